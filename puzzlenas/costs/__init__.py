"""Hardware cost of every alternative for a scenario: measured time, counted memory.

Scenario: `batch_size` requests, each a `prompt_len`-token prompt followed by `generate_len`
generated tokens. The time of one scenario run is
    T = prefill(B, P) + G * decode(B, context = P + G/2)
(decode cost is linear in the context, so one step at the mean context stands for all G steps).
Throughput = B * G / T generated tokens per second; speed-up = T_parent / T_child.

Per alternative we time `h + block(h)` (norm, sub-block and residual add, exactly what a layer
runs) for prefill and for one decode step against a KV cache of the mean context, with warm-up
and repeats, taking the median. What every child shares (embedding, rotary tables, final norm,
LM head, per-forward overhead) is timed once as a child whose layers are all no-op.

Memory is counted, not measured: weight bytes in the serving dtype and KV-cache bytes for
B x (P + G) tokens.

For a device that is not here, `estimate_profile` gives a roofline estimate from the device's
published peak FLOP/s and memory bandwidth (presets h100-sxm, h200, a100-80gb, l40s; and
cpu-roofline, this CPU's measured matmul peak and copy bandwidth); it is labelled "estimated"
everywhere it is shown.
"""

from __future__ import annotations

import platform
import re
import statistics
import time
from pathlib import Path

import torch

from ..checkpoint.io import attention_params, ffn_params
from ..engines.base import Scenario
from ..engines.torch_engine import measure_model_scenario
from ..errors import PuzzleError
from ..library.space import Alternative, build_subblock, target_alternatives
from ..utils import atomic_write_json, fingerprint

