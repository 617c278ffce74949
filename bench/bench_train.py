"""Training benchmarks of the NumPy engine; every figure is printed with a ratio to a floor or a
baseline measured in the same run.

    python bench/bench_train.py accuracy   [--quick] [--data-dir DIR]   # full MNIST: 2NN >= 97.5%, CNN >= 99.0%
    python bench/bench_train.py throughput [--quick] [--threads 1 2]    # samples/s, ours / PyTorch CPU
    python bench/bench_train.py profile    [--quick]                    # where the time goes, per op
    python bench/bench_train.py rss        [--quick] [--data-dir DIR]   # peak RSS training the CNN, batch 10
    python bench/bench_train.py all        [--quick] [--data-dir DIR]

* accuracy: centralised training on MNIST (60k/10k) with the engine, SGD with momentum and a
  per-epoch learning-rate decay; stops at the target. Ratios: test accuracy / target (the
  floor), and test errors / those of a logistic regression trained in the same run.
* throughput: the same model, batch sizes 1, 10 and 50, plain SGD, the same number of threads
  for NumPy's BLAS and PyTorch (each thread count runs in its own subprocess, since BLAS reads
  its thread count at import). Ours, PyTorch and, for the 2NN, the hand-written NumPy floor
  (``bench/_reference.py``) alternate, best of several repeats each. Ratios: ours / numpy
  (goal >= 0.95, 2NN) and ours / torch (goal >= 0.8, CNN), both at one thread.
* profile: per-op forward/backward time of one epoch slice; shares of the step time.
* rss: peak RSS (``VmHWM``; ``ru_maxrss`` is also printed, but Linux carries it over from the
  spawning parent) of a subprocess training the CNN on a device-sized partition file, against a
  baseline subprocess that imports, loads the same partition and builds the model.

The data folder is ``--data-dir`` or ``$UNUS_DATA_DIR``; without MNIST, accuracy is skipped and
the other benchmarks use random MNIST-shaped data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unus_edge import onnx_io, zoo
from unus_edge.nn import Graph, TrainConfig, gemm_backend, set_gemm_backend, set_gemm_threads, train

MODELS = {"2nn": "mnist_2nn", "cnn": "mnist_cnn"}
TARGETS = {"2nn": 0.975, "cnn": 0.990}
# (batch size, learning rate, momentum, per-epoch decay, max epochs)
RECIPES = {"2nn": (32, 0.05, 0.9, 0.8, 20), "cnn": (50, 0.02, 0.9, 0.7, 10)}


def _data(data_dir: str | None, split: str, num_examples: int | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    from unus_edge.data import load_mnist, resolve_data_dir

    folder = resolve_data_dir(data_dir)
    if folder is None or not folder.is_dir():
        return None
    dataset = load_mnist(folder, split, num_examples=num_examples)  # type: ignore[arg-type]
    return dataset.x, dataset.y


def _random_data(num_examples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((num_examples, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, num_examples)


# ----------------------------------------------------------------------------- accuracy


def bench_accuracy(args: argparse.Namespace) -> dict[str, Any]:
    train_data = _data(args.data_dir, "train", 10_000 if args.quick else None)
    test_data = _data(args.data_dir, "test", 2_000 if args.quick else None)
    if train_data is None or test_data is None:
        print("accuracy: skipped (no MNIST: pass --data-dir or set UNUS_DATA_DIR)")
        return {}
    results: dict[str, Any] = {}
    # Baseline measured in the same run: logistic regression, one epoch of the 2NN recipe.
    logreg = zoo.resolve_model("logreg")
    baseline_config = TrainConfig(epochs=1, batch_size=32, learning_rate=0.05, momentum=0.9)
    start = time.perf_counter()
    trained = train(Graph(logreg), onnx_io.read_parameters(logreg), train_data[0], train_data[1], baseline_config)
    baseline = onnx_io.Evaluator(logreg, backend="numpy").evaluate(trained.params, test_data[0], test_data[1]).accuracy
    print(f"accuracy baseline: logreg, 1 epoch: {baseline:.4f} ({time.perf_counter() - start:.1f} s)")
    results["logreg_baseline"] = {"accuracy": baseline}
    for key, name in MODELS.items():
        batch_size, learning_rate, momentum, decay, max_epochs = RECIPES[key]
        if args.quick:
            max_epochs = 1
        model = zoo.resolve_model(name)
        graph = Graph(model)
        evaluator = onnx_io.Evaluator(model, backend="numpy")
        params = onnx_io.read_parameters(model)
        print(f"accuracy {key}: batch {batch_size}, lr {learning_rate} x {decay}^epoch, momentum {momentum}")
        start = time.perf_counter()
        accuracy, epoch = 0.0, 0
        for epoch in range(1, max_epochs + 1):
            config = TrainConfig(
                epochs=1,
                batch_size=batch_size,
                learning_rate=learning_rate * decay ** (epoch - 1),
                momentum=momentum,
                seed=epoch,
            )
            result = train(graph, params, train_data[0], train_data[1], config)
            params = result.params
            accuracy = evaluator.evaluate(params, test_data[0], test_data[1]).accuracy
            elapsed = time.perf_counter() - start
            print(f"  epoch {epoch:2d}: train loss {result.mean_loss:.4f}  test acc {accuracy:.4f}  {elapsed:7.1f} s")
            if accuracy >= TARGETS[key]:
                break
        elapsed = time.perf_counter() - start
        ratio = accuracy / TARGETS[key]
        errors = (1 - accuracy) / (1 - baseline)
        print(
            f"  -> {key}: {accuracy:.4f} after {epoch} epochs, {elapsed:.1f} s; ratio to the floor "
            f"{TARGETS[key]}: {ratio:.4f}; test errors vs the logreg baseline: {errors:.2f}x"
        )
        results[key] = {
            "accuracy": accuracy,
            "epochs": epoch,
            "seconds": elapsed,
            "ratio_vs_floor": ratio,
            "errors_vs_logreg": errors,
        }
    return results


# ----------------------------------------------------------------------------- throughput


def _torch_twin(name: str, params: dict[str, np.ndarray]) -> Any:
    import torch

    nn = torch.nn
    if name == "mnist_2nn":
        net = nn.Sequential()
        net.add_module("flatten", nn.Flatten())
        for index, (fan_in, fan_out) in enumerate(((784, 200), (200, 200), (200, 10)), start=1):
            net.add_module(f"fc{index}", nn.Linear(fan_in, fan_out))
            if index < 3:
                net.add_module(f"relu{index}", nn.ReLU())
    else:
        net = nn.Sequential()
        net.add_module("conv1", nn.Conv2d(1, 32, 5, padding=2))
        net.add_module("relu1", nn.ReLU())
        net.add_module("pool1", nn.MaxPool2d(2))
        net.add_module("conv2", nn.Conv2d(32, 64, 5, padding=2))
        net.add_module("relu2", nn.ReLU())
        net.add_module("pool2", nn.MaxPool2d(2))
        net.add_module("flatten", nn.Flatten())
        net.add_module("fc1", nn.Linear(3136, 512))
        net.add_module("relu3", nn.ReLU())
        net.add_module("fc2", nn.Linear(512, 10))
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
    return net


def _measure(name: str, batch_size: int, steps: int, repeats: int, torch: Any) -> dict[str, Any]:
    """Samples/s of ours and of PyTorch on the same model, data, batch order and optimizer."""
    model = zoo.resolve_model(name)
    graph = Graph(model)
    params = onnx_io.read_parameters(model)
    x, y = _random_data(steps * batch_size)
    # Plain SGD, as the federated jobs (FedAvg, E=1, B=10) and the hand-written floor run it.
    config = TrainConfig(epochs=1, batch_size=batch_size, learning_rate=0.01)
    train(graph, params, x[: 3 * batch_size], y[: 3 * batch_size], config)  # warm up

    def ours() -> None:
        train(graph, params, x, y, config)

    def ours_numpy_products() -> None:  # the engine with every product in NumPy's OpenBLAS
        set_gemm_backend("numpy")
        try:
            train(graph, params, x, y, config)
        finally:
            set_gemm_backend("auto")

    runners: dict[str, Callable[[], None]] = {"ours": ours}
    if gemm_backend() == "onnxruntime":
        runners["ours_numpy_products"] = ours_numpy_products
    if name == "mnist_2nn":
        from _reference import train_reference

        def floor() -> None:
            train_reference(params, x, y, epochs=1, batch_size=batch_size, learning_rate=0.01, seed=0)

        floor()  # warm up
        runners["numpy"] = floor
    if torch is not None:
        net = _torch_twin(name, params)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        order = torch.from_numpy(np.random.default_rng(1).permutation(len(y)))

        def theirs() -> None:
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(net(tx[index]), ty[index]).backward()
                optimizer.step()

        theirs()  # warm up
        runners["torch"] = theirs
    best = dict.fromkeys(runners, float("inf"))
    for _ in range(repeats):  # alternate, so that a noisy neighbour hurts both
        for label, runner in runners.items():
            start = time.perf_counter()
            runner()
            best[label] = min(best[label], time.perf_counter() - start)
    entry = {f"{label}_samples_per_s": len(y) / seconds for label, seconds in best.items()}
    if "torch" in best:
        entry["ratio_ours_over_torch"] = best["torch"] / best["ours"]
    if "numpy" in best:
        entry["ratio_ours_over_numpy"] = best["numpy"] / best["ours"]
    return entry


def _throughput_worker(threads: int, quick: bool) -> dict[str, Any]:
    """Runs in a subprocess whose BLAS thread count is fixed by the environment."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
    set_gemm_threads(threads)
    results: dict[str, Any] = {"gemm_backend": gemm_backend()}
    for key, name in MODELS.items():
        for batch_size in (1, 10, 50):
            steps = (60 if quick else 300) if key == "2nn" else (8 if quick else 30)
            steps *= 5 if batch_size == 1 else 1
            results[f"{key}_batch{batch_size}"] = _measure(name, batch_size, steps, 2 if quick else 4, torch)
    return results


