"""docs/reliability.md, the fault and bad-input matrix, stays true to the tests: at least 40 numbered rows, each
naming a test, and every test it names exists."""

from __future__ import annotations

import re

from helpers import ROOT

DOC = ROOT / "docs" / "reliability.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)")


def _rows() -> list[str]:
    return [line for line in DOC.read_text().splitlines() if re.match(r"\| \d+ \|", line)]


def test_the_matrix_has_at_least_40_rows_each_with_a_test():
    rows = _rows()
    assert len(rows) >= 40
    numbers = [int(r.split("|")[1]) for r in rows]
    assert numbers == list(range(1, len(rows) + 1)), "rows are numbered in order, without gaps"
    missing = [r[:60] for r in rows if not REF.search(r)]
    assert not missing, missing


def test_every_test_the_matrix_names_exists():
    names = set(REF.findall(DOC.read_text()))
    assert names
    absent = [f"{path}::{name}" for path, name in sorted(names) if f"def {name}(" not in (ROOT / path).read_text()]
    assert not absent, absent
