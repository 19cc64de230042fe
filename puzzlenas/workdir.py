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
- The artifacts between stages, typed: their paths (`SCORES`, `cost_profile_file`, `SOLUTIONS`,
  `SELECTION`, `baseline_file`, ...) and one reader and writer each, which return and take dataclasses:

      scores = read_scores(workdir)             # ScoreSet       scores/replace1.json          (score)
      profile = read_cost_profile(workdir, n)   # CostProfile    costs/<n>.json                (costs)
      result = read_solutions(workdir)          # SearchResult   search/solutions.json         (search)
      selection = read_selection(workdir)       # Selection      search/selection.json         (realize)
      width = read_baseline(workdir, "width")   # SolutionRecord, or why not: baselines/width/solution.json

  A file that is not JSON, is cut short or is of an older shape is one PuzzleError line naming
  it (JSON only: nothing in a work directory is ever executed or unpickled here). Unknown keys are
  kept (`extra`) and written back in their place, so a file read and written again keeps its bytes,
  and its fingerprint. The types live here, not in the stage packages that write them, because
  stages talk only through these files: the report, the sweep, the baselines and the benchmarks
  read them without importing the stage that wrote them (torch, HiGHS), and this module stays the
  bottom layer (it imports only errors, and utils to write), with no import cycle.
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
from dataclasses import dataclass, field
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


# --- the layout: where each artifact between stages lives, relative to the work directory ------

SCORES = "scores/replace1.json"  # score: ScoreSet
COSTS = "costs"  # costs: one CostProfile per device, cost_profile_file(name)
SOLUTIONS = "search/solutions.json"  # search: SearchResult
SELECTION = "search/selection.json"  # realize (gkd.solution: auto): Selection
SELECTION_PARTIAL = "search/selection.partial.json"  # realize: the candidates measured so far
REFINE = "search/refine.json"  # search with search.refine_rounds > 0: each round's re-scored child and prediction
BASELINES = ("width", "depth")  # baselines: a SolutionRecord (or why not) each, baseline_file(name)


def cost_profile_file(name: str) -> str:
    return f"{COSTS}/{name}.json"


def baseline_dir(name: str) -> str:
    """A baseline's folder: solution.json, realized/, child/, gkd/."""
    return f"baselines/{name}"


def baseline_file(name: str) -> str:
    return f"{baseline_dir(name)}/solution.json"


