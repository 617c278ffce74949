"""Transport throughput through each broker, against a bare paho client pair in the same run.

For each broker (the embedded amqtt as its own process, and mosquitto) and each load
(1 MB payloads at QoS 1, in MB/s; 100 B payloads at QoS 1, in msg/s) it measures:

* floor: two bare paho clients with their network threads (``loop_start``), the publisher
  queueing every message at once;
* ours: two :class:`unus_edge.transport.MqttTransport` in one event loop, every ``publish``
  awaited for its PUBACK (all issued concurrently).

Both use the same in-flight window (100). Throughput = messages / time from the first publish
to the last message received. Goal: ours >= 70% of the floor.

    python bench/bench_transport.py [--quick] [--broker amqtt|mosquitto|both]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from unus_edge.transport import ConnectOptions, MqttTransport

INFLIGHT = 100


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    """Wait for the broker's listening socket: connect attempts bounded in number and time."""
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError("broker exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.05):
            return
        time.sleep(0.05)  # a benchmark harness outside the library: bounded start-up wait
    raise RuntimeError(f"broker did not listen on {port}")


@contextlib.contextmanager
def broker_process(kind: str) -> Iterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        if kind == "mosquitto":
            binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            config = Path(workdir) / "m.conf"
            config.write_text(
                f"user {getpass.getuser()}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                "persistence false\nmax_queued_messages 1000000\nmax_inflight_messages 0\n"
                "max_packet_size 67108864\n"
            )
            command = [binary, "-c", str(config)]
        else:
            command = [sys.executable, "-m", "unus_edge.cli", "-q", "broker", "--port", str(port)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port, process)
            yield port
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)


def paho_pair(port: int, payload: bytes, count: int, topic: str) -> float:
    received = 0
    done = threading.Event()
    subscribed = threading.Event()
    connected = threading.Event()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        nonlocal received
        received += 1
        if received == count:
            done.set()

    subscriber = paho.Client(CallbackAPIVersion.VERSION2)
    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *args: subscribed.set()
    subscriber.connect("127.0.0.1", port)
    subscriber.loop_start()
    subscriber.subscribe(topic, qos=1)
    publisher = paho.Client(CallbackAPIVersion.VERSION2)
    publisher.max_inflight_messages_set(INFLIGHT)
    publisher.on_connect = lambda *args: connected.set()
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    if not (subscribed.wait(10) and connected.wait(10)):
        raise RuntimeError("paho clients did not connect")
    start = time.perf_counter()
    infos = [publisher.publish(topic, payload, qos=1) for _ in range(count)]
    if not done.wait(300):
        raise RuntimeError(f"paho pair received {received}/{count}")
    elapsed = time.perf_counter() - start
    for info in infos:
        info.wait_for_publish(10)
    for client in (publisher, subscriber):
        client.disconnect()
        client.loop_stop()
    return elapsed


async def ours(port: int, payload: bytes, count: int, topic: str) -> float:
    options = ConnectOptions(port=port, max_inflight=INFLIGHT, max_queued_messages=max(count, 10))
    async with MqttTransport(options) as subscriber, MqttTransport(options) as publisher:
        await subscriber.subscribe(topic, qos=1)

        async def consume() -> None:
            received = 0
            async for _ in subscriber.messages():
                received += 1
                if received == count:
                    return

        consumer = asyncio.create_task(consume())
        start = time.perf_counter()
        async with asyncio.timeout(300):
            await asyncio.gather(*(publisher.publish(topic, payload, qos=1) for _ in range(count)))
            await consumer
        return time.perf_counter() - start


def measure(kind: str, quick: bool) -> list[tuple[str, str, float, float]]:
    loads = [
        ("1 MB QoS 1", b"\xab" * 1_000_000, 40 if quick else 200, "MB/s"),
        ("100 B QoS 1", b"\xcd" * 100, 2_000 if quick else 20_000, "msg/s"),
    ]
    rows = []
    with broker_process(kind) as port:
        for name, payload, count, unit in loads:
            scale = len(payload) / 1e6 if unit == "MB/s" else 1.0
            floor_rates, our_rates = [], []
            for attempt in range(2 if quick else 3):  # interleaved, best of each
                floor_rates.append(count * scale / paho_pair(port, payload, count, f"bench/floor/{attempt}"))
                our_rates.append(count * scale / asyncio.run(ours(port, payload, count, f"bench/ours/{attempt}")))
            rows.append((name, unit, max(floor_rates), max(our_rates)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--broker", choices=["amqtt", "mosquitto", "both"], default="both")
    args = parser.parse_args()
    kinds = ["amqtt", "mosquitto"] if args.broker == "both" else [args.broker]
    print(f"{'broker':10} {'load':12} {'bare paho':>12} {'unus-edge':>12} {'ratio':>7}   (goal >= 0.70)")
    for kind in kinds:
        for name, unit, floor, rate in measure(kind, args.quick):
            print(f"{kind:10} {name:12} {floor:9.1f} {unit:5} {rate:6.1f} {unit:5} {rate / floor:6.2f}")


if __name__ == "__main__":
    main()
