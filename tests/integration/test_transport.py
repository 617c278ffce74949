"""MqttTransport against real brokers: an embedded amqtt and a mosquitto process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.brokers import PYTHON, Broker, free_port, python_env, running_broker
from unus_edge.errors import ConnectError, SubscribeError
from unus_edge.transport import ConnectOptions, MqttTransport, ReceivedMessage, Will

BROKERS = ["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)]


def run(factory: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await factory()

    asyncio.run(bounded())


def options(broker: Broker, **kwargs: object) -> ConnectOptions:
    return ConnectOptions(host="127.0.0.1", port=broker.port, **kwargs)  # type: ignore[arg-type]


async def receive(transport: MqttTransport, count: int) -> list[ReceivedMessage]:
    received: list[ReceivedMessage] = []
    async for message in transport.messages():
        received.append(message)
        if len(received) == count:
            break
    return received


@pytest.mark.parametrize("kind", BROKERS)
def test_qos1_delivery_in_order(kind: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            async with MqttTransport(options(broker)) as subscriber, MqttTransport(options(broker)) as publisher:
                assert await subscriber.subscribe("test/qos1/#", qos=1) == 1
                for index in range(200):
                    await publisher.publish(f"test/qos1/{index % 3}", str(index).encode(), qos=1)
                received = await receive(subscriber, 200)
        assert [int(m.payload) for m in received] == list(range(200))
        assert {m.qos for m in received} == {1}

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_qos0_and_qos2_round_trip(kind: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            async with MqttTransport(options(broker)) as subscriber, MqttTransport(options(broker)) as publisher:
                await subscriber.subscribe("test/q2", qos=2)
                await publisher.publish("test/q2", b"exactly-once", qos=2)
                (message,) = await receive(subscriber, 1)
                assert message.payload == b"exactly-once"
                assert message.qos == 2
                await publisher.publish("test/q2", b"fire-and-forget", qos=0)
                (message,) = await receive(subscriber, 1)
                assert message.payload == b"fire-and-forget"

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_multi_megabyte_messages_arrive_intact(kind: str, tmp_path: Path) -> None:
    """Larger than any socket buffer, so every send and receive is partial (LargeMessageClient's paths)."""
    payloads = [secrets.token_bytes(6_000_000 + index) for index in range(3)]

    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            big = options(broker)
            async with MqttTransport(big) as subscriber, MqttTransport(big) as publisher:
                await subscriber.subscribe("test/large/+", qos=1)
                await asyncio.gather(*(publisher.publish(f"test/large/{qos}", payload, qos=qos)
                                       for qos, payload in zip((1, 0, 1), payloads, strict=True)))
                received = await receive(subscriber, len(payloads))
                await publisher.publish("test/large/model", payloads[0], qos=1, retain=True)
            async with MqttTransport(big) as late:
                await late.subscribe("test/large/model", qos=1)
                (retained,) = await receive(late, 1)
        assert sorted(m.payload for m in received) == sorted(payloads)
        assert {m.topic for m in received} == {"test/large/0", "test/large/1"}
        assert retained.payload == payloads[0] and retained.retain

    run(scenario, timeout=120)


@pytest.mark.parametrize("kind", BROKERS)
def test_subscribe_and_unsubscribe_back_to_back_fetch_exactly_the_retained_copy(kind: str, tmp_path: Path) -> None:
    """How a device fetches the model (device/_worker.fetch_model): the broker sends the retained
    copy for the SUBSCRIBE although the UNSUBSCRIBE follows at once, and nothing after it."""

    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            async with MqttTransport(options(broker)) as publisher, MqttTransport(options(broker)) as device:
                fetched = []
                for version in range(10):
                    await publisher.publish("test/fetch/model", f"v{version}".encode(), qos=1, retain=True)
                    await asyncio.gather(device.subscribe("test/fetch/model", qos=1),
                                         device.unsubscribe("test/fetch/model"))
                    (message,) = await receive(device, 1)
                    fetched.append(message.payload)
                await publisher.publish("test/fetch/model", b"not fetched", qos=1, retain=True)
                await device.subscribe("test/fetch/barrier", qos=1)  # a later message proves the queue is drained
                await publisher.publish("test/fetch/barrier", b"barrier", qos=1)
                (after,) = await receive(device, 1)
        assert fetched == [f"v{version}".encode() for version in range(10)]  # one copy per fetch, the latest
        assert after.payload == b"barrier"

    run(scenario)


@pytest.mark.mosquitto
def test_unsubscribing_while_the_broker_is_away_holds_after_the_persistent_session_resumes(tmp_path: Path) -> None:
    """A device drops its model subscription between fetches: a broker restart must neither hang
    the fetch nor leave the subscription in the persistent session (it would stream every model)."""

    async def scenario() -> None:
        async with running_broker("mosquitto", tmp_path, persistence=True) as broker:
            reconnected = asyncio.Event()
            persistent = options(broker, client_id="unsubscriber", clean_session=False, reconnect_min_delay=0.05,
                                 reconnect_max_delay=0.5)
            async with MqttTransport(persistent) as device:
                device.add_connection_listener(lambda session_present: reconnected.set())
                await device.subscribe("test/unsub/model", qos=1)
                await broker.stop()
                async with asyncio.timeout(10):  # neither call may wait for the broker's return
                    with contextlib.suppress(SubscribeError):
                        await asyncio.gather(device.subscribe("test/unsub/fetch", qos=1),
                                             device.unsubscribe("test/unsub/fetch"))
                    await device.unsubscribe("test/unsub/model")
                await broker.start()
                await reconnected.wait()
                await device.subscribe("test/unsub/barrier", qos=1)
                async with MqttTransport(options(broker)) as publisher:
                    await publisher.publish("test/unsub/model", b"must not arrive", qos=1)
                    await publisher.publish("test/unsub/fetch", b"must not arrive", qos=1)
                    await publisher.publish("test/unsub/barrier", b"barrier", qos=1)
                (message,) = await receive(device, 1)
        assert message.payload == b"barrier"

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_retained_message_reaches_late_subscriber(kind: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            async with MqttTransport(options(broker)) as publisher:
                await publisher.publish("test/retained/model", b"version-7", qos=1, retain=True)
            async with MqttTransport(options(broker)) as late:
                await late.subscribe("test/retained/+", qos=1)
                (message,) = await receive(late, 1)
        assert message.payload == b"version-7"
        assert message.retain

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_a_client_gets_no_retained_message_it_did_not_subscribe_to(kind: str, tmp_path: Path) -> None:
    """amqtt 0.12 sent a connecting client the retained messages of every filter anyone had
    subscribed to (``unus_edge/_amqtt_fixes.py``); Mosquitto is the control."""

    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            async with MqttTransport(options(broker)) as publisher, MqttTransport(options(broker)) as watcher:
                await publisher.publish("test/private/model", b"secret", qos=1, retain=True)
                await watcher.subscribe("test/private/#", qos=1)
                (seen,) = await receive(watcher, 1)
                assert seen.payload == b"secret"
                async with MqttTransport(options(broker)) as newcomer:
                    await newcomer.subscribe("test/probe", qos=1)
                    await publisher.publish("test/probe", b"probe", qos=1)
                    (first,) = await receive(newcomer, 1)
        assert (first.topic, first.payload) == ("test/probe", b"probe")

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_a_fetch_gets_one_model_when_a_publication_follows_its_suback(kind: str, tmp_path: Path) -> None:
    """A device fetches the retained model with SUBSCRIBE and UNSUBSCRIBE back to back. amqtt 0.12
    kept the subscription until the retained copy's PUBACK, so a publication right after the SUBACK
    reached the device as well: two models (``unus_edge/_amqtt_fixes.py``, the fourth defect).
    Mosquitto is the control."""

    received: list[list[bytes]] = []

    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            async with MqttTransport(options(broker)) as publisher, MqttTransport(options(broker)) as device:
                stream = device.messages()
                for _ in range(3):
                    await publisher.publish("test/fetch/model", b"old" * 3_000_000, qos=1, retain=True)
                    subscribed = asyncio.ensure_future(device.subscribe("test/fetch/model", qos=1))
                    unsubscribed = asyncio.ensure_future(device.unsubscribe("test/fetch/model"))
                    await subscribed
                    await publisher.publish("test/fetch/model", b"new", qos=1, retain=True)
                    await unsubscribed
                    await device.subscribe("test/fetch/marker", qos=1)
                    await publisher.publish("test/fetch/marker", b"end", qos=1)
                    models: list[bytes] = []
                    async for message in stream:
                        if message.topic == "test/fetch/marker":
                            break
                        models.append(message.payload[:3])
                    await device.unsubscribe("test/fetch/marker")
                    received.append(models)

    run(scenario)
    assert received == [[b"old"]] * 3


_FETCHER = """
import asyncio, sys
from unus_edge.transport import ConnectOptions, MqttTransport
async def main():
    options = ConnectOptions(port=int(sys.argv[1]), client_id="fetcher", clean_session=False, keepalive=60)
    async with MqttTransport(options) as transport:
        await transport.subscribe("test/killed/model", qos=int(sys.argv[2]))
        print("subscribed", flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.mark.parametrize(("kind", "fetch_qos"), [
    ("amqtt", 0), pytest.param("mosquitto", 0, marks=pytest.mark.mosquitto),
    pytest.param("mosquitto", 1, marks=pytest.mark.mosquitto, id="mosquitto-qos1-control"),
])
def test_a_device_killed_during_a_fetch_gets_no_queued_models_when_it_returns(kind: str, fetch_qos: int,
                                                                               tmp_path: Path) -> None:
    """A device holds the model subscription while it waits for a newer model (protocol.md,
    "Model delivery"). Killed then, its persistent session keeps the subscription: at QoS 1 the
    broker queues every model published while it is away and delivers them all when it returns,
    before the new daemon can unsubscribe (the QoS 1 case is the control, on Mosquitto, whose
    offline queue this is; amqtt's QoS 1 behaviour is not what the device relies on). Devices
    fetch at QoS 0, which no broker queues for an offline client: at most the retained copy
    comes back (amqtt re-sends retained messages to a returning session's subscriptions)."""
    models: list[bytes] = []

    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker, MqttTransport(options(broker)) as aggregator:
            fetcher = await asyncio.create_subprocess_exec(
                PYTHON, "-c", _FETCHER, str(broker.port), str(fetch_qos), stdout=asyncio.subprocess.PIPE,
                env=python_env())
            assert fetcher.stdout is not None
            assert (await fetcher.stdout.readline()).strip() == b"subscribed"
            fetcher.kill()
            await fetcher.wait()
            for version in range(5):
                await aggregator.publish("test/killed/model", f"model {version}".encode(), qos=1, retain=True)
            returning = ConnectOptions(host="127.0.0.1", port=broker.port, client_id="fetcher", clean_session=False)
            async with MqttTransport(returning) as device:
                await device.subscribe("test/killed/marker", qos=1)
                await aggregator.publish("test/killed/marker", b"end", qos=1)
                async for message in device.messages():
                    if message.topic == "test/killed/marker":
                        break
                    models.append(message.payload)

    run(scenario)
    if fetch_qos == 0:
        assert models in ([], [b"model 4"])  # nothing queued; at most the retained copy
    else:
        assert models == [f"model {version}".encode() for version in range(5)]  # what QoS 1 would cost


_VICTIM = """
import asyncio, sys
from unus_edge.transport import ConnectOptions, MqttTransport, Will
async def main():
    will = Will("test/will/victim", b"offline", qos=1, retain=True)
    async with MqttTransport(ConnectOptions(port=int(sys.argv[1]), client_id="victim", will=will, keepalive=60)):
        print("connected", flush=True)
        await asyncio.Event().wait()
asyncio.run(main())
"""


@pytest.mark.parametrize("kind", BROKERS)
def test_last_will_delivered_when_client_process_is_killed(kind: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            async with MqttTransport(options(broker)) as watcher:
                await watcher.subscribe("test/will/#", qos=1)
                victim = await asyncio.create_subprocess_exec(
                    PYTHON, "-c", _VICTIM, str(broker.port), stdout=asyncio.subprocess.PIPE, env=python_env()
                )
                assert victim.stdout is not None
                assert (await victim.stdout.readline()).strip() == b"connected"
                victim.kill()  # SIGKILL: no DISCONNECT, the kernel closes the socket
                await victim.wait()
                (will,) = await receive(watcher, 1)
        assert will.topic == "test/will/victim"
        assert will.payload == b"offline"

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_graceful_close_does_not_fire_the_will(kind: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            async with MqttTransport(options(broker)) as watcher:
                await watcher.subscribe("test/will/#", qos=1)
                will = Will("test/will/polite", b"offline")
                async with MqttTransport(options(broker, will=will)):
                    pass
                # A marker published after the close must be the first thing the watcher sees.
                async with MqttTransport(options(broker)) as publisher:
                    await publisher.publish("test/will/marker", b"marker")
                (first,) = await receive(watcher, 1)
        assert first.topic == "test/will/marker"

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_persistent_session_gets_messages_sent_while_offline(kind: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            device = options(broker, client_id=f"persist-{secrets.token_hex(3)}", clean_session=False)
            async with MqttTransport(device) as transport:
                await transport.subscribe("test/tasks/d1", qos=1)
            async with MqttTransport(options(broker)) as publisher:
                for index in range(5):
                    await publisher.publish("test/tasks/d1", f"task-{index}".encode(), qos=1)
            async with MqttTransport(device) as transport:
                received = await receive(transport, 5)
        assert [m.payload for m in received] == [f"task-{i}".encode() for i in range(5)]

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_reconnects_and_resubscribes_after_broker_restart(kind: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            reconnected = asyncio.Event()
            connections: list[bool] = []

            def on_connect(session_present: bool) -> None:
                connections.append(session_present)
                if len(connections) > 1:
                    reconnected.set()

            fast = options(broker, reconnect_min_delay=0.05, reconnect_max_delay=0.5)
            async with MqttTransport(fast) as subscriber:
                subscriber.add_connection_listener(on_connect)
                connections.append(False)  # the initial connection happened before the listener
                await subscriber.subscribe("test/restart/#", qos=1)
                await broker.restart()
                await reconnected.wait()
                assert subscriber.reconnections >= 1
                # Retained, so the subscriber gets it whether its re-subscription or the
                # publish reaches the broker first; it gets it only if it re-subscribed.
                async with MqttTransport(options(broker)) as publisher:
                    await publisher.publish("test/restart/after", b"still here", qos=1, retain=True)
                (message,) = await receive(subscriber, 1)
        assert message.payload == b"still here"

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_publish_while_disconnected_completes_after_reconnect(kind: str, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            fast = options(broker, reconnect_min_delay=0.05, reconnect_max_delay=0.5)
            async with MqttTransport(fast) as publisher:
                await broker.stop()
                await publisher._lost.wait()  # the transport noticed the loss
                assert not publisher.connected
                pending = asyncio.create_task(publisher.publish("test/offline/q", b"queued", qos=1, retain=True))
                await asyncio.sleep(0)
                assert not pending.done()
                await broker.start()
                await pending  # completes once the reconnection delivered it
            async with MqttTransport(options(broker)) as reader:
                await reader.subscribe("test/offline/q")
                (message,) = await receive(reader, 1)
        assert message.payload == b"queued"

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_full_receive_queue_pauses_reading_and_loses_nothing(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            async with MqttTransport(options(broker, max_queued_messages=10)) as subscriber, MqttTransport(
                options(broker)
            ) as publisher:
                await subscriber.subscribe("test/flood", qos=1)
                for index in range(300):
                    await publisher.publish("test/flood", index.to_bytes(2, "big"), qos=1)
                received = await receive(subscriber, 300)
        assert [int.from_bytes(m.payload, "big") for m in received] == list(range(300))

    with caplog.at_level(logging.WARNING, logger="unus_edge.transport"):
        run(scenario)
    assert any("receive queue full" in record.getMessage() for record in caplog.records)


def test_connect_to_closed_port_raises_connect_error() -> None:
    async def scenario() -> None:
        with pytest.raises(ConnectError) as caught:
            async with MqttTransport(ConnectOptions(port=free_port())):
                pass
        assert caught.value.port > 0

    run(scenario)


@pytest.mark.parametrize("kind", BROKERS)
def test_byte_bound_of_the_receive_queue_pauses_reading(
    kind: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with running_broker(kind, tmp_path) as broker:
            bounded = options(broker, max_queued_bytes=50_000)
            async with MqttTransport(bounded) as subscriber, MqttTransport(options(broker)) as publisher:
                await subscriber.subscribe("test/big", qos=1)
                for index in range(40):
                    await publisher.publish("test/big", index.to_bytes(2, "big") + b"\0" * 10_000, qos=1)
                received = await receive(subscriber, 40)
                assert subscriber._queued_bytes == 0
        assert [int.from_bytes(m.payload[:2], "big") for m in received] == list(range(40))

    with caplog.at_level(logging.WARNING, logger="unus_edge.transport"):
        run(scenario)
    assert any("receive queue full" in record.getMessage() and "bytes" in record.getMessage()
               for record in caplog.records)
