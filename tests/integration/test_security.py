"""Provisioning, the ACL and the gateway's Mosquitto drop-in, against a real Mosquitto.

The broker runs ``deploy/raspberry-pi/mosquitto-unus-edge.conf`` as shipped (paths and ports
moved into a temporary folder), included from a main file laid out like Debian's, with the
password file, ACL and certificates that ``unus-edge provision`` generated. Mosquitto 2.0
acknowledges a denied PUBLISH and grants every SUBSCRIBE, so a denial shows as silence: every
check that something did *not* arrive waits for a marker sent after it on a path that is
allowed (Mosquitto handles a client's packets in order and queues to each subscriber in order),
never for a delay. TLS failure modes (plain MQTT to the TLS port, a wrong host name, an unknown
CA) are covered by test_mosquitto_configs.py and not repeated here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import stat
import subprocess
import tomllib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import PYTHON, REPO, MosquittoBroker, free_port, python_env, require_mosquitto
from tests.secure_gateway import Fleet, SecureBroker, provision
from unus_edge import topics
from unus_edge._acl import ACL_TEMPLATE
from unus_edge._passwords import hash_password, read_password_file, verify_password
from unus_edge.device import load_release
from unus_edge.errors import ConnectError
from unus_edge.provision import redacted
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MqttTransport, ReceivedMessage, TLSOptions

JOB = "sec"
DEVICES = ("pi-a", "pi-b", "pi-c")
CLI = [PYTHON, "-m", "unus_edge.cli"]


def run(factory: Callable[[], Coroutine[Any, Any, None]], timeout: float = 60.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await factory()

    asyncio.run(bounded())


def provision_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "-v", "provision", *args], capture_output=True, text=True, env=python_env(),
                          timeout=60, check=False)


# ---------------------------------------------------------------------------- the fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    """Job "sec" with three devices, and job "other" with pi-x, provisioned into one folder."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("fleet")
    provision(out, "other", ["pi-x"])
    return provision(out, JOB, DEVICES)


@pytest.fixture
def broker(tmp_path: Path, fleet: Fleet) -> SecureBroker:
    require_mosquitto()
    return SecureBroker(tmp_path, fleet.gateway)


@pytest.fixture
def secured(broker: SecureBroker) -> Callable[..., None]:
    """Run a scenario with the broker up."""

    def runner(scenario: Callable[[], Coroutine[Any, Any, None]], timeout: float = 60.0) -> None:
        async def wrapped() -> None:
            await broker.broker.start()
            try:
                await scenario()
            finally:
                await broker.broker.stop()

        run(wrapped, timeout)

    return runner


def connect(fleet: Fleet, broker: SecureBroker, user: str, *, tls: bool = True, password: str | None = None,
            client_id: str = "") -> MqttTransport:
    """A transport as ``user``: devices over TLS, the aggregator and the monitor on loopback."""
    options = ConnectOptions(
        port=broker.tls_port if tls else broker.plain_port, client_id=client_id, username=user,
        password=fleet.password(user) if password is None else password,
        tls=TLSOptions(ca_file=fleet.ca_file) if tls else None,
    )
    return MqttTransport(options)


def device_topic(device: str, channel: Channel, job: str = JOB) -> str:
    return topics.device_topic(job, device, channel)


async def until_marker(client: MqttTransport, topic: str, payload: bytes) -> list[ReceivedMessage]:
    """Every message ``client`` receives, up to and including the marker."""
    seen: list[ReceivedMessage] = []
    async for message in client.messages():
        seen.append(message)
        if message.topic == topic and message.payload == payload:
            return seen
    raise AssertionError("the connection closed before the marker arrived")


@pytest.fixture
def aggregator_subscriptions() -> list[str]:
    return [topics.device_filter(JOB, channel)
            for channel in (Channel.STATUS, Channel.HEARTBEAT, Channel.REGISTER, Channel.UPDATE)]


# ---------------------------------------------------------------------------- provisioning


def test_acl_template_is_the_built_in_one() -> None:
    assert (REPO / "broker" / "acl.template").read_text() == ACL_TEMPLATE


