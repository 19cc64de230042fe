"""GKD throughput on SmolLM2-135M: where a training step's time goes, against this machine's matmul peak.

    python benchmarks/gkd_throughput.py [--batch 4] [--seq-len 256] [--steps 4]

One GKD step as gkd.distill runs it (the parent as teacher, a full copy of it as the child: the
most a child costs), split into its phases and timed with a wall clock around each:
  teacher    the frozen parent's forward, no graph, all hidden states kept
  child      the child's forward with its graph
  loss       KL(parent || child) over the 49k-token vocabulary + hidden-state cosine (gkd.distill_loss)
  backward   the child's backward
  optimizer  AdamW with gradient clipping (training.optimizer_step)
FLOPs are counted analytically: 2 per weight per token forward (the tied LM head included) plus
causal attention, twice that for the backward. The matmul peak is measured in the same run with
the step's own largest shape (tokens x hidden x FFN), so "of peak" says how close the step comes to
what this CPU does at all. Reported: the median over --steps steps after one warm-up step, and the
spread (min-max) of the step time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch


def matmul_rate(m: int, k: int, n: int, reps: int = 10) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * m * k * n * reps / (time.perf_counter() - t)


def forward_flops_per_token(model, seq_len: int) -> float:
    c = model.config
    weights = sum(p.numel() for n, p in model.model.layers.named_parameters() if "norm" not in n)
    lm_head = c.vocab_size * c.hidden_size  # tied: the embedding matrix again, as a matmul
    attention = c.num_hidden_layers * 2 * 2 * (seq_len / 2) * c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    return 2 * (weights + lm_head) + attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "puzzlenas-bench"))
    args = ap.parse_args()

    from puzzlenas.checkpoint.parent import prepare_parent
    from puzzlenas.config import config_from_dict
    from puzzlenas.gkd import distill_loss
    from puzzlenas.training import adamw, optimizer_step

    torch.manual_seed(0)
    parent, _, _ = prepare_parent("smollm2", Path(args.cache))
    parent.eval().requires_grad_(False)
    child = copy.deepcopy(parent).train().requires_grad_(True)
    g = config_from_dict({}).gkd
    optimizer = adamw(child.parameters(), g.optim)
    B, T = args.batch, args.seq_len
    config = parent.config
    fwd = forward_flops_per_token(parent, T)
    tokens = B * T
    peak = matmul_rate(tokens, config.hidden_size, config.intermediate_size)
    phases = {k: [] for k in ("teacher", "child", "loss", "backward", "optimizer")}
    for step in range(args.steps + 1):
        ids = torch.randint(0, config.vocab_size, (B, T))
        t0 = time.perf_counter()
        with torch.no_grad():
            parent_out = parent(ids, use_cache=False, output_hidden_states=True)
        t1 = time.perf_counter()
        child_out = child(ids, use_cache=False, output_hidden_states=True)
        t2 = time.perf_counter()
        loss, _ = distill_loss(child_out, parent_out, ids, g)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        optimizer_step(optimizer, child.parameters(), 1e-6, g.optim.grad_clip)
        t5 = time.perf_counter()
        if step:  # the first step warms up allocators and kernels
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                phases[k].append(dt)
        del parent_out, child_out, loss
    flops = {"teacher": fwd * tokens, "child": fwd * tokens, "loss": 0.0, "backward": 2 * fwd * tokens, "optimizer": 0.0}
    steps = [sum(p[i] for p in phases.values()) for i in range(args.steps)]
    step_s = statistics.median(steps)
    print(f"\nSmolLM2-135M GKD step (child = a full copy of the parent), batch {B} x {T} tokens, fp32, "
          f"{torch.get_num_threads()} threads, {args.steps} steps after 1 warm-up")
    print(f"matmul peak at {tokens}x{config.hidden_size}x{config.intermediate_size}: {peak / 1e9:.1f} GFLOP/s; "
          f"analytic forward {fwd / 1e6:.0f} MFLOP per token\n")
    print(f"| {'phase':<9} | {'median s':>8} | {'share':>6} | {'GFLOP/s':>8} | {'of peak':>7} |")
    print(f"|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 10}|{'-' * 9}|")
    for k, times in phases.items():
        s = statistics.median(times)
        rate = flops[k] / s if flops[k] else 0.0
        print(f"| {k:<9} | {s:>8.2f} | {s / step_s:>6.1%} | {rate / 1e9:>8.1f} | "
              f"{(f'{rate / peak:.0%}' if flops[k] else '-'):>7} |")
    total_flops = sum(flops.values())
    print(f"| {'step':<9} | {step_s:>8.2f} | {'100%':>6} | {total_flops / step_s / 1e9:>8.1f} | "
          f"{total_flops / step_s / peak:>6.0%} |")
    print(f"\n{tokens / step_s:.0f} tokens/s (step time {min(steps):.2f}-{max(steps):.2f} s)")


if __name__ == "__main__":
    main()
