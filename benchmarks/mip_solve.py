"""MIP solve time for a Llama-70B- or 405B-sized search space.

    python benchmarks/mip_solve.py [--layers 80] [--attention 9] [--ffn 9] [--solutions 10] [--repeats 5]
    python benchmarks/mip_solve.py --layers 126 --alternatives 12      # Llama-3.1-405B: 126 x 12 x 12

80 layers x (9 attention x 9 FFN) pairs = 6,480 binary variables (126 x 12 x 12 = 18,144), a memory
and a throughput constraint, 10 solutions that each differ from all earlier ones in >= 20 % of the
layers. Damage and costs are synthetic but shaped like real ones: cheaper alternatives do more
damage, and layers differ in how sensitive they are. Every solution is checked against every
budget and the diversity rule. Timings: the whole solve repeated --repeats times, median (min-max).
Target: < 2 s in total.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from puzzlenas.search.mip import Problem, solve


def llama70b_like_problem(layers: int, n_attn: int, n_ffn: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    attn_cost = np.linspace(1.0, 0.0, n_attn)  # full GQA ... no-op, relative time
    ffn_cost = np.linspace(2.0, 0.0, n_ffn)  # the FFN is about 2/3 of a Llama layer
    attn_mem = np.linspace(1.0, 0.0, n_attn) * 1.2  # weights + KV cache
    ffn_mem = np.linspace(2.0, 0.0, n_ffn)
    options, damage, time_cost, mem_cost = [], [], [], []
    for layer in range(layers):
        sensitivity = rng.lognormal(0, 1) * (3.0 if layer in (0, layers - 1) else 1.0)
        a_dmg = sensitivity * (1 - attn_cost) ** 2 * rng.uniform(0.5, 1.5, n_attn)
        f_dmg = sensitivity * (1 - ffn_cost / 2) ** 2 * rng.uniform(0.5, 1.5, n_ffn)
        a_dmg[0] = f_dmg[0] = 0.0  # the parent's own blocks
        pairs = [(a, f) for a in range(n_attn) for f in range(n_ffn)]
        options.append([(f"a{a}", f"f{f}") for a, f in pairs])
        damage.append([a_dmg[a] + f_dmg[f] for a, f in pairs])
        time_cost.append([attn_cost[a] + ffn_cost[f] + 0.05 for a, f in pairs])
        mem_cost.append([attn_mem[a] + ffn_mem[f] for a, f in pairs])
    parent_time = layers * (attn_cost[0] + ffn_cost[0] + 0.05) + 10.0
    parent_mem = layers * (attn_mem[0] + ffn_mem[0]) + 20.0
    return Problem(options, damage, {"time": time_cost, "memory": mem_cost}, fixed={"time": 10.0, "memory": 20.0},
                   budgets={"time": parent_time / 2.17, "memory": 0.6 * parent_mem})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=80)
    ap.add_argument("--attention", type=int, default=9)
    ap.add_argument("--ffn", type=int, default=9)
    ap.add_argument("--solutions", type=int, default=10)
    ap.add_argument("--diversity", type=float, default=0.2)
    ap.add_argument("--alternatives", type=int, help="attention and FFN alternatives per layer (sets both)")
    ap.add_argument("--repeats", type=int, default=5, help="times the whole solve is repeated (for median and spread)")
    args = ap.parse_args()
    if args.alternatives:
        args.attention = args.ffn = args.alternatives
    problem = llama70b_like_problem(args.layers, args.attention, args.ffn)
    runs, totals = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        sols = solve(problem, solutions=args.solutions, diversity=args.diversity, time_limit=60)
        totals.append(time.perf_counter() - t)
        check(problem, sols, args.diversity)
        runs.append(sols)
    n_vars = sum(len(o) for o in problem.options)
    print(f"{args.layers} layers x {args.attention}x{args.ffn} pairs = {n_vars} binaries, "
          f"constraints: time (2.17x throughput), memory (60 %), diversity {args.diversity:.0%}; "
          f"{args.repeats} repeats, median (min-max)\n")
    print(f"| {'solution':>8} | {'status':<8} | {'summed damage':>13} | {'solve s':>20} |")
    print(f"|{'-' * 10}|{'-' * 10}|{'-' * 15}|{'-' * 22}|")
    for i, s in enumerate(runs[0]):
        times = [r[i].solve_seconds for r in runs if i < len(r)]
        spread = f"{np.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"
        print(f"| {i:>8} | {s.status:<8} | {s.objective:>13.4f} | {spread:>20} |")
    print(f"\ntotal for {len(runs[0])} solutions: {np.median(totals):.2f} s ({min(totals):.2f}-{max(totals):.2f}), "
          "set-up included (target < 2 s)")


def check(problem: Problem, sols, diversity: float) -> None:
    """Every budget and the diversity rule hold (a fast solver that breaks them is no use)."""
    for s in sols:
        for r, b in problem.budgets.items():
            assert s.resources[r] <= b + 1e-6, (r, s.resources[r], b)
    need = math.ceil(diversity * problem.num_layers - 1e-9)
    for i in range(len(sols)):
        for j in range(i):
            assert sum(a != b for a, b in zip(sols[i].choice, sols[j].choice)) >= need, (i, j)


if __name__ == "__main__":
    main()