def test_password_hashes_are_mosquitto_passwd_hashes(tmp_path: Path) -> None:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    made = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(made), "alice", "correct horse"], check=True)
    hashed = read_password_file(made)["alice"]
    assert verify_password(hashed, "correct horse")
    assert not verify_password(hashed, "correct hors")
    _, _, iterations, salt, _ = hashed.split("$")
    assert hash_password("correct horse", salt=base64.b64decode(salt), iterations=int(iterations)) == hashed


def test_provision_writes_secrets_0600_never_prints_them_and_runs_again(tmp_path: Path) -> None:
    out = tmp_path / "fleet"
    first = provision_cli("--job", "j", "--devices", "d1", "d2", "--gateway", "gw.example", "--out", str(out),
                          "--client-certs")
    assert first.returncode == 0, first.stderr
    secrets_ = [out / "ca.key", out / "gateway" / "server.key", out / "gateway" / "mosquitto.passwd",
                out / "gateway" / "aggregator-j.password", out / "gateway" / "monitor.password",
                out / "devices" / "d1" / "password", out / "devices" / "d1" / "d1.key",
                out / "devices" / "d1" / "app.password", out / "devices" / "d1" / "app.key"]
    for path in secrets_:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    passwords = {path.read_text().strip() for path in out.rglob("*.password")} | {
        (out / "devices" / d / "password").read_text().strip() for d in ("d1", "d2")}
    assert len(passwords) == 6 and all(len(p) >= 40 for p in passwords)  # + app@d1, app@d2
    logs = first.stdout + first.stderr
    assert "DEBUG" in logs and "device.toml" in logs  # -v logged the configurations...
    for password in passwords:  # ...and no secret
        assert password not in logs
        for path in out.rglob("*"):
            if path.is_file() and path.suffix in (".toml", ".acl", ".json"):
                assert password not in path.read_text(), path
    device = (out / "devices" / "d1" / "device.toml").read_text()
    assert 'url = "mqtts://gw.example:8883"' in device and 'username = "d1"' in device
    assert 'password_file = "/etc/unus-edge/password"' in device and 'cert_file = "/etc/unus-edge/d1.crt"' in device
    predict = tomllib.loads(device)["predict"]  # the local applications' own identity
    assert predict == {"username": "app@d1", "password_file": "/etc/unus-edge/app.password",
                       "cert_file": "/etc/unus-edge/app.crt", "key_file": "/etc/unus-edge/app.key"}
    assert "CN = app@d1" in subprocess.run(["openssl", "x509", "-noout", "-subject", "-in",
                                            str(out / "devices" / "d1" / "app.crt")],
                                           capture_output=True, text=True, check=True).stdout
    assert redacted({"broker": {"password": "x", "url": "u"}}) == {"broker": {"password": "***", "url": "u"}}
    job = tomllib.loads((out / "gateway" / "j.toml").read_text())["job"]
    assert (job["min_devices"], job["min_fraction"]) == (1, 0.5)  # a quorum that fits 2 devices, not 1 and 0

    # Again, adding a device and revoking one: existing secrets and certificates are kept.
    kept = {path: path.read_bytes() for path in (out / "devices" / "d1" / "password", out / "gateway" / "server.crt",
                                                 out / "ca.crt", out / "gateway" / "monitor.password")}
    second = provision_cli("--job", "j", "--devices", "d3", "--revoke", "d2", "--out", str(out))
    assert second.returncode == 0, second.stderr
    assert all(path.read_bytes() == content for path, content in kept.items())
    assert not (out / "devices" / "d2").exists()
    hashes = read_password_file(out / "gateway" / "mosquitto.passwd")
    assert sorted(hashes) == ["aggregator-j", "app@d1", "app@d3", "d1", "d3", "monitor"]
    assert verify_password(hashes["d1"], (out / "devices" / "d1" / "password").read_text().strip())
    acl = (out / "gateway" / "mosquitto.acl").read_text()
    assert "user d3\n" in acl and "user d2\n" not in acl
    assert 'url = "mqtts://gw.example:8883"' in (out / "devices" / "d3" / "device.toml").read_text()  # remembered
    assert tomllib.loads((out / "gateway" / "j.toml").read_text())["job"]["min_devices"] == 1  # d1, d3: half is 1

    rotated = provision_cli("--job", "j", "--rotate", "d1", "--out", str(out))
    assert rotated.returncode == 0, rotated.stderr
    assert (out / "devices" / "d1" / "password").read_bytes() != kept[out / "devices" / "d1" / "password"]

    refused = provision_cli("--job", "j", "--devices", "monitor", "--out", str(out))
    assert refused.returncode == 2 and "reserved" in refused.stderr


