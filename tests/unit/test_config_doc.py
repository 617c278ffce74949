"""docs/aggregator.md documents every configuration key, and nothing that does not exist."""

from __future__ import annotations

import re
import typing
from dataclasses import fields

from tests.brokers import REPO
from unus_edge.config import DeviceConfig, JobConfig

DOC = (REPO / "docs" / "aggregator.md").read_text()


def keys(cls: type) -> set[str]:
    found = set()
    for name, section in typing.get_type_hints(cls).items():
        for item in fields(section):
            if item.name != "options":
                found.add(f"{name}.{item.name}")
    return found


def test_every_key_is_documented() -> None:
    first_cells = [line.split("|")[1] for line in DOC.splitlines() if line.startswith("| `")]
    pattern = r"`((?:job|model|strategy|train|evaluation|checkpoint|broker|device|predict)\.[a-z_]+)`"
    documented = {key for cell in first_cells for key in re.findall(pattern, cell)}
    expected = keys(JobConfig) | keys(DeviceConfig)
    assert expected - documented == set(), "undocumented keys"
    assert documented - expected == set(), "documented keys that do not exist"