# Published dense bf16 peak and memory bandwidth (vendor datasheets).
DEVICE_PRESETS = {
    "h100-sxm": {"name": "NVIDIA H100 SXM (estimated)", "flops": 989e12, "bandwidth": 3.35e12},
    "h200": {"name": "NVIDIA H200 (estimated)", "flops": 989e12, "bandwidth": 4.8e12},
    "a100-80gb": {"name": "NVIDIA A100 80GB SXM (estimated)", "flops": 312e12, "bandwidth": 2.039e12},
    "l40s": {"name": "NVIDIA L40S (estimated)", "flops": 362e12, "bandwidth": 0.864e12},
}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def device_name(device: torch.device) -> str:
    """A file-name-safe name of the hardware measured on."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    raw = line.split(":", 1)[1]
                    break
        except OSError:
            pass
        raw = f"cpu-{raw}-{torch.get_num_threads()}t"
    return re.sub(r"[^A-Za-z0-9.]+", "-", raw.strip()).strip("-").lower()


def serving_dtype(choice: str, device: torch.device) -> str:
    if choice != "auto":
        return choice
    return "bfloat16" if device.type == "cuda" else "float32"


def alternative_params(config, alt: Alternative) -> int:
    fn = attention_params if alt.sub == "attention" else ffn_params
    return fn(config, alt.kind, alt.size)


def alternative_kv_bytes_per_token(config, alt: Alternative, bytes_per_element: int) -> int:
    if alt.sub == "attention" and alt.kind == "gqa":
        return 2 * alt.size * config.head_dim * bytes_per_element
    return 0


def shared_params(config) -> int:
    return config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2) + config.hidden_size


def _median_time(fn, warmup: int, repeats: int, sync, reset=None) -> float:
    for _ in range(warmup):
        fn()
        if reset:
            reset()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if reset:
            reset()
    return statistics.median(times)


STREAM_BYTES = 256 * 2**20  # more than any CPU's last-level cache


@torch.no_grad()
def measure_alternative(config, alt: Alternative, scenario: Scenario, device, dtype, warmup: int, repeats: int) -> dict:
    """Median seconds of prefill and of one decode step for `h + block(h)`.

    Timing one small block over and over would keep its weights in the CPU cache, while in the
    real model every layer's weights stream from memory (decode is memory-bound). So we run
    enough distinct copies of the block back to back to move STREAM_BYTES of weights, and divide.
    """
    from transformers.cache_utils import DynamicCache

    from ..model.modeling_decilm import DeciLMRotaryEmbedding

    if alt.kind == "no_op":
        return {"prefill_s": 0.0, "decode_s": 0.0, "copies": 0}
    nbytes = alternative_params(config, alt) * torch.finfo(dtype).bits // 8
    copies = 1 if device.type == "cuda" else max(1, min(64, -(-STREAM_BYTES // max(nbytes, 1))))
    blocks = [build_subblock(config, alt).to(device=device, dtype=dtype).eval() for _ in range(copies)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    B, P, ctx, C = scenario.batch_size, scenario.prompt_len, scenario.decode_context, config.hidden_size
    rotary = DeciLMRotaryEmbedding(config)
    h = torch.randn(B, P, C, device=device, dtype=dtype)
    pe = rotary(h, torch.arange(P, device=device)[None].expand(B, -1))

    def prefill_all():
        for b in blocks:
            h + b(h, pe)

    prefill = _median_time(prefill_all, warmup, repeats, sync) / copies
    h1 = torch.randn(B, 1, C, device=device, dtype=dtype)
    pe1 = rotary(h1, torch.full((B, 1), ctx, device=device))
    if alt.sub == "attention" and alt.kind == "gqa":
        caches = []
        for _ in blocks:
            cache = DynamicCache()
            kv = torch.randn(B, alt.size, ctx, config.head_dim, device=device, dtype=dtype)
            cache.update(kv, kv.clone(), 0)
            caches.append(cache)

        def decode_all():
            for b, cache in zip(blocks, caches):
                h1 + b.self_attn(b.input_layernorm(h1), pe1, None, cache)

        def reset():
            for cache in caches:
                cache.crop(-1)  # drop the token the step appended

        decode = _median_time(decode_all, warmup, repeats, sync, reset=reset) / copies
    else:

        def decode_all():
            for b in blocks:
                h1 + b(h1, pe1)

        decode = _median_time(decode_all, warmup, repeats, sync) / copies
    return {"prefill_s": prefill, "decode_s": decode, "copies": copies}


def measure_shared(parent, scenario: Scenario, warmup: int, repeats: int, dtype=torch.float32) -> dict:
    """Everything but the layers: a child whose every layer is no-op, timed like a real model."""
    from ..realize import assemble_child

    choices = [(Alternative(i, "attention", "no_op"), Alternative(i, "ffn", "no_op"))
               for i in range(parent.config.num_hidden_layers)]
    shell = assemble_child(parent, choices, random_weights=True).to(dtype)
    m = measure_model_scenario(shell, scenario, warmup=warmup, repeats=repeats)
    # per-step decode time, so that T = prefill + G * decode holds for the shared part too
    return {"prefill_s": m["prefill_s"], "decode_s": m["decode_s"] / scenario.generate_len}


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


def run(cfg, workdir: str | Path, parent, progress: bool = True) -> dict:
    """Measure (or estimate, for a preset device) and save costs/<device>.json."""
    workdir = Path(workdir)
    c = cfg.costs
    scenario = Scenario(c.scenario.batch_size, c.scenario.prompt_len, c.scenario.generate_len)
    alternatives = target_alternatives(cfg, parent.config)
    if c.device == "cpu-roofline":
        preset = measure_cpu_roofline()
        profile = estimate_profile(parent.config, alternatives, scenario, preset, "float32" if c.dtype == "auto" else c.dtype)
        profile["device"] = "cpu-roofline"
        profile["preset"] = preset
    elif c.device != "auto":
        if c.device not in DEVICE_PRESETS:
            raise PuzzleError(
                f"costs.device={c.device!r} is unknown (accepted: auto, cpu-roofline, {', '.join(DEVICE_PRESETS)})"
            )
        profile = estimate_profile(parent.config, alternatives, scenario, DEVICE_PRESETS[c.device],
                                   serving_dtype("bfloat16" if c.dtype == "auto" else c.dtype, torch.device("cuda")))
        profile["device"] = c.device
    else:
        profile = _measure_profile(cfg, workdir, parent, alternatives, scenario, progress)
    out_file = workdir / "costs" / f"{profile['device']}.json"
    atomic_write_json(out_file, profile)
    return profile


def profile_name(cfg, device: torch.device) -> str:
    """The cost profile's name: a roofline preset, or the engine and the hardware measured on."""
    if cfg.costs.device != "auto":
        return cfg.costs.device
    engine = cfg.target.engine
    if engine == "llama.cpp":  # costs differ by GGUF type: one profile per type
        engine = f"llama.cpp-{cfg.target.gguf_type}"
    return device_name(device) if engine == "torch" else f"{engine}-{device_name(device)}"