def realized_dir(rank: int | str) -> str:
    return f"realized/solution{rank}"


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
        out = [SELECTION]
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            out.append(realized_dir(int(json.loads((workdir / SELECTION).read_text())["chosen"])))
        return out
    if stage == "bld":
        out = ["library/index.json"]
        with contextlib.suppress(OSError, ValueError, AttributeError):
            blocks = json.loads((workdir / "library" / "index.json").read_text()).get("blocks", {})
            out += [f"library/blocks/{r['file']}" for r in blocks.values() if r.get("file")]
        return out
    if stage == "baselines":
        out = []
        for name in BASELINES:
            out.append(baseline_file(name))
            with contextlib.suppress(OSError, ValueError):
                if "infeasible" not in json.loads((workdir / baseline_file(name)).read_text()):
                    out.append(f"{baseline_dir(name)}/child")
        return out
    return {
        "data": [],
        "score": [SCORES],
        "costs": [cost_profile_file(profile)],
        "search": [SOLUTIONS],
        "realize": [realized_dir(solution)],
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


# --- the artifacts between stages, typed ----------------------------------------------------


class ArtifactError(PuzzleError, ValueError):
    """What is wrong with an artifact's JSON; `load_artifact` adds the file's name."""


def _field(d, key: str, kind, where: str, optional: bool = False):
    """`d[key]`, checked to be of `kind` (float: any JSON number; int: a JSON integer)."""
    if not isinstance(d, dict):
        raise ArtifactError(f"{where} is a {type(d).__name__}, not an object")
    if key not in d:
        if optional:
            return None
        raise ArtifactError(f"{where} has no {key!r}")
    v = d[key]
    if v is None and optional:
        return None
    if kind is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    elif kind is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    else:
        ok = isinstance(v, kind)
    if not ok:
        name = "number" if kind is float else kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ArtifactError(f"{where}[{key!r}] is {json.dumps(v)[:40]}, not a {name}")
    return v


def _numbers(d, where: str, required: tuple[str, ...] = ()) -> dict[str, float]:
    """An object of numbers (e.g. metric name -> value), with `required` among its keys."""
    if not isinstance(d, dict):
        raise ArtifactError(f"{where} is a {type(d).__name__}, not an object")
    for key in required:
        _field(d, key, float, where)
    for key, v in d.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ArtifactError(f"{where}[{key!r}] is {json.dumps(v)[:40]}, not a number")
    return dict(d)


def _ordered(d: dict, order: tuple[str, ...]) -> dict:
    """`d` with the keys of `order` first, in that order (a file read keeps its key order when written)."""
    return {**{k: d[k] for k in order if k in d}, **{k: v for k, v in d.items() if k not in order}}


def load_artifact(path: str | Path, cls, stage: str):
    """`cls.from_json` of the file at `path`; a missing, malformed or older-format file is one
    PuzzleError line naming it and the command that writes it again."""
    path = Path(path)
    if not path.is_file():
        raise PuzzleError(f"{path} not found; run `puzzlenas {stage}` first")
    try:
        return cls.from_json(json.loads(path.read_text()))
    except ValueError as exc:  # not JSON (a cut-short write, another file), or another shape (ArtifactError)
        what = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PuzzleError(f"{path} is not a {cls.__name__} file puzzlenas can read ({what}); "
                          f"rerun `puzzlenas {stage}` to write it again") from None


def save_artifact(path: str | Path, artifact) -> None:
    from .utils import atomic_write_json  # utils imports torch; this module does not need it otherwise

    atomic_write_json(path, artifact.to_json())


@dataclass(frozen=True)
class ScoreSet:
    """scores/replace1.json (score stage): every alternative's replace-1-block metrics.

    `scores`: alternative (or coupled pair) name -> {"kl", "lm_loss", "lm_loss_delta",
    "agreement"}, one number per metric: the search picks the metric by name (score.damage).
    `fingerprint`: the library, data and settings the scores were measured with (score's cache key)."""

    fingerprint: str
    parent_fingerprint: str
    tokens: int
    scores: dict[str, dict[str, float]]
    extra: dict = field(default_factory=dict)

    METRICS = ("kl", "lm_loss_delta", "agreement")  # every entry has these (damage reads them)

    @classmethod
    def from_json(cls, d) -> ScoreSet:
        scores = _field(d, "scores", dict, "the file")
        known = ("fingerprint", "parent_fingerprint", "tokens", "scores")
        return cls(_field(d, "fingerprint", str, "the file"), _field(d, "parent_fingerprint", str, "the file"),
                   _field(d, "tokens", int, "the file"),
                   {name: _numbers(m, f"scores[{name!r}]", cls.METRICS) for name, m in scores.items()},
                   {k: v for k, v in d.items() if k not in known})

    def to_json(self) -> dict:
        return {"fingerprint": self.fingerprint, "parent_fingerprint": self.parent_fingerprint, "tokens": self.tokens,
                "scores": {name: dict(m) for name, m in self.scores.items()}, **self.extra}


@dataclass(frozen=True)
class BlockCost:
    """One alternative's entry of a cost profile, or the shared part's (embedding, final norm, head):
    seconds of the scenario's prefill and of one decode step, parameters, weight and KV-cache bytes.
    `kv_bytes` is None for the shared part; `extra` holds what a method adds (e.g. `copies` timed)."""

    prefill_s: float
    decode_s: float
    params: int
    weight_bytes: int
    kv_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d, where: str) -> BlockCost:
        known = ("prefill_s", "decode_s", "params", "weight_bytes", "kv_bytes")
        return cls(_field(d, "prefill_s", float, where), _field(d, "decode_s", float, where),
                   _field(d, "params", float, where), _field(d, "weight_bytes", float, where),
                   _field(d, "kv_bytes", float, where, optional=True), {k: v for k, v in d.items() if k not in known})

    def to_json(self) -> dict:  # times, what the method adds, then memory: the order costs/ writes
        out = {"prefill_s": self.prefill_s, "decode_s": self.decode_s, **self.extra, "params": self.params,
               "weight_bytes": self.weight_bytes}
        return out if self.kv_bytes is None else {**out, "kv_bytes": self.kv_bytes}


