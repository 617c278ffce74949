"""Job and device configuration: precedence, validation, clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from unus_edge.config import load_device_config, load_job_config
from unus_edge.errors import ConfigError
from unus_edge.provision import redacted
from unus_edge.transport import redact_url

JOB = """
[job]
name = "mnist"
rounds = 20
fraction = 0.1

[model]
source = "mnist_cnn"

[strategy]
name = "fedavg"
server_learning_rate = 0.5

[train]
epochs = 5
batch_size = 50
learning_rate = 0.02

[evaluation]
dataset = "synthetic"

[checkpoint]
dir = "/var/lib/unus-edge/mnist"

[broker]
url = "mqtts://gateway.local"
username = "aggregator"
ca_file = "/etc/unus-edge/tls/ca.crt"
"""


def write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_full_job_file_loads(tmp_path: Path) -> None:
    config = load_job_config(write(tmp_path, JOB), environ={})
    assert (config.job.name, config.job.rounds, config.job.fraction) == ("mnist", 20, 0.1)
    assert config.model.source == "mnist_cnn"
    assert config.strategy.options == {"server_learning_rate": 0.5}
    assert (config.train.epochs, config.train.batch_size, config.train.learning_rate) == (5, 50, 0.02)
    assert config.checkpoint.dir == "/var/lib/unus-edge/mnist"
    options = config.broker.connect_options(client_id="c", clean_session=False)
    assert (options.host, options.port, options.username) == ("gateway.local", 8883, "aggregator")
    assert options.tls is not None
    assert options.tls.ca_file == "/etc/unus-edge/tls/ca.crt"
    assert options.tls.check_hostname


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = write(tmp_path, JOB)
    environ = {"UNUS_TRAIN_EPOCHS": "2", "UNUS_JOB_ROUNDS": "7", "UNUS_DATA_DIR": "/data/mnist"}
    config = load_job_config(path, environ=environ, overrides=["job.rounds=9", "strategy.server_learning_rate=1"])
    assert config.train.epochs == 2  # environment over file
    assert config.job.rounds == 9  # flag over environment
    assert config.evaluation.data_dir == "/data/mnist"
    assert config.strategy.options == {"server_learning_rate": 1}


@pytest.mark.parametrize(
    ("text", "overrides", "key", "fragment"),
    [
        ("[train]\nlearnin_rate = 0.1\n", [], "train.learnin_rate", "unknown key"),
        ("[trian]\n", [], "trian", "unknown section"),
        ("[train]\nepochs = 'two'\n", [], "train.epochs", "integer"),
        ("[train]\nepochs = true\n", [], "train.epochs", "integer"),
        ("[train]\nlearning_rate = -1.0\n", [], "train.learning_rate", "positive"),
        ("[job]\nfraction = 1.5\n", [], "job.fraction", "(0, 1]"),
        ("[job]\nname = 'bad/name'\n", [], "job.name", "characters"),
        ("[evaluation]\ndataset = 'cifar'\n", [], "evaluation.dataset", "one of"),
        ("[broker]\nurl = 'http://x'\n", [], "broker.url", "mqtt://"),
        ("[train]\n", ["train.epochs=zero"], "train.epochs", "integer"),
        ("[train]\n", ["epochs=3"], "epochs", "section.key=value"),
        ("this is not toml", [], "--config", "not valid TOML"),
    ],
)
def test_bad_configurations_name_the_key(
    tmp_path: Path, text: str, overrides: list[str], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_job_config(write(tmp_path, text), environ={}, overrides=overrides)
    assert caught.value.key == key
    assert fragment in str(caught.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_config(tmp_path / "nope.toml", environ={})


def test_device_config_requires_an_id_and_data(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_device_config(write(tmp_path, "[device]\ndata = 'x.npz'\n"), environ={})
    assert caught.value.key == "device.id"
    with pytest.raises(ConfigError) as caught:
        load_device_config(write(tmp_path, "[device]\nid = 'pi-1'\n"), environ={})
    assert caught.value.key == "device.data"
    config = load_device_config(write(tmp_path, "[device]\nid = 'pi-1'\ndata = 'x.npz'\n"),
                                environ={"UNUS_BROKER_URL": "mqtt://gw:1884"})
    assert config.device.id == "pi-1"
    assert config.broker.url == "mqtt://gw:1884"


def test_password_file_is_read_at_connect_and_never_shown(tmp_path: Path) -> None:
    secret = write(tmp_path, "hunter2\n", "password")
    config = load_device_config(write(tmp_path, f"[device]\nid = 'pi'\ndata = 'x'\n[broker]\nusername = 'pi'\n"
                                                f"password_file = '{secret}'\n"), environ={})
    options = config.broker.connect_options(client_id="c", clean_session=False)
    assert options.password == "hunter2"
    assert "hunter2" not in repr(options)
    assert "hunter2" not in repr(load_job_config(environ={"UNUS_BROKER_PASSWORD": "hunter2"}))
    missing = load_device_config(write(tmp_path, "[device]\nid = 'pi'\ndata = 'x'\n[broker]\n"
                                                 "password_file = '/nonexistent'\n"), environ={})
    with pytest.raises(ConfigError) as caught:
        missing.broker.connect_options(client_id="c", clean_session=False)
    assert caught.value.key == "broker.password_file"


def test_a_password_in_the_broker_url_never_reaches_an_error_or_a_log() -> None:
    with pytest.raises(ConfigError) as caught:
        load_job_config(environ={}, overrides=["broker.url=mqtt://pi:hunter2@gateway:99999"])
    assert "hunter2" not in str(caught.value)
    assert "pi:***@gateway" in str(caught.value)
    assert redact_url("mqtts://pi:hunter2@gateway:8883/x") == "mqtts://pi:***@gateway:8883/x"
    assert redact_url("mqtt://gateway") == "mqtt://gateway"
    assert redacted({"broker": {"url": "mqtt://pi:hunter2@gw"}}) == {"broker": {"url": "mqtt://pi:***@gw"}}


def test_the_receive_queue_bound_is_a_setting() -> None:
    from unus_edge.aggregator import Aggregator

    automatic = load_job_config(environ={})
    assert Aggregator.connect_options(automatic, "s", model_bytes=20 << 20).max_queued_bytes == 60 << 20  # 3 models
    assert Aggregator.connect_options(automatic, "s", model_bytes=1 << 20).max_queued_bytes == 32 << 20
    small = load_job_config(environ={"UNUS_BROKER_RECEIVE_QUEUE_MB": "8"})
    assert small.broker.connect_options(client_id="c", clean_session=True).max_queued_bytes == 8 << 20
    assert Aggregator.connect_options(small, "s", model_bytes=20 << 20).max_queued_bytes == 8 << 20
    with pytest.raises(ConfigError) as caught:
        load_job_config(environ={}, overrides=["broker.receive_queue_mb=-1"])
    assert caught.value.key == "broker.receive_queue_mb"


def test_blas_threads_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match=r"device\.blas_threads"):
        load_device_config(environ={}, overrides=["device.id=d", "device.data=x.npz", "device.blas_threads=-1"])
