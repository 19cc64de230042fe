"""A model's layers split over two torchrun ranks (model/split.py), driven from rank 0, against the
whole model in one process: the parent writing its distillation text, perplexity, KL and agreement
of a child, lm-eval loglikelihoods.

Tolerance: none. Every rank runs the layers one process runs, on the same tensors, one thread
each, in fp32; what comes back equals one process's result bit for bit (measured: logits differ by
exactly 0.0, the sampled tokens are the same, the metrics are equal floats).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_distributed import finish

from puzzlenas.errors import PuzzleError

WORKER = Path(__file__).with_name("split_worker.py")


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """tests/split_worker.py on 2 gloo processes, once for the module: what rank 0 wrote."""
    import os
    import subprocess

    out = tmp_path_factory.mktemp("split") / "result.json"
    exe = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(exe), "--nproc-per-node", "2", "--standalone", str(WORKER),
                             str(out), "--lm-eval"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=WORKER.parent)
    log = finish(proc)
    return json.loads(out.read_text()), log


def test_split_logits_equal_one_process(split_run):
    """Plain, right-padded (attention mask) and KV-cached decoding (the cache handle returned, or
    the caller's own cache object passed at every step), for the parent (layers 0-1 on rank 0,
    layer 2 on rank 1) and a child whose layer 1 is pruned (its cache slots differ; its pipeline
    starts on rank 1, which gets the ids from rank 0, and ends on rank 0)."""
    r, log = split_run
    # the parent (model 0) starts on rank 0, the child (model 1) on rank 1 and ends on rank 0
    for line in ("rank 0 holds layers 0-1 + embedding of model 0", "rank 1 holds layers 2-2 + LM head of model 0",
                 "rank 1 holds layers 0-1 + embedding of model 1", "rank 0 holds layers 2-2 + LM head of model 1"):
        assert line in log
    for model in ("parent_logits", "child_logits"):
        assert r[model] == {"plain": 0.0, "padded": 0.0, "decode": 0.0, "decode_given_cache": 0.0}
    assert r["params"][0] == r["params"][1]  # the whole model's count, not rank 0's share


def test_split_parent_generates_the_same_tokens(split_run):
    """data.generate_sequences through the split parent: the same sequences (seed 3, batches of 3)."""
    split, whole = split_run[0]["generated"]
    assert len(split) == 5 and all(len(s) == 12 for s in split)
    assert split == whole


def test_split_perplexity_and_kl_equal_one_process(split_run):
    split, whole = split_run[0]["perplexity"]
    assert split == whole and split["tokens"] == 299
    split, whole = split_run[0]["kl"]  # the child split too: both models of KL(parent || child)
    assert split == whole and split["kl"] > 0 and split["tokens"] == 5 * 23


def test_split_lm_eval_loglikelihoods_equal_one_process(split_run):
    """lm-eval's HFLM given the SplitLM object, batches of 2 with padding: the same loglikelihoods."""
    split, whole = split_run[0]["lm_eval"]
    assert len(split) == 5 and split == whole


def test_torchrun_run_refuses_a_stage_that_does_not_split(tmp_path):
    from puzzlenas.config import config_from_dict
    from puzzlenas.pipeline import run_split

    cfg = config_from_dict({})
    with pytest.raises(PuzzleError, match="set eval.parallel=layers"):
        run_split(cfg, tmp_path, "eval", lambda: None)


