"""The block library on disk.

    library/index.json                 parent + data fingerprints, one entry per finished block
    library/blocks/<name>.safetensors  a trained alternative (layer-relative parameter names)
    library/blocks/<name>.json         its record: init method, tokens seen, train/val NMSE
    library/state/rank<r>.pt           resumable BLD state of one rank (deleted when done)

`<name>` is e.g. `layer007.ffn.mlp768`. Every file is written atomically; a block counts as
finished once its .json exists (written after its .safetensors) and its .safetensors has the size
the record states (a truncated or missing block file is trained again). index.json is rebuilt
from the .json records, so it can never disagree with them. A file that is not valid JSON or
safetensors is an error that names it; nothing is deleted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import PuzzleError
from ..utils import atomic_save_safetensors, atomic_write_json
from .space import Alternative

log = logging.getLogger(__name__)


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise PuzzleError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); {what}") from None
    if not isinstance(data, dict):
        raise PuzzleError(f"{path}: not a JSON object; {what}")
    return data


class Library:
    def __init__(self, root: str | Path, parent_fingerprint: str, data_fingerprint: str | None = None):
        self.root = Path(root)
        self.parent_fingerprint = parent_fingerprint
        self.data_fingerprint = data_fingerprint
        self.blocks_dir = self.root / "blocks"
        self.state_dir = self.root / "state"
        index = self.root / "index.json"
        if index.is_file():
            meta = _read_json(index, "delete it to rebuild it from the block records in blocks/")
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
        return self.block_problem(alt) is None

    def block_problem(self, alt: Alternative) -> str | None:
        """Why `alt` is not a finished block (None when it is): no record, or a block file that is
        missing or not the size its record states (an older record without a size: present)."""
        record_path = self.record_path(alt)
        if not record_path.is_file():
            return "not trained"
        record = _read_json(record_path, "delete it (and its .safetensors) to train that block again")
        if not record.get("file"):
            return None
        path = self.blocks_dir / record["file"]
        if not path.is_file():
            return f"{path} is missing"
        if record.get("bytes") is not None and path.stat().st_size != record["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, its record says {record['bytes']} (truncated?)"
        return None

    def save_block(self, alt: Alternative, state: dict[str, torch.Tensor], record: dict) -> None:
        atomic_save_safetensors(state, self.block_path(alt), {"alternative": alt.name})
        atomic_write_json(self.record_path(alt), {"name": alt.name, **record,
                                                  "bytes": self.block_path(alt).stat().st_size})

    def load_block(self, alt: Alternative) -> dict[str, torch.Tensor]:
        path = self.block_path(alt)
        if not path.is_file() or not self.record_path(alt).is_file():
            raise PuzzleError(f"library {self.root} has no trained block {alt.name}; run `puzzlenas bld` first")
        try:
            return load_file(path)
        except (SafetensorError, OSError) as exc:
            raise PuzzleError(f"{path}: unreadable or truncated block file ({str(exc).splitlines()[0]}); "
                              "rerun `puzzlenas bld` to train it again") from None

    def records(self) -> dict[str, dict]:
        if not self.blocks_dir.is_dir():
            return {}
        return {p.stem: _read_json(p, "delete it (and its .safetensors) to train that block again")
                for p in sorted(self.blocks_dir.glob("*.json"))}

    def write_index(self, extra: dict | None = None) -> None:
        index = {
            "parent_fingerprint": self.parent_fingerprint,
            "data_fingerprint": self.data_fingerprint,
            **(extra or {}),
            "blocks": self.records(),
        }
        atomic_write_json(self.root / "index.json", index)

    def index(self) -> dict:
        return _read_json(self.root / "index.json", "delete it to rebuild it from the block records in blocks/")
