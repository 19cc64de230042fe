"""Faults a new user meets: bad inputs, crafted files, concurrent runs, kills at awkward points.

Every bad input must end with exit code 2, exactly one `puzzlenas: error:` line naming the file or
field, and every file of the work directory (and of the inputs) unchanged. Every kill must be
followed by a rerun that finishes with the results of an uninterrupted run, redoing no stage that
had finished. The reference run (`finished`) is made once per module through the real CLI; the
bad-input cases call `cli.main` in-process on copies of it (seconds each).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED_DATA, make_tiny_parent, make_tiny_tokenizer, snapshot, start_cli, tiny_run_config

from puzzlenas.cli import main
from puzzlenas.pipeline import STAGES

ALICE = SHARED_DATA / "distill" / "gutenberg" / "pg11_Alice-s-Adventures-in-Wonderland.txt"


# the shared tiny configuration (conftest); the name these tests have always used
fault_config = tiny_run_config


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fault_inputs")
    make_tiny_parent("llama").save_pretrained(root / "parent")
    make_tiny_tokenizer().save_pretrained(root / "parent")
    (root / "cfg.yaml").write_text(yaml.safe_dump(fault_config(root / "parent")))
    return root


@pytest.fixture(scope="module")
def finished(inputs) -> Path:
    """A work directory of one uninterrupted run."""
    work = inputs / "reference"
    p = start_cli(["run", str(inputs / "cfg.yaml"), "--workdir", str(work), "--quiet"])
    out = p.communicate(timeout=900)[0]
    assert p.returncode == 0, out[-3000:]
    assert json.loads((work / "eval" / "results.json").read_text())["models"].keys() >= {"parent", "child"}
    return work


@pytest.fixture
def work(finished, tmp_path) -> Path:
    """A private copy of the finished work directory (its config names absolute paths)."""
    shutil.copytree(finished, tmp_path / "work", symlinks=True)
    return tmp_path / "work"


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    """`puzzlenas ARGS` in this process: (exit code, the lines it printed to stderr)."""
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as start_cli's OMP_NUM_THREADS=1: the measuring device's name counts threads
    try:
        rc = main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    return rc, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(rc: int, err: list[str], *names: str) -> None:
    """Exit 2 and one error line; what else is on stderr may only be log records and progress bars
    (transformers' "Loading weights" bar), never a traceback."""
    assert rc == 2, err
    err = [line for line in err if line.strip() and not re.search(r"^(INFO|WARNING) |\d+%\|", line)]
    assert len(err) == 1 and err[0].startswith("puzzlenas: error: "), err
    for name in names:
        assert name in err[0], (name, err[0])


# --- bad input: one line, exit 2, nothing changed ----------------------------------------------


def _bad_parent(inputs: Path, tmp: Path, how: str) -> Path:
    parent = tmp / f"parent-{how}"
    shutil.copytree(inputs / "parent", parent)
    weights = parent / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x07" * 8 + os.urandom(200))
    return parent


BAD_RUNS = {
    # case: (set-up(work, inputs, tmp) -> extra CLI args, text the error line must name)
    "truncated parent safetensors": (lambda w, i, t: ["--set", f"parent={_bad_parent(i, t, 'truncated')}"],
                                     "model.safetensors"),
    "corrupt parent safetensors": (lambda w, i, t: ["--set", f"parent={_bad_parent(i, t, 'corrupt')}"],
                                   "model.safetensors"),
    "corrupt library/index.json": (lambda w, i, t: [(w / "library" / "index.json").write_text('{"parent_fing')][:0],
                                   "index.json"),
    "unparsable --set value": (lambda w, i, t: ["--set", "bld.tokens=[1,"], "bld.tokens"),
    "non-UTF-8 .jsonl": (lambda w, i, t: _data_file(t, "bad.jsonl", b'{"text": "caf\xe9 au lait"}\n'), "bad.jsonl"),
    "non-UTF-8 .txt": (lambda w, i, t: _data_file(t, "latin1.txt", "d\u00e9j\u00e0 vu ".encode("latin-1") * 500),
                       "latin1.txt"),
    "binary file as text": (lambda w, i, t: _data_file(t, "weights.txt", (w / "child" / "model.safetensors").read_bytes()),
                            "weights.txt"),
    "seq_len above max_position_embeddings": (lambda w, i, t: ["--set", "data.seq_len=512"], "data.seq_len"),
    "negative memory budget": (lambda w, i, t: ["--set", "search.memory_bytes=-1GiB"], "search.memory_bytes"),
    "infeasible target": (lambda w, i, t: ["--set", "search.throughput=50"], "50"),
}


def _data_file(tmp: Path, name: str, content: bytes) -> list[str]:
    (tmp / name).write_bytes(content)
    return ["--set", f"data.path={tmp / name}"]


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_input_to_run_is_one_line_and_changes_nothing(case, work, inputs, tmp_path, capsys):
    setup, name = BAD_RUNS[case]
    extra = setup(work, inputs, tmp_path) or []
    before, inputs_before = snapshot(work), snapshot(inputs / "parent")
    rc, err = run_cli(capsys, "run", inputs / "cfg.yaml", "--workdir", work, "--quiet", *extra)
    assert_one_line_error(rc, err, name)
    assert snapshot(work) == before  # config.yaml included: a failed run leaves the last good config
    assert snapshot(inputs / "parent") == inputs_before


BAD_COMMANDS = {
    "search --solutions 0": (["search", "{cfg}", "--workdir", "{work}", "--solutions", "0"], "--solutions 0"),
    "search --throughput 0x": (["search", "{cfg}", "--workdir", "{work}", "--throughput", "0x"], "--throughput 0x"),
    "search --memory=-1GiB": (["search", "{cfg}", "--workdir", "{work}", "--memory=-1GiB"], "--memory -1GiB"),
    "eval of a missing checkpoint": (["eval", "{work}/nope", "--config", "{cfg}", "--workdir", "{work}"], "nope"),
    "work directory is a file": (["run", "{cfg}", "--workdir", "{work}/config.yaml"], "config.yaml"),
    "--only eval without the realized child": (["run", "{cfg}", "--workdir", "{work}", "--only", "eval"],
                                               "realized/solution0"),
}


@pytest.mark.parametrize("case", list(BAD_COMMANDS))
def test_bad_command_is_one_line_and_changes_nothing(case, work, inputs, capsys):
    args, name = BAD_COMMANDS[case]
    if case.startswith("--only eval"):
        shutil.rmtree(work / "realized" / "solution0")  # what a kill in the old save_checkpoint left
    before = snapshot(work)
    rc, err = run_cli(capsys, *[a.format(cfg=inputs / "cfg.yaml", work=work) for a in args], "--quiet"
                      if args[0] != "eval" else "--no-lm-eval")
    assert_one_line_error(rc, err, name)
    assert snapshot(work) == before


def test_truncated_library_block_is_named_then_retrained_by_run(work, inputs, capsys):
    block = sorted((work / "library" / "blocks").glob("*.safetensors"))[0]
    intact = block.read_bytes()
    block.write_bytes(intact[: len(intact) // 2])
    before = snapshot(work)
    rc, err = run_cli(capsys, "score", inputs / "cfg.yaml", "--workdir", work, "--quiet")
    assert_one_line_error(rc, err, block.stem)
    rc, err = run_cli(capsys, "run", inputs / "cfg.yaml", "--workdir", work, "--quiet", "--only", "score")
    assert_one_line_error(rc, err, f"library/blocks/{block.name}")
    assert snapshot(work) == before
    # a plain run redoes BLD, which retrains that block alone, to the same bytes; nothing after it is redone
    markers = {s: (work / "stages" / f"{s}.json").read_text() for s in STAGES if s != "bld"}
    assert run_cli(capsys, "run", inputs / "cfg.yaml", "--workdir", work, "--quiet")[0] == 0
    assert block.read_bytes() == intact
    assert {s: (work / "stages" / f"{s}.json").read_text() for s in markers} == markers


def test_unwritable_work_directory(work, inputs, capsys, monkeypatch):
    before = snapshot(work)
    if os.geteuid() == 0:  # root writes anywhere: make the check itself see what a user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == work else real_access(p, m))
    else:
        work.chmod(0o555)
    try:
        rc, err = run_cli(capsys, "run", inputs / "cfg.yaml", "--workdir", work, "--quiet")
    finally:
        work.chmod(0o755)
    assert_one_line_error(rc, err, str(work), "not writable")
    assert snapshot(work) == before


def test_permission_error_inside_a_command_is_one_line(work, inputs, capsys, monkeypatch):
    import puzzlenas.workdir

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(work / "report" / "report.md"))

    monkeypatch.setattr(puzzlenas.workdir, "stage_problem", denied)
    rc, err = run_cli(capsys, "run", inputs / "cfg.yaml", "--workdir", work, "--quiet")
    assert_one_line_error(rc, err, "report.md", "Permission denied")


# --- security: no file that puzzlenas reads runs code -------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("state", ["gkd/state.pt", "library/state/rank0-of1.pt"])
def test_crafted_state_file_is_refused_without_running_it(state, work, inputs, tmp_path, capsys):
    pwned = tmp_path / "pwned"
    (work / state).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 1, "payload": _Payload(pwned)}, work / state)
    if state.startswith("gkd"):
        (work / "gkd" / "done.json").unlink()  # so that distill looks for a state to resume
    else:
        (work / "stages" / "bld.json").unlink()  # so that bld (the pipeline's stage) is not skipped as done
    before = snapshot(work)
    command = "distill" if state.startswith("gkd") else "bld"
    rc, err = run_cli(capsys, command, inputs / "cfg.yaml", "--workdir", work, "--quiet")
    assert_one_line_error(rc, err, state, "refused")
    assert not pwned.exists()
    assert snapshot(work) == before


