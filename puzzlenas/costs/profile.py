"""A cost profile as data, and the arithmetic on it that search and the baselines do.

    costs/<name>.json = {"device", "estimated", "dtype", "scenario": {batch_size, prompt_len, generate_len},
                         "shared": {prefill_s, decode_s, params, weight_bytes},
                         "alternatives": {alternative name: {prefill_s, decode_s, params, weight_bytes, kv_bytes}},
                         "decode_steps" (engines only), ...}
    read and written as a `workdir.CostProfile` (workdir.read_cost_profile / write_cost_profile).

Times are measured (costs/measure.py) or estimated (costs/roofline.py); memory is counted here,
the same way for both: weight bytes in the serving dtype and KV-cache bytes for B x (P + G) tokens.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

from ..checkpoint.io import attention_params, ffn_params
from ..library.space import Alternative
from ..workdir import CostProfile

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # per element, by serving dtype


# --- counted memory ---------------------------------------------------------------------------

def alternative_params(config, alt: Alternative) -> int:
    fn = attention_params if alt.sub == "attention" else ffn_params
    return fn(config, alt.kind, alt.size)


def alternative_kv_bytes_per_token(config, alt: Alternative, bytes_per_element: int) -> int:
    if alt.sub == "attention" and alt.kind == "gqa":
        return 2 * alt.size * config.head_dim * bytes_per_element
    return 0


def shared_params(config) -> int:
    return config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2) + config.hidden_size


def alternative_memory(config, alt: Alternative, scenario, bytes_per_element: int) -> dict:
    """An alternative's profile entry less its times: parameters, weight bytes, KV-cache bytes."""
    params = alternative_params(config, alt)
    kv = alternative_kv_bytes_per_token(config, alt, bytes_per_element)
    return {"params": params, "weight_bytes": params * bytes_per_element,
            "kv_bytes": kv * scenario.batch_size * (scenario.prompt_len + scenario.generate_len)}


def shared_memory(config, bytes_per_element: int) -> dict:
    """The shared part's profile entry less its times."""
    params = shared_params(config)
    return {"params": params, "weight_bytes": params * bytes_per_element}


# --- time arithmetic: T = prefill + decode_steps x one decode step ------------------------------

def decode_steps(profile: CostProfile) -> int:
    """Decode forwards in one scenario run: generate_len in the harness (prefill, then G steps); one
    fewer in an engine, whose prefill already yields the first token."""
    return profile.scenario["generate_len"] if profile.decode_steps is None else profile.decode_steps


def scenario_time(profile: CostProfile, names: list[str]) -> dict:
    """Predicted prefill, per-step decode and total scenario seconds of a set of sub-blocks."""
    prefill = profile.shared.prefill_s + sum(profile.alternatives[n].prefill_s for n in names)
    decode = profile.shared.decode_s + sum(profile.alternatives[n].decode_s for n in names)
    return {"prefill_s": prefill, "decode_step_s": decode, "total_s": prefill + decode_steps(profile) * decode}


def alternative_time(profile: CostProfile, name: str) -> float:
    """Scenario seconds one alternative contributes: prefill + decode steps x one step."""
    a = profile.alternatives[name]
    return a.prefill_s + decode_steps(profile) * a.decode_s


# --- names ------------------------------------------------------------------------------------

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


def profile_name(cfg, device: torch.device) -> str:
    """The cost profile's name: a roofline preset, or the engine's tag and the hardware measured on."""
    if cfg.costs.device != "auto":
        return cfg.costs.device
    from ..engines import ENGINES

    engine = ENGINES.get(cfg.target.engine)
    tag = engine.profile_tag(cfg.target) if engine else cfg.target.engine
    return f"{tag}-{device_name(device)}" if tag else device_name(device)
