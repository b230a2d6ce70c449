"""The fidelity ledger (docs/fidelity.md) against the profiles: every value it states is the profile's value."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from domgen.config import EXPERIMENTS_DIR

LEDGER = Path(__file__).resolve().parents[1] / "docs" / "fidelity.md"
STATUSES = {"as written", "interpretation", "departure"}
COLUMNS = ["step", "the paper", "key", "paper", "quick", "status", "why"]


def ledger_sections(text: str) -> dict[str, list[dict[str, str]]]:
    """{family: rows} of the ledger; a section is a "## ..." heading naming `experiments/<family>/`."""
    sections: dict[str, list[dict[str, str]]] = {}
    family = None
    for line in text.splitlines():
        heading = re.match(r"^## .*`experiments/([a-z_]+)/`", line)
        if heading:
            family = heading.group(1)
            sections[family] = []
            continue
        if line.startswith("## "):
            family = None
        if family is None or not line.startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if cells == COLUMNS or set("".join(cells)) <= set("-: "):
            continue
        assert len(cells) == len(COLUMNS), f"ledger row of {family} has {len(cells)} cells, not {len(COLUMNS)}: {line}"
        sections[family].append(dict(zip(COLUMNS, cells)))
    return sections


def _code(cell: str) -> str | None:
    """The text inside one pair of backticks, or None for '-'."""
    if cell == "-":
        return None
    match = re.fullmatch(r"`([^`]*)`", cell)
    assert match, f"a ledger value must be `YAML` in backticks or '-', not {cell!r}"
    return match.group(1)


_MISSING = object()


def _lookup(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _rows():
    sections = ledger_sections(LEDGER.read_text())
    for family, rows in sections.items():
        for row in rows:
            yield pytest.param(family, row, id=f"{family}:{row['step']}")


def test_ledger_has_a_section_per_paper_profile():
    sections = ledger_sections(LEDGER.read_text())
    families = sorted(p.parent.name for p in EXPERIMENTS_DIR.glob("*/paper.yaml"))
    assert sorted(sections) == families
    assert all(len(rows) >= 1 for rows in sections.values())


@pytest.mark.parametrize("family,row", list(_rows()))
def test_ledger_row_agrees_with_the_profiles(family, row):
    assert row["status"] in STATUSES, f"status {row['status']!r} is not one of {sorted(STATUSES)}"
    if row["status"] != "as written":
        assert len(row["why"]) > 10, f"an {row['status']} needs a reason: {row['step']}"
    assert row["the paper"], f"the paper's words are missing: {row['step']}"
    key = _code(row["key"])
    if key is None:  # a formula in the code: no profile value to compare
        assert row["paper"] == "-" and row["quick"] == "-"
        return
    for profile in ("paper", "quick"):
        cfg = yaml.safe_load((EXPERIMENTS_DIR / family / f"{profile}.yaml").read_text())
        actual = _lookup(cfg, key)
        stated = _code(row[profile])
        if stated is None:
            assert actual is _MISSING, f"{family}/{profile}.yaml sets {key} = {actual!r}; the ledger says it is not set"
            continue
        assert actual is not _MISSING, f"{family}/{profile}.yaml does not set {key}; the ledger says {stated}"
        assert actual == yaml.safe_load(stated), f"{family}/{profile}.yaml: {key} = {actual!r}, the ledger says {stated}"