# --- convert never deletes what it did not write ---------------------------------------------------


def test_convert_refuses_a_foreign_folder_unless_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc, err = run_cli(capsys, "convert", inputs / "parent", out)
    assert_one_line_error(rc, err, str(out), "--overwrite")
    assert snapshot(out) == {"notes.txt": snapshot(out)["notes.txt"]} and (out / "notes.txt").read_text() == "mine"
    assert run_cli(capsys, "convert", inputs / "parent", out, "--overwrite")[0] == 0
    assert not (out / "notes.txt").exists() and (out / "puzzlenas.json").is_file()
    assert run_cli(capsys, "convert", inputs / "parent", out)[0] == 0  # its own output: replaced without asking


def test_interrupted_checkpoint_replace_keeps_the_old_one(inputs, tmp_path):
    """A kill after the old folder is moved aside: the next start puts it back, then replaces it."""
    out = tmp_path / "out"
    assert start_cli(["convert", str(inputs / "parent"), str(out)]).wait(timeout=300) == 0
    first = snapshot(out)
    p = start_cli(["convert", str(inputs / "parent"), str(out)], env={"PUZZLENAS_KILL_AT": "checkpoint.swap"})
    assert p.wait(timeout=300) == -signal.SIGKILL
    assert not out.exists() and snapshot(out.with_name("out.old")) == first
    from puzzlenas.workdir import recover

    recover(tmp_path)
    assert snapshot(out) == first and not out.with_name("out.old").exists() and not out.with_name("out.tmp").exists()


