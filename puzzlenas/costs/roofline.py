"""Roofline estimates for a device that is not here: time = max(FLOPs / peak, bytes moved / bandwidth)
per sub-block and phase, from the device's published peak FLOP/s and memory bandwidth (presets
h100-sxm, h200, a100-80gb, l40s; and cpu-roofline, this CPU's measured matmul peak and copy
bandwidth). Such a profile is labelled "estimated" everywhere it is shown.
"""

from __future__ import annotations

import time

import torch

from ..engines.base import Scenario
from ..workdir import CostProfile
from .profile import BYTES, alternative_kv_bytes_per_token, alternative_memory, device_name, shared_memory

# Published dense bf16 peak and memory bandwidth (vendor datasheets).
DEVICE_PRESETS = {
    "h100-sxm": {"name": "NVIDIA H100 SXM (estimated)", "flops": 989e12, "bandwidth": 3.35e12},
    "h200": {"name": "NVIDIA H200 (estimated)", "flops": 989e12, "bandwidth": 4.8e12},
    "a100-80gb": {"name": "NVIDIA A100 80GB SXM (estimated)", "flops": 312e12, "bandwidth": 2.039e12},
    "l40s": {"name": "NVIDIA L40S (estimated)", "flops": 362e12, "bandwidth": 0.864e12},
}


def serving_dtype(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    return "bfloat16" if device.type == "cuda" else "float32"


def measure_cpu_roofline() -> dict:
    """This CPU as a roofline preset: its measured fp32 matmul peak and memory copy bandwidth."""
    n, reps = 2048, 5
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    flops = 2 * n**3 * reps / (time.perf_counter() - t)
    src = torch.empty(64 * 2**20, dtype=torch.uint8)  # 64 MiB: past the last-level cache
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    bandwidth = 2 * src.numel() * reps / (time.perf_counter() - t)  # read + write
    return {"name": f"{device_name(torch.device('cpu'))} roofline (estimated)", "flops": flops, "bandwidth": bandwidth}


def estimate_profile(config, alternatives, scenario: Scenario, preset: dict, dtype_name: str) -> CostProfile:
    """Roofline: time = max(FLOPs / peak, bytes moved / bandwidth) per sub-block and phase."""
    bpe = BYTES[dtype_name]
    B, P, ctx, C = scenario.batch_size, scenario.prompt_len, scenario.decode_context, config.hidden_size

    def roofline(flops, nbytes):
        return max(flops / preset["flops"], nbytes / preset["bandwidth"])

    alts = {}
    for a in alternatives:
        memory = alternative_memory(config, a, scenario, bpe)
        params, w = memory["params"], memory["weight_bytes"]
        kv_tok = alternative_kv_bytes_per_token(config, a, bpe)
        attn_flops_prefill = attn_flops_decode = 0
        if a.sub == "attention" and a.kind == "gqa":
            attn_flops_prefill = 2 * 2 * B * P * (P / 2) * config.num_attention_heads * config.head_dim
            attn_flops_decode = 2 * 2 * B * ctx * config.num_attention_heads * config.head_dim
        act = 2 * B * P * C * bpe
        alts[a.name] = {
            "prefill_s": roofline(2 * params * B * P + attn_flops_prefill, w + act + kv_tok * B * P),
            "decode_s": roofline(2 * params * B + attn_flops_decode, w + kv_tok * B * ctx),
            **memory,
        }
    head = config.vocab_size * C
    return CostProfile.from_json({
        "device": preset["name"],
        "estimated": True,
        "dtype": dtype_name,
        "scenario": scenario.__dict__,
        "shared": {
            "prefill_s": roofline(2 * head * B, head * bpe),  # only the last position's logits
            "decode_s": roofline(2 * head * B, head * bpe),
            **shared_memory(config, bpe),
        },
        "alternatives": alts,
    })
