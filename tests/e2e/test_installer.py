"""deploy/raspberry-pi: shellcheck, systemd-analyze verify, install.sh and uninstall.sh for real.

install.sh runs with --no-systemd into a temporary prefix (tests/e2e/_install.py); the device
it installs then joins a job over TLS with its provisioned identity, against the gateway's
Mosquitto drop-in, and stops cleanly on SIGTERM. No systemd runs here, so the units are only
verified, not started.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.brokers import PYTHON, REPO, free_port, python_env, require_mosquitto
from tests.e2e._install import DEVICE, INSTALL, JOB, UNINSTALL, Installed, installed_device
from tests.secure_gateway import SecureBroker, provision
from unus_edge import topics
from unus_edge.errors import UnusError
from unus_edge.topics import Channel
from unus_edge.transport import ConnectOptions, MqttTransport, TLSOptions

DEPLOY = REPO / "deploy" / "raspberry-pi"
UNITS = ("unus-device.service", "unus-aggregator.service")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    return installed_device(tmp_path_factory)


def test_shellcheck_is_clean() -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", "--severity=style", str(INSTALL), str(UNINSTALL)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout


def test_units_are_hardened_and_restart_with_limits() -> None:
    for unit in UNITS:
        lines = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in (DEPLOY / unit).read_text().splitlines()
                 if "=" in line and not line.startswith("#")}
        assert "network-online.target" in lines["After"] and "network-online.target" in lines["Wants"]
        assert lines["Restart"] == "on-failure"
        assert int(lines["StartLimitBurst"]) > 0 and int(lines["StartLimitIntervalSec"]) > 0
        assert lines["EnvironmentFile"].startswith("-/etc/unus-edge/")
        assert lines["User"] == "unus" and lines["StateDirectory"] == "unus-edge"
        for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                           ("PrivateTmp", "yes")):
            assert lines[key] == value, key
        assert lines["ExecStart"].startswith("/opt/unus-edge/bin/unus-edge ")
        # The device needs up to 5 s to say goodbye (test_installed_device_... measures it).
        assert int(lines["TimeoutStopSec"].rstrip("s")) >= 30


def test_units_pass_systemd_analyze_verify(installed: Installed, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    # As the installer renders them: ExecStart names the venv it made, which exists.
    rendered = [str(installed.prefix / "share" / "unus-edge" / "systemd" / unit) for unit in UNITS]
    result = subprocess.run(["systemd-analyze", "verify", *rendered], capture_output=True, text=True, cwd=tmp_path,
                            check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # As shipped: the only complaint allowed is the default venv missing on this machine.
    result = subprocess.run(["systemd-analyze", "verify", *(str(DEPLOY / unit) for unit in UNITS)],
                            capture_output=True, text=True, cwd=tmp_path, check=False)
    complaints = [line for line in result.stderr.splitlines() if line.strip()]
    missing = "Command /opt/unus-edge/bin/unus-edge is not executable: No such file or directory"
    if Path("/opt/unus-edge/bin/unus-edge").exists():
        assert result.returncode == 0 and not complaints, result.stderr
    else:
        assert all(line.endswith(missing) for line in complaints), result.stderr


@pytest.mark.slow
def test_install_is_idempotent_and_keeps_edited_configuration(installed: Installed) -> None:
    etc = installed.etc
    assert "installed unus-edge" in installed.output
    assert {path.name for path in etc.iterdir()} == {"device.toml", "device.env", "password", "app.password",
                                                     "ca.crt"}
    assert stat.S_IMODE((etc / "password").stat().st_mode) == 0o640
    assert stat.S_IMODE((etc / "app.password").stat().st_mode) == 0o640  # for local applications (predict)
    assert stat.S_IMODE((etc / "device.toml").stat().st_mode) == 0o640
    assert (etc / "device.toml").read_text() == (installed.fleet.out / "devices" / DEVICE / "device.toml").read_text()
    assert not (installed.prefix / "bin" / "pip").exists()  # removed: not needed at run time
    bundle = ["--role", "device", "--no-systemd", "--no-apt", "--bundle", str(installed.fleet.out / "devices" / DEVICE)]

    again = installed.install(*bundle)
    assert again.returncode == 0, again.stderr
    assert not list(etc.glob("*.new"))
    original = (etc / "device.toml").read_text()
    (etc / "device.toml").write_text(original + "# edited by the operator\n")
    try:
        third = installed.install(*bundle)
        assert third.returncode == 0, third.stderr
        assert (etc / "device.toml").read_text().endswith("# edited by the operator\n")  # kept
        assert (etc / "device.toml.new").read_text() == original
        assert "device.toml.new" in third.stdout
    finally:
        (etc / "device.toml").write_text(original)
        (etc / "device.toml.new").unlink(missing_ok=True)
    refused = installed.install("--role", "toaster", "--no-systemd")
    assert refused.returncode != 0 and "device or gateway" in refused.stderr


@pytest.mark.slow
@pytest.mark.mosquitto
def test_installed_device_joins_a_job_over_tls_and_stops_cleanly_on_sigterm(installed: Installed,
                                                                         tmp_path: Path) -> None:
    require_mosquitto()
    fleet = installed.fleet
    split = subprocess.run([PYTHON, "-m", "unus_edge.cli", "data", "split", "--dataset", "synthetic", "--devices",
                            "1", "--train-examples", "600", "--out", str(tmp_path / "parts")], env=python_env(),
                           capture_output=True, text=True, timeout=120, check=False)
    assert split.returncode == 0, split.stderr
    shutil.copy(tmp_path / "parts" / "device_000.npz", installed.state / "data.npz")
    broker = SecureBroker(tmp_path, fleet.gateway)

    processes: list[asyncio.subprocess.Process] = []

    async def aggregator(*args: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "unus_edge.cli", "aggregator", "--config", str(fleet.gateway / f"{JOB}.toml"),
            "--broker", f"mqtt://127.0.0.1:{broker.plain_port}", "--no-resume",
            "--set", f"broker.password_file={fleet.gateway / f'aggregator-{JOB}.password'}",
            "--set", "evaluation.dataset=synthetic", "--set", "evaluation.num_examples=200", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=python_env())
        processes.append(process)
        return process

    async def device(*args: str) -> asyncio.subprocess.Process:
        # The installed console script, its installed configuration; only the port differs.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        process = await asyncio.create_subprocess_exec(
            str(installed.unus_edge), "device", "--config", str(installed.etc / "device.toml"),
            "--broker", f"mqtts://localhost:{broker.tls_port}", "--set", "device.heartbeat_interval=0.5", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path)
        processes.append(process)
        return process

    async def scenario() -> None:
        # 1. A two-round job: the device trains, reports, and exits when the job ends.
        job = await aggregator("--rounds", "2", "--checkpoint-dir", str(tmp_path / "c1"))
        member = await device("--exit-when-finished")
        out, err = await job.communicate()
        _, device_err = await member.communicate()
        assert job.returncode == 0, err.decode()[-3000:]
        assert member.returncode == 0, device_err.decode()[-3000:]
        assert "finished after 2 rounds" in out.decode()
        assert f"device {DEVICE} registered" in device_err.decode()
        # 2. SIGTERM in the middle of a long training task (5000 epochs: minutes): the device
        # abandons it, says goodbye (status offline, reason shutdown) and exits 0 at once.
        async with MqttTransport(ConnectOptions(port=broker.plain_port, username="monitor",
                                                password=fleet.password("monitor"))) as monitor:
            await monitor.subscribe(topics.device_topic(JOB, DEVICE, Channel.HEARTBEAT))
            await monitor.subscribe(topics.device_topic(JOB, DEVICE, Channel.STATUS))
            job = await aggregator("--rounds", "1", "--epochs", "5000", "--deadline", "600",
                                   "--checkpoint-dir", str(tmp_path / "c2"))
            member = await device()
            async for message in monitor.messages():
                body = json.loads(message.payload)["body"]
                if message.topic.endswith("/heartbeat") and body["state"] == "training":
                    break
            started = time.monotonic()
            member.send_signal(signal.SIGTERM)
            _, device_err = await member.communicate()
            stopped = time.monotonic() - started
            assert member.returncode == 0, device_err.decode()[-3000:]
            assert stopped < 10, stopped
            async for message in monitor.messages():
                body = json.loads(message.payload)["body"]
                if message.topic.endswith("/status") and body["session"] != "" and body["state"] == "offline":
                    assert body["reason"] == "shutdown"
                    break

    async def bounded() -> None:
        await broker.broker.start()
        try:
            async with asyncio.timeout(180):
                await scenario()
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await broker.broker.stop()

    asyncio.run(bounded())
    assert "Denied" not in broker.log
    assert re.search(rf"New client connected from 127\.0\.0\.1:\d+ as {DEVICE} \(", broker.log)


def test_uninstall_removes_what_install_made_and_is_idempotent(tmp_path: Path) -> None:
    prefix, etc, state = tmp_path / "opt", tmp_path / "etc", tmp_path / "state"
    units, conf_d = tmp_path / "systemd", tmp_path / "conf.d"
    for folder in (prefix / "bin", etc, state, units, conf_d):
        folder.mkdir(parents=True)
    (prefix / "pyvenv.cfg").write_text("home = /usr/bin\n")
    (prefix / "bin" / "unus-edge").write_text("#!/bin/sh\n")
    (prefix / "bin" / "unus-edge").chmod(0o755)
    for unit in UNITS:
        (units / unit).write_text("[Unit]\n")
    (conf_d / "unus-edge.conf").write_text("")
    (etc / "device.toml").write_text("")
    env = {**os.environ, "UNUS_PREFIX": str(prefix), "UNUS_ETC": str(etc), "UNUS_STATE": str(state),
           "UNUS_SYSTEMD_DIR": str(units), "UNUS_MOSQUITTO_CONF_D": str(conf_d), "UNUS_USER": "nobody-here"}

    def uninstall(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(UNINSTALL), "--no-systemd", *args], env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    first = uninstall()
    assert first.returncode == 0, first.stderr
    assert not prefix.exists() and not list(units.iterdir()) and not list(conf_d.iterdir())
    assert (etc / "device.toml").exists() and state.exists()  # kept without --purge
    assert uninstall().returncode == 0  # nothing left to do: still fine
    purged = uninstall("--purge")
    assert purged.returncode == 0, purged.stderr
    assert not etc.exists() and not state.exists()
    # A folder that is not an unus-edge venv is never removed.
    (tmp_path / "other").mkdir()
    env["UNUS_PREFIX"] = str(tmp_path / "other")
    assert uninstall().returncode == 0 and (tmp_path / "other").exists()


@pytest.mark.slow
def test_gateway_install_places_broker_files_and_the_drop_in(installed: Installed, tmp_path: Path) -> None:
    """The gateway role (NumPy only here: UNUS_EXTRAS empty), first bare, then with its bundle."""
    etc, conf_d = tmp_path / "etc", tmp_path / "conf.d"
    conf_d.mkdir()
    env = {**installed.env, "UNUS_ETC": str(etc), "UNUS_STATE": str(tmp_path / "state"), "UNUS_EXTRAS": "",
           "UNUS_MOSQUITTO_CONF_D": str(conf_d)}
    bundle = installed.fleet.gateway

    def install(*args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["bash", str(INSTALL), "--role", "gateway", "--no-systemd", "--no-apt", *args],
                                env=env, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    bare = install()
    assert 'username = "aggregator-mnist"' in (etc / "job.toml").read_text()  # the template
    # No drop-in before the files it names exist: Mosquitto would not start.
    assert not (conf_d / "unus-edge.conf").exists() and "drop-in is not installed yet" in bare.stderr
    install("--bundle", str(bundle))  # one job in the bundle: no --job needed
    # The untouched template is replaced by the provisioned configuration, without a .new.
    assert (etc / "job.toml").read_text() == (bundle / f"{JOB}.toml").read_text()
    assert not list(etc.rglob("*.new"))
    for name in ("ca.crt", "server.crt", "server.key", "mosquitto.passwd", "mosquitto.acl"):
        assert (etc / "broker" / name).read_bytes() == (bundle / name).read_bytes()
        assert stat.S_IMODE((etc / "broker" / name).stat().st_mode) == 0o640
    assert stat.S_IMODE((etc / f"aggregator-{JOB}.password").stat().st_mode) == 0o640
    drop_in = (conf_d / "unus-edge.conf").read_text()
    files = re.findall(r"^(?:cafile|certfile|keyfile|password_file|acl_file) (\S+)$", drop_in, re.MULTILINE)
    assert len(files) == 5 and all(Path(file).is_file() and file.startswith(str(etc)) for file in files)

    # A re-provisioned ACL: kept (with a .new) by default, replaced (with a .old) when asked.
    changed = tmp_path / "bundle"
    shutil.copytree(bundle, changed)
    with (changed / "mosquitto.acl").open("a") as handle:
        handle.write("# re-provisioned\n")
    install("--bundle", str(changed))
    assert (etc / "broker" / "mosquitto.acl.new").read_text().endswith("# re-provisioned\n")
    install("--bundle", str(changed), "--replace-credentials")
    assert (etc / "broker" / "mosquitto.acl").read_text().endswith("# re-provisioned\n")
    assert (etc / "broker" / "mosquitto.acl.old").read_bytes() == (bundle / "mosquitto.acl").read_bytes()


@pytest.mark.mosquitto
def test_the_installed_gateway_runs_mosquitto_as_its_user_with_the_provisioned_listeners(
        installed: Installed) -> None:
    """Issue 14, found deploying: Mosquitto could not open the password file (the mosquitto user
    could not enter the 0750 configuration folder); the drop-in listened on 1883/8883 whatever
    provision --port said, its TLS listener on every interface; a bundle provisioned with the
    default folders kept /etc/unus-edge paths when UNUS_ETC moved them; --no-systemd printed
    systemctl steps. Mosquitto starts here from the installed drop-in, as the mosquitto user when
    this runs as root, and a provisioned device connects over TLS on the provisioned port."""
    require_mosquitto()
    root = Path(tempfile.mkdtemp(prefix="unus-gateway-"))  # not under pytest's 0700 folder: mosquitto enters it
    try:
        root.chmod(0o755)
        tls_port, plain_port = free_port(), free_port()
        fleet = provision(root / "fleet", JOB, [DEVICE], "--port", str(tls_port), "--bind", "127.0.0.1",
                          "--aggregator-url", f"mqtt://127.0.0.1:{plain_port}")  # default folders
        etc, conf_d = root / "etc", root / "conf.d"
        conf_d.mkdir()
        env = {**installed.env, "UNUS_ETC": str(etc), "UNUS_STATE": str(root / "state"), "UNUS_EXTRAS": "",
               "UNUS_MOSQUITTO_CONF_D": str(conf_d)}
        result = subprocess.run(["bash", str(INSTALL), "--role", "gateway", "--no-systemd", "--no-apt", "--bundle",
                                 str(fleet.gateway)], env=env, capture_output=True, text=True, timeout=600,
                                check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        next_steps = [line for line in result.stdout.splitlines() if "next:" in line]
        assert next_steps and not any("systemctl" in line for line in next_steps), result.stdout
        assert f"{installed.prefix}/bin/unus-edge aggregator --config {etc}/job.toml" in result.stdout
        job = (etc / "job.toml").read_text()
        assert f'password_file = "{etc}/aggregator-{JOB}.password"' in job and "/etc/unus-edge/" not in job
        drop_in = (conf_d / "unus-edge.conf").read_text()
        assert f"\nlistener {tls_port} 127.0.0.1\n" in drop_in and f"\nlistener {plain_port} 127.0.0.1\n" in drop_in
        assert "\nlistener 8883" not in drop_in and "\nlistener 1883 " not in drop_in
        assert stat.S_IMODE(etc.stat().st_mode) == 0o751

        data = root / "mosquitto-data"
        data.mkdir()
        as_root = os.geteuid() == 0
        if as_root:
            shutil.chown(data, "mosquitto", "mosquitto")
        main = root / "mosquitto.conf"  # what Debian's main file holds, and its include_dir
        main.write_text(("user mosquitto\n" if as_root else f"user {getpass.getuser()}\n")
                        + f"persistence_location {data}/\nlog_dest stdout\ninclude_dir {conf_d}\n")
        broker = subprocess.Popen(["mosquitto", "-c", str(main)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True)
        async def connect() -> None:
            options = ConnectOptions(host="localhost", port=tls_port, username=DEVICE,
                                     password=fleet.password(DEVICE), client_id=f"unus-{JOB}-{DEVICE}",
                                     tls=TLSOptions(ca_file=fleet.ca_file), retry_first_connect=True)
            async with asyncio.timeout(30):
                async with MqttTransport(options):
                    pass

        try:
            asyncio.run(connect())
            connected = ""
        except (TimeoutError, OSError, UnusError) as error:
            connected = f"{type(error).__name__}: {error}"
        finally:
            broker.terminate()
            log, _ = broker.communicate(timeout=20)
        assert not connected, f"a provisioned device could not connect ({connected}); mosquitto said:\n{log}"
        assert "Unable to open" not in log and "Error" not in log, log
    finally:
        shutil.rmtree(root, ignore_errors=True)