# --- stage markers are checked against their artifacts ---------------------------------------------


def test_missing_or_set_aside_artifact_is_rebuilt_not_trusted(work, inputs, capsys, caplog):
    realized = work / "realized" / "solution0"
    reference = snapshot(realized)
    markers = {s: (work / "stages" / f"{s}.json").read_text() for s in STAGES if s != "realize"}
    shutil.rmtree(realized)  # the old save_checkpoint's kill window: folder gone, marker says done
    assert run_cli(capsys, "run", inputs / "cfg.yaml", "--workdir", work, "--quiet")[0] == 0
    assert "realize: redoing it: realized/solution0 is missing" in caplog.text
    assert snapshot(realized) == reference  # same bytes, so GKD, eval... are not redone
    assert {s: (work / "stages" / f"{s}.json").read_text() for s in markers} == markers

    realized.rename(realized.with_name("solution0.old"))  # the new save_checkpoint's kill window
    (work / "gkd" / ".state.pt.abc123.tmp").write_bytes(b"\0" * 1000)  # a killed atomic write
    caplog.clear()
    rc = run_cli(capsys, "run", inputs / "cfg.yaml", "--workdir", work, "--quiet")[0]
    assert rc == 0 and "restored" in caplog.text and "removed 1 leftover" in caplog.text
    assert snapshot(realized) == reference and not list(work.rglob("*.tmp"))

    (work / "scores" / "replace1.json").write_text("{}")  # changed behind the pipeline's back
    caplog.clear()
    assert run_cli(capsys, "run", inputs / "cfg.yaml", "--workdir", work, "--quiet")[0] == 0
    assert "score: redoing it: scores/replace1.json changed" in caplog.text
    assert list((work / "scores").glob("replace1.json.stale-*"))  # kept, not deleted
    assert json.loads((work / "scores" / "replace1.json").read_text())["scores"]
    cfg = json.loads((work / "stages" / "score.json").read_text())["config"]
    assert cfg["search"]["throughput"] == 1.2  # each stage records the config it ran with


