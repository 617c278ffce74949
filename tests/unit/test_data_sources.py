"""A device's own data: CSV, a folder of images, IDX, npz; clear errors; holdout; growth (issue 16)."""

from __future__ import annotations

import asyncio
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.test_service_memory import JOB, config, make_aggregator, run
from unus_edge.config import DeviceConfig, DeviceSettings
from unus_edge.data import LocalData, detect_format, load_source, save_partition
from unus_edge.device import Device
from unus_edge.errors import DataError
from unus_edge.messages import RoundMetrics
from unus_edge.nn import Graph
from unus_edge.onnx_io import fingerprint
from unus_edge.transport import MemoryBroker, MemoryTransport
from unus_edge.zoo import resolve_model


def write_csv(path: Path, rows: int, *, start: int = 0, features: int = 4) -> None:
    rng = np.random.default_rng(start)
    lines = [] if path.exists() else [",".join(["id", *[f"f{i}" for i in range(features)], "label"])]
    for index in range(start, start + rows):
        values = rng.random(features)
        lines.append(",".join([str(index), *(f"{v:.4f}" for v in values), str(index % 3)]))
    with open(path, "a") as handle:
        handle.write("\n".join(lines) + "\n")


def test_csv_with_named_columns(tmp_path: Path) -> None:
    path = tmp_path / "sensor.csv"
    write_csv(path, 10)
    data = load_source(path, feature_columns=("f0", "f1", "f2", "f3"))
    assert data.x.shape == (10, 4) and data.y.tolist() == [i % 3 for i in range(10)] and data.num_classes == 3
    assert load_source(path).x.shape == (10, 5)  # default: every column but the label (id included)


@pytest.mark.parametrize(("text", "reason", "where"), [
    ("id,f0,label\n1,0.5,1\n2,abc,0\n", "bad_row", "row 3, column 'f0': 'abc' is not a number"),
    ("id,f0,label\n1,0.5,1\n2,0.5\n", "bad_row", "row 3: 2 fields, the header has 3"),
    ("id,f0,label\n1,0.5,-1\n", "bad_label", "row 2: label '-1' must be an integer >= 0"),
    ("id,f0,label\n1,0.5,1.5\n", "bad_label", "must be an integer"),
    ("id,f0,kind\n1,0.5,1\n", "bad_column", "no label column 'label' (columns: id, f0, kind)"),
    ("id,f0,label\n1,nan,1\n", "bad_row", "NaN or infinite"),
    ("", "empty", "no header row"),
])
def test_a_malformed_csv_is_refused_with_the_row_and_the_reason(tmp_path: Path, text: str, reason: str,
                                                               where: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError) as caught:
        load_source(path)
    assert caught.value.reason == reason and where in str(caught.value) and str(path) in str(caught.value)


def image_folder(root: Path, per_class: int, *, size: tuple[int, int] = (28, 28), start: int = 0) -> Path:
    for label in (0, 1, 2):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        for index in range(start, start + per_class):
            pixels = np.full(size, 80 * label, np.uint8)
            pixels[index % size[0], :] = 255
            Image.fromarray(pixels).save(root / str(label) / f"{index:03d}.png")
    return root


def test_a_folder_of_images_one_subfolder_per_class(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "images", 4)
    (folder / "0" / "notes.txt").write_text("not an image: ignored by its suffix")
    data = load_source(folder)
    assert detect_format(folder) == "images"
    assert data.x.shape == (12, 1, 28, 28) and data.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.x.max() == 1.0 and abs(float(data.x[4].min()) - 80 / 255) < 1e-6


