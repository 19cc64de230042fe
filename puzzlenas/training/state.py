"""Resume states, written so that a kill at any instant leaves the last complete one.

One process (and BLD's per-rank states): one file, `atomic_torch_save` (temp file, then rename),
read back with `weights_only=True`.

Sharded (FSDP2 GKD under torchrun): every rank writes its shards with torch.distributed.checkpoint
(DCP) into `.step-N.tmp/`; when all have, rank 0 adds `meta.json` (step and plain-JSON extras),
renames the folder `step-N/` and deletes older ones. A folder without meta.json is never read; any
number of processes reads a folder back (DCP reshards), one process included. DCP's
`.metadata` is a pickle: it is read by an unpickler that builds only DCP's own record classes and
torch's dtypes/sizes; its non-tensor items (optimizer hyper-parameters) are read with
`weights_only=True`; so a crafted folder cannot run code.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from pathlib import Path

import torch

from ..errors import PuzzleError
from ..utils import atomic_torch_save, atomic_write_json, kill_point, load_training_state
from .distributed import barrier, rank_world


def save_state(state: dict, path: str | Path) -> None:
    atomic_torch_save(state, path)


def load_state(path: str | Path, map_location=None, mmap: bool = False) -> dict:
    """A state saved by save_state; a file that is not one (or would run code) is one PuzzleError."""
    return load_training_state(path, map_location=map_location, mmap=mmap)


# --- sharded (DCP) --------------------------------------------------------------------------

_STEP = re.compile(r"step-(\d+)")


def latest_sharded(root: Path) -> Path | None:
    """The newest complete sharded state under `root` (one with meta.json), or None."""
    done = [p for p in root.glob("step-*") if _STEP.fullmatch(p.name) and (p / "meta.json").is_file()]
    return max(done, key=lambda p: int(_STEP.fullmatch(p.name).group(1)), default=None)


def read_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PuzzleError(f"{folder}/meta.json: unreadable ({exc}); delete {folder} to restart from the one before") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise PuzzleError(f"{folder}/meta.json: not a puzzlenas sharded state (no step)")
    return meta


def save_sharded(root: Path, step: int, state: dict, meta: dict) -> Path:
    """Collective: every rank calls it with its own shards in `state`; returns the step folder."""
    import torch.distributed.checkpoint as dcp

    rank, world = rank_world()
    tmp, final = root / f".step-{step:06d}.tmp", root / f"step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(state, checkpoint_id=tmp)
    barrier()  # every rank's shards are on disk
    if rank == 0:
        kill_point("atomic_write", str(final))
        atomic_write_json(tmp / "meta.json", {**meta, "step": step, "world": world})
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in root.glob("step-*"):
            if old != final and _STEP.fullmatch(old.name):
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def clean_partial(root: Path) -> None:
    """Rank 0: delete the folders of sharded saves a kill interrupted."""
    for tmp in root.glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def load_sharded(folder: Path, state: dict) -> None:
    """Collective: fill `state` (this rank's shards, as built for saving) in place from `folder`."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, checkpoint_id=folder, storage_reader=_SafeReader(folder), planner=_SafePlanner(),
                 no_dist=rank_world()[1] == 1)  # one process reads all shards (DCP reshards)
    except PuzzleError:
        raise
    except Exception as exc:  # DCP wraps per-rank failures in CheckpointException
        line = next((x.strip() for x in str(exc).splitlines() if x.strip()), type(exc).__name__)[:200]
        raise PuzzleError(f"{folder}: refused: not a sharded state of this model ({line}); delete it to restart") from None


# DCP's .metadata pickle may name these, and nothing else
_ALLOWED_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.")
_ALLOWED_BUILTINS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                     ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                     ("pathlib", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith(_ALLOWED_MODULES) or (module, name) in _ALLOWED_BUILTINS:
            return super().find_class(module, name)
        if module == "torch":
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
                return value
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _make_safe_reader():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            path = Path(self.path) / ".metadata"
            try:
                metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
            except (pickle.UnpicklingError, EOFError, OSError, AttributeError, ImportError, ValueError) as exc:
                raise PuzzleError(f"{path}: refused: not a sharded state ({exc})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _SafeReader(folder: Path):
    return _make_safe_reader()(folder)


def _SafePlanner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            # DefaultLoadPlanner unpickles these with weights_only=False: check them with True first,
            # then hand it a copy re-saved from the checked (plain) object
            try:
                obj = torch.load(value, weights_only=True)
            except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
                line = next((x.strip() for x in str(exc).splitlines() if "GLOBAL" in x or "Unsupported" in x),
                            type(exc).__name__)[:160]
                raise PuzzleError(f"refused: a sharded state item is not plain data ({line})") from None
            clean = io.BytesIO()
            torch.save(obj, clean)
            clean.seek(0)
            super().load_bytes(read_item, clean)

    return SafePlanner()