# ---------------------------------------------------------------------------- the broker


def test_authentication(fleet: Fleet, broker: SecureBroker, secured: Any) -> None:
    async def scenario() -> None:
        for tls in (True, False):
            with pytest.raises(ConnectError, match="refused"):  # anonymous, on both listeners
                async with MqttTransport(ConnectOptions(port=broker.tls_port if tls else broker.plain_port,
                                                        tls=TLSOptions(ca_file=fleet.ca_file) if tls else None)):
                    pass
            with pytest.raises(ConnectError, match="refused"):  # a wrong password
                async with connect(fleet, broker, "pi-a", tls=tls, password=fleet.password("pi-b")):
                    pass
        with pytest.raises(ConnectError, match="refused"):  # a revoked or unknown user
            async with connect(fleet, broker, "pi-z", password="whatever"):
                pass
        # A device cannot take over another device's session with its client id: on the TLS
        # listener the client id is the username.
        async with connect(fleet, broker, "pi-b", client_id=f"unus-{JOB}-pi-b") as victim:
            async with connect(fleet, broker, "pi-a", client_id=f"unus-{JOB}-pi-b") as intruder:
                assert intruder.connected
                await victim.publish(device_topic("pi-b", Channel.HEARTBEAT), b"still here", qos=1)
                assert victim.connected and victim.reconnections == 0
        assert "already connected, closing old connection" not in broker.log
        assert re.search(r"New client connected .* as pi-a \(.*u'pi-a'\)", broker.log)

    secured(scenario)


def test_a_device_cannot_publish_as_another_device(fleet: Fleet, broker: SecureBroker, secured: Any,
                                                   aggregator_subscriptions: list[str]) -> None:
    forged = [device_topic("pi-b", channel) for channel in (Channel.UPDATE, Channel.REGISTER, Channel.STATUS,
                                                             Channel.HEARTBEAT)]
    forged.append(device_topic("pi-x", Channel.UPDATE))  # its own id, but a job it is not in

    async def scenario() -> None:
        async with connect(fleet, broker, "aggregator-sec", tls=False) as aggregator:
            for topic_filter in aggregator_subscriptions:
                await aggregator.subscribe(topic_filter)
            async with connect(fleet, broker, "pi-a") as device_a, connect(fleet, broker, "pi-x") as device_x:
                for topic in forged[:-1]:
                    await device_a.publish(topic, b"forged by pi-a", qos=1)  # acknowledged, then dropped
                await device_x.publish(forged[-1], b"forged by pi-x", qos=1)
                marker = device_topic("pi-a", Channel.UPDATE)
                await device_a.publish(marker, b"marker", qos=1)
                seen = await until_marker(aggregator, marker, b"marker")
        assert [m.topic for m in seen] == [marker], "the aggregator received a forged message"
        for topic in forged:
            await broker.wait_for_log(f"Denied PUBLISH from .*'{re.escape(topic)}'")

    secured(scenario)


def test_a_device_cannot_overwrite_the_model_clock_or_tasks(fleet: Fleet, broker: SecureBroker, secured: Any) -> None:
    model, clock = topics.model(JOB), topics.clock(JOB)

    async def scenario() -> None:
        async with connect(fleet, broker, "aggregator-sec", tls=False) as aggregator:
            await aggregator.publish(model, b"model v1", retain=True)
            await aggregator.publish(clock, b"clock v1", retain=True)
            async with connect(fleet, broker, "pi-a") as device_a:
                for topic in (model, clock, topics.aggregator_status(JOB), topics.metrics(JOB, "round")):
                    await device_a.publish(topic, b"forged", qos=1, retain=True)
                    await device_a.publish(topic, b"", qos=1, retain=True)  # clearing a retained message
                for device in ("pi-a", "pi-b"):  # nobody but the aggregator writes tasks
                    await device_a.publish(device_topic(device, Channel.TASKS), b"forged task", qos=1)
            async with connect(fleet, broker, "pi-b") as device_b:
                await device_b.subscribe(device_topic("pi-b", Channel.TASKS))
                await device_b.subscribe(model)
                await device_b.subscribe(clock)
                marker = device_topic("pi-b", Channel.TASKS)
                await aggregator.publish(marker, b"marker task", qos=1)
                seen = await until_marker(device_b, marker, b"marker task")
        assert sorted((m.topic, m.payload) for m in seen) == sorted(
            [(model, b"model v1"), (clock, b"clock v1"), (marker, b"marker task")])

    secured(scenario)