def test_an_image_of_the_wrong_size_or_not_an_image_is_refused_by_name(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "images", 2)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "1" / "big.png")
    with pytest.raises(DataError, match=r"big\.png: bad_image: 32x32 pixels; the model takes 28x28"):
        load_source(folder)
    (folder / "1" / "big.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"big\.png: bad_image: not a readable image"):
        load_source(folder)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_in_a_folder_and_npz(tmp_path: Path) -> None:
    folder = tmp_path / "idx"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", np.full((5, 28, 28), 255))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(5))
    data = load_source(folder)
    assert detect_format(folder) == "idx" and data.x.shape == (5, 1, 28, 28) and data.x.max() == 1.0
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"no labels file train-labels-idx1-ubyte\.gz"):
        load_source(folder)
    save_partition(tmp_path / "part.npz", data)
    assert len(load_source(tmp_path / "part.npz")) == 5
    (tmp_path / "data.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="unknown_format"):
        load_source(tmp_path / "data.bin")


def test_a_held_out_split_is_seeded_and_disjoint_and_growth_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    write_csv(path, 100)
    local = LocalData(path, holdout=0.2, seed=3)
    assert (len(local.train), len(local.held_out or ())) == (80, 20)
    ids = set(local.train.x[:, 0].tolist()) | set((local.held_out.x[:, 0] if local.held_out else []).tolist())
    assert len(ids) == 100  # disjoint, and every example in one of them
    again = LocalData(path, holdout=0.2, seed=3)
    np.testing.assert_array_equal(again.train.x, local.train.x)
    assert not local.refresh()  # nothing changed
    write_csv(path, 50, start=100)
    assert local.refresh() and len(local.train) == 120
    with pytest.raises(DataError, match="holdout"):
        LocalData(path, holdout=1.0)


def test_a_device_whose_data_grows_registers_the_new_count_and_trains_on_it(tmp_path: Path) -> None:
    """A CSV of 784-feature rows (the logreg's input, flattened): rows appended after round 1 are
    trained on in round 2, and the aggregator weighs that update by the new count."""
    path = tmp_path / "device.csv"
    write_csv(path, 30, features=784)

    async def scenario() -> tuple[list[RoundMetrics], int]:
        broker = MemoryBroker()
        rounds: list[RoundMetrics] = []

        def grow(metrics: RoundMetrics) -> None:
            rounds.append(metrics)
            if metrics.server_round == 1:
                write_csv(path, 20, start=30, features=784)

        aggregator = make_aggregator(broker, config(job__min_devices=1, job__rounds=2))
        aggregator.on_round = grow
        settings = DeviceSettings(id="grow", job=JOB, data=str(path), model="logreg", heartbeat_interval=0.2,
                                  csv_features=",".join(f"f{i}" for i in range(784)))
        model = resolve_model("logreg")
        local = LocalData(path, feature_columns=tuple(f"f{i}" for i in range(784)))
        transport = MemoryTransport(broker, Device.connect_options(DeviceConfig(device=settings), "s-grow"))
        device = Device(DeviceConfig(device=settings), transport, graph=Graph(model), fingerprint=fingerprint(model),
                        dataset=local.train, session="s-grow", exit_when_finished=True)
        device.local_data = local
        async with device.transport:
            running = asyncio.create_task(device.run())
            async with aggregator.transport:
                result = await aggregator.run()
            await running
        assert result.state == "finished"
        record = aggregator.registry.get("grow")
        assert record is not None
        return rounds, record.num_examples

    rounds, registered = run(scenario)
    assert [m.num_examples for m in rounds] == [30, 50]
    assert registered == 50


@pytest.mark.parametrize("data_format", ["npz", "csv", "idx", "images"])
def test_every_format_written_is_read_back(tmp_path: Path, data_format: str) -> None:
    from unus_edge.data import load_dataset, write_source

    data = load_dataset("digits", "test", num_examples=40)
    path = write_source(data, tmp_path / ("part.csv" if data_format == "csv" else
                                          "part.npz" if data_format == "npz" else "part"), data_format)
    assert detect_format(path) == data_format
    back = load_source(path)
    order = np.argsort(back.y, kind="stable") if data_format == "images" else np.arange(len(back))  # by class folder
    expected = np.argsort(data.y, kind="stable") if data_format == "images" else np.arange(len(data))
    np.testing.assert_array_equal(back.y[order], data.y[expected])
    np.testing.assert_allclose(back.x[order].reshape(len(back), -1), data.x[expected].reshape(len(data), -1),
                               atol=0.5 / 255 + 1e-6)  # 8-bit pixels: within half a step


def test_data_split_writes_csv_sources_a_device_reads(tmp_path: Path) -> None:
    from unus_edge.cli import main

    assert main(["data", "split", "--dataset", "digits", "--devices", "3", "--format", "csv", "--out",
                 str(tmp_path / "parts")]) == 0
    sizes = [len(load_source(tmp_path / "parts" / f"device_{i:03d}.csv")) for i in range(3)]
    assert sum(sizes) == 1497 and min(sizes) > 400
    assert main(["data", "split", "--dataset", "digits", "--devices", "3", "--format", "csv", "--out",
                 str(tmp_path / "parts")]) == 2  # not empty: refused, nothing overwritten


@pytest.mark.parametrize("data_format", ["csv", "idx"])
def test_a_split_of_sources_has_a_manifest_with_counts_and_hashes(tmp_path: Path, data_format: str) -> None:
    import hashlib
    import json

    from unus_edge.cli import main
    from unus_edge.data._split import MANIFEST_FORMAT

    out = tmp_path / "parts"
    assert main(["data", "split", "--dataset", "digits", "--devices", "2", "--format", data_format,
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == MANIFEST_FORMAT and manifest["source_format"] == data_format
    assert manifest["num_parts"] == 2 and manifest["num_classes"] == 10
    for entry in manifest["devices"]:
        path = out / entry["file"]
        assert len(load_source(path)) == entry["num_examples"]
        assert sum(entry["label_histogram"]) == entry["num_examples"]
        if path.is_file():
            assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        else:  # a folder: its files' relative paths and hashes, sorted
            lines = "".join(f"{f.relative_to(path).as_posix()} {hashlib.sha256(f.read_bytes()).hexdigest()}\n"
                            for f in sorted(path.rglob("*")) if f.is_file())
            assert entry["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    assert sum(entry["num_examples"] for entry in manifest["devices"]) == manifest["num_examples"]
