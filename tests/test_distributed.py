"""Sharded training on two CPU processes (gloo): FSDP2 GKD against one process, sharded
checkpoints resumed after SIGKILL, the shared training config, and BLD with the parent's layers
split over the ranks.

Tolerances: two processes sum gradients in another order than one, so fp32 results part in the
last bits after the first step. Measured over 8 steps: losses within 1.6e-5 relative (KL, a small
difference of log-probabilities; cosine within 1e-6), weights within 2.1e-5 absolute. The tests
allow 1e-4 for both.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import GKD_CFG, make_tiny_parent, max_weight_diff, prepare_gkd_workdir, start_cli
from test_bld import TINY_CFG, _assert_same_library

from puzzlenas.errors import PuzzleError

LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4
OPTS = ["--set", "gkd.tokens=1024", "--set", "gkd.checkpoint_every=2", "--set", "gkd.val_every=4", "--quiet"]


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None) -> subprocess.Popen:
    """`torchrun -m puzzlenas ARGS` on `nproc` CPU processes (extra environment `env`)."""
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe), "--nproc-per-node", str(nproc), "--standalone", "-m", "puzzlenas", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
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
    prepare_gkd_workdir(tmp / "one", raw)
    for name in ("two", "killed", "resharded", "offload"):  # the same parent, data and realized child
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
    assert max_weight_diff(gkd_runs / "one" / "child", gkd_runs / "two" / "child") < WEIGHT_ATOL
    assert not (gkd_runs / "two" / "gkd" / "sharded").exists()  # states are gone once the child is saved


def test_fsdp2_gkd_with_the_student_offloaded_to_host_ram_matches_one_process(gkd_runs):
    """gkd.offload=true (CPUOffloadPolicy): the same loss curve and child as one process."""
    finish(torchrun(["distill", str(gkd_runs / "cfg.yaml"), "--workdir", str(gkd_runs / "offload"), *OPTS,
                     "--set", "gkd.offload=true"]))
    one, off = losses(gkd_runs / "one"), losses(gkd_runs / "offload")
    assert [e["step"] for e in one] == [e["step"] for e in off]
    for a, b in zip(one, off):
        for key in ("kl", "cos", "val_kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=LOSS_RTOL), (a, b)
    assert max_weight_diff(gkd_runs / "one" / "child", gkd_runs / "offload" / "child") < WEIGHT_ATOL


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
    assert max_weight_diff(gkd_runs / "two" / "child", work / "child") < WEIGHT_ATOL


def test_sharded_checkpoint_resumes_in_one_process(gkd_runs):
    """Two processes killed while saving step 6 (step 4 is the last complete state); one process
    reads the two ranks' shards back and finishes the run like the uninterrupted one."""
    work = gkd_runs / "resharded"
    args = ["distill", str(gkd_runs / "cfg.yaml"), "--workdir", str(work), *OPTS]
    killed = torchrun(args, env={"PUZZLENAS_KILL_AT": "atomic_write:step-000006"})
    assert killed.wait(timeout=300) != 0
    assert sorted(p.name for p in (work / "gkd" / "sharded").iterdir()) == [".step-000006.tmp", "step-000004"]
    out = finish(start_cli(args))
    assert "resuming GKD from step 4/8" in out
    assert not (work / "gkd" / "sharded").exists()
    assert max_weight_diff(gkd_runs / "one" / "child", work / "child") < WEIGHT_ATOL


