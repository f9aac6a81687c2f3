"""The repository carries the contract it honours (docs/contract.md), the README links to that
copy, and the copy still says everything the shared original says."""
from __future__ import annotations

import re

from tests import servers

ROOT = servers.ROOT
SHARED = ROOT.parent / "shared" / "contract.md"


def test_the_readme_links_the_projects_own_copy_of_the_contract():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", readme)
    assert "docs/contract.md" in links
    assert not [link for link in links if link.startswith("../")], "a link leaves the repository"
    for link in links:
        if not link.startswith(("http", "#")):
            assert (ROOT / link.split("#")[0]).exists(), link


def test_the_copy_says_all_the_original_says():
    original = SHARED if SHARED.exists() else ROOT.parent.parent / "shared" / "contract.md"
    copy = (ROOT / "docs" / "contract.md").read_text()
    if not original.exists():   # a checkout without the shared folder beside it: the copy stands alone
        assert "## HTTP API" in copy and "YYYYMMDDHHMMSS" in copy
        return
    missing = [line for line in original.read_text().splitlines() if line.strip() and line not in copy]
    assert missing == []