def _tiny_workdir_config(tmp_path: Path) -> Path:
    """A tiny parent with its tokenizer, a pruned child checkpoint, and a config whose data the
    parent writes itself: cfg.yaml's path."""
    import yaml
    from conftest import SHARED_DATA, make_tiny_parent, make_tiny_tokenizer, pruned_choices

    from puzzlenas.checkpoint import convert_parent
    from puzzlenas.checkpoint.io import save_checkpoint
    from puzzlenas.realize import assemble_child

    parent = make_tiny_parent("llama")
    parent.save_pretrained(tmp_path / "parent")
    make_tiny_tokenizer().save_pretrained(tmp_path / "parent")
    decilm = convert_parent(parent)
    save_checkpoint(assemble_child(decilm, pruned_choices(decilm.config)), tmp_path / "child")
    # the start of WikiText-2's test file: tokenizing all of it takes 12 s per model with the tiny tokenizer
    wiki = tmp_path / "eval-data" / "wikitext-2-raw" / "wiki.test.raw"
    wiki.parent.mkdir(parents=True)
    wiki.write_text((SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text()[:4000])
    raw = {"parent": str(tmp_path / "parent"), "data": {"seq_len": 32, "generate_sequences": 24, "val_sequences": 8},
           "eval": {"task_data_dir": str(tmp_path / "eval-data"), "tasks": [], "ppl_context": 64, "ppl_max_tokens": 256,
                    "kl_sequences": 4, "batch_size": 3, "speed_repeats": 1},
           "costs": {"scenario": {"batch_size": 1, "prompt_len": 8, "generate_len": 4}}, "target": {"engine": "torch"}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "cfg.yaml"


def _one_thread(fn):
    """`fn()` on one thread, as the torchrun workers run (OMP_NUM_THREADS=1): the same float sums."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


def test_torchrun_run_only_data_with_the_parent_split_writes_one_process_tokens(tmp_path):
    """`torchrun -m puzzlenas run --only data` with data.parallel=layers: the parent writes its
    distillation text split over 2 ranks; the token cache is one process's, byte for byte, with the
    same stage fingerprint (a later stage takes it as done)."""
    from test_distributed import torchrun

    from puzzlenas.config import load_config
    from puzzlenas.pipeline import run_pipeline

    cfg = _tiny_workdir_config(tmp_path)
    two = torchrun(["run", str(cfg), "--only", "data", "--quiet", "--workdir", str(tmp_path / "two"),
                    "--set", "data.parallel=layers"])
    _one_thread(lambda: run_pipeline(load_config(cfg), tmp_path / "one", only="data", progress=False))
    assert "data.parallel=layers: rank 1 holds layers 2-2 + LM head of model 0" in finish(two)
    tokens = {w: sorted((tmp_path / w / "data").glob("tokens-*.safetensors")) for w in ("one", "two")}
    assert [p.name for p in tokens["one"]] == [p.name for p in tokens["two"]] and len(tokens["one"]) == 1
    assert tokens["one"][0].read_bytes() == tokens["two"][0].read_bytes()
    marker = {w: json.loads((tmp_path / w / "stages" / "data.json").read_text()) for w in ("one", "two")}
    assert marker["one"]["fingerprint"] == marker["two"]["fingerprint"]


def test_torchrun_eval_with_parent_and_child_split_equals_one_process(tmp_path):
    """`torchrun -m puzzlenas eval CHILD` with eval.parallel=layers (parent and child split over 2
    ranks): one process's perplexities, KL, agreement and parameter counts; speed timed split."""
    import shutil

    from test_distributed import torchrun

    from puzzlenas.cli import main
    from puzzlenas.config import load_config
    from puzzlenas.pipeline import run_pipeline

    cfg = _tiny_workdir_config(tmp_path)
    run_pipeline(load_config(cfg), tmp_path / "one", only="data", progress=False)  # the validation sequences
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    ev = ["eval", str(tmp_path / "child"), "--config", str(cfg), "--no-lm-eval"]
    two = torchrun([*ev, "--workdir", str(tmp_path / "two"), "--set", "eval.parallel=layers"])
    assert _one_thread(lambda: main([*ev, "--workdir", str(tmp_path / "one")])) == 0
    assert "eval.parallel=layers: rank 0 holds layers 2-2 + LM head of model 1" in finish(two)
    report = {w: json.loads((tmp_path / w / "eval" / "results.json").read_text()) for w in ("one", "two")}
    for model in ("parent", "child"):
        a, b = report["one"]["models"][model], report["two"]["models"][model]
        assert (a["params"], a["wikitext2"], a["kl"], a["agreement"]) == (b["params"], b["wikitext2"], b["kl"], b["agreement"])
    assert report["two"]["models"]["child"]["kl"] > 0 and report["two"]["models"]["parent"]["kl"] == 0
    assert report["one"]["engine"] == "torch" and report["two"]["engine"] == "torch, layers split over 2 ranks"


def test_torchrun_bld_asks_for_the_split_data_stage_first(tmp_path):
    """data.parallel=layers and no tokens cached: `torchrun ... bld` (its data preparation) says
    which command writes them, instead of generating with the whole parent on rank 0."""
    from puzzlenas.cli import _prepare_on_ranks
    from puzzlenas.config import load_config

    cfg = load_config(_tiny_workdir_config(tmp_path), ["data.parallel=layers"])
    with pytest.raises(PuzzleError, match="run `torchrun --nproc-per-node N -m puzzlenas run CONFIG --only data` first"):
        _prepare_on_ranks(cfg, tmp_path / "w", 0)
