"""Error messages that say what to do (issue 14): each names the file or key at fault and the fix,
and none leaks a library's misleading text (NumPy's advice to unpickle, a bare protobuf code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from unus_edge.config import BrokerSettings
from unus_edge.data import Dataset, load_dataset, load_partition
from unus_edge.device._training import check_dataset
from unus_edge.errors import ConfigError, DataError, ModelError
from unus_edge.nn import Graph
from unus_edge.onnx_io import load_model
from unus_edge.zoo import resolve_model


def test_a_text_file_given_as_a_partition_is_named_and_no_pickle_is_suggested(tmp_path: Path) -> None:
    path = tmp_path / "partition.npz"
    path.write_text("device_id,label\n1,2\n")
    with pytest.raises(DataError) as caught:
        load_partition(path)
    assert caught.value.reason == "not_npz"
    assert str(path) in str(caught.value) and "unus-edge data split" in str(caught.value)
    assert "allow_pickle" not in str(caught.value)
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataError, match="an empty file"):
        load_partition(tmp_path / "empty.npz")


def test_a_file_that_is_not_onnx_is_named_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_text("this is not a model")
    with pytest.raises(ModelError) as caught:
        load_model(path)
    assert str(path) in str(caught.value) and "is it an ONNX file?" in str(caught.value)


def test_the_missing_mnist_folder_names_the_real_config_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNUS_DATA_DIR", raising=False)
    with pytest.raises(DataError, match=r"evaluation\.data_dir"):
        load_dataset("mnist", "test")


def test_an_unreadable_password_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-password"
    settings = BrokerSettings(url="mqtt://127.0.0.1:1883", username="pi", password_file=str(missing))
    with pytest.raises(ConfigError, match=str(missing)):
        settings.connect_options(client_id="c", clean_session=True)


def test_plain_mqtt_with_tls_files_is_refused_not_switched_to_tls() -> None:
    settings = BrokerSettings(url="mqtt://gateway.local:1883", ca_file="/etc/unus-edge/ca.crt")
    with pytest.raises(ConfigError, match=r"mqtts://"):
        settings.connect_options(client_id="c", clean_session=True)
    secure = BrokerSettings(url="mqtts://gateway.local:8883", ca_file="/etc/unus-edge/ca.crt")
    tls = secure.connect_options(client_id="c", clean_session=True).tls
    assert tls is not None and tls.ca_file == "/etc/unus-edge/ca.crt"


def test_data_that_does_not_fit_the_model_is_refused_before_registering_with_the_shapes() -> None:
    graph = Graph(resolve_model("mnist_2nn"))
    wrong_shape = Dataset(np.zeros((4, 3, 32, 32), np.float32), np.zeros(4, np.int64), 10)
    with pytest.raises(DataError) as caught:
        check_dataset(graph, wrong_shape, "cifar.npz")
    assert caught.value.reason == "bad_shape"
    assert "(3, 32, 32)" in str(caught.value) and "cifar.npz" in str(caught.value)
    too_many_classes = Dataset(np.zeros((4, 784), np.float32), np.arange(4, dtype=np.int64) * 5, 20)
    with pytest.raises(DataError, match="20 classes, but model mnist_2nn has 10 outputs"):
        check_dataset(graph, too_many_classes, "p.npz")
    check_dataset(graph, Dataset(np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64), 10), "ok.npz")


def test_the_deploy_readme_shows_what_provision_prints_and_no_password_on_a_command_line() -> None:
    """The README's max_packet_size line drifted from provision's output (issue 14), and its
    commands put the monitor password in the process list."""
    from unus_edge.provision import _packet_hint

    readme = (Path(__file__).parents[2] / "deploy" / "raspberry-pi" / "README.md").read_text()
    assert _packet_hint("mnist_2nn") in readme
    assert '-P "$P"' not in readme and "monitor:$P@" not in readme
