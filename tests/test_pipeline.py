"""`puzzlenas run` end to end on a tiny random model, with kills in BLD and GKD, and the presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_DATA, kill_at_step, make_tiny_parent, make_tiny_tokenizer, start_cli

from puzzlenas.config import PRESETS, load_config
from puzzlenas.pipeline import STAGES


def tiny_run_config(parent_dir: Path) -> dict:
    return {
        "parent": str(parent_dir),
        "data": {"path": str(SHARED_DATA / "distill" / "gutenberg" / "pg11_Alice-s-Adventures-in-Wonderland.txt"),
                 "seq_len": 32, "max_train_sequences": 96, "val_sequences": 8},
        "search_space": {"ffn": [1.0, 0.5, "linear", "no_op"], "ffn_multiple_of": 8},
        "init": {"calibration_sequences": 16},
        "bld": {"tokens": 8192, "batch_size": 4, "lr": 3e-4, "checkpoint_every": 4, "dtype": "float32"},
        "score": {"sequences": 4},
        "costs": {"repeats": 3, "warmup": 1, "scenario": {"batch_size": 1, "prompt_len": 32, "generate_len": 16}},
        "search": {"throughput": 1.2, "solutions": 2},
        "gkd": {"tokens": 4096, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 4, "val_every": 8, "dtype": "float32"},
        "eval": {"task_data_dir": str(SHARED_DATA), "limit": 2, "ppl_context": 64, "ppl_max_tokens": 256,
                 "kl_sequences": 4, "speed_repeats": 1},
    }


def test_run_end_to_end_with_kills_in_bld_and_gkd(tmp_path):
    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    make_tiny_tokenizer().save_pretrained(tmp_path / "parent")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(tiny_run_config(tmp_path / "parent")))
    work = tmp_path / "work"
    args = ["run", str(tmp_path / "cfg.yaml"), "--workdir", str(work), "--quiet"]

    killed_bld = kill_at_step(start_cli(args), work / "library" / "state" / "rank0-of1.pt", 8)
    assert killed_bld is not None, "BLD finished before it could be killed"
    assert json.loads((work / "stages" / "data.json").read_text())["tokens"] > 0
    assert not (work / "stages" / "bld.json").exists()

    killed_gkd = kill_at_step(start_cli(args), work / "gkd" / "state.pt", 8)
    assert killed_gkd is not None, "GKD finished before it could be killed"
    assert (work / "stages" / "bld.json").is_file() and (work / "stages" / "search.json").is_file()

    final = start_cli(args)
    out = final.communicate(timeout=900)[0]
    assert final.returncode == 0, out[-4000:]
    assert "resuming GKD from step" in out
    for stage in STAGES:
        assert (work / "stages" / f"{stage}.json").is_file(), stage
    for path in ("config.yaml", "library/index.json", "scores/replace1.json", "search/solutions.json",
                 "child/config.json", "baselines/width/solution.json", "baselines/depth/child/config.json",
                 "eval/results.json", "report/report.md", "report/report.html", "report/architecture.png",
                 "report/quality_vs_speed.png"):
        assert (work / path).is_file(), path
    assert len(list((work / "costs").glob("*.json"))) == 1
    results = json.loads((work / "eval" / "results.json").read_text())["models"]
    assert {"parent", "child", "depth baseline"} <= set(results)
    width = json.loads((work / "baselines" / "width" / "solution.json").read_text())
    # the tiny model is dominated by per-call overhead: uniform FFN pruning cannot reach 1.2x, and says so
    assert ("width baseline" in results) != ("infeasible" in width)
    assert results["parent"]["kl"] == 0.0 and results["child"]["kl"] > 0
    assert set(results["child"]["tasks"]) == {"lambada_openai", "arc_challenge", "boolq", "openbookqa"}
    report = (work / "report" / "report.md").read_text()
    assert "| child |" in report and "Predicted vs measured" in report

    # a rerun skips everything; a new target redoes the search and what follows, not BLD
    again = start_cli(args)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0 and out.count("skipped") == len(STAGES), out[-2000:]
    bld_marker = (work / "stages" / "bld.json").read_text()
    retarget = start_cli([*args, "--set", "search.throughput=1.1", "--only", "search"])
    out = retarget.communicate(timeout=300)[0]
    assert retarget.returncode == 0, out[-2000:]
    assert (work / "stages" / "bld.json").read_text() == bld_marker
    assert json.loads((work / "search" / "solutions.json").read_text())["budgets"]["time"] > 0


def test_run_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("bld: {tokenz: 5}\n")
    p = start_cli(["run", str(bad), "--workdir", str(tmp_path / "w")])
    out = p.communicate(timeout=120)[0].strip().splitlines()
    assert p.returncode == 2 and out[-1] == f"puzzlenas: error: {bad}: bld.tokenz: unknown key"
    missing = tmp_path / "m.yaml"
    missing.write_text(yaml.safe_dump({"parent": "smollm2", "data": {"path": str(tmp_path / "nope.txt")}}))
    p = start_cli(["run", str(missing), "--workdir", str(tmp_path / "w2"), "--only", "data"])
    out = p.communicate(timeout=300)[0].strip().splitlines()
    assert p.returncode == 2 and "does not exist" in out[-1] and out[-1].startswith("puzzlenas: error:")


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_every_shipped_preset_and_config_loads(preset):
    load_config(PRESETS / f"{preset}.yaml")


def test_repo_configs_load():
    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(path)