def test_a_device_reads_only_its_own_tasks_and_the_shared_state(fleet: Fleet, broker: SecureBroker,
                                                                secured: Any) -> None:
    async def scenario() -> None:
        async with connect(fleet, broker, "aggregator-sec", tls=False) as aggregator, \
                connect(fleet, broker, "pi-a") as device_a, connect(fleet, broker, "pi-b") as device_b:
            # Mosquitto 2.0 grants these subscriptions (SUBACK QoS 1)... and delivers nothing forbidden.
            for topic_filter in ("#", f"unus/v1/{JOB}/#", topics.device_filter(JOB, Channel.UPDATE),
                                 device_topic("pi-b", Channel.UPDATE), device_topic("pi-b", Channel.TASKS),
                                 topics.job_filter("other")):
                await device_a.subscribe(topic_filter)
            for channel in (Channel.UPDATE, Channel.REGISTER, Channel.STATUS, Channel.HEARTBEAT):
                await device_b.publish(device_topic("pi-b", channel), b"pi-b's", qos=1)
            await aggregator.publish(device_topic("pi-b", Channel.TASKS), b"pi-b's task", qos=1)
            await aggregator.publish(topics.metrics(JOB, "round"), b"{}", qos=1)
            await aggregator.publish(topics.model(JOB), b"model", qos=1)
            marker = device_topic("pi-a", Channel.TASKS)
            await aggregator.publish(marker, b"marker", qos=1)
            seen = await until_marker(device_a, marker, b"marker")
        received = {m.topic for m in seen}
        assert received == {topics.model(JOB), marker}, received

    secured(scenario)


def test_predictions_stay_between_a_device_and_its_own_identity(fleet: Fleet, broker: SecureBroker,
                                                                secured: Any) -> None:
    """pi-a's local application (app@pi-a, its own identity: the broker holds one connection per
    username) asks pi-a's daemon; pi-b, pi-b's application and the aggregator can neither read
    the answers nor ask in pi-a's name (the ACL's predict lines)."""

    async def scenario() -> None:
        async with connect(fleet, broker, "aggregator-sec", tls=False) as aggregator, \
                connect(fleet, broker, "pi-a") as daemon, connect(fleet, broker, "app@pi-a") as app, \
                connect(fleet, broker, "pi-b") as device_b, connect(fleet, broker, "app@pi-b") as app_b:
            request = device_topic("pi-a", Channel.PREDICT_REQUEST)
            response = device_topic("pi-a", Channel.PREDICT_RESPONSE)
            await daemon.subscribe(request)
            await app.subscribe(response)
            for client in (device_b, aggregator, app_b):
                await client.subscribe(f"unus/v1/{JOB}/devices/pi-a/predict/#")
            for client in (device_b, app_b, aggregator):  # denied: dropped by the broker
                await client.publish(request, b"asked in pi-a's name", qos=1)
                await client.publish(response, b"answered in pi-a's name", qos=1)
            await app.publish(response, b"the application answers", qos=1)  # denied: it only asks
            await daemon.publish(request, b"the daemon asks", qos=1)  # denied: it only answers
            await app.publish(request, b"inputs", qos=1)
            (asked,) = await until_marker(daemon, request, b"inputs")
            assert asked.payload == b"inputs"  # no other request reached the daemon
            await daemon.publish(response, b"answer", qos=1)
            assert [m.payload for m in await until_marker(app, response, b"answer")] == [b"answer"]
            marker_b, marker_aggregator = device_topic("pi-b", Channel.TASKS), device_topic("pi-a", Channel.UPDATE)
            await aggregator.subscribe(marker_aggregator)
            await device_b.subscribe(marker_b)
            await aggregator.publish(marker_b, b"marker", qos=1)
            await daemon.publish(marker_aggregator, b"marker", qos=1)
            marker_app_b = device_topic("pi-b", Channel.PREDICT_RESPONSE)
            await app_b.subscribe(marker_app_b)
            await device_b.publish(marker_app_b, b"marker", qos=1)
            seen_b = await until_marker(device_b, marker_b, b"marker")
            seen_aggregator = await until_marker(aggregator, marker_aggregator, b"marker")
            seen_app_b = await until_marker(app_b, marker_app_b, b"marker")
        assert {m.topic for m in seen_b} == {marker_b}
        assert {m.topic for m in seen_aggregator} == {marker_aggregator}
        assert {m.topic for m in seen_app_b} == {marker_app_b}

    secured(scenario)


