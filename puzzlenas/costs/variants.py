"""Cost profiles measured in a serving engine, from whole synthetic models.

An engine's cost of a sub-block cannot be timed by running the sub-block alone: the engine only
runs whole models, and its per-step overhead, scheduler and fused kernels are part of what we
want to see. So for every shape of alternative (say "attention with 1 KV head", "FFN of 768")
we build a *variant* of the parent in which every layer that may hold that shape holds it
(random weights: timing only), and time it in the engine beside the unchanged parent, in turns
(parent, variant, parent, variant, ...). Then

    cost(shape) - cost(parent's shape) = (median over rounds of T_variant / T_parent - 1) x T_parent / layers changed,

separately for prefill and for one decode step, T_parent in the last factor being the parent's
median over every group. Ratios, not differences in seconds: on a shared machine a whole group
can run slower than the next, and a ratio within a round does not carry that into the cost. A
no-op costs nothing by definition, which anchors the parent's own sub-block costs.

The shared part (embedding, LM head, per-step overhead) is timed directly too: a variant with
every sub-block a no-op but layer 0's attention (llama.cpp aborts on a model without any
attention). What is left of the parent's time after the two no-op variants took their layers
off, T_attention-no-op + T_ffn-no-op - T_parent, says the same in theory, but it is a small
difference of three large, separately timed numbers: on runs/s12's parent it came out at 9 %
of the parent's time in one profile and 1 % in another, and between 2.6 % and 31 % round by
round, where the direct variant measured 5.4-6.9 % (runs/exp18/shared_direct.py in the work
area, 7 rounds). The parent's own sub-block costs are then scaled by one factor per phase
(`additivity` in the profile) so that shared + layers x (attention + FFN) is the parent's
measured time again. The MIP adds these up: T_child = shared + sum over layers of its sub-blocks'
costs.
"""

from __future__ import annotations

import logging
import shutil
import statistics
from pathlib import Path

from ..library.space import Alternative

log = logging.getLogger(__name__)


# what a cost profile's key says of how its variants were turned into costs (costs/measure.py)
VARIANTS_METHOD = "ratios, shared-only variant"
PHASES = ("prefill_s", "decode_s")  # a prefill, and one decode step
# the variant that times the shared part: every sub-block a no-op but layer 0's attention
SHARED_ONLY = ("shared", "only", None)


def shape_name(shape: tuple[str, str, int | None]) -> str:
    """A variant's name (its folder, its key in the profile): `ffn-mlp768`, `attention-no_op`, `shared-only`."""
    sub, kind, size = shape
    return "shared-only" if shape == SHARED_ONLY else f"{sub}-{Alternative.format_short(kind, size)}"


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


def shared_only_choices(config) -> tuple[list, int]:
    """Every layer's attention and FFN a no-op except layer 0's attention; and how many sub-blocks
    that takes off the parent (2n - 1)."""
    from ..realize import parent_choices

    choices = [(attn if layer == 0 else Alternative(layer, "attention", "no_op"), Alternative(layer, "ffn", "no_op"))
               for layer, (attn, _ffn) in enumerate(parent_choices(config))]
    return choices, 2 * len(choices) - 1


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
                      | {("attention", "no_op", None), ("ffn", "no_op", None)}, key=str) + [SHARED_ONLY]
    models, changed = {"parent": parent_dir}, {}
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        if parent_dir is None:  # no converted parent on disk (a bare library call): write one
            models["parent"] = save_checkpoint(parent, scratch / "parent")
        for shape in measured:
            choices, changed[shape] = (shared_only_choices(config) if shape == SHARED_ONLY
                                       else variant_choices(config, engine, shape))
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
    parent_rounds = [g["parent"] for g in results]
    parent_time = (statistics.median(x for t in parent_rounds for x in t.prefill_s),
                   statistics.median(x for t in parent_rounds for x in t.decode_s) / steps)
    delta = {}  # shape -> per-layer change of (prefill, decode step) seconds against the parent's shape
    raw = {}
    for shape, group in zip(measured, results):
        keep = _steady_rounds(group["parent"], typical) or list(range(len(group["parent"].total_s)))
        ref, var = _select(group["parent"], keep), _select(group[shape_name(shape)], keep)
        # each round's variant against the parent beside it, as a ratio, times the parent's time over
        # all groups: a group timed while the machine ran slower (every time in it stretched alike)
        # then changes nothing, where a difference in seconds would carry the stretch into the cost
        dp = statistics.median(v / r - 1 for v, r in zip(var.prefill_s, ref.prefill_s)) * parent_time[0]
        dd = statistics.median(v / r - 1 for v, r in zip(var.decode_s, ref.decode_s)) * parent_time[1]
        delta[shape] = (dp / changed[shape], dd / changed[shape])
        raw[shape_name(shape)] = {"layers_changed": changed[shape], "parent": ref.to_dict(), "variant": var.to_dict()}
    n = config.num_hidden_layers
    attention = tuple(-x for x in delta[("attention", "no_op", None)])  # the parent's, per layer, as measured
    ffn = tuple(-x for x in delta[("ffn", "no_op", None)])
    # the shared-only variant is the parent less (n - 1) attentions and n FFNs: per layer, delta x changed;
    # the shared time is what it still runs less the one attention it keeps
    shared_only = tuple(p + d * changed[SHARED_ONLY] - a for p, d, a in zip(parent_time, delta[SHARED_ONLY], attention))
    warnings = [f"shared {phase} time came out negative ({t:.4g} s): the rounds were disturbed (a busy machine?); "
                "measure again on a quiet one" for phase, t in zip(PHASES, shared_only) if t < 0]
    shared_time = tuple(max(0.0, t) for t in shared_only)
    # one factor per phase puts the parent's sub-blocks and the shared part back at the parent's measured time
    additivity = tuple((p - s) / (n * (a + f)) if a + f > 0 else 1.0
                       for p, s, a, f in zip(parent_time, shared_time, attention, ffn))
    warnings += [f"the parent's {phase} time is {k:.2f}x what its layers' no-op variants measured beside the shared "
                 "part: the engine does not add up its layers' times, or the rounds were disturbed; the profile "
                 "scales its layers' costs to the parent's time" for phase, k in zip(PHASES, additivity) if abs(k - 1) > 0.2]
    for w in warnings:
        log.warning("%s", w)
    cost = {ref_attention: tuple(k * x for k, x in zip(additivity, attention)),
            ref_ffn: tuple(k * x for k, x in zip(additivity, ffn))}
    for shape in measured:
        if shape == SHARED_ONLY:
            continue
        base = cost[ref_attention] if shape[0] == "attention" else cost[ref_ffn]
        # noise can push a nearly free block a hair below zero; a block never saves time by running
        cost[shape] = (0.0, 0.0) if shape[1] == "no_op" else tuple(max(0.0, b + d) for b, d in zip(base, delta[shape]))
    return {"shared": dict(zip(PHASES, shared_time)), "decode_steps": steps, "warnings": warnings,
            "shapes": {s: {"prefill_s": c[0], "decode_s": c[1]} for s, c in cost.items()},
            "additivity": dict(zip(PHASES, additivity)),
            "parent_measured": dict(zip(PHASES, parent_time)), "variants": raw}