def test_saved_tokenizer_is_the_same_bytes_online_and_offline(inputs, tmp_path):
    """A process started offline (HF_HUB_OFFLINE=1) must write the checkpoint's tokenizer byte for
    byte as an online one, or output fingerprints change with the environment and stages are redone."""
    import subprocess
    import sys

    code = ("import sys; from transformers import PreTrainedTokenizerFast; from puzzlenas.checkpoint import load_parent, "
            "convert_parent, save_checkpoint; m, t = load_parent(sys.argv[1]); "
            "save_checkpoint(convert_parent(m, copy=False), sys.argv[2], t)")
    files = {}
    for offline in ("0", "1"):
        out = tmp_path / f"offline{offline}"
        env = {**os.environ, "HF_HUB_OFFLINE": offline, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", code, str(inputs / "parent"), str(out)], env=env, check=True, timeout=300)
        files[offline] = (out / "tokenizer_config.json").read_bytes()
    assert files["0"] == files["1"]


# --- one writer per work directory ---------------------------------------------------------------


def _wait_for_holder(lock: Path, pid: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if lock.is_file() and f'"pid": {pid},' in lock.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} never took {lock}")


def test_second_writer_stops_at_once_and_a_dead_holders_lock_is_taken_over(inputs, tmp_path):
    work = tmp_path / "work"
    first = start_cli(["run", str(inputs / "cfg.yaml"), "--workdir", str(work), "--quiet"])
    try:
        _wait_for_holder(work / ".lock", first.pid)
        t0 = time.time()
        second = start_cli(["run", str(inputs / "cfg.yaml"), "--workdir", str(work), "--quiet",
                            "--set", "search.throughput=1.6"])
        out = second.communicate(timeout=120)[0].strip().splitlines()
        assert second.returncode == 2 and time.time() - t0 < 60
        assert out[-1].startswith(f"puzzlenas: error: work directory {work} is in use by pid {first.pid}"), out
        assert "`puzzlenas run " in out[-1] and "started 20" in out[-1]
        assert not [line for line in out[:-1] if "error" in line.lower()]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed holder's record remains; its flock died with it: the next writer takes over
    assert f'"pid": {first.pid},' in (work / ".lock").read_text()
    third = start_cli(["search", str(inputs / "cfg.yaml"), "--workdir", str(work)])
    out = third.communicate(timeout=120)[0]
    assert f"taking over the lock left by pid {first.pid}" in out, out
    assert "in use" not in out


def test_lock_message_names_the_holder_and_torchrun_ranks_share_it(tmp_path, monkeypatch):
    import fcntl

    from puzzlenas.errors import PuzzleError
    from puzzlenas.workdir import lock_workdir

    work = tmp_path / "w"
    with lock_workdir(work, "puzzlenas run holder.yaml"):
        with lock_workdir(work, "nested"):  # re-entrant in one process
            pass
        fd = os.open(work / ".lock", os.O_RDWR)
        try:  # another open file description: what a second process gets
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "1")
        with lock_workdir(work, "rank 1"):  # torchrun's other ranks: rank 0 holds it for them
            pass
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("RANK")
    assert (work / ".lock").read_text() == ""  # released cleanly: no holder record left
    holder = os.open(work / ".lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.write(holder, json.dumps({"pid": 4242, "host": "h", "command": "puzzlenas bld x.yaml",
                                 "started": "2030-01-01 00:00:00"}).encode())
    try:
        with pytest.raises(PuzzleError, match=r"in use by pid 4242 on h \(`puzzlenas bld x.yaml`, started 2030"):
            with lock_workdir(work, "second"):
                pass
    finally:
        os.close(holder)


