"""Predicted vs measured speed-up on this machine for solutions between 1.2x and 2.5x.

    python benchmarks/cost_model.py [--targets 1.2 1.5 1.8 2.1 2.5] [--prompt 128] [--generate 64]

Measures the SmolLM2-135M cost profile (every alternative of the default search space) for the
scenario, solves the MIP once per target, builds each child (random weights: speed only) and
times parent and child end to end with the same harness (prefill, then greedy decode with the
KV cache), alternating them. Quality plays no part here, so the damage fed to the MIP is a
seeded random proxy that makes the solutions mix every kind of alternative.
Target: every prediction within 10 % of the measurement.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from puzzlenas import costs
from puzzlenas.checkpoint.parent import prepare_parent
from puzzlenas.config import config_from_dict
from puzzlenas.costs import Scenario, measure_model_scenario
from puzzlenas.library.space import Alternative, enumerate_alternatives
from puzzlenas.realize import assemble_child
from puzzlenas.search import build_problem
from puzzlenas.search.mip import solve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", type=float, nargs="+", default=[1.2, 1.5, 1.8, 2.1, 2.5])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--generate", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "puzzlenas-bench"))
    args = ap.parse_args()
    work = Path(args.cache) / "cost-model"
    cfg = config_from_dict({"costs": {"scenario": {"batch_size": args.batch, "prompt_len": args.prompt,
                                                   "generate_len": args.generate}}})
    parent, _, _ = prepare_parent("smollm2", Path(args.cache))
    profile = costs.run(cfg, work, parent, progress=True)
    alternatives = [a.name for a in enumerate_alternatives(cfg.search_space, parent.config)]
    rng = np.random.default_rng(0)
    scores = {}
    for name in alternatives:  # proxy damage: fewer parameters hurt more, with per-layer noise
        a = Alternative.from_name(name)
        full = profile["alternatives"][name]["params"] or 0
        ref = max(profile["alternatives"][n]["params"] for n in alternatives if n.startswith(name.rsplit(".", 1)[0]))
        scores[name] = {"kl": float((1 - full / ref) * rng.uniform(0.2, 1.8)) if ref else 0.0}
        if a.kind == "no_op":
            scores[name]["kl"] += float(rng.uniform(0, 0.3))
    problem, parent_res = build_problem(scores, profile, "kl", alternatives)
    scenario = Scenario(args.batch, args.prompt, args.generate)
    rows = []
    for target in args.targets:
        problem.budgets = {"time": parent_res["time"] / target}
        sol = solve(problem, solutions=1)[0]
        predicted = parent_res["time"] / sol.resources["time"]
        choices = [(Alternative.from_name(a), Alternative.from_name(f)) for a, f in sol.pairs]
        child = assemble_child(parent, choices, random_weights=True)
        parent_t, child_t = [], []
        for _ in range(args.repeats):  # alternate, so drifts in machine speed hit both
            parent_t.append(measure_model_scenario(parent, scenario, warmup=1, repeats=1)["total_s"])
            child_t.append(measure_model_scenario(child, scenario, warmup=1, repeats=1)["total_s"])
        measured = statistics.median(parent_t) / statistics.median(child_t)
        kinds = {k: sum(1 for a, f in sol.pairs for x in (a, f) if x.split(".")[-1].startswith(k))
                 for k in ("gqa", "mlp", "linear", "no_op")}
        rows.append((target, predicted, measured, predicted / measured - 1, kinds, statistics.median(child_t)))
        del child
    print(f"\ncost profile: {profile['device']} ({'estimated' if profile['estimated'] else 'measured'}), "
          f"{profile['dtype']}, batch {args.batch}, prompt {args.prompt}, generate {args.generate}; "
          f"parent measured {statistics.median(parent_t):.3f} s per scenario run, {torch.get_num_threads()} threads\n")
    print(f"| {'target':>6} | {'predicted':>9} | {'measured':>8} | {'error':>7} | sub-blocks (gqa/mlp/linear/no_op) |")
    print(f"|{'-' * 8}|{'-' * 11}|{'-' * 10}|{'-' * 9}|{'-' * 36}|")
    for target, pred, meas, err, kinds, _ in rows:
        mix = "/".join(str(kinds[k]) for k in ("gqa", "mlp", "linear", "no_op"))
        print(f"| {target:>5.1f}x | {pred:>8.2f}x | {meas:>7.2f}x | {err:>+6.1%} | {mix:<34} |")
    worst = max(abs(r[3]) for r in rows)
    print(f"\nworst error {worst:.1%} (target: within 10 %)")


if __name__ == "__main__":
    main()
