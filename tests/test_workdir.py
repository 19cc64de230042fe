"""The artifacts between stages: typed readers and writers (workdir.py).

    pytest tests/test_workdir.py

Each artifact round-trips (written, read, equal); a file cut short, not JSON or of an older shape is
one PuzzleError line naming it; files as puzzlenas wrote them before the types existed load, and
are written back byte for byte (so a stage's output fingerprint does not change).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_parent

from puzzlenas.errors import PuzzleError
from puzzlenas.workdir import (
    SCORES,
    SELECTION,
    SOLUTIONS,
    BlockCost,
    Candidate,
    CostProfile,
    ScoreSet,
    SearchResult,
    Selection,
    SolutionRecord,
    baseline_file,
    cost_profile_file,
    read_baseline,
    read_cost_profile,
    read_scores,
    read_selection,
    read_solutions,
    write_baseline,
    write_cost_profile,
    write_scores,
    write_selection,
    write_solutions,
)

# Files as the stages wrote them before they were typed (a tiny run's, trimmed to two alternatives).
OLD_SCORES = {"fingerprint": "2094568b066a2a05", "parent_fingerprint": "b45eb0fc71b33307", "tokens": 124, "scores": {
    "layer000.attention.gqa1": {"kl": 0.002299193653368181, "lm_loss": 4.6174134285219255,
                                "lm_loss_delta": 0.01043405840473799, "agreement": 0.5564516129032258},
    "layer000.attention.gqa2": {"kl": 0.0, "lm_loss": 4.6069793701171875, "lm_loss_delta": 0.0, "agreement": 1.0}}}
OLD_ROOFLINE = {"device": "h100-sxm", "estimated": True, "dtype": "bfloat16",
                "scenario": {"batch_size": 1, "prompt_len": 32, "generate_len": 16},
                "shared": {"prefill_s": 3.78e-09, "decode_s": 3.78e-09, "params": 12736, "weight_bytes": 25472},
                "alternatives": {
                    "layer000.attention.gqa1": {"prefill_s": 9.2e-09, "decode_s": 6.9e-09, "params": 10304,
                                                "weight_bytes": 20608, "kv_bytes": 3072},
                    "layer000.ffn.no_op": {"prefill_s": 0.0, "decode_s": 0.0, "params": 0, "weight_bytes": 0,
                                           "kv_bytes": 0}}}
OLD_ENGINE = {"device": "llama.cpp-q8_0-cpu-amd-epyc-2t", "estimated": False, "dtype": "float32",
              "fingerprint": "01e60cced4700e05", "scenario": {"batch_size": 1, "prompt_len": 64, "generate_len": 32},
              "engine": "llama.cpp", "method": "whole-model variants", "decode_steps": 31,
              "parent_measured": {"prefill_s": 0.0995, "decode_s": 0.0199}, "variants": {"parent": [[0.1, 0.7]]},
              "warnings": [], "shared": {"prefill_s": 0.0092, "decode_s": 0.0081, "params": 28312128,
                                         "weight_bytes": 113248512},
              "alternatives": {"layer000.attention.gqa1": {"prefill_s": 0.0011, "decode_s": 0.00034, "copies": 4,
                                                           "params": 737856, "weight_bytes": 2951424, "kv_bytes": 49152}}}
LAYERS = [{"attention": "layer000.attention.gqa2", "ffn": "layer000.ffn.mlp96"},
          {"attention": "layer001.attention.no_op", "ffn": "layer001.ffn.no_op"}]
PREDICTED = {"prefill_s": 7.19e-08, "decode_step_s": 5.81e-08, "total_s": 1.0e-06}
OLD_SOLUTIONS = {"device": "h100-sxm", "estimated": True, "metric": "kl", "budgets": {"time": 9.1e-07},
                 "parent": {"time": 1.1e-06, "memory": 228992, "latency": 6.4e-08, "params": 105280},
                 "solutions": [{"rank": 0, "status": "optimal", "damage": 1.9e-05, "predicted_speedup": 1.09,
                                "predicted": PREDICTED, "memory_bytes": 210560, "params": 96064,
                                "solve_seconds": 0.0108, "layers": LAYERS}]}
OLD_HEURISTIC = {**OLD_SOLUTIONS, "metric": "lm_loss", "method": "greedy"}
OLD_HEURISTIC = {k: OLD_HEURISTIC[k] for k in ("device", "estimated", "metric", "method", "budgets", "parent", "solutions")}
OLD_BASELINE = {"rank": "depth", "damage": 0.0044, "predicted_speedup": 1.45, "predicted": PREDICTED,
                "memory_bytes": 161152, "params": 74432, "layers": LAYERS, "description": "1 layers removed: [1]"}
OLD_SELECTION = {"chosen": 1, "reason": "lowest mixed KL to the parent (3.309e-05) on domain text, measured before GKD",
                 "predicted_best": 1, "domain_only": True,
                 "sources": {"domain": {"what": "data validation sequences 4..7", "overlaps_eval": False,
                                        "sequences": 4, "tokens": 128},
                             "wikitext2": {"unavailable": "no local evaluation data"}},
                 "mixed": "mean of domain KL", "solutions_fingerprint": "835ce4ee0b19dab5",
                 "candidates": [{"rank": r, "predicted_speedup": 1.2, "damage": 4.4e-05,
                                 "kl": {"domain": 3.9e-05, "mixed": 3.9e-05},
                                 "agreement": {"domain": 0.99, "mixed": 0.99}} for r in (0, 1)]}

# (file, its old content, how to read it, how to write what was read)
ARTIFACTS = {
    "scores": (SCORES, OLD_SCORES, read_scores, write_scores),
    "roofline costs": (cost_profile_file("h100-sxm"), OLD_ROOFLINE, lambda w: read_cost_profile(w, "h100-sxm"),
                       write_cost_profile),
    "engine costs": (cost_profile_file(OLD_ENGINE["device"]), OLD_ENGINE, read_cost_profile, write_cost_profile),
    "solutions": (SOLUTIONS, OLD_SOLUTIONS, read_solutions, write_solutions),
    "heuristic solutions": (SOLUTIONS, OLD_HEURISTIC, read_solutions, write_solutions),
    "baseline": (baseline_file("depth"), OLD_BASELINE, lambda w: read_baseline(w, "depth"),
                 lambda w, b: write_baseline(w, "depth", b)),
    "infeasible baseline": (baseline_file("width"), {"infeasible": "width baseline: no uniform FFN size reaches 9x"},
                            lambda w: read_baseline(w, "width"), lambda w, b: write_baseline(w, "width", b)),
    "selection": (SELECTION, OLD_SELECTION, read_selection, write_selection),
}


def _write_old(workdir: Path, rel: str, content) -> Path:
    path = workdir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")  # as utils.atomic_write_json wrote it
    return path


@pytest.mark.parametrize("name", ARTIFACTS)
def test_files_written_before_the_types_load_and_write_back_byte_for_byte(tmp_path, name):
    rel, old, read, write = ARTIFACTS[name]
    before = _write_old(tmp_path / "old", rel, old).read_bytes()
    artifact = read(tmp_path / "old")
    write(tmp_path / "new", artifact)
    assert (tmp_path / "new" / rel).read_bytes() == before
    assert read(tmp_path / "new") == artifact


def test_old_files_read_as_typed_fields(tmp_path):
    read = {}
    for name, (rel, old, reader, _) in ARTIFACTS.items():
        _write_old(tmp_path / name, rel, old)
        read[name] = reader(tmp_path / name)
    scores = read["scores"]
    assert scores.tokens == 124 and scores.scores["layer000.attention.gqa2"]["agreement"] == 1.0
    engine = read["engine costs"]
    assert engine.decode_steps == 31 and not engine.estimated and engine.warnings == []
    assert engine.alternatives["layer000.attention.gqa1"].extra == {"copies": 4}
    assert engine.shared.kv_bytes is None and engine.extra["method"] == "whole-model variants"
    assert read["roofline costs"].decode_steps is None and read["roofline costs"].estimated
    result = read["solutions"]
    assert result.method is None and result.solutions[0].layers[1] == ("layer001.attention.no_op", "layer001.ffn.no_op")
    assert result.layers_json() == [LAYERS]  # what a selection's solutions_fingerprint is taken of
    assert read["heuristic solutions"].method == "greedy"
    baseline = read["baseline"]
    assert baseline.rank == "depth" and baseline.status is None and baseline.description.startswith("1 layers")
    assert read["infeasible baseline"].startswith("width baseline:")
    selection = read["selection"]
    assert selection.chosen == 1 and selection.candidates[1].kl["mixed"] == 3.9e-05 and selection.domain_only


def test_artifacts_built_in_code_round_trip(tmp_path):
    block = BlockCost(1e-3, 2e-4, 1000, 2000, 64)
    profile = CostProfile("dev", False, "float32", {"batch_size": 2, "prompt_len": 8, "generate_len": 4},
                          BlockCost(1e-4, 1e-5, 10, 20), {"layer000.ffn.mlp8": block}, decode_steps=3,
                          extra={"engine": "torch"})
    scores = ScoreSet("f", "p", 30, {"layer000.ffn.mlp8": {"kl": 0.1, "lm_loss": 2.0, "lm_loss_delta": 0.05,
                                                           "agreement": 0.9}})
    record = SolutionRecord(0, 0.1, 1.5, dict(PREDICTED), 3000, 1010, (("layer000.attention.gqa2", "layer000.ffn.mlp8"),),
                            status="optimal", solve_seconds=0.01)
    result = SearchResult("dev", False, "kl", {"time": 1.0}, {"time": 1.5, "memory": 4000, "latency": 1.0, "params": 2000},
                          (record,))
    selection = Selection(0, "lowest", 0, True, {"domain": {"what": "val"}}, "mean of domain KL", "abc",
                          (Candidate(0, 1.5, 0.1, {"domain": 0.2, "mixed": 0.2}, {"domain": 0.8, "mixed": 0.8}),))
    write_cost_profile(tmp_path, profile)
    write_scores(tmp_path, scores)
    write_solutions(tmp_path, result)
    write_selection(tmp_path, selection)
    write_baseline(tmp_path, "width", SolutionRecord("width", 0.2, 1.4, dict(PREDICTED), 1, 2, record.layers,
                                                     description="uniform FFN 8"))
    assert read_cost_profile(tmp_path) == profile
    assert read_scores(tmp_path) == scores
    assert read_solutions(tmp_path) == result
    assert read_selection(tmp_path) == selection
    assert read_baseline(tmp_path, "width").description == "uniform FFN 8"


def _cut_short(text: str) -> str:
    return text[: len(text) // 2]


def _older_shape(content: dict) -> dict:
    """A required field gone, the way a file of an earlier puzzlenas or another tool would differ."""
    if "infeasible" in content:
        return {"infeasible": 3}
    key = next(k for k in ("scores", "alternatives", "solutions", "layers", "candidates") if k in content)
    return {k: v for k, v in content.items() if k != key}


@pytest.mark.parametrize("damage", ["cut short", "not json", "older shape", "wrong type"])
@pytest.mark.parametrize("name", ARTIFACTS)
def test_a_damaged_file_is_one_line_naming_it(tmp_path, name, damage):
    rel, old, read, _ = ARTIFACTS[name]
    path = _write_old(tmp_path, rel, old)
    if damage == "cut short":
        path.write_text(_cut_short(path.read_text()))
    elif damage == "not json":
        path.write_text("import os; os.system('echo never run')\n")
    elif damage == "older shape":
        _write_old(tmp_path, rel, _older_shape(old))
    else:  # a list where an object belongs
        _write_old(tmp_path, rel, [old])
    with pytest.raises(PuzzleError) as info:
        read(tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "rerun `puzzlenas" in message, message


def test_a_wrong_field_is_named(tmp_path):
    bad = json.loads(json.dumps(OLD_ROOFLINE))
    bad["alternatives"]["layer000.ffn.no_op"]["decode_s"] = "fast"
    _write_old(tmp_path, cost_profile_file("h100-sxm"), bad)
    with pytest.raises(PuzzleError, match=r"alternatives\['layer000.ffn.no_op'\]\['decode_s'\] is \"fast\", not a number"):
        read_cost_profile(tmp_path)


def test_missing_files_name_the_command_that_writes_them(tmp_path):
    for read, command in ((read_scores, "score"), (read_solutions, "search"), (read_selection, "realize"),
                          (read_cost_profile, "costs")):
        with pytest.raises(PuzzleError, match=f"run `puzzlenas {command}` first"):
            read(tmp_path)


def test_what_the_stages_write_now_loads(tmp_path):
    """The costs and search stages' own files (a roofline preset and a MIP solve on a tiny parent)."""
    from puzzlenas import costs, search
    from puzzlenas.checkpoint import convert_parent
    from puzzlenas.config import config_from_dict
    from puzzlenas.library.space import target_alternatives

    torch.manual_seed(0)
    parent = convert_parent(make_tiny_parent("llama"))
    cfg = config_from_dict({"search_space": {"ffn": [1.0, "no_op"]}, "costs": {"device": "h100-sxm"},
                            "search": {"throughput": 1.2, "solutions": 2}})
    profile = costs.run(cfg, tmp_path, parent, progress=False)
    assert read_cost_profile(tmp_path, "h100-sxm") == profile
    names = [a.name for a in target_alternatives(cfg, parent.config)]
    metrics = {n: {"kl": 0.1 * i, "lm_loss": 1.0, "lm_loss_delta": 0.01 * i, "agreement": 0.9} for i, n in enumerate(names)}
    result = search.run(cfg, tmp_path, ScoreSet("f", "p", 10, metrics), profile, names)
    assert read_solutions(tmp_path) == result and result.solutions[0].status in ("optimal", "feasible")