def _measure_profile(cfg, workdir: Path, parent, alternatives, scenario: Scenario, progress: bool) -> dict:
    """Time the alternatives on this machine: in puzzlenas's harness sub-block by sub-block
    (engine torch), or in the target engine with whole-model variants (costs/variants.py)."""
    import json

    from ..engines import get_engine

    c = cfg.costs
    engine = get_engine(cfg.target.engine)
    engine.check_available()
    device = next(parent.parameters()).device
    dtype_name = engine.serving_dtype(c.dtype)
    name = profile_name(cfg, device)
    key = fingerprint(name, dtype_name, scenario.__dict__, c.warmup, c.repeats,
                      sorted(a.name for a in alternatives), parent.config.to_dict())
    out_file = workdir / "costs" / f"{name}.json"
    if out_file.is_file():
        cached = json.loads(out_file.read_text())
        if cached.get("fingerprint") == key:
            return cached
    bpe = _BYTES[dtype_name]
    if engine.profiles_by_variants:
        from .variants import measure_variants_profile, shape_key

        parent_dir = workdir / "parent" if (workdir / "parent" / "config.json").is_file() else None
        measured = measure_variants_profile(parent, parent_dir, engine, alternatives, scenario, dtype_name,
                                            c.warmup, c.repeats, workdir / "costs" / "variants.tmp", progress)
        times = {shape: measured["shapes"][shape] for shape in {shape_key(a) for a in alternatives}}
        shared = measured["shared"]
        extra = {"engine": engine.name, "method": "whole-model variants", "decode_steps": measured["decode_steps"],
                 "parent_measured": measured["parent_measured"], "variants": measured["variants"],
                 "warnings": measured["warnings"]}
    else:
        from tqdm.auto import tqdm

        dtype = getattr(torch, dtype_name)
        unique = {}  # same-shaped alternatives of different layers cost the same: time each shape once
        for a in alternatives:
            unique.setdefault((a.sub, a.kind, a.size), a)
        times = {}
        for shape, a in tqdm(unique.items(), desc="timing alternatives", disable=not progress):
            times[shape] = measure_alternative(parent.config, a, scenario, device, dtype, c.warmup, c.repeats)
        shared = measure_shared(parent, scenario, c.warmup, c.repeats, dtype)
        extra = {"engine": "torch", "method": "sub-blocks in the PyTorch harness"}
    return {
        "device": name,
        "estimated": False,
        "dtype": dtype_name,
        "fingerprint": key,
        "scenario": scenario.__dict__,
        **extra,
        "shared": {**shared, "params": shared_params(parent.config), "weight_bytes": shared_params(parent.config) * bpe},
        "alternatives": {
            a.name: {
                **times[(a.sub, a.kind, a.size)],
                "params": alternative_params(parent.config, a),
                "weight_bytes": alternative_params(parent.config, a) * bpe,
                "kv_bytes": alternative_kv_bytes_per_token(parent.config, a, bpe)
                * scenario.batch_size * (scenario.prompt_len + scenario.generate_len),
            }
            for a in alternatives
        },
    }


def estimate_profile(config, alternatives, scenario: Scenario, preset: dict, dtype_name: str) -> dict:
    """Roofline: time = max(FLOPs / peak, bytes moved / bandwidth) per sub-block and phase."""
    bpe = _BYTES[dtype_name]
    B, P, ctx, C = scenario.batch_size, scenario.prompt_len, scenario.decode_context, config.hidden_size

    def roofline(flops, nbytes):
        return max(flops / preset["flops"], nbytes / preset["bandwidth"])

    alts = {}
    for a in alternatives:
        params = alternative_params(config, a)
        w = params * bpe
        kv_tok = alternative_kv_bytes_per_token(config, a, bpe)
        attn_flops_prefill = attn_flops_decode = 0
        if a.sub == "attention" and a.kind == "gqa":
            attn_flops_prefill = 2 * 2 * B * P * (P / 2) * config.num_attention_heads * config.head_dim
            attn_flops_decode = 2 * 2 * B * ctx * config.num_attention_heads * config.head_dim
        act = 2 * B * P * C * bpe
        alts[a.name] = {
            "prefill_s": roofline(2 * params * B * P + attn_flops_prefill, w + act + kv_tok * B * P),
            "decode_s": roofline(2 * params * B + attn_flops_decode, w + kv_tok * B * ctx),
            "params": params,
            "weight_bytes": w,
            "kv_bytes": kv_tok * B * (P + scenario.generate_len),
        }
    sp = shared_params(config)
    head = config.vocab_size * C
    return {
        "device": preset["name"],
        "estimated": True,
        "dtype": dtype_name,
        "scenario": scenario.__dict__,
        "shared": {
            "prefill_s": roofline(2 * head * B, head * bpe),  # only the last position's logits
            "decode_s": roofline(2 * head * B, head * bpe),
            "params": sp,
            "weight_bytes": sp * bpe,
        },
        "alternatives": alts,
    }


def decode_steps(profile: dict) -> int:
    """Decode forwards in one scenario run: generate_len in the harness (prefill, then G steps); one
    fewer in an engine, whose prefill already yields the first token."""
    return profile.get("decode_steps", profile["scenario"]["generate_len"])


def scenario_time(profile: dict, names: list[str]) -> dict:
    """Predicted prefill, per-step decode and total scenario seconds of a set of sub-blocks."""
    prefill = profile["shared"]["prefill_s"] + sum(profile["alternatives"][n]["prefill_s"] for n in names)
    decode = profile["shared"]["decode_s"] + sum(profile["alternatives"][n]["decode_s"] for n in names)
    return {"prefill_s": prefill, "decode_step_s": decode, "total_s": prefill + decode_steps(profile) * decode}


def alternative_time(profile: dict, name: str) -> float:
    """Scenario seconds one alternative contributes: prefill + decode steps x one step."""
    a = profile["alternatives"][name]
    return a["prefill_s"] + decode_steps(profile) * a["decode_s"]
