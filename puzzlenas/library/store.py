"""The block library on disk.

    library/index.json                 parent + data fingerprints, one entry per finished block
    library/blocks/<name>.safetensors  a trained alternative (layer-relative parameter names)
    library/blocks/<name>.json         its record: init method, tokens seen, train/val NMSE
    library/state/rank<r>.pt           resumable BLD state of one rank (deleted when done)

`<name>` is e.g. `layer007.ffn.mlp768`. Every file is written atomically; a block counts as
finished once its .json exists (written after its .safetensors). index.json is rebuilt from the
.json records, so it can never disagree with them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import PuzzleError
from ..utils import atomic_save_safetensors, atomic_write_json
from .space import Alternative


class Library:
    def __init__(self, root: str | Path, parent_fingerprint: str, data_fingerprint: str | None = None):
        self.root = Path(root)
        self.parent_fingerprint = parent_fingerprint
        self.data_fingerprint = data_fingerprint
        self.blocks_dir = self.root / "blocks"
        self.state_dir = self.root / "state"
        index = self.root / "index.json"
        if index.is_file():
            meta = json.loads(index.read_text())
            if meta.get("parent_fingerprint") != parent_fingerprint:
                raise PuzzleError(
                    f"{self.root} was built from another parent (fingerprint {meta.get('parent_fingerprint')} != "
                    f"{parent_fingerprint}); use another work directory or delete it"
                )
            if data_fingerprint and meta.get("data_fingerprint") not in (None, data_fingerprint):
                raise PuzzleError(
                    f"{self.root} was trained on other data (fingerprint {meta.get('data_fingerprint')} != "
                    f"{data_fingerprint}); use another work directory or delete it"
                )
        else:
            self.write_index()

    # --- blocks ------------------------------------------------------------------------
    def block_path(self, alt: Alternative) -> Path:
        return self.blocks_dir / f"{alt.name}.safetensors"

    def record_path(self, alt: Alternative) -> Path:
        return self.blocks_dir / f"{alt.name}.json"

    def is_done(self, alt: Alternative) -> bool:
        return self.record_path(alt).is_file()

    def save_block(self, alt: Alternative, state: dict[str, torch.Tensor], record: dict) -> None:
        atomic_save_safetensors(state, self.block_path(alt), {"alternative": alt.name})
        atomic_write_json(self.record_path(alt), {"name": alt.name, **record})

    def load_block(self, alt: Alternative) -> dict[str, torch.Tensor]:
        path = self.block_path(alt)
        if not path.is_file() or not self.is_done(alt):
            raise PuzzleError(f"library {self.root} has no trained block {alt.name}; run `puzzlenas bld` first")
        return load_file(path)

    def records(self) -> dict[str, dict]:
        if not self.blocks_dir.is_dir():
            return {}
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.blocks_dir.glob("*.json"))}

    def write_index(self, extra: dict | None = None) -> None:
        index = {
            "parent_fingerprint": self.parent_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            **(extra or {}),
            "blocks": self.records(),
        }
        atomic_write_json(self.root / "index.json", index)

    def index(self) -> dict:
        return json.loads((self.root / "index.json").read_text())
