"""Issue #10's acceptance against published deployment figures (benchmarks/published_figures.py).

- decode: tierlm's decode throughput is an upper bound of every published decode throughput at
  the same hardware, parallelism and batch, and at most 5x it;
- tpot: batch-1 time per output token within 3x of the published measurement;
- capacity: sequences or weight bytes per GPU within +/-25 %;
- docs/planner.md holds the table the script generates now.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("published_figures", ROOT / "benchmarks" / "published_figures.py")
pf = importlib.util.module_from_spec(_spec)
sys.modules["published_figures"] = pf        # dataclasses look their module up while building
_spec.loader.exec_module(pf)


def test_at_least_twelve_sourced_figures_of_every_kind():
    assert len(pf.FIGURES) >= 12
    assert {f.kind for f in pf.FIGURES} == {"decode", "tpot", "capacity"}
    for f in pf.FIGURES:
        assert re.search(r"\((dated )?20\d\d(-\d\d-\d\d)?\)", f.source), f.source    # a date
        assert "/" in f.source and f.quote and f.setting and f.published > 0


@pytest.mark.parametrize("fig", pf.FIGURES, ids=[f"{f.kind}-{i}" for i, f in enumerate(pf.FIGURES)])
def test_ratio_within_acceptance(fig):
    lo, hi = pf.BOUNDS[fig.kind]
    r = fig.ratio()
    assert lo <= r <= hi, f"{fig.setting}: tierlm {fig.tierlm():.4g} vs published {fig.published:.4g} ({r:.2f})"


def test_docs_table_is_current():
    doc = (ROOT / "docs" / "planner.md").read_text()
    m = re.search(re.escape(pf.START) + r"\n(.*?)" + re.escape(pf.END), doc, re.S)
    assert m, "docs/planner.md has no published-figures table; run benchmarks/published_figures.py --write"
    assert m.group(1) == pf.table(), "stale table: run .venv/bin/python benchmarks/published_figures.py --write"
