"""The greedy and random searches (search/heuristics.py) and benchmarks/ablations.py on a tiny parent.

Synthetic problems check the heuristics against the MIP (optimal for the summed damage, so neither
heuristic may beat it) and against every budget; one ablation run of every variant on a tiny random
Llama checks that each realizes, distills (same GKD tokens) and evaluates at the same target.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import yaml
from conftest import load_benchmark, make_tiny_parent, make_tiny_tokenizer
from test_faults import fault_config

from puzzlenas.errors import PuzzleError
from puzzlenas.search.heuristics import greedy, random_search
from puzzlenas.search.mip import Infeasible, Problem, evaluate, solve


def synthetic_problem(layers: int, seed: int) -> Problem:
    """Cheaper pairs do more damage; layers differ in sensitivity; pair 0 is the parent's (0 damage)."""
    rng = random.Random(seed)
    options, damage, time_cost, memory = [], [], [], []
    for layer in range(layers):
        sens = rng.lognormvariate(0, 1)
        n = rng.randint(3, 7)
        t = sorted((rng.uniform(0.05, 1.0) for _ in range(n - 1)), reverse=True)
        t = [1.0, *t]
        options.append([(f"a{layer}_{p}", f"f{layer}_{p}") for p in range(n)])
        damage.append([0.0] + [sens * (1 - x) ** 2 * rng.uniform(0.5, 1.5) for x in t[1:]])
        time_cost.append(t)
        memory.append([x * rng.uniform(0.5, 1.5) if p else 1.0 for p, x in enumerate(t)])
    return Problem(options, damage, {"time": time_cost, "memory": memory}, fixed={"time": 2.0, "memory": 3.0})


def check_budgets(problem: Problem, sol) -> None:
    _, resources = evaluate(problem, sol.choice)
    for r, b in problem.budgets.items():
        assert resources[r] <= b * (1 + 1e-9), (r, resources[r], b)
    assert sol.pairs == [problem.options[layer][p] for layer, p in enumerate(sol.choice)]


@pytest.mark.parametrize("seed", range(8))
def test_heuristics_meet_budgets_and_never_beat_the_mip(seed):
    problem = synthetic_problem(10, seed)
    start = [0] * problem.num_layers
    _, parent = evaluate(problem, start)
    # a memory budget tighter than the throughput target alone implies on some seeds
    problem.budgets = {"time": parent["time"] / 1.6, "memory": parent["memory"] * (0.55 if seed % 2 else 0.9)}
    mip = solve(problem)[0]
    g, r = greedy(problem, start), random_search(problem, start, seed)
    for sol in (mip, g, r):
        check_budgets(problem, sol)
    assert g.objective >= mip.objective * (1 - 1e-3) - 1e-12  # the MIP is optimal (within its 1e-3 gap)
    assert r.objective >= mip.objective * (1 - 1e-3) - 1e-12
    assert random_search(problem, start, seed).choice == r.choice  # seeded
    assert g.choice != start and r.choice != start


def test_greedy_takes_the_least_damage_per_unit_saved():
    # layer 0 saves 0.5 for damage 1 (2 per unit), layer 1 saves 0.5 for damage 0.5 (1 per unit):
    # one swap is enough, and greedy must take layer 1's
    problem = Problem([[("a", "f"), ("a'", "f'")]] * 2, [[0.0, 1.0], [0.0, 0.5]],
                      {"time": [[1.0, 0.5], [1.0, 0.5]]}, fixed={"time": 0.0}, budgets={"time": 1.6})
    assert greedy(problem, [0, 0]).choice == [0, 1]


def test_heuristics_say_when_the_target_is_out_of_reach():
    problem = synthetic_problem(4, 0)
    problem.budgets = {"time": 0.1}  # below the fixed part alone
    for search in (lambda p, s: greedy(p, s), lambda p, s: random_search(p, s, 0)):
        with pytest.raises(Infeasible) as exc:
            search(problem, [0] * 4)
        assert "\n" not in str(exc.value) and "time" in str(exc.value)


# --- the benchmark on a tiny parent --------------------------------------------------------------


TARGET = 1.2


