"""docs/strategies.md and examples/README.md: every example in them runs.

* ``python`` blocks run in order, in one namespace per document, in a temporary folder; a block
  whose info string says ``file=NAME`` is written to ``NAME`` there instead (later blocks import
  it, or load it as a strategy file);
* every ``unus-edge ...`` line of a ``console`` block parses with the real command-line parser,
  and its ``--strategy`` with its ``--set strategy.*`` options loads;
* and each distinct ``unus-edge simulate`` line also runs, scaled down (synthetic data, 3 devices,
  2 rounds) over the embedded broker on loopback: in ``tests/integration/test_user_strategy.py``;
* every ``toml`` block is a valid job configuration whose strategy loads;
* relative links point to files that exist.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import REPO
from unus_edge.cli import build_parser
from unus_edge.config import load_device_config, load_job_config
from unus_edge.strategies import load_strategy

DOCUMENTS = [REPO / "docs" / "strategies.md", REPO / "examples" / "README.md"]
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(document: Path, language: str) -> list[tuple[str, str]]:
    """``(info, code)`` of the fenced blocks of ``language``, in order."""
    return [(info.strip(), code) for lang, info, code in BLOCK.findall(document.read_text()) if lang == language]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temporary current folder, importable, where ``examples/`` is the repository's."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:  # the documents' modules must not leak into other tests
        if name == "fedavgm" or name.startswith("unus_edge_user_strategy_"):
            del sys.modules[name]


def write_files(document: Path, folder: Path) -> None:
    for info, code in blocks(document, "python"):
        match = re.search(r"file=(\S+)", info)
        if match:
            (folder / match.group(1)).write_text(code)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_python_examples_run(document: Path, workdir: Path) -> None:
    write_files(document, workdir)
    namespace: dict[str, object] = {"__name__": f"doc_{document.stem}"}
    ran = 0
    for index, (info, code) in enumerate(blocks(document, "python")):
        if "file=" in info:
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                exec(compile(code, f"{document.name}[python block {index}]", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"{document.name}, python block {index} failed:\n{code}") from error
        ran += 1
    assert ran or document.name == "README.md"


def commands(document: Path) -> list[list[str]]:
    found = []
    for _, code in blocks(document, "console"):
        for line in code.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("unus-edge "):
                found.append(shlex.split(line)[1:])
    return found


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_command_lines_parse_and_their_strategies_load(document: Path, workdir: Path) -> None:
    write_files(DOCUMENTS[0], workdir)  # the guide's fedavgm.py, which the examples' README may name too
    lines = commands(document)
    assert lines, f"{document.name} shows no command line"
    for argv in lines:
        args = build_parser().parse_args(argv)
        if getattr(args, "strategy", None) is None:
            continue
        options = [item for item in (args.set or []) if item.startswith("strategy.")]
        config = load_job_config(environ={}, overrides=[f"strategy.name={args.strategy}", *options])
        load_strategy(config.strategy.name, config.strategy.options)


def test_toml_examples_load(workdir: Path) -> None:
    found = blocks(DOCUMENTS[0], "toml")
    assert found
    for index, (_, code) in enumerate(found):
        path = workdir / f"example{index}.toml"
        path.write_text(code)
        if code.lstrip().startswith("[device]"):  # a device.toml: its keys must exist and validate
            load_device_config(path, environ={})
            continue
        config = load_job_config(path, environ={})
        load_strategy(config.strategy.resolved(config.job.mode), config.strategy.options)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_relative_links_exist(document: Path) -> None:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", document.read_text()):
        assert (document.parent / target).exists(), f"{document.name} links to a missing {target}"


def test_every_built_in_strategy_is_documented_and_in_the_help() -> None:
    from unus_edge.strategies import BUILTIN_STRATEGIES

    strategy_help = next(action.help for action in build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr]
                         .choices["simulate"]._actions if "--strategy" in action.option_strings)
    guide, reference = (REPO / "docs" / "strategies.md").read_text(), (REPO / "docs" / "aggregator.md").read_text()
    for name in BUILTIN_STRATEGIES:
        assert f"`{name}`" in guide, f"docs/strategies.md does not list {name}"
        assert f"`{name}`" in reference, f"docs/aggregator.md does not list {name}"
        assert re.search(rf"(^|[ ,]){re.escape(name)}[,. ]", strategy_help or ""), f"--strategy help lacks {name}"
