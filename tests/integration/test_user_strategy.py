"""A user-written strategy, examples/fedadam.py, loaded from its file and run end to end.

* ``unus-edge simulate --strategy examples/fedadam.py:FedAdam`` as a child process, over its
  embedded amqtt broker, and against a Mosquitto process;
* its arithmetic (one Adam step on the mean delta, by hand), its checkpoint round trip and its
  composition with robust aggregation, in-process;
* it is what the issue asks: at most ~60 lines, public API only.
"""

from __future__ import annotations

import ast
import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.brokers import PYTHON, REPO, MosquittoBroker, python_env
from unus_edge.strategies import ClientUpdate, FedAvg, load_strategy, strategy_class
from unus_edge.strategies._robust import Robust

EXAMPLE = REPO / "examples" / "fedadam.py"
SPEC = "examples/fedadam.py:FedAdam"
ROUNDS = 4


def simulate_cli(out: Path, *extra: str) -> dict[str, Any]:
    """The documented command, from the repository root, as a child process."""
    command = [PYTHON, "-m", "unus_edge.cli", "simulate", "--strategy", SPEC,
               "--set", "strategy.server_learning_rate=0.01", "--dataset", "synthetic", "--devices", "3",
               "--rounds", str(ROUNDS), "--train-examples", "900", "--eval-examples", "300", "--lr", "0.05",
               "--deadline", "120", "--out", str(out), *extra]
    completed = subprocess.run(command, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=280)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return json.loads((out / "metrics.json").read_text())  # type: ignore[no-any-return]


def check(metrics: dict[str, Any]) -> None:
    summary, rounds = metrics["summary"], metrics["rounds"]
    assert summary["state"] == "finished"
    assert summary["strategy"] == SPEC
    assert [row["num_updates"] for row in rounds] == [3] * ROUNDS
    assert [row["version"] for row in rounds] == list(range(1, ROUNDS + 1))  # every round changed the model
    assert rounds[-1]["eval_accuracy"] > max(0.5, rounds[0]["eval_accuracy"])  # and it learned


def test_the_example_runs_from_the_command_line_over_amqtt(tmp_path: Path) -> None:
    check(simulate_cli(tmp_path / "run"))