@dataclass(frozen=True)
class CostProfile:
    """costs/<name>.json (costs stage): the hardware cost of every alternative in one scenario.

    `scenario`: {"batch_size", "prompt_len", "generate_len"}; `decode_steps`: decode forwards per
    scenario run when an engine measured it (None: generate_len, the harness's count; see
    costs.profile.decode_steps); `estimated`: times from a roofline, not measured. `extra` keeps
    what the producing method records besides (fingerprint, engine, method, warnings, preset...)."""

    device: str
    estimated: bool
    dtype: str
    scenario: dict[str, int]
    shared: BlockCost
    alternatives: dict[str, BlockCost]
    decode_steps: int | None = None
    extra: dict = field(default_factory=dict)
    order: tuple[str, ...] = field(default=(), compare=False, repr=False)  # the file's key order

    SCENARIO = ("batch_size", "prompt_len", "generate_len")

    @property
    def warnings(self) -> list[str]:
        return list(self.extra.get("warnings", []))

    @classmethod
    def from_json(cls, d) -> CostProfile:
        alternatives = _field(d, "alternatives", dict, "the file")
        scenario = _field(d, "scenario", dict, "the file")
        for key in cls.SCENARIO:
            _field(scenario, key, int, "scenario")
        known = ("device", "estimated", "dtype", "scenario", "shared", "alternatives", "decode_steps")
        return cls(_field(d, "device", str, "the file"), _field(d, "estimated", bool, "the file"),
                   _field(d, "dtype", str, "the file"), dict(scenario),
                   BlockCost.from_json(_field(d, "shared", dict, "the file"), "shared"),
                   {n: BlockCost.from_json(a, f"alternatives[{n!r}]") for n, a in alternatives.items()},
                   _field(d, "decode_steps", int, "the file", optional=True),
                   {k: v for k, v in d.items() if k not in known}, tuple(d))

    def to_json(self) -> dict:
        out = {"device": self.device, "estimated": self.estimated, "dtype": self.dtype, "scenario": dict(self.scenario),
               **({} if self.decode_steps is None else {"decode_steps": self.decode_steps}), **self.extra,
               "shared": self.shared.to_json(),
               "alternatives": {n: a.to_json() for n, a in self.alternatives.items()}}
        return _ordered(out, self.order)


@dataclass(frozen=True)
class SolutionRecord:
    """One child architecture: an (attention, FFN) alternative name pair per layer, with what the
    search predicted for it. `rank`: its place among the search's solutions, or a baseline's name;
    `status` and `solve_seconds`: from a solver (absent for a baseline); `description`: a baseline's."""

    rank: int | str
    damage: float
    predicted_speedup: float
    predicted: dict[str, float]  # prefill_s, decode_step_s, total_s of one scenario run
    memory_bytes: float
    params: float
    layers: tuple[tuple[str, str], ...]  # (attention name, FFN name) per layer
    status: str | None = None
    solve_seconds: float | None = None
    description: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d, where: str) -> SolutionRecord:
        rank = _field(d, "rank", (int, str), where)
        layers = _field(d, "layers", list, where)
        pairs = tuple((_field(x, "attention", str, f"{where} layer {i}"), _field(x, "ffn", str, f"{where} layer {i}"))
                      for i, x in enumerate(layers))
        known = ("rank", "status", "damage", "predicted_speedup", "predicted", "memory_bytes", "params", "solve_seconds",
                 "layers", "description")
        return cls(rank, _field(d, "damage", float, where), _field(d, "predicted_speedup", float, where),
                   _numbers(_field(d, "predicted", dict, where), f"{where} predicted"),
                   _field(d, "memory_bytes", float, where), _field(d, "params", float, where), pairs,
                   _field(d, "status", str, where, optional=True), _field(d, "solve_seconds", float, where, optional=True),
                   _field(d, "description", str, where, optional=True), {k: v for k, v in d.items() if k not in known})

    def layers_json(self) -> list[dict[str, str]]:
        return [{"attention": a, "ffn": f} for a, f in self.layers]

    def to_json(self) -> dict:
        out = {"rank": self.rank, "status": self.status, "damage": self.damage,
               "predicted_speedup": self.predicted_speedup, "predicted": dict(self.predicted),
               "memory_bytes": self.memory_bytes, "params": self.params, "solve_seconds": self.solve_seconds,
               "layers": self.layers_json(), "description": self.description, **self.extra}
        return {k: v for k, v in out.items() if v is not None or k in self.extra}


