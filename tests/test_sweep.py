"""`puzzlenas sweep`: several targets from one library and one score set, child and both baselines at
each, one table and one plot; a second target trains nothing, a rerun redoes nothing, and targets
evaluated before with the same settings join the table."""

from __future__ import annotations

import json
from pathlib import Path

import test_faults
import yaml
from conftest import make_tiny_parent, make_tiny_tokenizer

from puzzlenas.cli import main
from puzzlenas.sweep import SHARED as sweep_shared


def shared_state(work: Path) -> dict[str, tuple[int, int]]:
    """Every file of the shared upstream artifacts and markers: (mtime_ns, size)."""
    out = {}
    for rel in ("library", "scores", "costs", "data", "stages/data.json", "stages/bld.json", "stages/score.json",
                "stages/costs.json"):
        path = work / rel
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            out[str(f.relative_to(work))] = (f.stat().st_mtime_ns, f.stat().st_size)
    return out


def test_sweep_reuses_library_and_scores(tmp_path):
    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    make_tiny_tokenizer().save_pretrained(tmp_path / "parent")
    raw = test_faults.fault_config(tmp_path / "parent")
    raw["search"] = {"solutions": 2, "diversity": 0.5}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    work = tmp_path / "work"
    args = ["sweep", str(tmp_path / "cfg.yaml"), "--workdir", str(work), "--quiet", "--targets"]

    assert main([*args, "1.2"]) == 0
    before = shared_state(work)
    assert any(k.startswith("library/blocks/") for k in before)
    # the first target is done and not named again: it joins the table; the second reads W's library
    assert main([*args, "1.5x"]) == 0
    assert shared_state(work) == before  # no block trained, scored or costed again
    # 1.5x is the config's own target (search.throughput's default): it runs in W, as `puzzlenas run` would
    assert not (work / "sweep" / "1.5x").exists()
    folders = {"1.2x": work / "sweep" / "1.2x", "1.5x": work}
    sub = folders["1.2x"]
    assert (sub / "library").is_symlink() and (sub / "scores").is_symlink() and (sub / "eval-memo").is_symlink()
    for t, sub in folders.items():
        cfg = yaml.safe_load((sub / "config.yaml").read_text())
        assert cfg["search"]["throughput"] == float(t[:-1])
        assert (sub / "search" / "selection.json").is_file() and (sub / "eval" / "results.json").is_file()
        assert not list(sub.glob("stages/bld*")) or json.loads((sub / "stages" / "bld.json").read_text()) == \
            json.loads((work / "stages" / "bld.json").read_text())
    # the parent's quality was measured for the first target only; the second read it back (eval/memo.py)
    measured = [json.loads(f.read_text())["model"] for f in (work / "eval-memo").glob("*.json")]
    assert measured.count("parent") == 1, measured
    parents = [json.loads((sub / "eval" / "results.json").read_text())["models"]["parent"] for sub in folders.values()]
    assert parents[0]["wikitext2"] == parents[1]["wikitext2"]
    sweep = json.loads((work / "report" / "sweep.json").read_text())
    assert sweep["targets"] == [1.2, 1.5] and list(sweep["rows"]) == ["1.2x", "1.5x"]
    assert sweep["folders"] == {"1.2x": "sweep/1.2x", "1.5x": "."}
    for t, rows in sweep["rows"].items():
        results = json.loads((folders[t] / "eval" / "results.json").read_text())["models"]
        assert rows["child"]["kl"] == results["child"]["kl"]
        assert rows["child"]["speedup"] == results["child"]["speed"]["total_speedup"]
        for name in ("width", "depth"):
            assert ("kl" in rows[name]) == (f"{name} baseline" in results)
    table = (work / "report" / "sweep.md").read_text()
    assert "| 1.2x | child" in table and "| 1.5x | child" in table
    assert (work / "report" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    report = (work / "report" / "report.md").read_text()  # W's own target's sections, then the sweep's
    assert "## Selection among the diverse solutions" in report and "## Pareto sweep" in report
    assert "## Selection among the diverse solutions" in (work / "sweep" / "1.2x" / "report" / "report.md").read_text()

    # everything done: a rerun of the sweep redoes no stage of any target
    # (not W's report stage, redone by every sweep to write the combined table into W's report, nor
    # the targets' copies of W's shared markers, copied again by every sweep)
    markers = {p: p.stat().st_mtime_ns for p in sorted([*work.glob("sweep/*/stages/*.json"), *work.glob("stages/*.json")])
               if p != work / "stages" / "report.json" and not (p.parent.parent != work and p.stem in sweep_shared)}
    assert main([*args, "1.2", "1.5"]) == 0
    assert {p: p.stat().st_mtime_ns for p in markers} == markers

    # a target evaluated with other settings (here: its eval marker's fingerprint no longer matches)
    # is left out of a later sweep's table instead of being shown beside results it cannot be compared with
    marker = work / "sweep" / "1.2x" / "stages" / "eval.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "fingerprint": "other-settings"}))
    assert main([*args, "1.5"]) == 0
    sweep = json.loads((work / "report" / "sweep.json").read_text())
    assert sweep["targets"] == [1.5] and list(sweep["rows"]) == ["1.5x"]
    assert "| 1.2x |" not in (work / "report" / "sweep.md").read_text()
