"""MIP solve time for a Llama-70B-sized search space.

    python benchmarks/mip_solve.py [--layers 80] [--attention 9] [--ffn 9] [--solutions 10]

80 layers x (9 attention x 9 FFN) pairs = 6,480 binary variables, a memory and a throughput
constraint, 10 solutions that each differ from all earlier ones in >= 20 % of the layers.
Damage and costs are synthetic but shaped like real ones: cheaper alternatives do more damage,
and layers differ in how sensitive they are. Target: < 2 s in total.
"""

from __future__ import annotations

import argparse
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
    args = ap.parse_args()
    problem = llama70b_like_problem(args.layers, args.attention, args.ffn)
    t = time.perf_counter()
    sols = solve(problem, solutions=args.solutions, diversity=args.diversity, time_limit=60)
    total = time.perf_counter() - t
    n_vars = sum(len(o) for o in problem.options)
    print(f"{args.layers} layers x {args.attention}x{args.ffn} pairs = {n_vars} binaries, "
          f"constraints: time (2.17x throughput), memory (60 %), diversity {args.diversity:.0%}\n")
    print(f"| {'solution':>8} | {'status':<8} | {'summed damage':>13} | {'solve s':>8} |")
    print(f"|{'-' * 10}|{'-' * 10}|{'-' * 15}|{'-' * 10}|")
    for i, s in enumerate(sols):
        print(f"| {i:>8} | {s.status:<8} | {s.objective:>13.4f} | {s.solve_seconds:>8.3f} |")
    print(f"\ntotal for {len(sols)} solutions: {total:.2f} s (target < 2 s)")


if __name__ == "__main__":
    main()
