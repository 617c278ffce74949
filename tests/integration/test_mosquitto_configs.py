"""The shipped Mosquitto configs load, and TLS + passwords work through the transport."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.brokers import REPO, RUN_AS, MosquittoBroker, free_port, require_mosquitto
from unus_edge.errors import ConnectError
from unus_edge.provision import make_ca, make_certificate
from unus_edge.transport import ConnectOptions, MqttTransport, TLSOptions

pytestmark = pytest.mark.mosquitto


def run(coro_factory, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    async def bounded() -> None:
        async with asyncio.timeout(timeout):
            await coro_factory()

    asyncio.run(bounded())


@pytest.fixture
def production_broker(tmp_path: Path) -> tuple[MosquittoBroker, Path, int]:
    """broker/mosquitto.conf with its paths and ports moved into tmp_path."""
    require_mosquitto()
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    ca = make_ca(tmp_path / "tls")
    server = make_certificate(tmp_path / "tls", "server", ca, hosts=("127.0.0.1", "localhost"))
    password_file = tmp_path / "mosquitto.passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(password_file), "device-1", "s3cret"], check=True)
    acl = tmp_path / "mosquitto.acl"
    acl.write_text("user device-1\ntopic readwrite unus/#\n")
    plain_port, tls_port = free_port(), free_port()
    config = RUN_AS + "\n" + (REPO / "broker" / "mosquitto.conf").read_text()
    config = config.replace("listener 1883 127.0.0.1", f"listener {plain_port} 127.0.0.1")
    config = config.replace("listener 8883", f"listener {tls_port} 127.0.0.1")
    config = config.replace("/etc/unus-edge/tls/ca.crt", str(ca.cert_file))
    config = config.replace("/etc/unus-edge/tls/server.crt", str(server.cert_file))
    config = config.replace("/etc/unus-edge/tls/server.key", str(server.key_file))
    config = config.replace("/etc/unus-edge/mosquitto.passwd", str(password_file))
    config = config.replace("/etc/unus-edge/mosquitto.acl", str(acl))
    config = config.replace("/var/lib/unus-edge/mosquitto/", f"{tmp_path}/")
    config = re.sub(r"(?m)^log_dest syslog$", "log_dest stdout", config)
    config = re.sub(r"(?m)^log_type notice$", "log_type notice\nlog_type information", config)
    broker = MosquittoBroker(tmp_path)
    broker.port = plain_port
    broker._config = lambda: _write(tmp_path / "production.conf", config)  # type: ignore[method-assign]
    return broker, ca.cert_file, tls_port


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_production_config_serves_tls_with_passwords(production_broker: tuple[MosquittoBroker, Path, int]) -> None:
    broker, ca_file, tls_port = production_broker

    async def scenario() -> None:
        await broker.start()
        try:
            secure = ConnectOptions(port=tls_port, username="device-1", password="s3cret",
                                    tls=TLSOptions(ca_file=str(ca_file)))
            async with MqttTransport(secure) as client:
                await client.subscribe("unus/v1/job/model")
                await client.publish("unus/v1/job/model", b"over tls", retain=True)
                async for message in client.messages():
                    assert message.payload == b"over tls"
                    break
            with pytest.raises(ConnectError, match="refused"):  # wrong password
                async with MqttTransport(ConnectOptions(port=tls_port, username="device-1", password="nope",
                                                        tls=TLSOptions(ca_file=str(ca_file)))):
                    pass
            with pytest.raises(ConnectError, match="refused"):  # anonymous
                async with MqttTransport(ConnectOptions(port=tls_port, tls=TLSOptions(ca_file=str(ca_file)))):
                    pass
            with pytest.raises(ConnectError, match="TLS port"):  # plain MQTT to the TLS port: a hint
                async with MqttTransport(ConnectOptions(port=tls_port, username="device-1", password="s3cret",
                                                        keepalive=2)):
                    pass
            with pytest.raises(ConnectError, match=r"(?i)certificate"):  # a CA we do not trust
                async with MqttTransport(ConnectOptions(port=tls_port, username="device-1", password="s3cret",
                                                        tls=TLSOptions())):
                    pass
        finally:
            await broker.stop()

    run(scenario)


def test_hostname_is_checked(tmp_path: Path) -> None:
    require_mosquitto()
    ca = make_ca(tmp_path / "tls")
    wrong = make_certificate(tmp_path / "tls", "server", ca, hosts=("gateway.example",))
    port = free_port()
    broker = MosquittoBroker(tmp_path, extra_config="\n".join([
        f"listener {port} 127.0.0.1", f"cafile {ca.cert_file}", f"certfile {wrong.cert_file}",
        f"keyfile {wrong.key_file}",
    ]))

    async def scenario() -> None:
        await broker.start()
        try:
            with pytest.raises(ConnectError, match=r"(?i)hostname|IP address mismatch"):
                async with MqttTransport(ConnectOptions(port=port, tls=TLSOptions(ca_file=str(ca.cert_file)))):
                    pass
            # Explicitly switching the check off (never the default) connects.
            relaxed = TLSOptions(ca_file=str(ca.cert_file), check_hostname=False)
            async with MqttTransport(ConnectOptions(port=port, tls=relaxed)) as client:
                assert client.connected
        finally:
            await broker.stop()

    run(scenario)


def test_loopback_test_config_loads(tmp_path: Path) -> None:
    require_mosquitto()
    port = free_port()
    config = RUN_AS + "\n" + (REPO / "broker" / "mosquitto-test.conf").read_text()
    config = config.replace("listener 1883", f"listener {port}")
    broker = MosquittoBroker(tmp_path)
    broker.port = port
    broker._config = lambda: _write(tmp_path / "test.conf", config)  # type: ignore[method-assign]

    async def scenario() -> None:
        await broker.start()
        try:
            async with MqttTransport(ConnectOptions(port=port)) as client:
                assert client.connected
        finally:
            await broker.stop()

    run(scenario)
