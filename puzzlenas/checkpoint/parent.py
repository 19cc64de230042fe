"""The parent as every stage sees it: a DeciLM model, converted once and cached in the work dir.

    workdir/parent/   DeciLM checkpoint of the parent (+ tokenizer), and source.json naming where
                      it came from; reused while the config names the same parent.

A torchrun rank of a layer split (bld/score.parallel=layers) asks for its `part` only: it reads
just those tensors from the cached checkpoint (io.load_checkpoint_part), never the whole parent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from ..utils import atomic_write_json, model_fingerprint
from .convert import convert_parent, load_parent, resolve_parent_path
from .io import ParentPart, load_checkpoint, load_checkpoint_part, load_config, save_checkpoint


def _source_stamp(parent: str) -> dict:
    path = resolve_parent_path(parent)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"parent": str(parent), "files": [[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in files]}


def prepare_parent(parent: str, workdir: str | Path, dtype: torch.dtype = torch.float32,
                   part: Callable[..., ParentPart] | None = None):
    """(DeciLM parent model in eval mode, tokenizer or None, fingerprint).

    `part`: given the parent's DeciLMConfig, the share of it this process holds; only that is read
    from the cache (converting the parent first, when needed, loads all of it once)."""
    from transformers import AutoTokenizer

    cache = Path(workdir) / "parent"
    stamp = _source_stamp(parent)
    source_file = cache / "source.json"
    if source_file.is_file() and json.loads(source_file.read_text()).get("stamp") == stamp:
        if part is None:
            model = load_checkpoint(cache, dtype=dtype)
        else:
            model = load_checkpoint_part(cache, part(load_config(cache)), dtype=dtype)
        tokenizer = None
        if (cache / "tokenizer_config.json").is_file() or (cache / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(cache)
        return _frozen(model), tokenizer, json.loads(source_file.read_text())["fingerprint"]
    source_model, tokenizer = load_parent(parent, dtype=dtype)
    model = convert_parent(source_model, copy=False)
    del source_model
    save_checkpoint(model, cache, tokenizer, overwrite=True)  # the work directory's own cache
    fp = model_fingerprint(model)
    atomic_write_json(source_file, {"stamp": stamp, "fingerprint": fp})
    if part is not None:  # from the cache just written, as a later start reads it
        del model
        model = load_checkpoint_part(cache, part(load_config(cache)), dtype=dtype)
    return _frozen(model), tokenizer, fp


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
