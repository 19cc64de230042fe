"""Baselines a practitioner would otherwise use, at the same throughput target, from the same
library and initializations (then realized, distilled and evaluated exactly like the child):

  width   uniform FFN-width pruning (Minitron-style): every layer keeps full attention and the same
          FFN size, the largest library size whose predicted throughput meets the target; if no
          FFN size suffices, KV heads are reduced uniformly too.
  depth   depth pruning (ShortGPT-style): whole layers (attention and FFN no-op) are removed, the
          layer with the lowest replace-1-block damage first, until the target is met.

Each is written as a solution (a workdir.SolutionRecord, as in search/solutions.json) to
baselines/<name>/solution.json, or {"infeasible": why} when it cannot reach the target.
"""

from __future__ import annotations

from pathlib import Path

from ..costs.profile import scenario_time
from ..errors import PuzzleError
from ..library.space import Alternative
from ..score import damage
from ..search import layer_alternatives
from ..workdir import CostProfile, ScoreSet, SolutionRecord, write_baseline


def _solution(layers: list[tuple[Alternative, Alternative]], profile: CostProfile, scores: dict, metric: str,
              parent_time: float, name: str, description: str | None = None) -> SolutionRecord:
    names = [x.name for pair in layers for x in pair]
    t = scenario_time(profile, names)
    prof = profile.alternatives
    return SolutionRecord(
        rank=name,
        damage=sum(damage(scores[n], metric) for n in names),
        predicted_speedup=parent_time / t["total_s"],
        predicted=t,
        memory_bytes=profile.shared.weight_bytes + sum(prof[n].weight_bytes + prof[n].kv_bytes for n in names),
        params=profile.shared.params + sum(prof[n].params for n in names),
        layers=tuple((a.name, f.name) for a, f in layers),
        description=description,
    )


def _parent_pairs(by_layer) -> list[tuple[Alternative, Alternative]]:
    pairs = []
    for layer in sorted(by_layer):
        attn = max((a for a in by_layer[layer]["attention"] if a.kind == "gqa"), key=lambda a: a.size)
        ffn = max((f for f in by_layer[layer]["ffn"] if f.kind == "mlp"), key=lambda f: f.size)
        pairs.append((attn, ffn))
    return pairs


def width_baseline(profile: CostProfile, scores: dict, metric: str, alternatives: list[str],
                   target: float) -> SolutionRecord:
    by_layer = layer_alternatives(alternatives)
    parent = _parent_pairs(by_layer)
    parent_time = scenario_time(profile, [x.name for p in parent for x in p])["total_s"]
    common_ffn = set.intersection(*({f.size for f in v["ffn"] if f.kind == "mlp"} for v in by_layer.values()))
    common_kv = set.intersection(*({a.size for a in v["attention"] if a.kind == "gqa"} for v in by_layer.values()))
    for kv in sorted(common_kv, reverse=True):
        for size in sorted(common_ffn, reverse=True):
            layers = [(Alternative(i, "attention", "gqa", kv), Alternative(i, "ffn", "mlp", size)) for i in sorted(by_layer)]
            sol = _solution(layers, profile, scores, metric, parent_time, "width",
                            f"uniform FFN {size}, {kv} KV heads in every layer")
            if sol.predicted_speedup >= target:
                return sol
    raise PuzzleError(f"width baseline: no uniform FFN size / KV-head count in the library reaches {target}x")


def depth_baseline(profile: CostProfile, scores: dict, metric: str, alternatives: list[str],
                   target: float) -> SolutionRecord:
    by_layer = layer_alternatives(alternatives)
    layers = _parent_pairs(by_layer)
    parent_time = scenario_time(profile, [x.name for p in layers for x in p])["total_s"]
    removal_damage = {}
    available = set(alternatives)
    for i in by_layer:  # a layer the engine must keep (vLLM: attention in layer 0) is never removed
        noop_a, noop_f = Alternative(i, "attention", "no_op"), Alternative(i, "ffn", "no_op")
        if noop_a.name in available and noop_f.name in available:
            removal_damage[i] = damage(scores[noop_a.name], metric) + damage(scores[noop_f.name], metric)
    if not removal_damage:
        raise PuzzleError("depth baseline needs no_op alternatives for attention and FFN in the search space")
    removed = []
    for i in sorted(removal_damage, key=removal_damage.get):
        layers[i] = (Alternative(i, "attention", "no_op"), Alternative(i, "ffn", "no_op"))
        removed.append(i)
        sol = _solution(layers, profile, scores, metric, parent_time, "depth",
                        f"{len(removed)} layers removed: {sorted(removed)}")
        if sol.predicted_speedup >= target:
            return sol
    raise PuzzleError(f"depth baseline: removing every layer does not reach {target}x")


def run(cfg, workdir: str | Path, scores: ScoreSet, profile: CostProfile,
        alternatives: list[str]) -> dict[str, SolutionRecord | str]:
    """Each baseline's solution, or (a string) why it cannot reach the target; both are written."""
    from ..search import parse_factor

    if cfg.search.throughput is None:
        raise PuzzleError("baselines need a throughput target (search.throughput)")
    target = parse_factor(cfg.search.throughput)
    out = {}
    for name, fn in (("width", width_baseline), ("depth", depth_baseline)):
        try:
            sol = fn(profile, scores.scores, cfg.score.metric, alternatives, target)
        except PuzzleError as exc:  # a baseline that cannot reach the target is a result, not a crash
            sol = str(exc)
        write_baseline(workdir, name, sol)
        out[name] = sol
    return out