@pytest.fixture(scope="module")
def ablations(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablations")
    make_tiny_parent("llama").save_pretrained(root / "parent")
    make_tiny_tokenizer().save_pretrained(root / "parent")
    raw = fault_config(root / "parent")
    raw["bld"]["tokens"] = 1024
    raw["gkd"]["tokens"] = 512
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    bench = load_benchmark("ablations")
    bench.main(["--config", str(root / "cfg.yaml"), "--workdir", str(root / "w"), "--target", str(TARGET), "--quiet"])
    return bench, root


def test_every_variant_runs_at_the_same_target_and_tokens(ablations):
    bench, root = ablations
    result = json.loads((root / "w" / "ablations.json").read_text())
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == list(bench.VARIANTS)
    assert len({r["gkd_tokens"] for r in rows.values()}) == 1  # equal tokens
    for name, r in rows.items():
        assert r["predicted_speedup"] >= TARGET * (1 - 1e-9), name
        assert r["kl"] >= 0 and math.isfinite(r["kl"]) and math.isfinite(r["ppl"]) and r["ppl"] > 1, name
        assert (r["search"], r["library"], r["metric"], r["gkd_loss"]) == bench.VARIANTS[name]
        owner = r.get("same_as", name)  # a variant whose child and settings equal an earlier one's reuses its run
        assert rows[owner].get("same_as") is None
        assert (root / "w" / "variants" / bench.slug(owner) / "child" / "config.json").is_file()
    # the MIP is optimal for the summed damage on the same scores
    assert rows["greedy"]["damage"] >= rows["MIP"]["damage"] * (1 - 1e-3) - 1e-12
    assert rows["random"]["damage"] >= rows["MIP"]["damage"] * (1 - 1e-3) - 1e-12
    # the GKD variants distilled the same child with different losses: different weights
    gkd_logs = {n: (root / "w" / "variants" / bench.slug(n) / "gkd" / "log.jsonl").read_text()
                for n in ("MIP", "GKD KL only", "GKD LM loss")}
    assert '"lm"' in gkd_logs["GKD LM loss"] and '"lm"' not in gkd_logs["MIP"]
    assert len(set(gkd_logs.values())) == 3
    table = (root / "w" / "ablations.md").read_text()
    assert all(f"| {name} " in table for name in bench.VARIANTS) and "GKD 512 tokens" in table  # "(same child as ...)" may follow


# search/mip.py scales each resource row to its budget: HiGHS's absolute tolerance (1e-7) once let a
# tiny model's roofline time budget (~1e-6 s) be overrun
def test_mip_meets_the_target_on_tiny_costs(ablations):
    _, root = ablations
    rows = json.loads((root / "w" / "ablations.json").read_text())["variants"]
    assert all(r["predicted_speedup"] >= TARGET * (1 - 1e-9) for r in rows if r["search"] == "mip")


def test_init_only_library_is_untrained_and_scores_worse(ablations):
    _, root = ablations
    init = json.loads((root / "w" / "init-only" / "library" / "index.json").read_text())["blocks"]
    trained = json.loads((root / "w" / "base" / "library" / "index.json").read_text())["blocks"]
    files = [k for k, v in init.items() if v.get("file")]
    assert files and all(init[k]["tokens"] == 0 and trained[k]["tokens"] > 0 for k in files)
    s_init = json.loads((root / "w" / "init-only" / "scores" / "replace1.json").read_text())["scores"]
    s_bld = json.loads((root / "w" / "base" / "scores" / "replace1.json").read_text())["scores"]
    # BLD lowers the blocks' own NMSE, so the summed replace-1 KL of the trained blocks is lower
    assert sum(s_bld[k]["kl"] for k in files) < sum(s_init[k]["kl"] for k in files)


def test_a_finished_variant_is_not_redone_and_bad_names_are_one_line(ablations):
    bench, root = ablations
    before = json.loads((root / "w" / "variants" / "random" / "result.json").read_text())
    bench.main(["--config", str(root / "cfg.yaml"), "--workdir", str(root / "w"), "--target", str(TARGET),
                "--variants", "random", "--quiet"])
    assert json.loads((root / "w" / "variants" / "random" / "result.json").read_text()) == before
    with pytest.raises(PuzzleError, match="unknown variant 'bogus'"):
        bench.main(["--config", str(root / "cfg.yaml"), "--workdir", str(root / "w"), "--variants", "bogus"])


def test_heuristics_keep_to_the_engines_blocks(ablations):
    """With vLLM as the target, neither heuristic may pick a linear block or a no-op attention in layer 0."""
    from puzzlenas.config import load_config
    from puzzlenas.library.space import Alternative, target_alternatives
    from puzzlenas.pipeline import parent_config
    from puzzlenas.search import heuristics
    from puzzlenas.workdir import read_cost_profile, read_scores

    _, root = ablations
    work = root / "w" / "base"
    cfg = load_config(root / "cfg.yaml", [f"search.throughput={TARGET}"])
    scores = read_scores(work)
    profile = read_cost_profile(work)
    every = [a.name for a in target_alternatives(cfg, parent_config(work))]
    cfg.target.engine = "vllm"
    served = [a.name for a in target_alternatives(cfg, parent_config(work))]
    assert len(served) < len(every)
    cfg.search.throughput = 1.5
    for method, seed in [("greedy", 0), *(("random", s) for s in range(5))]:
        sol = heuristics.run(cfg, scores, profile, served, method, seed=seed).solutions[0]
        assert sol.predicted_speedup >= 1.5 * (1 - 1e-9)
        picked = [Alternative.from_name(name) for pair in sol.layers for name in pair]
        assert not any(a.kind == "linear" for a in picked)
        assert Alternative.from_name(sol.layers[0][0]).kind != "no_op"
    with pytest.raises(PuzzleError, match="unknown heuristic"):
        heuristics.run(cfg, scores, profile, served, "annealing")


def test_search_only_compares_the_searches_without_training(ablations):
    bench, root = ablations
    table = bench.main(["--config", str(root / "cfg.yaml"), "--workdir", str(root / "w"), "--search-only", "1.1,1.2"])
    rows = [[float(x) for x in line.split("|")[2:5]] for line in table.splitlines()[2:]]
    assert len(rows) == 2
    for mip, by_greedy, by_random in rows:
        assert by_greedy >= mip * (1 - 1e-3) - 1e-12 and by_random >= mip * (1 - 1e-3) - 1e-12
