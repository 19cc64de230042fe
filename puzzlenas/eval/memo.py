"""Quality results kept per model, so that evaluation never measures the same weights twice.

Perplexity, KL and lm-eval accuracy of one SmolLM2 take about six minutes on a 2-core CPU at the
default 500 items per task, and they depend only on the model's weights, the parent's (for KL),
the evaluation settings and the evaluation data. W/eval-memo/<key>.json holds one model's quality
under one such key, written as soon as that model is measured, so:
  - a killed eval resumes at the first model it had not finished;
  - a run re-evaluated after new GKD settings does not measure the parent and the child before
    GKD again, and every target of a sweep (whose W/sweep/<t>x/eval-memo links to W's) reuses
    the parent's;
Speed is never kept: every run times its models together, in turns (eval/__init__.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..utils import atomic_write_json, fingerprint


def weights_id(model) -> str:
    """A hash of the model's config and every tensor's bytes in full: the same id only for the same
    weights (a second or so for 135M parameters; utils.model_fingerprint samples 64 values per
    tensor, enough to tell parents apart, not to be sure two children are the same)."""
    # the config's differences from its defaults: to_dict() also holds where it was loaded from
    config = model.config.to_json_string() if hasattr(model, "config") else ""
    return fingerprint(config, *(part for name, t in sorted(model.state_dict().items()) for part in (name, t)))


class QualityMemo:
    """memo_dir/<key>.json: {"model": the name it was measured under, "quality": its results}."""

    def __init__(self, memo_dir: Path, parent, settings: dict, wikitext: str, val_ids: torch.Tensor):
        self.dir = Path(memo_dir)
        self.parent, self.parent_id = parent, weights_id(parent)  # the parent is also evaluated: hashed once
        # everything besides the model itself that its quality figures depend on
        self.context = fingerprint(self.parent_id, settings, wikitext, val_ids)

    def key(self, model) -> str:
        return fingerprint(self.context, self.parent_id if model is self.parent else weights_id(model))

    def get(self, key: str) -> dict | None:
        path = self.dir / f"{key}.json"
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None  # none yet, or unreadable: measure again (and overwrite it)
        quality = entry.get("quality") if isinstance(entry, dict) else None
        return quality if isinstance(quality, dict) else None

    def put(self, key: str, name: str, quality: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.dir / f"{key}.json", {"model": name, "quality": quality})


def settings_of(e, tasks: list[str], data_source: str) -> dict:
    """The evaluation settings a quality result depends on (not speed_repeats: speed is never kept)."""
    version = None
    if tasks:
        from importlib.metadata import version as package_version

        version = package_version("lm_eval")
    return {"ppl_context": e.ppl_context, "ppl_max_tokens": e.ppl_max_tokens, "kl_sequences": e.kl_sequences,
            "batch_size": e.batch_size, "limit": e.limit if tasks else None, "tasks": list(tasks),
            "lm_eval": version, "eval_data": data_source}
