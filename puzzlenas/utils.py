"""Small shared helpers: atomic writes, safe state loading, fingerprints, a median timer, device and dtype choice."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def kill_point(name: str, detail: str = "") -> None:
    """Test hook: SIGKILL this process here when PUZZLENAS_KILL_AT names this point.

    PUZZLENAS_KILL_AT=NAME kills at the first NAME reached; NAME:TEXT at the first whose detail
    (a path, a block name) contains TEXT. Points: atomic_write (temp file written, not yet renamed),
    checkpoint.write (new checkpoint folder written), checkpoint.swap (old folder moved aside, new
    not yet in place), bld.save_block (before each block of BLD's final save), score.state (scoring
    saved its progress; detail "batch=B done=K;")."""
    spec = os.environ.get("PUZZLENAS_KILL_AT")
    if spec:
        want, _, text = spec.partition(":")
        if want == name and text in detail:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: a kill never leaves half a file
    (the temp file `.<name>.*.tmp` of a killed write is deleted by the next command: workdir.recover)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        kill_point("atomic_write", str(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        kill_point("atomic_write", str(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_training_state(path: str | Path, map_location=None, mmap: bool = False) -> dict:
    """A BLD/GKD resume state saved by atomic_torch_save, loaded without running any code from it.

    `weights_only=True` unpickles only tensors and plain containers: a crafted file that would run
    code (or anything else that is not such a state) is refused with one line naming it."""
    import pickle

    from .errors import PuzzleError

    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, TypeError, AttributeError) as exc:
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()] or [type(exc).__name__]
        # torch's message opens with advice to set weights_only=False: show what it refused instead
        reason = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[0])[:160].rstrip(".")
        raise PuzzleError(f"{path}: refused: not a puzzlenas training state ({reason}); delete it to restart "
                          "that training from its beginning") from None
    if not isinstance(state, dict) or "step" not in state:
        raise PuzzleError(f"{path}: refused: not a puzzlenas training state (no step); delete it to restart "
                          "that training from its beginning")
    return state


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def fingerprint(*parts) -> str:
    """Short stable hash of JSON-able parts and tensors."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's config and a sample of every tensor (cheap, but any re-trained or
    different parent changes it)."""
    parts = [model.config.to_dict() if hasattr(model, "config") else {}]
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().flatten()
        parts.append(name)
        parts.append(flat[:: max(1, flat.numel() // 64)][:64].float())
    return fingerprint(*parts)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training: bf16 where the device runs it natively, else None (fp32)."""
    if choice == "float32":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_bf16_is_faster() else None


def median_time(fn, warmup: int, repeats: int, sync, reset=None) -> float:
    """Median seconds of `fn()` over `repeats` calls after `warmup` untimed ones; `sync` waits for the
    device (cuda) around each timed call, `reset` (untimed) undoes what a call changed."""
    for _ in range(warmup):
        fn()
        if reset:
            reset()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
        if reset:
            reset()
    return statistics.median(times)


@functools.cache
def cpu_bf16_is_faster(size: int = 512, repeats: int = 7) -> bool:
    """Whether this CPU multiplies bf16 matrices clearly faster than fp32, by measuring it once.

    Why measure: CPUs with AVX512-BF16/AMX run bf16 matmul ~2.7x faster than fp32, but CPUs
    without them (e.g. AVX2-only EPYCs) emulate it ~30x slower, which turns an hour of BLD into
    a day. No flag reports this portably across x86 and ARM; a timing of a few ms does. The two
    are timed in turns after a warm-up (the first bf16 call builds its kernels), and each keeps its
    fastest round: a neighbour's load slows a round, never speeds one up. (A 256-wide, 3-round
    median once said "slower" on an AVX512-BF16 machine, and a GKD trained in fp32.)
    """
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    best = dict.fromkeys(pairs, float("inf"))
    for round_ in range(repeats + 1):
        for dtype, (x, y) in pairs.items():
            t = time.perf_counter()
            x @ y
            if round_:  # round 0 is the warm-up
                best[dtype] = min(best[dtype], time.perf_counter() - t)
    faster = best[torch.float32] > 1.2 * best[torch.bfloat16]
    logging.getLogger(__name__).info("CPU bf16 matmul is %s than fp32 (%.2f vs %.2f ms): training in %s",
                                     "faster" if faster else "slower", 1e3 * best[torch.bfloat16],
                                     1e3 * best[torch.float32], "bf16 autocast" if faster else "fp32")
    return faster
