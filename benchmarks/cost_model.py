"""Predicted vs measured speed-up in a serving engine for solutions between 1.2x and 2.5x.

    python benchmarks/cost_model.py [--engine torch|vllm|llama.cpp] [--gguf-type q8_0] [--targets 1.2 1.5 1.8 2.1 2.5]
                                    [--prompt 128] [--generate 64] [--repeats 3]

Measures the SmolLM2-135M cost profile of the default search space for the scenario in the
engine (torch: sub-blocks in puzzlenas's harness; vllm / llama.cpp: whole-model variants timed in
the engine, for llama.cpp each exported to GGUF in --gguf-type),
solves the MIP once per target, builds each child (random weights: speed only) and times the
parent and every child in the engine, all in turns in one run (A B C ... A B C ...). The
measured speed-up is the median of the per-round ratios (min-max shown). Quality plays no part,
so the damage fed to the MIP is a seeded random proxy that makes the solutions mix every kind of
alternative. Targets the engine cannot reach (its fixed costs are too large) are reported as such.
Goal: every prediction within 10 % of the measurement.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from puzzlenas import costs
from puzzlenas.checkpoint.io import save_checkpoint
from puzzlenas.checkpoint.parent import prepare_parent
from puzzlenas.config import config_from_dict
from puzzlenas.engines import Scenario, get_engine, speedup_stats
from puzzlenas.library.space import Alternative, target_alternatives
from puzzlenas.realize import assemble_child
from puzzlenas.search import build_problem
from puzzlenas.search.mip import Infeasible, solve


def proxy_scores(profile, alternatives: list[str]) -> dict:
    """Fewer parameters hurt more, with per-layer noise; no-ops a little extra."""
    rng = np.random.default_rng(0)
    scores = {}
    parsed = {n: Alternative.from_name(n) for n in alternatives}
    for name, a in parsed.items():
        full = profile.alternatives[name].params or 0
        ref = max(profile.alternatives[n].params for n, b in parsed.items() if (b.layer, b.sub) == (a.layer, a.sub))
        scores[name] = {"kl": float((1 - full / ref) * rng.uniform(0.2, 1.8)) if ref else 0.0}
        if a.kind == "no_op":
            scores[name]["kl"] += float(rng.uniform(0, 0.3))
    return scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="torch", help="torch | vllm | llama.cpp")
    ap.add_argument("--gguf-type", default="q8_0", help="llama.cpp only: the GGUF type models are timed in")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.2, 1.5, 1.8, 2.1, 2.5])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--generate", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the solutions' timing")
    ap.add_argument("--profile-repeats", type=int, default=5, help="rounds per variant of the cost profile")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "puzzlenas-bench"))
    args = ap.parse_args()
    work = Path(args.cache) / f"cost-model-{args.engine}"
    target = {"engine": args.engine, **({"gguf_type": args.gguf_type} if args.engine == "llama.cpp" else {})}
    cfg = config_from_dict({"target": target,
                            "costs": {"repeats": args.profile_repeats, "warmup": 1,
                                      "scenario": {"batch_size": args.batch, "prompt_len": args.prompt,
                                                   "generate_len": args.generate}}})
    engine = get_engine(cfg.target.engine)
    engine.check_available()
    parent, _, _ = prepare_parent("smollm2", work)  # converted once into work/parent
    profile = costs.run(cfg, work, parent, progress=True)
    alternatives = [a.name for a in target_alternatives(cfg, parent.config)]
    problem, parent_res = build_problem(proxy_scores(profile, alternatives), profile, "kl", alternatives, engine)
    scenario = Scenario(args.batch, args.prompt, args.generate)
    solved = []
    for target in args.targets:
        problem.budgets = {"time": parent_res["time"] / target}
        try:
            sol = solve(problem, solutions=1)[0]
        except Infeasible:
            solved.append((target, None))
            continue
        solved.append((target, sol))
    scratch = work / "children.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    models: dict = {"parent": work / "parent" if engine.name != "torch" else parent}
    for i, (_, sol) in enumerate(solved):
        if sol is None:
            continue
        child = assemble_child(parent, [(Alternative.from_name(a), Alternative.from_name(f)) for a, f in sol.pairs],
                               random_weights=True)
        models[f"child{i}"] = child if engine.name == "torch" else save_checkpoint(child, scratch / f"child{i}")
    try:
        timings = engine.time_models(models, scenario, repeats=args.repeats, warmup=1,
                                     dtype=engine.serving_dtype(cfg.costs.dtype))[0]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    parent_s = timings["parent"].summary()["total_s"]
    print(f"\nengine {engine.name}; cost profile {profile.device} ({profile.extra.get('method', 'estimated')}), "
          f"{profile.dtype}, batch {args.batch}, prompt {args.prompt}, generate {args.generate}; parent measured "
          f"{parent_s:.3f} s per scenario run (median of {args.repeats} rounds), {torch.get_num_threads()} threads\n")
    print(f"| {'target':>6} | {'predicted':>9} | {'measured (min-max)':>20} | {'error':>7} | gqa/mlp/linear/no_op |")
    print(f"|{'-' * 8}|{'-' * 11}|{'-' * 22}|{'-' * 9}|{'-' * 22}|")
    errors = []
    for i, (target, sol) in enumerate(solved):
        if sol is None:
            print(f"| {target:>5.1f}x | {'unreachable in this engine':>44} | {'':>7} | {'':>20} |")
            continue
        predicted = parent_res["time"] / sol.resources["time"]
        ratio = speedup_stats(timings["parent"], timings[f"child{i}"])["total"]
        err = predicted / ratio["median"] - 1
        errors.append(abs(err))
        kinds = [Alternative.from_name(x).kind for pair in sol.pairs for x in pair]
        mix = "/".join(str(kinds.count(k)) for k in ("gqa", "mlp", "linear", "no_op"))
        spread = f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"
        print(f"| {target:>5.1f}x | {predicted:>8.2f}x | {spread:>20} | {err:>+6.1%} | {mix:<20} |")
    if errors:
        print(f"\nworst error {max(errors):.1%} over {len(errors)} solutions (goal: within 10 %)")
    for warning in profile.warnings:
        print(f"warning: {warning}")


if __name__ == "__main__":
    main()
