"""BLD throughput on SmolLM2-135M and achieved FLOP/s as a fraction of this machine's matmul peak.

    python benchmarks/bld_throughput.py [--layers 4] [--steps 12] [--batch 8] [--seq-len 256]

Measures, in one run: the peak of a large square matmul (fp32 and bf16), then BLD with the
default search space on `--layers` layers in fp32 and in bf16 autocast. FLOPs are counted
analytically: the parent's traced forward (2 FLOPs per weight per token, plus causal
attention) and, for each trained alternative, forward + backward (6 per weight per token,
plus 3x its attention).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import SHARED_DATA  # noqa: E402

from puzzlenas import bld  # noqa: E402
from puzzlenas.checkpoint.io import attention_params, ffn_params  # noqa: E402
from puzzlenas.checkpoint.parent import prepare_parent  # noqa: E402
from puzzlenas.config import config_from_dict  # noqa: E402
from puzzlenas.data import prepare_data  # noqa: E402
from puzzlenas.library.space import enumerate_alternatives, is_parent_alternative  # noqa: E402


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def block_forward_flops_per_token(config, alt, seq_len: int) -> float:
    """2 x weights, plus causal attention scores and values (QK^T and AV: 2 x 2 x T/2 x H x D)."""
    weights = (attention_params if alt.sub == "attention" else ffn_params)(config, alt.kind, alt.size)
    flops = 2 * weights
    if alt.sub == "attention" and alt.kind == "gqa":
        flops += 2 * 2 * (seq_len / 2) * config.num_attention_heads * config.head_dim
    return flops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "puzzlenas-bench"))
    args = ap.parse_args()
    torch.manual_seed(0)
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    cache = Path(args.cache)
    parent, tokenizer, fp = prepare_parent("smollm2", cache)
    base = {
        "data": {"path": str(SHARED_DATA / "distill" / "gutenberg"), "seq_len": args.seq_len,
                 "max_train_sequences": max(64, args.steps * args.batch), "val_sequences": 8},
        "search_space": {"only_layers": list(range(args.layers))},
        "init": {"calibration_sequences": 16},
        "bld": {"tokens": args.steps * args.batch * args.seq_len, "batch_size": args.batch, "checkpoint_every": 10**6},
    }
    cfg = config_from_dict(base)
    data = prepare_data(cfg.data, tokenizer, cache, model=parent, model_fingerprint=fp)
    config = parent.config
    alts = [a for a in enumerate_alternatives(cfg.search_space, config)
            if a.trainable and not is_parent_alternative(a, config)]
    parent_layer_flops = sum(
        block_forward_flops_per_token(config, a, args.seq_len)
        for a in enumerate_alternatives(cfg.search_space, config)
        if a.layer < args.layers and is_parent_alternative(a, config)
    )
    train_flops = sum(3 * block_forward_flops_per_token(config, a, args.seq_len) for a in alts)
    flops_per_token = parent_layer_flops + train_flops
    rows = []
    for dtype in ("float32", "bfloat16"):
        work = cache / f"bld-{dtype}"
        shutil.rmtree(work, ignore_errors=True)
        run_cfg = config_from_dict({**base, "bld": {**base["bld"], "dtype": dtype}})
        library = bld.run(run_cfg, work, parent, data, fp, progress=False)
        record = next(r for r in library.records().values() if r.get("file"))
        seconds, tokens = record["train_seconds"], record["tokens"]
        achieved = flops_per_token * tokens / seconds
        rows.append((dtype, tokens / seconds, achieved, peaks[dtype]))
    print(f"\nSmolLM2-135M BLD, layers 0..{args.layers - 1}, {len(alts)} trained alternatives, batch {args.batch} x "
          f"{args.seq_len} tokens, {args.steps} steps, {torch.get_num_threads()} threads")
    print(f"analytic FLOPs per token: {flops_per_token / 1e6:.1f} M (parent trace {parent_layer_flops / 1e6:.1f} M, "
          f"training {train_flops / 1e6:.1f} M)\n")
    print(f"| {'dtype':<9} | {'BLD tokens/s':>12} | {'achieved GFLOP/s':>16} | {'matmul peak GFLOP/s':>19} | {'of peak':>7} |")
    print(f"|{'-' * 11}|{'-' * 14}|{'-' * 18}|{'-' * 21}|{'-' * 9}|")
    for dtype, tps, achieved, peak in rows:
        print(f"| {dtype:<9} | {tps:>12,.0f} | {achieved / 1e9:>16.1f} | {peak / 1e9:>19.1f} | {achieved / peak:>6.1%} |")
    print(json.dumps({"rows": [dict(zip(["dtype", "tokens_per_s", "flops", "peak"], r)) for r in rows]}))


if __name__ == "__main__":
    main()
