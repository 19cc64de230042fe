"""benchmarks/bld_settings.py on a tiny parent: every variant trains the whole library again from the
same initializations, and a setting that trains moves the blocks further than one that barely does."""

from __future__ import annotations

import json

from conftest import load_benchmark

from puzzlenas.cli import main as cli


def test_variants_share_initializations_and_the_budget(tiny_run):
    work = tiny_run.parent / "w"
    assert cli(["run", str(tiny_run), "--workdir", str(work), "--only", "data", "--quiet"]) == 0
    bench = load_benchmark("bld_settings")
    table = bench.main(["--workdir", str(work), "--tokens", "1024", "--variants", "8:1e-5,2:3e-3", "--quiet"])
    result = json.loads((work / "bld-settings.json").read_text())
    slow, fast = result["variants"]["8x1e-05-1024tok"], result["variants"]["2x0.003-1024tok"]
    assert (slow["steps"], fast["steps"]) == (4, 16)  # 1024 tokens of 32-token sequences
    assert slow["kinds"].keys() == fast["kinds"].keys() and "attention linear" in fast["kinds"]
    for kind, f in fast["kinds"].items():
        s = slow["kinds"][kind]
        assert s["init"] == f["init"] and s["blocks"] == f["blocks"]  # the same starting blocks
        assert f["trained"] <= f["init"] and s["trained"] <= s["init"]  # never worse than the start (bld keeps it)
    for kind in ("attention gqa1", "ffn mlp48"):  # the tiny parent's linear blocks start at their best fit
        assert fast["kinds"][kind]["trained"] < slow["kinds"][kind]["trained"]  # 16 steps at 3e-3 learn more than 4 at 1e-5
    # each variant keeps its library apart from W's own, and the table has a row per variant
    assert (work / "bld-settings" / "2x0.003-1024tok" / "library" / "index.json").exists()
    assert not (work / "library").exists()
    assert "| 8x1e-05-1024tok | 4 |" in table and "| 2x0.003-1024tok | 16 |" in table