@pytest.mark.mosquitto
def test_the_example_runs_from_the_command_line_over_mosquitto(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        broker = MosquittoBroker(tmp_path)
        await broker.start()
        try:
            return await asyncio.to_thread(simulate_cli, tmp_path / "run", "--broker", broker.url)
        finally:
            await broker.stop()

    check(asyncio.run(scenario()))


def documented_simulate_commands() -> list[list[str]]:
    from tests.unit.test_strategies_doc import DOCUMENTS, commands

    distinct: list[list[str]] = []
    for document in DOCUMENTS:
        distinct += [argv for argv in commands(document) if argv[0] == "simulate" and argv not in distinct]
    return distinct


@pytest.mark.parametrize("argv", documented_simulate_commands(), ids=lambda argv: " ".join(argv[1:3]))
def test_the_documented_command_lines_run(argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each ``unus-edge simulate`` line of docs/strategies.md and examples/README.md, scaled down, runs."""
    from tests.unit.test_strategies_doc import DOCUMENTS, write_files
    from unus_edge.cli import main

    (tmp_path / "examples").symlink_to(REPO / "examples")
    write_files(DOCUMENTS[0], tmp_path)  # the guide's fedavgm.py
    monkeypatch.chdir(tmp_path)
    small = ["--dataset", "synthetic", "--devices", "4", "--rounds", "2", "--train-examples", "800",
             "--eval-examples", "200", "--deadline", "120", "--out", str(tmp_path / "run")]
    assert main(["--quiet", *argv, *small]) == 0  # later flags win: the document's own flags are kept otherwise
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())["summary"]
    assert summary["state"] == "finished"


# ------------------------------------------------------------------------------ in-process


def update(device_id: str, n: int, values: list[float]) -> ClientUpdate:
    return ClientUpdate(device_id, n, {"w": np.array(values, np.float32)}, base_version=0, train_loss=0.1)


def test_one_adam_step_by_hand() -> None:
    strategy = load_strategy(f"{EXAMPLE}:FedAdam",
                             {"server_learning_rate": 0.1, "beta1": 0.5, "beta2": 0.75, "tau": 0.01})
    params = {"w": np.array([1.0, 1.0], np.float32)}
    accumulator = strategy.new_accumulator(1, params)
    accumulator.add(update("a", 1, [2.0, 0.0]))
    accumulator.add(update("b", 3, [2.0, -4.0]))  # mean delta d = (2, -3)
    result = strategy.aggregate(1, params, accumulator, [])
    assert result is not None
    d = np.array([2.0, -3.0])
    m = 0.5 * d
    v = 0.75 * 0.01**2 + 0.25 * d * d
    np.testing.assert_allclose(result["w"], 1.0 + 0.1 * m / (np.sqrt(v) + 0.01), rtol=1e-6)
    assert result["w"].dtype == np.float32
    empty = strategy.new_accumulator(2, result)
    assert strategy.aggregate(2, result, empty, []) is None  # nobody answered: model kept

    tensors, scalars = strategy.state_dict()
    again = load_strategy(f"{EXAMPLE}:FedAdam", {"server_learning_rate": 0.1, "beta1": 0.5, "beta2": 0.75,
                                                  "tau": 0.01})
    again.load_state_dict({name: np.array(value) for name, value in tensors.items()}, json.loads(json.dumps(scalars)))
    following = [update("a", 1, [1.0, 1.0])]
    results = []
    for instance in (strategy, again):
        accumulator = instance.new_accumulator(2, result)
        for item in following:
            accumulator.add(item)
        results.append(instance.aggregate(2, result, accumulator, []))
    assert np.array_equal(results[0]["w"], results[1]["w"])  # type: ignore[index]


def test_it_composes_with_robust_aggregation() -> None:
    fedadam = strategy_class(f"{EXAMPLE}:FedAdam")

    class RobustFedAdam(Robust):
        def __init__(self, robust: str = "median") -> None:
            super().__init__(fedadam(server_learning_rate=0.1), robust)

    params = {"w": np.zeros(1, np.float32)}
    steps = {}
    for robust in ("none", "median"):
        strategy = RobustFedAdam(robust)
        accumulator = strategy.new_accumulator(1, params)
        for item in (update("a", 1, [1.0]), update("b", 1, [2.0]), update("evil", 1, [-1000.0])):
            accumulator.add(item)
        steps[robust] = float(strategy.aggregate(1, params, accumulator, [])["w"][0])  # type: ignore[index]
    assert steps["none"] < 0 < steps["median"]  # the median's pseudo-gradient ignores the attacker


def test_it_is_short_and_uses_the_public_api_only() -> None:
    source = EXAMPLE.read_text()
    assert len(source.splitlines()) <= 60
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unus_edge"):
            assert node.module == "unus_edge.strategies", node.module
        if isinstance(node, ast.Import):
            assert all(not alias.name.startswith("unus_edge") for alias in node.names)
    assert issubclass(strategy_class(f"{EXAMPLE}:FedAdam"), FedAvg)


def test_its_moments_survive_an_aggregator_checkpoint() -> None:
    """Through the synchronous driver's checkpoint state, as an aggregator restart restores it."""
    from types import SimpleNamespace

    from unus_edge.aggregator._driver import RoundDriver

    strategy = load_strategy(f"{EXAMPLE}:FedAdam")
    params = {"w": np.zeros(1, np.float32)}
    accumulator = strategy.new_accumulator(1, params)
    accumulator.add(update("a", 1, [1.0]))
    strategy.aggregate(1, params, accumulator, [])
    view = SimpleNamespace(params=params, version=1)
    state, tensors = RoundDriver(view, SimpleNamespace(), strategy).state()  # type: ignore[arg-type]
    assert {"strategy/m/w", "strategy/v/w"} <= set(tensors)
    restored = load_strategy(f"{EXAMPLE}:FedAdam")
    RoundDriver(SimpleNamespace(version=1), SimpleNamespace(), restored).restore(  # type: ignore[arg-type]
        json.loads(json.dumps(state)), {name: np.array(value) for name, value in tensors.items()})
    assert np.array_equal(restored.m["w"], strategy.m["w"])  # type: ignore[attr-defined]
    assert np.array_equal(restored.v["w"], strategy.v["w"])  # type: ignore[attr-defined]