@dataclass(frozen=True)
class SearchResult:
    """search/solutions.json (search stage): the solutions, best first, and what they were solved
    for: the cost profile's device, the scoring metric, the budgets and the parent's resources
    (time, memory, latency, params). `method`: a heuristic's name (benchmarks), None for the MIP."""

    device: str
    estimated: bool
    metric: str
    budgets: dict[str, float]
    parent: dict[str, float]
    solutions: tuple[SolutionRecord, ...]
    method: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d) -> SearchResult:
        solutions = _field(d, "solutions", list, "the file")
        known = ("device", "estimated", "metric", "method", "budgets", "parent", "solutions")
        return cls(_field(d, "device", str, "the file"), _field(d, "estimated", bool, "the file"),
                   _field(d, "metric", str, "the file"), _numbers(_field(d, "budgets", dict, "the file"), "budgets"),
                   _numbers(_field(d, "parent", dict, "the file"), "parent"),
                   tuple(SolutionRecord.from_json(s, f"solution {i}") for i, s in enumerate(solutions)),
                   _field(d, "method", str, "the file", optional=True), {k: v for k, v in d.items() if k not in known})

    def to_json(self) -> dict:
        return {"device": self.device, "estimated": self.estimated, "metric": self.metric,
                **({} if self.method is None else {"method": self.method}), "budgets": dict(self.budgets),
                "parent": dict(self.parent), "solutions": [s.to_json() for s in self.solutions], **self.extra}

    def layers_json(self) -> list[list[dict[str, str]]]:
        """Every solution's layers as the file holds them (what a selection's fingerprint is of)."""
        return [s.layers_json() for s in self.solutions]


@dataclass(frozen=True)
class Candidate:
    """One search solution as the realize stage measured it before GKD: KL(parent || child) and
    top-1 agreement per text source (domain, wikitext2) and their mean ("mixed")."""

    rank: int
    predicted_speedup: float
    damage: float
    kl: dict[str, float]
    agreement: dict[str, float]

    @classmethod
    def from_json(cls, d, where: str) -> Candidate:
        return cls(_field(d, "rank", int, where), _field(d, "predicted_speedup", float, where),
                   _field(d, "damage", float, where), _numbers(_field(d, "kl", dict, where), f"{where} kl", ("mixed",)),
                   _numbers(_field(d, "agreement", dict, where), f"{where} agreement", ("mixed",)))

    def to_json(self) -> dict:
        return {"rank": self.rank, "predicted_speedup": self.predicted_speedup, "damage": self.damage,
                "kl": dict(self.kl), "agreement": dict(self.agreement)}


