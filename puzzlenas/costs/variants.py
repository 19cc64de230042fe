"""Cost profiles measured in a serving engine, from whole synthetic models.

An engine's cost of a sub-block cannot be timed by running the sub-block alone: the engine only
runs whole models, and its per-step overhead, scheduler and fused kernels are part of what we
want to see. So for every shape of alternative (say "attention with 1 KV head", "FFN of 768")
we build a *variant* of the parent in which every layer that may hold that shape holds it
(random weights: timing only), and time it in the engine beside the unchanged parent, in turns
(parent, variant, parent, variant, ...). Per round,

    cost(shape) - cost(parent's shape) = (T_variant - T_parent) / layers changed,

separately for prefill and for one decode step; the median over rounds is kept. A no-op costs
nothing by definition, which anchors the parent's own sub-block costs, and what is left of the
parent's time is the shared part (embedding, LM head, per-step overhead). The MIP then adds
these up: T_child = shared + sum over layers of its sub-blocks' costs.
"""

from __future__ import annotations

import logging
import shutil
import statistics
from pathlib import Path

from ..library.space import Alternative

log = logging.getLogger(__name__)


def shape_name(shape: tuple[str, str, int | None]) -> str:
    """A variant's name (its folder, its key in the profile): `ffn-mlp768`, `attention-no_op`."""
    sub, kind, size = shape
    return f"{sub}-{Alternative.format_short(kind, size)}"


def _steady_rounds(parent_timings, typical: float, tolerance: float = 0.25) -> list[int]:
    """Rounds whose parent time is within `tolerance` of the parent's typical (median) time."""
    return [i for i, t in enumerate(parent_timings.total_s) if abs(t - typical) <= tolerance * typical]


def _select(timings, rounds: list[int]):
    from ..engines.base import ModelTimings

    out = ModelTimings(decode_steps=timings.decode_steps)
    for i in rounds:
        out.add(timings.prefill_s[i], timings.total_s[i])
    return out


def variant_choices(config, engine, shape) -> tuple[list, int]:
    """The parent's layers with `shape` put into every layer the engine allows it in; and how many."""
    from ..realize import parent_choices

    choices, changed = [], 0
    sub, kind, size = shape
    for layer, (attn, ffn) in enumerate(parent_choices(config)):
        alt = Alternative(layer, sub, kind, size)
        if engine.unsupported(alt, config) is None:
            changed += 1
            attn, ffn = (alt, ffn) if sub == "attention" else (attn, alt)
        choices.append((attn, ffn))
    return choices, changed


def measure_variants_profile(parent, parent_dir: Path | None, engine, alternatives: list[Alternative], scenario, dtype: str,
                             warmup: int, repeats: int, scratch: Path, progress: bool = True) -> dict:
    """{"shared": {prefill_s, decode_s}, "shapes": {shape: {prefill_s, decode_s}}, "variants": raw timings,
    "decode_steps": n}: per-shape costs measured in `engine`."""
    from ..checkpoint.io import save_checkpoint
    from ..realize import assemble_child

    config = parent.config
    ref_attention = ("attention", "gqa", config.block_configs[0].attention.num_key_value_heads)
    ref_ffn = ("ffn", "mlp", config.block_configs[0].ffn.intermediate_size)
    shapes = sorted({a.shape for a in alternatives}, key=str)
    # the no-op variants anchor the parent's own sub-block costs, whether or not they are searched
    measured = sorted({s for s in shapes if s not in (ref_attention, ref_ffn)}
                      | {("attention", "no_op", None), ("ffn", "no_op", None)}, key=str)
    models, changed = {"parent": parent_dir}, {}
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        if parent_dir is None:  # no converted parent on disk (a bare library call): write one
            models["parent"] = save_checkpoint(parent, scratch / "parent")
        for shape in measured:
            choices, changed[shape] = variant_choices(config, engine, shape)
            folder = scratch / shape_name(shape)
            save_checkpoint(assemble_child(parent, choices, random_weights=True), folder)
            models[shape_name(shape)] = folder
        log.info("timing %d variants of the parent in %s (each beside the parent, %d rounds)",
                 len(measured), engine.name, repeats)
        groups = [["parent", shape_name(s)] for s in measured]
        results = engine.time_models(models, scenario, repeats=repeats, warmup=warmup, groups=groups, dtype=dtype,
                                     progress=progress)
        # A burst of other work on the machine can stretch whole rounds several-fold. The parent runs in
        # every group, so its median over all rounds says what an undisturbed round takes: rounds whose
        # parent time is far from it are dropped, and a group left with too few rounds is timed again.
        for _attempt in range(2):
            typical = statistics.median(t for g in results for t in g["parent"].total_s)
            bad = [i for i, g in enumerate(results) if len(_steady_rounds(g["parent"], typical)) < max(2, repeats // 2)]
            if not bad:
                break
            log.info("timing %d disturbed variant group(s) again", len(bad))
            again = engine.time_models(models, scenario, repeats=repeats, warmup=warmup,
                                       groups=[groups[i] for i in bad], dtype=dtype, progress=progress)
            for i, g in zip(bad, again):
                results[i] = g
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    typical = statistics.median(t for g in results for t in g["parent"].total_s)
    steps = results[0]["parent"].decode_steps
    delta = {}  # shape -> per-layer change of (prefill, decode step) seconds against the parent's shape
    raw = {}
    for shape, group in zip(measured, results):
        keep = _steady_rounds(group["parent"], typical) or list(range(len(group["parent"].total_s)))
        ref, var = _select(group["parent"], keep), _select(group[shape_name(shape)], keep)
        dp = statistics.median(v - r for v, r in zip(var.prefill_s, ref.prefill_s))
        dd = statistics.median(v - r for v, r in zip(var.decode_s, ref.decode_s)) / steps
        delta[shape] = (dp / changed[shape], dd / changed[shape])
        raw[shape_name(shape)] = {"layers_changed": changed[shape], "parent": ref.to_dict(), "variant": var.to_dict()}
    cost = {ref_attention: tuple(-x for x in delta[("attention", "no_op", None)]),
            ref_ffn: tuple(-x for x in delta[("ffn", "no_op", None)])}
    for shape in measured:
        base = cost[ref_attention] if shape[0] == "attention" else cost[ref_ffn]
        # noise can push a nearly free block a hair below zero; a block never saves time by running
        cost[shape] = (0.0, 0.0) if shape[1] == "no_op" else tuple(max(0.0, b + d) for b, d in zip(base, delta[shape]))
    parent_rounds = [g["parent"] for g in results]
    parent_prefill = statistics.median(x for t in parent_rounds for x in t.prefill_s)
    parent_decode = statistics.median(x for t in parent_rounds for x in t.decode_s) / steps
    n = config.num_hidden_layers
    shared = {"prefill_s": parent_prefill - n * (cost[ref_attention][0] + cost[ref_ffn][0]),
              "decode_s": parent_decode - n * (cost[ref_attention][1] + cost[ref_ffn][1])}
    warnings = [f"shared {phase} time came out negative ({shared[phase]:.4g} s): the per-layer differences exceed the "
                "parent's own time, so the rounds were disturbed (a busy machine?); measure again on a quiet one"
                for phase in ("prefill_s", "decode_s") if shared[phase] < 0]
    for w in warnings:
        log.warning("%s", w)
    return {"shared": shared, "decode_steps": steps, "warnings": warnings,
            "shapes": {s: {"prefill_s": c[0], "decode_s": c[1]} for s, c in cost.items()},
            "parent_measured": {"prefill_s": parent_prefill, "decode_s": parent_decode}, "variants": raw}
