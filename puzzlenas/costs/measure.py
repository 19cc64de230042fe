"""Measured cost profiles: every alternative timed on this machine, in the target engine.

Which way an engine is timed is its own attribute (`Engine.profiles_by_variants`), so this module
names no engine; a new engine plugs in through puzzlenas/engines/ alone:
  - by whole-model variants (vLLM, llama.cpp, any engine that times checkpoints): costs/variants.py,
    through the engine's `time_models`;
  - sub-block by sub-block in puzzlenas's PyTorch harness (torch), below: per alternative we time
    `h + block(h)` (norm, sub-block and residual add, exactly what a layer runs) for prefill and
    for one decode step against a KV cache of the mean context, with warm-up and repeats, taking
    the median. What every child shares (embedding, rotary tables, final norm, LM head,
    per-forward overhead) is timed once as a child whose layers are all no-op.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from ..engines.base import Scenario
from ..engines.torch_engine import measure_model_scenario
from ..errors import PuzzleError
from ..library.space import Alternative, build_subblock
from ..utils import fingerprint, median_time
from ..workdir import CostProfile, cost_profile_file, load_artifact
from .profile import BYTES, alternative_memory, alternative_params, profile_name, shared_memory
from .variants import VARIANTS_METHOD

log = logging.getLogger(__name__)

STREAM_BYTES = 256 * 2**20  # more than any CPU's last-level cache
# A 1-minute load average above this many times the CPU count means other jobs share the CPUs. This
# process's own previous stage accounts for up to one per thread, hence not 1x. Measured here: a
# llama.cpp profile taken at load 4-9 on 2 cores promised 1.50x for children that ran 1.30-1.34x,
# and the same library profiled quietly promised 1.50x for 1.45-1.48x (README, the Pareto sweep).
BUSY_LOAD = 1.5


def machine_load(device: torch.device) -> dict | None:
    """The 1-minute load average and the CPUs this process may use, when timing on a CPU."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"load_1min": round(os.getloadavg()[0], 2), "cpus": cpus}


def warn_if_busy(load: dict | None, when: str) -> None:
    if load and load["load_1min"] > BUSY_LOAD * load["cpus"]:
        log.warning("costs: the machine was busy %s timing (load average %.1f on %d CPUs): other jobs distort "
                    "the timings and so the speed-up the search promises; run `puzzlenas costs` again on a quiet "
                    "machine (delete costs/ first)", when, load["load_1min"], load["cpus"])


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

    prefill = median_time(prefill_all, warmup, repeats, sync) / copies
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

        decode = median_time(decode_all, warmup, repeats, sync, reset=reset) / copies
    else:

        def decode_all():
            for b in blocks:
                h1 + b(h1, pe1)

        decode = median_time(decode_all, warmup, repeats, sync) / copies
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


def measure_profile(cfg, workdir: Path, parent, alternatives, scenario: Scenario, progress: bool) -> CostProfile:
    """Time the alternatives on this machine: in puzzlenas's harness sub-block by sub-block
    (engine torch), or in the target engine with whole-model variants (costs/variants.py). A
    profile already on disk for the same inputs is returned as it is."""
    from ..engines import get_engine

    c = cfg.costs
    engine = get_engine(cfg.target.engine)
    engine.check_available()
    device = next(parent.parameters()).device
    dtype_name = engine.serving_dtype(c.dtype)
    name = profile_name(cfg, device)
    # the variants' method is in the key: a profile whose shared part was the parent's remainder
    # (before the shared-only variant, costs/variants.py) is measured again, not reused
    method = [VARIANTS_METHOD] if engine.profiles_by_variants else []
    key = fingerprint(name, dtype_name, scenario.__dict__, c.warmup, c.repeats,
                      sorted(a.name for a in alternatives), parent.config.to_dict(), *method)
    out_file = workdir / cost_profile_file(name)
    if out_file.is_file():
        with contextlib.suppress(PuzzleError):  # an unreadable profile is measured again
            cached = load_artifact(out_file, CostProfile, "costs")
            if cached.extra.get("fingerprint") == key:
                return cached
    bpe = BYTES[dtype_name]
    load_before = machine_load(device)
    warn_if_busy(load_before, "before")
    if engine.profiles_by_variants:
        from .variants import measure_variants_profile

        parent_dir = workdir / "parent" if (workdir / "parent" / "config.json").is_file() else None
        measured = measure_variants_profile(parent, parent_dir, engine, alternatives, scenario, dtype_name,
                                            c.warmup, c.repeats, workdir / "costs" / "variants.tmp", progress)
        times = {shape: measured["shapes"][shape] for shape in {a.shape for a in alternatives}}
        shared = measured["shared"]
        extra = {"engine": engine.name, "method": "whole-model variants", "decode_steps": measured["decode_steps"],
                 "parent_measured": measured["parent_measured"], "additivity": measured["additivity"],
                 "variants": measured["variants"],
                 "warnings": measured["warnings"]}
    else:
        from tqdm.auto import tqdm

        dtype = getattr(torch, dtype_name)
        unique = {}  # same-shaped alternatives of different layers cost the same: time each shape once
        for a in alternatives:
            unique.setdefault(a.shape, a)
        times = {}
        for shape, a in tqdm(unique.items(), desc="timing alternatives", disable=not progress):
            times[shape] = measure_alternative(parent.config, a, scenario, device, dtype, c.warmup, c.repeats)
        shared = measure_shared(parent, scenario, c.warmup, c.repeats, dtype)
        extra = {"engine": engine.name, "method": "sub-blocks in the PyTorch harness"}
    load_after = machine_load(device)
    warn_if_busy(load_after, "while")
    if load_before:  # kept in the profile: whoever reads it later can tell a quiet profile from a loaded one
        extra["machine_load"] = {"before": load_before, "after": load_after}
    return CostProfile.from_json({
        "device": name,
        "estimated": False,
        "dtype": dtype_name,
        "fingerprint": key,
        "scenario": scenario.__dict__,
        **extra,
        "shared": {**shared, **shared_memory(parent.config, bpe)},
        "alternatives": {a.name: {**times[a.shape], **alternative_memory(parent.config, a, scenario, bpe)}
                         for a in alternatives},
    })