# --- kills at several points, then one rerun: the results of an uninterrupted run ------------------


def _markers(work: Path) -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted((work / "stages").glob("*.json"))}


def _results(work: Path) -> dict:
    """Everything a run computes that must not depend on kills (timings and speeds excluded)."""
    out = {rel: h for rel, h in snapshot(work).items()  # weights and checkpoint folders, byte for byte
           if rel.endswith(".safetensors") or rel.startswith(("realized/", "child/"))
           or (rel.startswith("baselines/") and "/gkd/" not in rel)}
    out["scores"] = json.loads((work / "scores" / "replace1.json").read_text())
    out["layers"] = [s["layers"] for s in json.loads((work / "search" / "solutions.json").read_text())["solutions"]]
    models = json.loads((work / "eval" / "results.json").read_text())["models"]
    out["eval"] = {m: (r["wikitext2"]["perplexity"], r["kl"], r["agreement"]) for m, r in models.items()}
    return out


def test_kills_at_awkward_points_then_rerun_equals_uninterrupted_run(finished, inputs, tmp_path):
    work = tmp_path / "work"
    args = ["run", str(inputs / "cfg.yaml"), "--workdir", str(work), "--quiet"]
    blocks = sorted(json.loads((finished / "library" / "index.json").read_text())["blocks"])
    trained = [b for b in blocks if (finished / "library" / "blocks" / f"{b}.safetensors").is_file()]

    def killed_at(point: str) -> str:
        p = start_cli(args, env={"PUZZLENAS_KILL_AT": point})
        out = p.communicate(timeout=600)[0]
        assert p.returncode == -signal.SIGKILL, f"{point}: not reached\n{out[-3000:]}"
        return out

    def finished_stages_untouched(before: dict[str, str]) -> None:
        after = _markers(work)
        assert {s: after.get(s) for s in before} == before, "a finished stage was redone"

    # 1. inside BLD's final save: the first blocks are saved, the rest only in the final state
    killed_at(f"bld.save_block:{trained[1]}")
    saved = {p.name: p.stat().st_mtime_ns for p in (work / "library" / "blocks").glob("*.safetensors")}
    assert 1 <= len(saved) < len(trained) and (work / "library" / "state" / "rank0-of1.pt").is_file()
    # 2. the rerun saves the rest without training, then is killed inside an atomic write
    before = _markers(work)
    out = killed_at("atomic_write:replace1.json")
    assert f"saving {len(trained) - len(saved)} blocks trained before the last run was killed" in out
    assert "resuming BLD from step 16/16" in out and "ignoring" not in out
    assert {p: (work / "library" / "blocks" / p).stat().st_mtime_ns for p in saved} == saved
    assert list((work / "scores").glob(".replace1.json.*.tmp"))
    finished_stages_untouched(before)
    # 3. inside the first write of a checkpoint folder (realize)
    before = _markers(work)
    out = killed_at("checkpoint.write:realized")
    assert "removed 1 leftover" in out and not list((work / "scores").glob("*.tmp"))
    assert (work / "realized" / "solution0.tmp").is_dir() and not (work / "realized" / "solution0").exists()
    finished_stages_untouched(before)
    # 4. inside GKD's save of the child, after its last training step
    before = _markers(work)
    killed_at("checkpoint.write:child")
    finished_stages_untouched(before)
    # 5. to the end
    before = _markers(work)
    p = start_cli(args)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out[-3000:]
    assert "resuming GKD from step 8/8" in out
    finished_stages_untouched(before)
    # 6. inside the replace of an existing checkpoint (realize forced again), then a plain rerun
    p = start_cli([*args, "--only", "realize"], env={"PUZZLENAS_KILL_AT": "checkpoint.swap:realized"})
    assert p.wait(timeout=600) == -signal.SIGKILL
    assert not (work / "realized" / "solution0").exists() and (work / "realized" / "solution0.old").is_dir()
    before = _markers(work)
    p = start_cli(args)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0 and out.count("skipped") == len(STAGES), out[-3000:]
    assert "restored" in out
    finished_stages_untouched(before)
    assert not [p for p in work.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert _results(work) == _results(finished)
