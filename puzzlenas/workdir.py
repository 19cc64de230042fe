"""The work directory's integrity: one writer at a time, no half-written, lost or mixed artifacts.

    with lock_workdir(workdir, "puzzlenas run cfg.yaml"):   # every command that writes `workdir`
        ...

- Lock: `fcntl.flock` on `workdir/.lock`, which also holds the holder's pid, command line and
  start time, so a second writer stops at once with a line naming the holder. The kernel drops
  a flock when its process dies, so the lock of a killed run is simply taken over (and said so).
  Under torchrun only rank 0 takes it: the other ranks belong to the same command.
- Recovery, once the lock is held: an interrupted checkpoint replace (`X.old` beside a missing
  `X`) is undone, and the temporary files of interrupted writes (`.name.*.tmp`, `X.tmp/`) are
  deleted; at 8B scale one GKD state is ~100 GB.
- Stage outputs: `stages/<stage>.json` records the fingerprint of the files each stage wrote and
  of its upstream stages' outputs; a stage whose outputs are missing or changed is redone, never
  trusted (see `stage_problem`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from .errors import PuzzleError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CHECKPOINT_MARKER = "puzzlenas.json"  # in every checkpoint folder puzzlenas writes (checkpoint/io.py)
_held: dict[str, int] = {}  # lock path -> nesting depth in this process (flock is per open file, not per process)


# --- the lock --------------------------------------------------------------------------------


def _rank() -> int:
    """This process's torchrun rank (0 outside torchrun)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 65536, 0).decode("utf-8", errors="replace").strip()
        return json.loads(raw) if raw else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (no holder record)"
    return f"pid {holder.get('pid')} on {holder.get('host', '?')} (`{holder.get('command', '?')}`, started {holder.get('started', '?')})"


