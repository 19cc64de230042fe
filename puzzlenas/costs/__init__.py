"""Costs: hardware cost of every alternative for a scenario, measured time and counted memory.

    puzzlenas costs CONFIG --workdir W [--device h100-sxm]

Scenario: `batch_size` requests, each a `prompt_len`-token prompt followed by `generate_len`
generated tokens. The time of one scenario run is
    T = prefill(B, P) + G * decode(B, context = P + G/2)
(decode cost is linear in the context, so one step at the mean context stands for all G steps).
Throughput = B * G / T generated tokens per second; speed-up = T_parent / T_child.

One module per job:
    profile.py   the profile as data: counted memory, T = prefill + steps x decode (what search reads), names
    measure.py   times measured here, in the target engine (variants.py: whole-model variants in an engine)
    roofline.py  times estimated for a preset device from its peak FLOP/s and memory bandwidth
This module is the stage: `run` picks one, and saves costs/<profile name>.json.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..engines.base import Scenario
from ..engines.torch_engine import measure_model_scenario
from ..errors import PuzzleError
from ..library.space import target_alternatives
from ..workdir import CostProfile, write_cost_profile
from .measure import STREAM_BYTES, measure_alternative, measure_profile, measure_shared
from .profile import (
    alternative_kv_bytes_per_token,
    alternative_params,
    alternative_time,
    decode_steps,
    device_name,
    profile_name,
    scenario_time,
    shared_params,
)
from .roofline import DEVICE_PRESETS, estimate_profile, measure_cpu_roofline, serving_dtype


def run(cfg, workdir: str | Path, parent, progress: bool = True) -> CostProfile:
    """Measure (or estimate, for a preset device) and save costs/<device>.json."""
    workdir = Path(workdir)
    c = cfg.costs
    scenario = Scenario(c.scenario.batch_size, c.scenario.prompt_len, c.scenario.generate_len)
    alternatives = target_alternatives(cfg, parent.config)
    if c.device == "cpu-roofline":
        preset = measure_cpu_roofline()
        profile = estimate_profile(parent.config, alternatives, scenario, preset, "float32" if c.dtype == "auto" else c.dtype)
        profile = replace(profile, device="cpu-roofline", extra={**profile.extra, "preset": preset})
    elif c.device != "auto":
        if c.device not in DEVICE_PRESETS:
            raise PuzzleError(
                f"costs.device={c.device!r} is unknown (accepted: auto, cpu-roofline, {', '.join(DEVICE_PRESETS)})"
            )
        profile = estimate_profile(parent.config, alternatives, scenario, DEVICE_PRESETS[c.device],
                                   serving_dtype("bfloat16" if c.dtype == "auto" else c.dtype, torch.device("cuda")))
        profile = replace(profile, device=c.device)
    else:
        profile = measure_profile(cfg, workdir, parent, alternatives, scenario, progress)
    write_cost_profile(workdir, profile)
    return profile


__all__ = [  # the stage, and the names other modules, tests and benchmarks use
    "DEVICE_PRESETS", "STREAM_BYTES", "Scenario", "alternative_kv_bytes_per_token", "alternative_params",
    "alternative_time", "decode_steps", "device_name", "estimate_profile", "measure_alternative",
    "measure_cpu_roofline", "measure_model_scenario", "measure_profile", "measure_shared", "profile_name", "run",
    "scenario_time", "serving_dtype", "shared_params",
]