def test_the_monitor_reads_metrics_and_statuses_only(fleet: Fleet, broker: SecureBroker, secured: Any) -> None:
    async def scenario() -> None:
        async with connect(fleet, broker, "aggregator-sec", tls=False) as aggregator, \
                connect(fleet, broker, "monitor", tls=False) as monitor, connect(fleet, broker, "pi-b") as device_b:
            await monitor.subscribe("#")
            await monitor.publish(topics.metrics(JOB, "round"), b"forged by the monitor", qos=1)
            await monitor.publish(device_topic("pi-b", Channel.TASKS), b"forged by the monitor", qos=1)
            for channel in (Channel.UPDATE, Channel.REGISTER, Channel.STATUS):
                await device_b.publish(device_topic("pi-b", channel), b"pi-b's", qos=1)
            await aggregator.publish(device_topic("pi-b", Channel.TASKS), b"task", qos=1)
            await aggregator.publish(topics.model(JOB), b"model", qos=1)
            marker = topics.metrics(JOB, "job")
            await aggregator.publish(marker, b"marker", qos=1)
            seen = await until_marker(monitor, marker, b"marker")
        assert [(m.topic, m.payload) for m in seen] == [(device_topic("pi-b", Channel.STATUS), b"pi-b's"),
                                                        (marker, b"marker")]

    secured(scenario)


# ---------------------------------------------------------------------------- a whole job


@pytest.mark.slow
def test_federated_job_over_tls_and_acl_with_three_device_processes(fleet: Fleet, broker: SecureBroker,
                                                                    secured: Any, tmp_path: Path) -> None:
    split = subprocess.run([*CLI, "data", "split", "--dataset", "synthetic", "--devices", "3", "--train-examples",
                            "1500", "--out", str(tmp_path / "parts")], capture_output=True, text=True,
                           env=python_env(), timeout=120, check=False)
    assert split.returncode == 0, split.stderr

    async def scenario() -> None:
        plain, tls = f"mqtt://127.0.0.1:{broker.plain_port}", f"mqtts://localhost:{broker.tls_port}"
        metrics: list[tuple[str, dict[str, Any]]] = []
        async with connect(fleet, broker, "monitor", tls=False) as monitor:
            await monitor.subscribe(topics.metrics_filter(JOB))
            await monitor.subscribe(topics.device_filter(JOB, Channel.STATUS))
            # Until the job is finished and the three devices said goodbye (retained JSON).
            collector = asyncio.create_task(collect_json(monitor, metrics))
            aggregator = await spawn(
                "aggregator", "--config", str(fleet.gateway / f"{JOB}.toml"), "--broker", plain,
                "--rounds", "3", "--checkpoint-dir", str(tmp_path / "checkpoint"),
                "--set", f"broker.password_file={fleet.gateway / 'aggregator-sec.password'}",
                "--set", "job.min_devices=3", "--set", "evaluation.dataset=synthetic",
                "--set", "evaluation.num_examples=500", "--set", "train.batch_size=20")
            devices = []
            for index, device in enumerate(DEVICES):
                bundle = fleet.out / "devices" / device
                devices.append(await spawn(
                    "device", "--config", str(bundle / "device.toml"), "--broker", tls,
                    "--data", str(tmp_path / "parts" / f"device_{index:03d}.npz"), "--exit-when-finished",
                    "--set", f"broker.password_file={bundle / 'password'}",
                    "--set", f"broker.ca_file={bundle / 'ca.crt'}", "--set", "device.heartbeat_interval=1",
                    "--set", f"device.release_dir={tmp_path / 'release' / device}"))
            try:
                out, err = await aggregator.communicate()
                assert aggregator.returncode == 0, err.decode()[-3000:]
                logs = [await device.communicate() for device in devices]
                assert all(d.returncode == 0 for d in devices), logs[0][1].decode()[-3000:]
                await collector
            finally:
                collector.cancel()
                for process in (aggregator, *devices):
                    if process.returncode is None:
                        process.kill()
        assert "finished after 3 rounds" in out.decode()
        rounds = [body["body"] for topic, body in metrics if topic.endswith("/metrics/round")]
        assert len(rounds) == 3
        assert rounds[-1]["eval_accuracy"] > rounds[0]["eval_accuracy"] > 0.1
        assert all(entry["num_updates"] == 3 and not entry["rejected"] for entry in rounds)
        # Each device's facts on its own topic (metrics/#: the ACL lets the aggregator write there).
        facts = {topic.rsplit("/", 1)[1]: body["body"] for topic, body in metrics if "/metrics/devices/" in topic}
        assert set(facts) == set(DEVICES) and all(entry["rounds_contributed"] == 3 for entry in facts.values())
        # The trained model came back to every device (the ACL lets them read `release`).
        for device in DEVICES:
            assert load_release(tmp_path / "release" / device).version == rounds[-1]["version"]
        # The devices came over TLS, under their own names, and the ACL denied nothing they did.
        for device in DEVICES:
            assert re.search(rf"New client connected from 127\.0\.0\.1:\d+ as {device} \(.*u'{device}'\)", broker.log)
        assert "Denied" not in broker.log

    secured(scenario, timeout=240)


