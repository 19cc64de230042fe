"""puzzlenas's own PyTorch model as the serving engine: eager transformers-style forward with a
KV cache. Runs every block kind; its costs come from timing each sub-block in isolation
(`costs/measure.py`), which predicts this harness's whole-model time within a few percent.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .base import Engine, ModelTimings, Scenario


@torch.no_grad()
def time_scenario_once(model, scenario: Scenario, generator: torch.Generator | None = None) -> tuple[float, float]:
    """(prefill seconds, total seconds) of one scenario run: prefill, then `generate_len` greedy
    decode steps against the KV cache."""
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    B, P, G = scenario.batch_size, scenario.prompt_len, scenario.generate_len
    prompt = torch.randint(0, model.config.vocab_size, (B, P), generator=generator).to(device)
    cache = DynamicCache()
    sync()
    t0 = time.perf_counter()
    out = model(prompt, cache=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    sync()
    t1 = time.perf_counter()
    for _ in range(G):
        out = model(nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    sync()
    return t1 - t0, time.perf_counter() - t0


def measure_model_scenario(model, scenario: Scenario, warmup: int = 1, repeats: int = 3) -> dict:
    """Median prefill and decode seconds of a loaded model over `repeats` scenario runs."""
    runs = [time_scenario_once(model, scenario) for _ in range(warmup + repeats)][warmup:]
    prefill = statistics.median(p for p, _ in runs)
    decode = statistics.median(t - p for p, t in runs)
    B, P, G = scenario.batch_size, scenario.prompt_len, scenario.generate_len
    return {"prefill_s": prefill, "decode_s": decode, "total_s": prefill + decode,
            "prefill_tok_s": B * P / prefill, "decode_tok_s": B * G / decode}


class TorchEngine(Engine):
    name = "torch"
    kinds = {"attention": {"gqa", "linear", "no_op"}, "ffn": {"mlp", "linear", "no_op"}}
    profiles_by_variants = False

    def serving_dtype(self, choice: str) -> str:
        if choice != "auto":
            return choice
        return "bfloat16" if torch.cuda.is_available() else "float32"

    @classmethod
    def profile_tag(cls, target) -> str:
        return ""  # harness profiles are named by the hardware alone

    def time_models(self, models, scenario, repeats, warmup=1, groups=None, dtype="float32", progress=False):
        from ..checkpoint.io import load_checkpoint
        from ..utils import pick_device

        device = pick_device()
        groups = groups or [list(models)]
        loaded: dict[str, torch.nn.Module] = {}
        results = []
        for group in groups:
            for name in [n for n in loaded if n not in group]:
                del loaded[name]
            for name in group:
                if name not in loaded:
                    model = models[name]
                    loaded[name] = (load_checkpoint(Path(model), dtype) if isinstance(model, (str, Path))
                                    else model).to(device).eval()
            timings = {name: ModelTimings(decode_steps=scenario.generate_len) for name in group}
            for r in range(warmup + repeats):
                order = group[r % len(group):] + group[: r % len(group)]  # rotate: no model always goes first
                for name in order:
                    prefill, total = time_scenario_once(loaded[name], scenario)
                    if r >= warmup:
                        timings[name].add(prefill, total)
            results.append(timings)
        return results
