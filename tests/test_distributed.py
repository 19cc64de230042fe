"""Sharded training on two CPU processes (gloo): FSDP2 GKD against one process, sharded
checkpoints resumed after SIGKILL, the shared training config, and BLD with the parent's layers
split over the ranks.

Tolerances: two processes sum gradients in another order than one, so fp32 results part in the
last bits after the first step. Measured over 8 steps: losses within 1.6e-5 relative (KL, a small
difference of log-probabilities; cosine within 1e-6), weights within 2.1e-5 absolute. The tests
allow 1e-4 for both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_parent, start_cli
from test_gkd_eval import GKD_CFG, _max_weight_diff, _prepare

from puzzlenas.errors import PuzzleError

LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4
OPTS = ["--set", "gkd.tokens=1024", "--set", "gkd.checkpoint_every=2", "--set", "gkd.val_every=4", "--quiet"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2) -> subprocess.Popen:
    """`torchrun -m puzzlenas ARGS` on `nproc` CPU processes."""
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe), "--nproc-per-node", str(nproc), "--master-port", str(free_port()), "-m", "puzzlenas", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def children(pid: int) -> list[int]:
    """The processes `pid` started (torchrun starts its workers in sessions of their own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "gkd" / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gkd_runs(tmp_path_factory):
    """One process and two FSDP2 processes distilling the same child (each started once)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    make_tiny_parent("llama").save_pretrained(tmp / "parent")
    raw = {"parent": str(tmp / "parent"), **GKD_CFG}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(raw))
    _prepare(tmp / "one", raw)
    for name in ("two", "killed"):  # the same parent, data and realized child
        shutil.copytree(tmp / "one", tmp / name)
    one = start_cli(["distill", str(tmp / "cfg.yaml"), "--workdir", str(tmp / "one"), *OPTS])
    two = torchrun(["distill", str(tmp / "cfg.yaml"), "--workdir", str(tmp / "two"), *OPTS])
    finish(one)
    finish(two)
    return tmp


def test_fsdp2_gkd_two_processes_match_one(gkd_runs):
    one, two = losses(gkd_runs / "one"), losses(gkd_runs / "two")
    assert [e["step"] for e in one] == [e["step"] for e in two] and len(one) == 9  # 8 steps + step 0
    for a, b in zip(one, two):
        for key in ("kl", "cos", "val_kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (a, b)
    assert one[-1]["val_kl"] < 0.9 * one[0]["val_kl"]  # it trained
    assert _max_weight_diff(gkd_runs / "one" / "child", gkd_runs / "two" / "child") < WEIGHT_ATOL
    assert not (gkd_runs / "two" / "gkd" / "sharded").exists()  # states are gone once the child is saved


def test_sharded_checkpoint_resumes_after_sigkill(gkd_runs):
    work = gkd_runs / "killed"
    args = ["distill", str(gkd_runs / "cfg.yaml"), "--workdir", str(work), *OPTS]
    proc = torchrun(args)
    killed_at = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and killed_at is None:
        steps = [int(p.name.split("-")[1]) for p in (work / "gkd" / "sharded").glob("step-*") if (p / "meta.json").is_file()]
        if steps and max(steps) >= 4:
            for pid in [*children(proc.pid), proc.pid]:  # both workers and the launcher, mid-run
                os.kill(pid, signal.SIGKILL)
            killed_at = max(steps)
        time.sleep(0.02)
    proc.communicate()
    assert killed_at is not None and killed_at < 8, "the run ended before it could be killed midway"
    assert not (work / "child").exists()
    out = finish(torchrun(args))
    assert "resuming GKD from step" in out
    assert losses(work)[-1]["val_kl"] == pytest.approx(losses(gkd_runs / "two")[-1]["val_kl"], rel=LOSS_RTOL)
    assert _max_weight_diff(gkd_runs / "two" / "child", work / "child") < WEIGHT_ATOL


def test_crafted_dcp_metadata_is_refused_without_running_it(tmp_path):
    """DCP's .metadata is a pickle: one that would call a function is refused, not run."""
    from puzzlenas.training.state import _SafeReader

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PuzzleError, match="refused"):
        _SafeReader(tmp_path).read_metadata()
    assert not (tmp_path / "pwned").exists()


def test_one_optimizer_section_serves_bld_and_gkd():
    from puzzlenas.config import config_from_dict

    cfg = config_from_dict({"bld": {"optim": {"lr": 3e-4}}, "gkd": {"optim": {"grad_clip": 0.5}}})
    assert type(cfg.bld.optim) is type(cfg.gkd.optim)
    assert cfg.bld.optim.lr == 3e-4 and cfg.gkd.optim.lr == 5e-5 and cfg.gkd.optim.grad_clip == 0.5
    old = config_from_dict({"bld": {"lr": 2e-4, "warmup_fraction": 0.1}, "gkd": {"lr": 1e-3}})  # keys before `optim`
    assert (old.bld.optim.lr, old.bld.optim.warmup_fraction, old.gkd.optim.lr) == (2e-4, 0.1, 1e-3)
    with pytest.raises(PuzzleError, match="bld: Value error, lr is set twice"):
        config_from_dict({"bld": {"lr": 2e-4, "optim": {"lr": 1e-4}}})