async def spawn(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(*CLI, *args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=python_env())


async def collect_json(client: MqttTransport, into: list[tuple[str, dict[str, Any]]]) -> None:
    """Collect JSON messages until the job is finished and every device is offline."""
    offline: set[str] = set()
    finished = False
    async for message in client.messages():
        body = json.loads(message.payload)
        into.append((message.topic, body))
        if message.topic.endswith("/status") and body["body"]["state"] == "offline":
            offline.add(body["body"]["device_id"])
        finished = finished or (message.topic.endswith("/metrics/job") and body["body"]["state"] == "finished")
        if finished and offline == set(DEVICES):
            return


def test_provisioned_client_certificates_authenticate(tmp_path: Path) -> None:
    """--client-certs: for a broker that requires certificates (require_certificate true)."""
    require_mosquitto()
    fleet = provision(tmp_path / "fleet", "certs", ["pi-c1"], "--client-certs")
    bundle = fleet.out / "devices" / "pi-c1"
    port = free_port()
    broker = MosquittoBroker(tmp_path, extra_config="\n".join([
        f"listener {port} 127.0.0.1", f"cafile {fleet.ca_file}", f"certfile {fleet.gateway / 'server.crt'}",
        f"keyfile {fleet.gateway / 'server.key'}", "require_certificate true",
    ]))

    async def scenario() -> None:
        await broker.start()
        try:
            with_cert = TLSOptions(ca_file=fleet.ca_file, cert_file=str(bundle / "pi-c1.crt"),
                                   key_file=str(bundle / "pi-c1.key"))
            async with MqttTransport(ConnectOptions(port=port, tls=with_cert)) as client:
                assert client.connected
            with pytest.raises(ConnectError):
                async with MqttTransport(ConnectOptions(port=port, keepalive=2,
                                                        tls=TLSOptions(ca_file=fleet.ca_file))):
                    pass
        finally:
            await broker.stop()

    run(scenario)


def test_a_client_certificate_logs_in_as_its_own_device_whatever_name_it_gives(tmp_path: Path) -> None:
    """Issue 14: with require_certificate true, device 1's certificate and device 2's password
    logged in as device 2. With --client-certs the drop-in takes the identity from the
    certificate (use_identity_as_username): the same attempt is device 1, and the ACL keeps it
    off device 2's topics."""
    require_mosquitto()
    fleet = provision(tmp_path / "fleet", JOB, ["pi-c1", "pi-c2"], "--client-certs")
    assert "CLIENT_CERTS=1" in (fleet.gateway / "listeners.env").read_text()
    (tmp_path / "broker").mkdir()
    gateway = SecureBroker(tmp_path / "broker", fleet.gateway, client_certs=True)
    bundle = fleet.out / "devices" / "pi-c1"
    own_cert = TLSOptions(ca_file=fleet.ca_file, cert_file=str(bundle / "pi-c1.crt"),
                          key_file=str(bundle / "pi-c1.key"))
    seen: list[ReceivedMessage] = []

    async def scenario() -> None:
        await gateway.broker.start()
        try:
            async with connect(fleet, gateway, f"aggregator-{JOB}", tls=False) as aggregator:
                await aggregator.subscribe(topics.device_filter(JOB, Channel.UPDATE), qos=1)
                impostor = ConnectOptions(port=gateway.tls_port, username="pi-c2", password=fleet.password("pi-c2"),
                                          client_id=f"unus-{JOB}-pi-c2", tls=own_cert)
                async with MqttTransport(impostor) as client:
                    await client.publish(device_topic("pi-c2", Channel.UPDATE), b"forged", qos=1)
                    await client.publish(device_topic("pi-c1", Channel.UPDATE), b"marker", qos=1)
                    async with asyncio.timeout(20):
                        seen.extend(await until_marker(aggregator, device_topic("pi-c1", Channel.UPDATE), b"marker"))
                with pytest.raises(ConnectError):  # and no certificate, no connection, password or not
                    async with MqttTransport(ConnectOptions(port=gateway.tls_port, keepalive=2, username="pi-c2",
                                                            password=fleet.password("pi-c2"),
                                                            tls=TLSOptions(ca_file=fleet.ca_file))):
                        pass
        finally:
            await gateway.broker.stop()

    run(scenario)
    assert [m.topic for m in seen] == [device_topic("pi-c1", Channel.UPDATE)]  # the forged update never arrived


def test_provision_uses_a_given_ca_or_server_certificate(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    from unus_edge.provision import make_ca, make_certificate

    corporate = make_ca(tmp_path / "corporate", common_name="Corporate CA")
    fleet = provision(tmp_path / "a", "j", ["d1"], "--ca-cert", str(corporate.cert_file), "--ca-key",
                      str(corporate.key_file))
    assert not (fleet.out / "ca.key").exists()  # the given CA's key is used in place, not copied
    for copy in (fleet.out / "ca.crt", fleet.gateway / "ca.crt", fleet.out / "devices" / "d1" / "ca.crt"):
        assert copy.read_bytes() == corporate.cert_file.read_bytes()
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(corporate.cert_file),
                             str(fleet.gateway / "server.crt")], capture_output=True, text=True, check=False)
    assert verify.returncode == 0, verify.stderr
    provision(tmp_path / "a", "j", ["d2"])  # a later run remembers where the CA key is
    assert (fleet.out / "devices" / "d2" / "ca.crt").read_bytes() == corporate.cert_file.read_bytes()

    server = make_certificate(tmp_path / "corporate", "gw", corporate, hosts=("gw.corp",))
    given = provision(tmp_path / "b", "j", ["d1"], "--ca-cert", str(corporate.cert_file), "--server-cert",
                      str(server.cert_file), "--server-key", str(server.key_file))
    assert (given.gateway / "server.crt").read_bytes() == server.cert_file.read_bytes()
    assert stat.S_IMODE((given.gateway / "server.key").stat().st_mode) == 0o600