@dataclass(frozen=True)
class Selection:
    """search/selection.json (realize, gkd.solution: auto): which search solution GKD and eval use,
    and why. `solutions_fingerprint`: of the search result it was chosen from (a selection from an
    earlier search is not used); `sources`: each text source's description, or why it was unavailable."""

    chosen: int
    reason: str
    predicted_best: int
    domain_only: bool
    sources: dict[str, dict]
    mixed: str
    solutions_fingerprint: str
    candidates: tuple[Candidate, ...]
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d) -> Selection:
        candidates = _field(d, "candidates", list, "the file")
        known = ("chosen", "reason", "predicted_best", "domain_only", "sources", "mixed", "solutions_fingerprint",
                 "candidates")
        return cls(_field(d, "chosen", int, "the file"), _field(d, "reason", str, "the file"),
                   _field(d, "predicted_best", int, "the file"), _field(d, "domain_only", bool, "the file"),
                   _field(d, "sources", dict, "the file"), _field(d, "mixed", str, "the file"),
                   _field(d, "solutions_fingerprint", str, "the file"),
                   tuple(Candidate.from_json(c, f"candidate {i}") for i, c in enumerate(candidates)),
                   {k: v for k, v in d.items() if k not in known})

    def to_json(self) -> dict:
        return {"chosen": self.chosen, "reason": self.reason, "predicted_best": self.predicted_best,
                "domain_only": self.domain_only, "sources": self.sources, "mixed": self.mixed,
                "solutions_fingerprint": self.solutions_fingerprint,
                "candidates": [c.to_json() for c in self.candidates], **self.extra}


def read_scores(workdir: str | Path) -> ScoreSet:
    return load_artifact(Path(workdir) / SCORES, ScoreSet, "score")


def write_scores(workdir: str | Path, scores: ScoreSet) -> None:
    save_artifact(Path(workdir) / SCORES, scores)


def read_cost_profile(workdir: str | Path, name: str | None = None) -> CostProfile:
    """The cost profile `name` in costs/, or the only one there when `name` is None."""
    folder = Path(workdir) / COSTS
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if name:
        files = [f for f in files if f.stem == name]
    if not files:
        raise PuzzleError(f"{folder}: no cost profile{' for ' + name if name else ''}; run `puzzlenas costs` first")
    if len(files) > 1:
        raise PuzzleError(f"{folder} holds several profiles ({', '.join(f.stem for f in files)}); choose one with --device")
    return load_artifact(files[0], CostProfile, "costs")


def write_cost_profile(workdir: str | Path, profile: CostProfile) -> None:
    save_artifact(Path(workdir) / cost_profile_file(profile.device), profile)


def read_solutions(workdir: str | Path) -> SearchResult:
    return load_artifact(Path(workdir) / SOLUTIONS, SearchResult, "search")


def write_solutions(workdir: str | Path, result: SearchResult) -> None:
    save_artifact(Path(workdir) / SOLUTIONS, result)


def read_selection(workdir: str | Path) -> Selection:
    return load_artifact(Path(workdir) / SELECTION, Selection, "realize")


def write_selection(workdir: str | Path, selection: Selection) -> None:
    save_artifact(Path(workdir) / SELECTION, selection)


class BaselineSolution:
    """baselines/<name>/solution.json (baselines stage): a SolutionRecord, or {"infeasible": why}
    when the baseline cannot reach the target; `from_json` returns the record or the reason."""

    @staticmethod
    def from_json(d) -> SolutionRecord | str:
        if isinstance(d, dict) and "infeasible" in d:
            return _field(d, "infeasible", str, "the file")
        return SolutionRecord.from_json(d, "the baseline")

    @staticmethod
    def to_json(solution: SolutionRecord | str) -> dict:
        return {"infeasible": solution} if isinstance(solution, str) else solution.to_json()


def read_baseline(workdir: str | Path, name: str) -> SolutionRecord | str:
    """A baseline's solution, or (a string) why it cannot reach the target."""
    return load_artifact(Path(workdir) / baseline_file(name), BaselineSolution, "baselines")


def write_baseline(workdir: str | Path, name: str, solution: SolutionRecord | str) -> None:
    from .utils import atomic_write_json

    atomic_write_json(Path(workdir) / baseline_file(name), BaselineSolution.to_json(solution))
