"""Interaction-corrected search (search/refine.py) on tiny random parents.

    python -m pytest -q tests/test_refine.py
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
import yaml
from conftest import make_tiny_parent

from puzzlenas.checkpoint import convert_parent
from puzzlenas.config import config_from_dict
from puzzlenas.costs import DEVICE_PRESETS, Scenario, estimate_profile
from puzzlenas.library.space import Alternative, enumerate_alternatives
from puzzlenas.realize import assemble_child, parent_choices
from puzzlenas.score import damage, score_alternatives
from puzzlenas.search import build_problem
from puzzlenas.search.mip import Problem, evaluate, solve
from puzzlenas.search.refine import refine, refined_problem, score_inside


def _fits(problem, choice) -> bool:
    return all(evaluate(problem, choice)[1][r] <= b * (1 + 1e-9) for r, b in problem.budgets.items())


def _brute_force(problem) -> float:
    return min(evaluate(problem, list(c))[0] for c in itertools.product(*(range(len(o)) for o in problem.options))
               if _fits(problem, list(c)))


@pytest.fixture(scope="module")
def tiny_problem():
    """A 3-layer random parent, a space of the parent's blocks and no-ops (no library needed), its
    replace-1-block scores, a roofline profile and a budget that forces some removals."""
    torch.manual_seed(0)
    parent = convert_parent(make_tiny_parent("llama")).eval()
    space = config_from_dict({"search_space": {"attention": [2, "no_op"], "ffn": [1.0, "no_op"]}}).search_space
    alts = enumerate_alternatives(space, parent.config)
    ids = torch.randint(3, 99, (4, 24), generator=torch.Generator().manual_seed(1))
    scores = score_alternatives(parent, None, alts, ids, progress=False)
    profile = estimate_profile(parent.config, alts, Scenario(1, 16, 8), DEVICE_PRESETS["l40s"], "float32")
    problem, parent_resources = build_problem(scores, profile, "kl", [a.name for a in alts])
    problem.budgets = {"params": parent_resources["params"] * 0.8}

    def rescore(pairs):
        choices = [(Alternative.from_name(a), Alternative.from_name(f)) for a, f in pairs]
        return score_inside(parent, assemble_child(parent, choices), None, choices, alts, ids, progress=False)

    return parent, alts, ids, scores, problem, rescore


def test_scoring_inside_the_parent_is_replace1_scoring(tiny_problem):
    """With the parent as the child, the re-scored metrics are score.score_alternatives's own."""
    parent, alts, ids, scores, _, _ = tiny_problem
    base, inside = score_inside(parent, parent, None, parent_choices(parent.config), alts, ids, progress=False)
    assert base["kl"] == pytest.approx(0.0, abs=1e-6) and base["agreement"] == 1.0
    for a in alts:
        for k in ("kl", "lm_loss_delta", "agreement"):
            assert inside[a.name][k] == pytest.approx(scores[a.name][k], rel=1e-4, abs=1e-6), (a.name, k)


def test_zero_rounds_is_the_plain_search(tiny_problem):
    *_, problem, _ = tiny_problem
    plain = solve(problem, 2, 0.3)

    def never(pairs):
        raise AssertionError("0 rounds must not re-score")

    found, record = refine(problem, plain, never, 0, "kl", 2, 0.3)
    assert found is plain and [r["round"] for r in record["rounds"]] == [0]
    assert record["rounds"][0]["predicted"] == plain[0].objective


def test_refined_rounds_keep_the_budget_and_record_what_the_solver_minimized(tiny_problem):
    parent, alts, ids, scores, problem, rescore = tiny_problem
    plain = solve(problem, 1)
    found, record = refine(problem, plain, rescore, 4, "kl", 2, 0.3)
    rounds = record["rounds"]
    assert 2 <= len(rounds) <= 5
    final = found[0]
    for s in found:  # every solution of the kept round within every budget
        assert _fits(problem, s.choice)
    for r in rounds:  # every round's child too, and each child measured on the scoring text
        pairs = [(x["attention"], x["ffn"]) for x in r["layers"]]
        assert _fits(problem, [o.index(p) for o, p in zip(problem.options, pairs)])
        child = assemble_child(parent, [(Alternative.from_name(a), Alternative.from_name(f)) for a, f in pairs])
        assert r["measured"] == pytest.approx(score_inside(parent, child, None, [], [], ids, progress=False)[0]["kl"], rel=1e-5)
    # the kept round is the lowest measured child's, and its solutions are the result
    kept = record["kept"]
    assert rounds[kept]["measured"] == min(r["measured"] for r in rounds)
    assert [(x["attention"], x["ffn"]) for x in rounds[kept]["layers"]] == final.pairs
    assert rounds[kept]["predicted"] == final.objective
    if kept == 0:
        return  # the additive solutions: nothing refined to check
    final = found[0]
    # the kept round's problem: scores re-measured inside the child that round started from
    base_pairs = [(x["attention"], x["ffn"]) for x in rounds[kept - 1]["layers"]]
    base, inside = rescore(base_pairs)
    assert damage(base, "kl") == pytest.approx(rounds[kept]["measured_base"], rel=1e-5)
    last = refined_problem(problem, base_pairs, base, inside, "kl")
    assert evaluate(last, final.choice)[0] == pytest.approx(final.objective, rel=1e-6)
    assert final.objective <= _brute_force(last) + 1e-3 * abs(final.objective) + 1e-9  # the MIP's optimum
    # at the child it was scored in, the prediction is that child's measured damage, not a sum of parts
    assert evaluate(last, [o.index(p) for o, p in zip(problem.options, base_pairs)])[0] == \
        pytest.approx(damage(base, "kl"), rel=1e-6)
    if not rounds[kept]["changed_layers"]:  # converged: the recorded prediction is the final child's real KL
        assert final.objective == pytest.approx(rounds[kept]["measured"], rel=1e-5)