def test_the_embedded_broker_takes_a_mosquitto_password_file(tmp_path: Path) -> None:
    """``unus-edge broker --password-file``: the file `provision` writes for Mosquitto works for amqtt too."""
    from unus_edge._passwords import render_password_file
    from unus_edge.broker import EmbeddedBroker, _loopback, load_users
    from unus_edge.errors import ConfigError

    passwords = tmp_path / "passwd"
    passwords.write_text(render_password_file({"pi-a": hash_password("right")}))

    async def scenario() -> None:
        async with asyncio.timeout(60), EmbeddedBroker(port=0, users=load_users(str(passwords))) as broker:
            async with MqttTransport(ConnectOptions(port=broker.port, username="pi-a", password="right")) as client:
                assert client.connected
            for username, password in (("pi-a", "wrong"), ("pi-z", "right"), (None, None)):
                with pytest.raises(ConnectError, match="refused"):
                    async with MqttTransport(ConnectOptions(port=broker.port, username=username, password=password)):
                        pass

    asyncio.run(scenario())
    for content in (None, "# nobody\n"):
        path = tmp_path / f"bad-{content is None}"
        if content is not None:
            path.write_text(content)
        with pytest.raises(ConfigError, match="password-file"):
            load_users(str(path))
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("gateway.local")