def test_activation_checkpointing_trains_the_same_child(tmp_path):
    """Recomputing each layer in the backward pass changes memory, not results (bit for bit on CPU)."""
    from puzzlenas import gkd
    from puzzlenas.checkpoint.io import load_checkpoint
    from puzzlenas.config import config_from_dict

    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    raw = {"parent": str(tmp_path / "parent"), **GKD_CFG, "gkd": {**GKD_CFG["gkd"], "tokens": 512}}
    cfg, parent, data = prepare_gkd_workdir(tmp_path / "plain", raw)
    shutil.copytree(tmp_path / "plain", tmp_path / "ckpt")
    gkd.run(cfg, tmp_path / "plain", parent, data, progress=False)
    raw["gkd"]["activation_checkpointing"] = True
    gkd.run(config_from_dict(raw), tmp_path / "ckpt", parent, data, progress=False)
    a, b = (load_checkpoint(tmp_path / w / "child").state_dict() for w in ("plain", "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in load_checkpoint(tmp_path / "plain" / "realized" / "solution0").state_dict().items())


def test_crafted_dcp_metadata_is_refused_without_running_it(tmp_path):
    """DCP's .metadata is a pickle: one that would call a function is refused, not run."""
    from puzzlenas.training.state import _SafePlanner, _SafeReader

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import pickle

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(PuzzleError, match="refused"):
        _SafeReader(tmp_path).read_metadata()
    # a non-tensor item (DCP itself would torch.load it with weights_only=False)
    planner = _SafePlanner()
    planner.flatten_state_dict, planner.state_dict = False, {}
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="optim.param_groups.0.lr"))
    buf = io.BytesIO()
    torch.save({"lr": Evil()}, buf)
    with pytest.raises(PuzzleError, match="refused"):
        planner.load_bytes(item, io.BytesIO(buf.getvalue()))
    assert not (tmp_path / "pwned").exists()
    torch.save({"lr": 1e-3, "betas": (0.9, 0.999)}, buf := io.BytesIO())  # plain data still loads
    planner.load_bytes(item, io.BytesIO(buf.getvalue()))
    assert planner.state_dict["optim.param_groups.0.lr"] == {"lr": 1e-3, "betas": (0.9, 0.999)}


def test_one_optimizer_section_serves_bld_and_gkd():
    from puzzlenas.config import config_from_dict

    cfg = config_from_dict({"bld": {"optim": {"lr": 3e-4}}, "gkd": {"optim": {"grad_clip": 0.5}}})
    assert type(cfg.bld.optim) is type(cfg.gkd.optim)
    assert cfg.bld.optim.lr == 3e-4 and cfg.gkd.optim.lr == 5e-5 and cfg.gkd.optim.grad_clip == 0.5
    old = config_from_dict({"bld": {"lr": 2e-4, "warmup_fraction": 0.1}, "gkd": {"lr": 1e-3}})  # keys before `optim`
    assert (old.bld.optim.lr, old.bld.optim.warmup_fraction, old.gkd.optim.lr) == (2e-4, 0.1, 1e-3)
    with pytest.raises(PuzzleError, match="bld: Value error, lr is set twice"):
        config_from_dict({"bld": {"lr": 2e-4, "optim": {"lr": 1e-4}}})


@pytest.fixture(scope="module")
def bld_one(tmp_path_factory):
    """A tiny parent, its config, and the library one process trains (16 steps)."""
    tmp = tmp_path_factory.mktemp("bld")
    make_tiny_parent("llama").save_pretrained(tmp / "parent")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump({"parent": str(tmp / "parent"), **TINY_CFG}))
    args = ["bld", str(tmp / "cfg.yaml"), "--quiet", "--set", "bld.tokens=2048"]
    finish(start_cli([*args, "--workdir", str(tmp / "one")]))
    for name in ("two", "killed", "passes"):  # the same converted parent and data, no library
        shutil.copytree(tmp / "one", tmp / name, ignore=shutil.ignore_patterns("library"))
    return tmp, [*args, "--set", "bld.parallel=layers"]


def _records(workdir: Path) -> dict:
    return json.loads((workdir / "library" / "index.json").read_text())["blocks"]


def _parts_read(out: str, stage: str) -> dict[int, tuple[int, int, int]]:
    """rank -> (parameters it read from the parent's safetensors, the parent's, parameters it holds),
    from each rank's log line (cli._prepare_on_ranks)."""
    line = rf"{stage}\.parallel=layers: rank (\d+) read .* from its safetensors: ([\d,]+) of its ([\d,]+) parameters .*; holds ([\d,]+)"
    return {int(r): tuple(int(n.replace(",", "")) for n in counts) for r, *counts in re.findall(line, out)}