def bench_throughput(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for threads in args.threads:
        env = dict(os.environ)
        for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[variable] = str(threads)
        command = [sys.executable, __file__, "throughput-worker", "--threads", str(threads)]
        if args.quick:
            command.append("--quick")
        output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
        figures = json.loads(output.strip().splitlines()[-1])
        results[f"threads{threads}"] = figures
        print(f"throughput threads {threads}: large float32 products in {figures.pop('gemm_backend')}")
        for case, entry in figures.items():
            line = f"throughput {case:13s} threads {threads}: ours {entry['ours_samples_per_s']:8.0f} samples/s"
            if "ours_numpy_products_samples_per_s" in entry:
                line += f" (NumPy products {entry['ours_numpy_products_samples_per_s']:8.0f})"
            if "torch_samples_per_s" in entry:
                ratio = entry["ratio_ours_over_torch"]
                line += f"  torch {entry['torch_samples_per_s']:8.0f}  ratio ours/torch {ratio:.2f}"
            if "numpy_samples_per_s" in entry:
                line += (f"  hand-written numpy {entry['numpy_samples_per_s']:8.0f}  ratio ours/numpy "
                         f"{entry['ratio_ours_over_numpy']:.2f} (goal >= 0.95 at 1 thread)")
            elif "torch_samples_per_s" in entry and case.startswith("cnn"):
                line += " (goal >= 0.80 at 1 thread)"
            print(line)
    return results


# ----------------------------------------------------------------------------- profile


def _instrument(graph: Graph, timings: Counter[str]) -> None:
    """Wrap every op's forward and backward with a timer accumulating into ``timings``."""
    for op in graph.ops:
        for method in ("forward", "backward"):
            original = getattr(op, method)
            label = f"{op.node.op_type}:{op.node.name} {method}"

            def timed(*call: Any, _original: Any = original, _label: str = label) -> Any:
                start = time.perf_counter()
                value = _original(*call)
                timings[_label] += time.perf_counter() - start
                return value

            setattr(op, method, timed)


def bench_profile(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for key, name in MODELS.items():
        for batch_size in (10, 50):
            model = zoo.resolve_model(name)
            graph = Graph(model)
            params = onnx_io.read_parameters(model)
            timings: Counter[str] = Counter()
            _instrument(graph, timings)
            steps = (50 if args.quick else 200) if key == "2nn" else (5 if args.quick else 20)
            x, y = _random_data(steps * batch_size)
            config = TrainConfig(epochs=1, batch_size=batch_size, learning_rate=0.01, momentum=0.9)
            train(graph, params, x[: 2 * batch_size], y[: 2 * batch_size], config)
            timings.clear()
            start = time.perf_counter()
            train(graph, params, x, y, config)
            total = time.perf_counter() - start
            timings["loss, SGD update, batching (rest)"] = total - sum(timings.values())
            print(f"profile {key} batch {batch_size}: {total / steps * 1e3:.2f} ms per step")
            for label, seconds in timings.most_common(8):
                print(f"  {label:40s} {seconds / steps * 1e3:7.3f} ms  {seconds / total:6.1%}")
            results[f"{key}_batch{batch_size}"] = {
                "ms_per_step": total / steps * 1e3,
                "shares": {label: seconds / total for label, seconds in timings.most_common()},
            }
    return results


# ----------------------------------------------------------------------------- rss


def _rss_worker(partition: str, mode: str) -> dict[str, Any]:
    """Load a device partition file, build the CNN and (mode "train") train one epoch at batch 10."""
    import resource

    from unus_edge.data import load_partition

    dataset = load_partition(partition)
    model = zoo.resolve_model("mnist_cnn")
    graph = Graph(model)
    params = onnx_io.read_parameters(model)
    seconds = 0.0
    if mode == "train":
        start = time.perf_counter()
        config = TrainConfig(epochs=1, batch_size=10, learning_rate=0.01, momentum=0.9)
        train(graph, params, dataset.x, dataset.y, config)
        seconds = time.perf_counter() - start
    # ru_maxrss survives execve on Linux: a child spawned by a large parent reports at least the
    # parent's peak. VmHWM is the high-water mark of this process's own address space.
    maxrss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    peak_mb = maxrss_mb
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak_mb = int(line.split()[1]) / 1024
    except OSError:
        pass
    return {"peak_rss_mb": peak_mb, "ru_maxrss_mb": maxrss_mb, "seconds": seconds, "num_examples": len(dataset)}


def bench_rss(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    from unus_edge.data import Dataset, save_partition

    results: dict[str, Any] = {}
    sizes = (600,) if args.quick else (600, 6000)
    source = _data(args.data_dir, "train", max(sizes)) or _random_data(max(sizes))
    with tempfile.TemporaryDirectory() as folder:
        for num_examples in sizes:
            partition = str(Path(folder) / f"device_{num_examples}.npz")
            save_partition(partition, Dataset(source[0][:num_examples], source[1][:num_examples].astype(np.int64), 10))
            figures = {}
            for mode in ("baseline", "train"):
                command = [sys.executable, __file__, "rss-worker", "--partition", partition, "--mode", mode]
                output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                figures[mode] = json.loads(output.strip().splitlines()[-1])
            peak, base = figures["train"]["peak_rss_mb"], figures["baseline"]["peak_rss_mb"]
            seconds = figures["train"]["seconds"]
            print(
                f"rss cnn batch 10, partition of {num_examples} examples, 1 epoch ({seconds:.1f} s): "
                f"peak {peak:.0f} MB; baseline (imports, partition, model; no training) {base:.0f} MB; "
                f"ratio {peak / base:.2f}; goal < 200 MB (ru_maxrss {figures['train']['ru_maxrss_mb']:.0f} MB)"
            )
            results[f"examples{num_examples}"] = {"peak_rss_mb": peak, "baseline_rss_mb": base, "ratio": peak / base}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "benchmark",
        choices=["accuracy", "throughput", "profile", "rss", "all", "throughput-worker", "rss-worker"],
    )
    parser.add_argument("--quick", action="store_true", help="small data and few repeats")
    parser.add_argument("--data-dir", default=None, help="MNIST folder (default: $UNUS_DATA_DIR)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="BLAS/torch threads")
    parser.add_argument("--partition", default="", help="rss-worker: the partition file to train on")
    parser.add_argument("--mode", choices=["baseline", "train"], default="train", help="rss-worker")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if args.benchmark == "throughput-worker":
        print(json.dumps(_throughput_worker(args.threads[0], args.quick)))
        return
    if args.benchmark == "rss-worker":
        print(json.dumps(_rss_worker(args.partition, args.mode)))
        return
    benchmarks: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
        "throughput": bench_throughput,
        "profile": bench_profile,
        "rss": bench_rss,
        "accuracy": bench_accuracy,
    }
    results = {}
    for name, function in benchmarks.items():
        if args.benchmark in (name, "all"):
            results[name] = function(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
