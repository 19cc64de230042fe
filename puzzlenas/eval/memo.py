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

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..utils import atomic_write_json, fingerprint

log = logging.getLogger(__name__)


def weights_id(model) -> str:
    """A hash of the model's architecture and every tensor's bytes: the same id only for the same
    weights (a second or so for 135M parameters; file stamps would miss an in-place edit)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    h.update((config.to_json_string() if hasattr(config, "to_json_string") else repr(config)).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()[:16]


class QualityMemo:
    """memo_dir/<key>.json: {"model": the name it was measured under, "quality": its results}."""

    def __init__(self, memo_dir: Path, parent, settings: dict):
        self.dir = Path(memo_dir)
        # everything besides the model itself that its quality figures depend on
        self.context = fingerprint(weights_id(parent), settings)

    def key(self, model) -> str:
        return fingerprint(self.context, weights_id(model))

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


def settings_of(e, tasks: list[str], data_source: str, wikitext: str, val_ids: torch.Tensor) -> dict:
    """The evaluation settings and data a quality result depends on (not speed_repeats: speed is
    never kept)."""
    version = None
    if tasks:
        from importlib.metadata import version as package_version

        version = package_version("lm_eval")
    return {"ppl_context": e.ppl_context, "ppl_max_tokens": e.ppl_max_tokens, "kl_sequences": e.kl_sequences,
            "batch_size": e.batch_size, "limit": e.limit if tasks else None, "tasks": list(tasks),
            "lm_eval": version, "eval_data": data_source,
            "wikitext": hashlib.sha256(wikitext.encode()).hexdigest()[:16],
            "val": hashlib.sha256(val_ids[: e.kl_sequences].contiguous().numpy().tobytes()).hexdigest()[:16]}
