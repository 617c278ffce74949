"""Every relative link in the README, docs/, examples/ and deploy/ points to a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.brokers import REPO

DOCUMENTS = sorted([REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("examples/*.md"),
                    *REPO.glob("deploy/*/*.md"), *REPO.glob("models/*.md")])
LINK = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_exist(document: Path) -> None:
    missing = [target for target in LINK.findall(document.read_text()) if not (document.parent / target).exists()]
    assert not missing, f"{document.relative_to(REPO)} links to missing {missing}"
