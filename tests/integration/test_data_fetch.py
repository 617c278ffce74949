"""``unus-edge data fetch`` against a loopback HTTP server serving the shared dataset files.

No dataset can be downloaded here, so the server plays the mirror: it serves ``$UNUS_DATA_DIR``
(the real MNIST, when ``make test`` found it) or small files made by the test, and counts the
requests it answered.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from unus_edge.cli import main
from unus_edge.data import SOURCES, fetch_dataset, load_mnist, verify_file
from unus_edge.data._fetch import Source
from unus_edge.errors import DataError


class Mirror:
    def __init__(self, folder: Path, *, truncate: set[str] | None = None) -> None:
        self.folder = folder
        self.truncate = truncate or set()
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                name = self.path.lstrip("/")
                if name in mirror.truncate:  # announce the whole file, send half of it, hang up
                    body = (folder / name).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    return
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def __enter__(self) -> Mirror:
        threading.Thread(target=self.server.serve_forever, name="mirror", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A two-file dataset ``tiny`` served from ``tmp_path/served``."""
    served = tmp_path / "served"
    served.mkdir()
    files = {}
    for name, content in (("a-idx1-ubyte.gz", b"first file " * 1000), ("b-idx1-ubyte.gz", os.urandom(50_000))):
        (served / name).write_bytes(gzip.compress(content))
        files[name] = hashlib.sha256(content).hexdigest()
    monkeypatch.setitem(SOURCES, "tiny", Source("tiny", files, ("http://127.0.0.1:9/",)))
    return served


def test_fetch_downloads_checks_and_does_not_download_twice(tiny: Path, tmp_path: Path) -> None:
    with Mirror(tiny) as mirror:
        folder = fetch_dataset("tiny", tmp_path / "cache", base_url=mirror.url)
        assert sorted(p.name for p in folder.iterdir()) == ["a-idx1-ubyte.gz", "b-idx1-ubyte.gz"]
        assert all(verify_file(folder / name, sha) for name, sha in SOURCES["tiny"].files.items())
        first = len(mirror.requests)
        fetch_dataset("tiny", tmp_path / "cache", base_url=mirror.url)
    assert first == 2 and len(mirror.requests) == 2  # both already there and correct: nothing fetched again


def test_a_wrong_file_is_refused_and_nothing_is_kept(tiny: Path, tmp_path: Path) -> None:
    (tiny / "b-idx1-ubyte.gz").write_bytes(gzip.compress(b"not the data"))
    with Mirror(tiny) as mirror, pytest.raises(DataError) as caught:
        fetch_dataset("tiny", tmp_path / "cache", base_url=mirror.url)
    assert caught.value.reason == "checksum_mismatch"
    assert "b-idx1-ubyte.gz" in str(caught.value) and "Nothing was kept" in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a-idx1-ubyte.gz"]  # the good one stays


def test_a_truncated_download_is_refused_and_leaves_no_partial_file(tiny: Path, tmp_path: Path) -> None:
    with Mirror(tiny, truncate={"b-idx1-ubyte.gz"}) as mirror, pytest.raises(DataError) as caught:
        fetch_dataset("tiny", tmp_path / "cache", base_url=mirror.url)
    assert caught.value.reason == "unreachable"  # the connection ended early: this mirror failed
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["a-idx1-ubyte.gz"]


def test_without_a_network_the_error_says_where_to_put_the_files(tiny: Path, tmp_path: Path) -> None:
    with Mirror(tiny) as mirror:
        url = mirror.url
    with pytest.raises(DataError) as caught:  # the server is gone: connection refused
        fetch_dataset("tiny", tmp_path / "cache", base_url=url)
    assert caught.value.reason == "unreachable"
    assert f"copy the dataset's files into {tmp_path / 'cache'} by hand" in str(caught.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_an_unknown_dataset_is_refused() -> None:
    with pytest.raises(DataError, match="fetch knows fashion-mnist, mnist"):
        fetch_dataset("cifar")


def test_the_real_mnist_through_the_cli(mnist_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The canonical checksums against the real files, the default cache folder, and the loader."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("UNUS_DATA_DIR", raising=False)
    with Mirror(mnist_dir) as mirror:
        assert main(["data", "fetch", "mnist", "--url", mirror.url]) == 0
    cached = tmp_path / "xdg" / "unus-edge" / "mnist"
    assert str(cached) in capsys.readouterr().out
    train = load_mnist(cached, "train")
    assert len(train) == 60_000
    from unus_edge.data import resolve_data_dir

    assert resolve_data_dir() == cached  # found without a flag or UNUS_DATA_DIR
    with contextlib.suppress(FileNotFoundError):
        assert not any(p.suffix == ".part" for p in cached.iterdir())


FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (make test installs it)


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist is not installed (make test installs it)")
def test_fashion_mnist_is_fetched_checked_and_trained_on_end_to_end(tmp_path: Path) -> None:
    """An IDX dataset other than MNIST: fetched from a file:// mirror (the recorded checksums
    against real files), read by the MNIST loader, and trained on by a federated job."""
    import asyncio

    from unus_edge.config import load_job_config
    from unus_edge.simulation import SimulationOptions, simulate

    folder = fetch_dataset("fashion-mnist", tmp_path / "fashion", base_url=FASHION.as_uri() + "/")
    train, test = load_mnist(folder, "train"), load_mnist(folder, "test")
    assert (len(train), len(test), train.num_classes) == (60_000, 10_000, 10)
    config = load_job_config(environ={}, overrides=[
        "job.name=fashion", "job.rounds=2", "model.source=logreg", "train.learning_rate=0.1",
        "evaluation.dataset=mnist", f"evaluation.data_dir={folder}", "evaluation.num_examples=2000"])
    options = SimulationOptions(config=config, num_devices=3, dataset="mnist", data_dir=str(folder),
                                train_examples=6000)
    report = asyncio.run(asyncio.wait_for(simulate(options), 240))
    assert report.result.state == "finished"
    accuracies = [m.eval_accuracy for m in report.result.history]
    assert accuracies[-1] is not None and accuracies[-1] > 0.6, accuracies  # chance is 0.1