def _open_workdir(workdir: Path) -> int:
    """Create the work directory if needed and open its lock file; every way this fails is one line."""
    if workdir.exists() and not workdir.is_dir():
        raise PuzzleError(f"work directory {workdir} is a file, not a directory; give another --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PuzzleError(f"cannot create work directory {workdir}: {exc.strerror}") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise PuzzleError(f"work directory {workdir} is not writable (permission denied); give another --workdir")
    try:
        return os.open(workdir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PuzzleError(f"cannot open the lock file {workdir / LOCK_NAME}: {exc.strerror}") from None


@contextlib.contextmanager
def lock_workdir(workdir: str | Path, command: str):
    """Hold `workdir` exclusively for this command, then recover what interrupted writes left.

    A second writer gets a PuzzleError naming the holder. Re-entrant within one process."""
    import fcntl

    workdir = Path(workdir)
    if _rank() != 0:  # torchrun: rank 0 holds the lock for the whole group
        yield
        return
    fd = _open_workdir(workdir)
    key = os.path.realpath(workdir / LOCK_NAME)
    if key in _held:
        os.close(fd)
        _held[key] += 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise PuzzleError(f"work directory {workdir} is in use by {_describe(holder)}; wait for it to finish "
                          "or use another --workdir") from None
    except OSError as exc:  # a file system without flock (some network mounts): the pid record decides
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            os.close(fd)
            raise
        holder = _read_holder(fd)
        if holder.get("pid") not in (None, os.getpid()) and _pid_alive(int(holder["pid"])) \
                and holder.get("host") == socket.gethostname():
            os.close(fd)
            raise PuzzleError(f"work directory {workdir} is in use by {_describe(holder)}; wait for it to finish "
                              "or use another --workdir") from None
        log.warning("%s: file locks are not supported here; relying on the holder record alone", workdir)
    previous = _read_holder(fd)
    if previous.get("pid") not in (None, os.getpid()):
        log.warning("work directory %s: taking over the lock left by %s, which is no longer running", workdir,
                    _describe(previous))
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[key] = 1
    try:
        recover(workdir)
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # a clean exit leaves no holder record: a record means "died holding it"
        os.close(fd)  # releases the flock


# --- recovery of interrupted writes ------------------------------------------------------------


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def finish_replace(target: Path) -> str | None:
    """Complete or undo an interrupted `save_checkpoint` replace of `target`; what was done, or None.

    The replace is: write `target.tmp`, move `target` to `target.old`, move `target.tmp` to
    `target`, delete `target.old`. A kill leaves at most one of these steps half done."""
    old, tmp = target.with_name(target.name + ".old"), target.with_name(target.name + ".tmp")
    done = None
    if old.is_dir() and (old / CHECKPOINT_MARKER).is_file():
        if target.exists():  # the new one is complete: only the delete of the old was missed
            shutil.rmtree(old)
        else:
            old.rename(target)
            done = f"restored {target} (a replace of it was interrupted)"
    if tmp.is_dir() and ((tmp / CHECKPOINT_MARKER).is_file() or not any(tmp.iterdir())):
        shutil.rmtree(tmp)
    return done


def recover(workdir: str | Path) -> None:
    """Undo interrupted checkpoint replaces and delete the temporary files of interrupted writes."""
    workdir = Path(workdir)
    removed, freed = 0, 0
    for root, dirs, files in os.walk(workdir):
        here = Path(root)
        for d in list(dirs):
            path = here / d
            if not path.is_dir():  # handled with its sibling just before
                dirs.remove(d)
                continue
            if d.endswith(".old") and (path / CHECKPOINT_MARKER).is_file():
                dirs.remove(d)
                target = path.with_name(d[: -len(".old")])
                size = _size(path) if target.exists() else 0
                what = finish_replace(target)
                if what:
                    log.warning("%s", what)
                else:
                    removed, freed = removed + 1, freed + size
            elif d.endswith(".tmp") and ((path / CHECKPOINT_MARKER).is_file() or not any(path.iterdir())):
                dirs.remove(d)
                removed, freed = removed + 1, freed + _size(path)
                shutil.rmtree(path)
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):  # utils.atomic_write_* / atomic_torch_save temp files
                path = here / f
                with contextlib.suppress(FileNotFoundError):
                    freed += path.stat().st_size
                    path.unlink()
                    removed += 1
    if removed:
        log.warning("removed %d leftover(s) of interrupted writes in %s (%.1f MB)", removed, workdir, freed / 1e6)


# --- stage outputs ---------------------------------------------------------------------------

# each stage's upstream stages: a stage is redone when an upstream stage's outputs changed since it ran
STAGE_DEPS = {"data": [], "bld": ["data"], "score": ["bld"], "costs": [], "search": ["score", "costs"],
              "realize": ["search", "bld"], "gkd": ["realize"], "baselines": ["score", "costs", "bld"],
              "eval": ["realize", "gkd", "baselines"], "report": ["search", "baselines", "eval"]}


def stage_outputs(workdir: Path, stage: str, solution: int | str, profile: str) -> list[str]:
    """The files and folders (relative to `workdir`) that a finished stage must have left.

    `data` has none to check: the parent cache and token files are rebuilt whenever missing, and
    everything downstream is keyed to the data's content. `solution` "auto": the realized child is
    the one search/selection.json chose, and the selection is an output of realize too."""
    if stage == "realize" and solution == "auto":
        out = ["search/selection.json"]
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            out.append(f"realized/solution{int(json.loads((workdir / out[0]).read_text())['chosen'])}")
        return out
    if stage == "bld":
        out = ["library/index.json"]
        with contextlib.suppress(OSError, ValueError, AttributeError):
            blocks = json.loads((workdir / "library" / "index.json").read_text()).get("blocks", {})
            out += [f"library/blocks/{r['file']}" for r in blocks.values() if r.get("file")]
        return out
    if stage == "baselines":
        out = []
        for name in ("width", "depth"):
            out.append(f"baselines/{name}/solution.json")
            with contextlib.suppress(OSError, ValueError):
                if "infeasible" not in json.loads((workdir / "baselines" / name / "solution.json").read_text()):
                    out.append(f"baselines/{name}/child")
        return out
    return {
        "data": [],
        "score": ["scores/replace1.json"],
        "costs": [f"costs/{profile}.json"],
        "search": ["search/solutions.json"],
        "realize": [f"realized/solution{solution}"],
        "gkd": ["child", "gkd/done.json"],
        "eval": ["eval/results.json"],
        "report": ["report/report.md"],
    }[stage]


def file_fingerprint(path: Path, sample: int = 1 << 16, whole_below: int = 8 << 20) -> str:
    """Content hash of a file: whole below 8 MiB, else its size and 17 evenly spaced 64 KiB samples
    (seconds for a 100 GB checkpoint; catches a missing, truncated or swapped file, not a bit flip)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= whole_below:
            h.update(f.read())
        else:
            for i in range(17):
                f.seek(i * (size - sample) // 16)
                h.update(f.read(sample))
    return h.hexdigest()[:16]


def path_fingerprint(path: Path) -> str | None:
    """A file's fingerprint, or a folder's (over every file in it); None when missing."""
    if path.is_file():
        return file_fingerprint(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(path)}={file_fingerprint(f)};".encode())
        return h.hexdigest()[:16] if files else None
    return None


def output_fingerprint(workdir: Path, rel: str) -> str | None:
    """`path_fingerprint`, except that the library index is hashed without the training times of
    its records: a block trained again to the same weights leaves the library's identity, and so
    every stage after BLD, unchanged."""
    path = workdir / rel
    if rel == "library/index.json" and path.is_file():
        try:
            index = json.loads(path.read_text())
            for record in index.get("blocks", {}).values():
                record.pop("train_seconds", None)
            return hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()[:16]
        except (ValueError, AttributeError, TypeError):
            pass  # not an index: its bytes
    return path_fingerprint(path)


def _outputs_id(marker: dict | None) -> str:
    return hashlib.sha256(json.dumps((marker or {}).get("outputs", {}), sort_keys=True).encode()).hexdigest()[:16]


def _read_marker(workdir: Path, stage: str) -> dict | None:
    path = workdir / "stages" / f"{stage}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def stage_record(workdir: Path, stage: str, solution: int | str, profile: str) -> dict:
    """What a stage's marker records besides its input fingerprint: its outputs and its upstream's."""
    return {"outputs": {rel: output_fingerprint(workdir, rel) for rel in stage_outputs(workdir, stage, solution, profile)},
            "upstream": {d: _outputs_id(_read_marker(workdir, d)) for d in STAGE_DEPS[stage]}}


def stage_problem(workdir: Path, stage: str, fingerprint: str | None, solution: int | str, profile: str,
                  set_aside: bool = False) -> str | None:
    """Why `stage` must (re)run: not finished, inputs changed, outputs missing or changed, or an
    upstream stage's outputs changed since it ran. None when it is done and intact. `fingerprint`
    None: check the outputs only, whatever inputs made them.

    With `set_aside`, outputs that changed are renamed `<name>.stale-<time>` (kept, not deleted)
    so the stage rebuilds them instead of trusting them; the library is never set aside (BLD
    checks every block itself and keeps the intact ones)."""
    marker = _read_marker(workdir, stage)
    if marker is None:
        return "not finished"
    if fingerprint is not None and marker.get("fingerprint") != fingerprint:
        return "inputs changed"
    recorded = marker.get("outputs")
    if recorded is None:  # a marker from before outputs were recorded: check they exist
        for rel in stage_outputs(workdir, stage, solution, profile):
            if not (workdir / rel).exists():
                return f"{rel} is missing"
        return None
    problems, changed = [], []
    for rel, fp in recorded.items():
        now = output_fingerprint(workdir, rel)
        if now is None:
            problems.append(f"{rel} is missing")
        elif now != fp:
            problems.append(f"{rel} changed since the stage finished")
            changed.append(rel)
    for d, upstream_id in marker.get("upstream", {}).items():
        if _outputs_id(_read_marker(workdir, d)) != upstream_id:
            problems.append(f"the outputs of stage {d} changed since it ran")
    if set_aside and stage != "bld":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for rel in changed:
            path = workdir / rel
            path.rename(path.with_name(f"{path.name}.stale-{stamp}"))
    if problems:
        return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    return None