def _tensor_counts(parent_dir: Path) -> dict[str, int]:
    """Parameters of the converted parent by what holds them: "embed", "layer0", ..., "norm", "head"."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for f in parent_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as handle:
            for key in handle.keys():
                part = ("embed" if "embed_tokens" in key else "head" if key.startswith("lm_head") else
                        f"layer{key.split('.')[2]}" if ".layers." in key else "norm")
                counts[part] = counts.get(part, 0) + math.prod(handle.get_slice(key).get_shape())
    return counts


def test_bld_with_the_parents_layers_split_over_two_ranks_equals_one_rank(bld_one):
    """bld.parallel=layers: rank 0 holds layers 0-1, rank 1 layer 2 and gets its input from rank 0;
    every block equals the one a single process trains (the parent is frozen, so each block sees
    the same tensors, bit for bit)."""
    tmp, args = bld_one
    out = finish(torchrun([*args, "--workdir", str(tmp / "two")]))
    _assert_same_library(tmp / "one", tmp / "two", atol=0)
    # each rank read only its layers from the safetensors files (rank 0 also the embedding; BLD
    # makes no logits, so no rank reads the LM head), and holds just what it read
    c = _tensor_counts(tmp / "one" / "parent")
    whole = sum(c.values())
    assert _parts_read(out, "bld") == {0: (c["embed"] + c["layer0"] + c["layer1"], whole, c["embed"] + c["layer0"] + c["layer1"]),
                                       1: (c["layer2"], whole, c["layer2"])}
    one, two = _records(tmp / "one"), _records(tmp / "two")
    assert one.keys() == two.keys()
    assert all(rec.get("val_nmse") == two[name].get("val_nmse") for name, rec in one.items())
    # each rank's loop time is on its own blocks: layers 0-1 share one, layer 2 has the other (not
    # compared: the ranks run in lockstep, so their loop times can agree to the millisecond)
    seconds = {layer: {r["train_seconds"] for r in two.values() if r["layer"] == layer and r.get("file")}
               for layer in range(3)}
    assert len(seconds[0] | seconds[1]) == 1 and len(seconds[2]) == 1


def test_layer_split_bld_keeps_initializations_like_one_rank(bld_one):
    """At an lr that overshoots some blocks, both ranks run the passes that initialize them again
    (each rank's own blocks, the other relaying), and the library equals one process's."""
    tmp, args = bld_one
    hot = ["--set", "bld.lr=0.3"]  # TINY_CFG sets the old place
    for name in ("hot-one", "hot-two"):
        shutil.copytree(tmp / "one", tmp / name, ignore=shutil.ignore_patterns("library"))
    finish(start_cli([*args[:-2], *hot, "--workdir", str(tmp / "hot-one")]))
    finish(torchrun([*args, *hot, "--workdir", str(tmp / "hot-two")]))
    one, two = _records(tmp / "hot-one"), _records(tmp / "hot-two")
    kept = {name for name, r in one.items() if r.get("kept_initialization")}
    assert kept and kept == {name for name, r in two.items() if r.get("kept_initialization")}
    _assert_same_library(tmp / "hot-one", tmp / "hot-two", atol=0)


def test_layer_split_bld_in_passes_equals_one_rank(bld_one):
    """bld.alternatives_per_pass=4 with the layers split: rank 0 trains its 10 alternatives in 3
    passes, rank 1 its 5 in 2 and relays rank 0's third pass with nothing of its own to train."""
    tmp, args = bld_one
    out = finish(torchrun([*args, "--set", "bld.alternatives_per_pass=4", "--workdir", str(tmp / "passes")]))
    assert "BLD in 3 passes" in out and "BLD in 2 passes" in out
    _assert_same_library(tmp / "one", tmp / "passes", atol=0)
    assert not list((tmp / "passes" / "library" / "state").glob("*.pt"))


def test_layer_split_bld_resumes_after_sigkill(bld_one):
    """Killed mid-run, then rank 1's state lost too: rank 1 starts over while rank 0 resumes from
    its saved step, relaying rank 1's initialization passes and the steps it already trained; the
    run ends with the same blocks as one process."""
    tmp, args = bld_one
    work = tmp / "killed"
    proc = torchrun([*args, "--workdir", str(work)])
    state, killed_at, deadline = work / "library" / "state" / "rank1-of2-layers.pt", None, time.time() + 240
    while time.time() < deadline and proc.poll() is None and killed_at is None:
        try:
            step = torch.load(state, weights_only=True)["step"] if state.is_file() else 0
        except Exception:  # caught between write and rename
            step = 0
        if step >= 4:
            for pid in [*children(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
            killed_at = step
        time.sleep(0.02)
    proc.communicate()
    assert killed_at is not None and killed_at < 16, "the run ended before it could be killed midway"
    rank0 = torch.load(state.with_name("rank0-of2-layers.pt"), weights_only=True)["step"]
    state.unlink()
    assert rank0 >= 4  # rank 0 runs ahead of rank 1, which waits on its activations
    out = finish(torchrun([*args, "--workdir", str(work)]))
    assert f"resuming BLD from step {rank0}/16" in out
    _assert_same_library(tmp / "one", work, atol=0)


def test_layer_ranges_cover_the_parent_once():
    from puzzlenas.bld.pipeline import LayerPipeline
    from puzzlenas.checkpoint import convert_parent

    parent = convert_parent(make_tiny_parent("llama"))
    owned = [[i for i in range(3) if LayerPipeline(parent, r, 2).owns(i)] for r in range(2)]
    assert owned == [[0, 1], [2]]
    LayerPipeline(parent, 1, 2).drop_others(parent)
    assert [sum(p.numel() for p in layer.parameters()) > 0 for layer in parent.model.layers] == [False, False, True]
    with pytest.raises(PuzzleError, match="bld.parallel=layers: 4 torchrun processes for a parent of 3 layers"):
        LayerPipeline(parent, 0, 4)
    with pytest.raises(PuzzleError, match="score.parallel=layers: 4 torchrun processes"):
        LayerPipeline(parent, 0, 4, setting="score.parallel=layers")


def test_a_fresh_layer_split_generates_the_data_with_the_whole_parent_once(tmp_path, monkeypatch):
    """bld.parallel=layers on a fresh work directory with self-generated data: rank 0 converts the
    parent, finds its part cannot write the text (the first layer it lacks says so), generates it
    with the whole parent once, then keeps its part only. Parent and data equal one process's."""
    import puzzlenas.training as training
    from puzzlenas.checkpoint.io import ParentPart, PartialParentError
    from puzzlenas.cli import _prepare_on_ranks
    from puzzlenas.config import config_from_dict
    from puzzlenas.pipeline import load_context

    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    cfg = config_from_dict({"parent": str(tmp_path / "parent"), **TINY_CFG})
    monkeypatch.setattr(training, "rank_world", lambda: (0, 2))  # rank 0 of 2 (no process group: no barrier)
    parent, _, fp, data = _prepare_on_ranks(cfg, tmp_path / "split", 0, "bld")
    assert parent.loaded_part.part == ParentPart(0, 2, embedding=True, head=False)
    assert parent.loaded_part.params == sum(p.numel() for p in parent.parameters()) < parent.loaded_part.whole_params
    with pytest.raises(PartialParentError, match="layer 2 of the parent is not loaded in this process"):
        parent(torch.zeros(1, 4, dtype=torch.long))
    one = load_context(cfg, tmp_path / "one")
    assert fp == one.parent_fingerprint and data.fingerprint == one.data.fingerprint


SCORE_CFG = {**TINY_CFG,
             "search_space": {"attention": [1, "linear", "no_op"], "ffn": [1.0, 0.5, "linear", "no_op"],
                              "ffn_multiple_of": 8},
             "bld": {**TINY_CFG["bld"], "tokens": 256, "coupled": [{"layer": 1, "attention": 1, "ffn": 0.5},
                                                                   {"layer": 2, "attention": 1, "ffn": 0.5}]},
             "score": {"batch_size": 3}}  # 8 validation sequences: batches of 3, 3 and 2


def test_scoring_split_over_two_ranks_equals_one_process(tmp_path):
    """score.parallel=layers: rank 0 holds layers 0-1 and the embedding, rank 1 layer 2 and the LM
    head; an alternative of layer 0 or 1 is put in place on rank 0 and its damaged stream finishes
    on rank 1. With score.parallel=alternatives each rank holds the whole parent and scores half
    the alternatives. Both write the file one process writes, byte for byte (fp32: the same
    tensors, layer for layer; one thread in every process, as the workers run)."""
    from puzzlenas.config import load_config
    from puzzlenas.pipeline import run_pipeline

    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({"parent": str(tmp_path / "parent"), **SCORE_CFG}))
    cfg = str(tmp_path / "cfg.yaml")
    run_pipeline(load_config(cfg), tmp_path / "one", stages=["data", "bld"], progress=False)  # the library: an input
    for name in ("layers", "alternatives"):
        shutil.copytree(tmp_path / "one", tmp_path / name)
    layers = torchrun(["score", cfg, "--workdir", str(tmp_path / "layers"), "--quiet", "--set", "score.parallel=layers"])
    alts = torchrun(["score", cfg, "--workdir", str(tmp_path / "alternatives"), "--quiet"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the workers
    try:
        run_pipeline(load_config(cfg), tmp_path / "one", stages=["score"], progress=False)  # one process, here
    finally:
        torch.set_num_threads(threads)
    out = finish(layers)
    finish(alts)
    assert "rank 0 holds layers 0-1 + embedding:" in out and "rank 1 holds layers 2-2 + LM head:" in out
    # each rank read only what it holds from the parent's safetensors: rank 0 its layers and the
    # embedding, rank 1 its layer, the final norm and the LM head; together the parent, once
    c = _tensor_counts(tmp_path / "one" / "parent")
    whole, first, last = sum(c.values()), c["embed"] + c["layer0"] + c["layer1"], c["layer2"] + c["norm"] + c["head"]
    assert _parts_read(out, "score") == {0: (first, whole, first), 1: (last, whole, last)}
    assert first < whole and last < whole and first + last == whole
    scores = {name: json.loads((tmp_path / name / "scores" / "replace1.json").read_text())
              for name in ("one", "layers", "alternatives")}
    names = scores["one"]["scores"]
    assert len(names) == 26 and sum(".pair." in n for n in names) == 2
    assert scores["layers"] == scores["one"] and scores["alternatives"] == scores["one"]
    assert any(m["kl"] > 0 for m in names.values())
    # the stage marker of one process: a later `puzzlenas search` takes the split run's scores as done
    marker = {name: json.loads((tmp_path / name / "stages" / "score.json").read_text())["fingerprint"]
              for name in ("one", "layers")}
    assert marker["layers"] == marker["one"]


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A tiny parent's library (data + bld, one process) and the scores of one uninterrupted
    `puzzlenas score` run on it, saving its progress after every alternative."""
    from puzzlenas.config import load_config
    from puzzlenas.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("score")
    make_tiny_parent("llama").save_pretrained(tmp / "parent")
    (tmp / "cfg.yaml").write_text(yaml.safe_dump({"parent": str(tmp / "parent"), **SCORE_CFG}))
    run_pipeline(load_config(tmp / "cfg.yaml"), tmp / "base", stages=["data", "bld"], progress=False)
    args = ["score", str(tmp / "cfg.yaml"), "--quiet", "--set", "score.checkpoint_seconds=0"]
    shutil.copytree(tmp / "base", tmp / "one")
    finish(start_cli([*args, "--workdir", str(tmp / "one")]))
    assert not (tmp / "one" / "scores" / "replace1.partial").exists()  # gone once the scores are written
    return tmp, args


def _killed_then_resumed(scored, name: str, kill_at: str, run) -> str:
    """Score a copy of the library, SIGKILLed (PUZZLENAS_KILL_AT) right after it saved position
    `kill_at`, then again to the end; the second run's output."""
    tmp, args = scored
    work = tmp / name
    shutil.copytree(tmp / "base", work)
    killed = run([*args, "--workdir", str(work)], env={"PUZZLENAS_KILL_AT": f"score.state:{kill_at}"})
    out = killed.communicate(timeout=300)[0]
    assert killed.returncode != 0, out[-3000:]
    assert not (work / "scores" / "replace1.json").exists() and list((work / "scores" / "replace1.partial").iterdir())
    out = finish(run([*args, "--workdir", str(work)]))
    assert json.loads((work / "scores" / "replace1.json").read_text()) == json.loads(
        (tmp / "one" / "scores" / "replace1.json").read_text())
    assert not (work / "scores" / "replace1.partial").exists()
    return out


def test_scoring_resumes_mid_batch_after_sigkill(scored):
    """One process killed inside its second batch (3 of 3, 3 and 2 sequences), after the 5th
    alternative: the rerun takes up the sums, runs the parent over that batch again without
    counting it twice, scores only what is left and writes the uninterrupted run's file."""
    out = _killed_then_resumed(scored, "killed", "batch=1 done=5;", lambda a, env=None: start_cli(a, env=env))
    n = len(json.loads((scored[0] / "one" / "scores" / "replace1.json").read_text())["scores"])
    ran = re.search(r"scoring: (\d+) of (\d+) alternative runs done in this run, (\d+) taken up", out)
    runs, total, restored = map(int, ran.groups())
    assert f"resuming scoring at batch 1, alternative 5 of {total // 3}" in out
    assert restored == total // 3 + 5 and runs == total - restored and total < 3 * n


@pytest.mark.parametrize("parallel", ["layers", "alternatives"])
def test_scoring_under_torchrun_resumes_after_sigkill(scored, parallel):
    """Two ranks killed when a state file reached batch 2's first alternative. score.parallel=layers:
    the last rank holds the sums and the file, and every rank walks on from its position;
    =alternatives: each rank its own share and file. Both end with one process's file."""
    out = _killed_then_resumed(scored, parallel, "batch=2 done=1;",
                               lambda a, env=None: torchrun([*a, "--set", f"score.parallel={parallel}"], env=env))
    assert "resuming scoring at batch 2, alternative 1 of" in out
    assert re.search(r"scoring: \d+ of \d+ alternative runs done in this run, \d+ taken up", out)