def _toy_problem():
    """Three layers, each: keep the FFN (time 1) or remove it (time 0.5); time <= 2.5 forces one
    removal. Additive damage says layer 0's removal is the cheapest."""
    options = [[(f"layer{layer:03d}.attention.gqa2", f"layer{layer:03d}.ffn.mlp64"),
                (f"layer{layer:03d}.attention.gqa2", f"layer{layer:03d}.ffn.no_op")] for layer in range(3)]
    return Problem(options, [[0.0, 0.1], [0.0, 0.2], [0.0, 0.3]], {"time": [[1.0, 0.5]] * 3},
                   {"time": 0.0}, {"time": 2.5})


def test_refine_keeps_the_additive_child_when_refinement_measures_worse():
    """A first-order prediction that misleads (inside the additive child, moving the removal to layer 1
    looks better; built, it measures worse): the search keeps round 0's solutions, and says so."""
    problem = _toy_problem()
    plain = solve(problem, 1)
    assert plain[0].choice == [1, 0, 0]
    real = {(1, 0, 0): 0.15, (0, 1, 0): 0.50, (0, 0, 1): 0.60}  # each child's measured KL

    def child_kl(pairs):
        return real[tuple(o.index(p) for o, p in zip(problem.options, pairs))]

    def rescore(pairs):  # inside (1, 0, 0): restoring layer 0 -> 0.0, removing layer 1 too -> 0.20
        assert child_kl(pairs) == 0.15, "only the additive child is re-scored in one round"
        return {"kl": 0.15}, {"layer000.ffn.mlp64": {"kl": 0.0}, "layer001.ffn.no_op": {"kl": 0.20},
                              "layer002.ffn.no_op": {"kl": 0.40}, "layer000.ffn.no_op": {"kl": 0.15},
                              "layer001.ffn.mlp64": {"kl": 0.15}, "layer002.ffn.mlp64": {"kl": 0.15}}

    measured = []

    def measure(pairs):
        measured.append(pairs)
        return {"kl": child_kl(pairs)}

    found, record = refine(problem, plain, rescore, 1, "kl", 1, measure=measure)
    assert record["rounds"][1]["predicted"] == pytest.approx(0.05)  # 0.15 - 0.15 + 0.05: it moved the removal
    assert record["rounds"][1]["changed_layers"] == [0, 1]
    assert len(measured) == 1 and record["rounds"][1]["measured"] == 0.50  # the refined child, built and measured
    assert record["kept"] == 0 and found is plain and found[0].choice == [1, 0, 0]

    # when the refined child measures better, it is kept
    real[(0, 1, 0)] = 0.10
    found, record = refine(problem, plain, rescore, 1, "kl", 1, measure=measure)
    assert record["kept"] == 1 and found[0].choice == [0, 1, 0]


def test_a_trust_region_limits_the_layers_a_round_changes(tiny_problem):
    *_, problem, rescore = tiny_problem
    problem = dataclasses.replace(problem, budgets={"params": problem.budgets["params"] * 0.75})
    plain = solve(problem, 1)
    found, record = refine(problem, plain, rescore, 3, "kl", 1, 0.3, max_changes=1)
    assert record["max_changes"] == 1
    for r in record["rounds"][1:]:
        assert len(r["changed_layers"]) <= 1
    assert _fits(problem, found[0].choice)  # the trust region adds a budget, it drops none


def test_refine_through_the_pipeline_on_trained_blocks(tiny_run, tmp_path):
    """search.refine_rounds=2 in the search stage: trained blocks re-scored, search/refine.json written,
    and a changed setting is a new search fingerprint."""
    from puzzlenas.config import load_config
    from puzzlenas.pipeline import run_pipeline, stage_fingerprints

    raw = yaml.safe_load(tiny_run.read_text())
    raw["bld"]["tokens"], raw["score"]["sequences"] = 256, 2
    raw["search"].update(refine_rounds=2, solutions=2)
    tiny_run.write_text(yaml.safe_dump(raw))
    cfg = load_config(tiny_run)
    work = tmp_path / "w"
    run_pipeline(cfg, work, stages=["data", "bld", "score", "costs", "search"], progress=False)
    record = json.loads((work / "search" / "refine.json").read_text())
    result = json.loads((work / "search" / "solutions.json").read_text())
    assert 2 <= len(record["rounds"]) <= 3 and record["tokens"] > 0
    kept = record["rounds"][record["kept"]]
    assert kept["measured"] == min(r["measured"] for r in record["rounds"])
    assert result["solutions"][0]["damage"] == pytest.approx(kept["predicted"])
    assert [x for x in result["solutions"][0]["layers"]] == kept["layers"]
    for s in result["solutions"]:
        assert s["predicted_speedup"] >= 1.2 - 1e-9
    from puzzlenas.report import write_report

    md = write_report(work).read_text()  # the report shows the rounds
    assert "## Interaction-corrected search" in md and f"stopped: {record['stopped']}" in md
    plain = load_config(tiny_run, ["search.refine_rounds=0"])
    assert stage_fingerprints(plain, "x")["search"] != stage_fingerprints(cfg, "x")["search"]
