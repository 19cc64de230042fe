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
from test_distributed import finish, free_port

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
    proc = subprocess.Popen([str(exe), "--nproc-per-node", "2", "--master-port", str(free_port()), str(WORKER),
                             str(out), "--lm-eval"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=WORKER.parent)
    log = finish(proc)
    return json.loads(out.read_text()), log


def test_split_logits_equal_one_process(split_run):
    """Plain, right-padded (attention mask) and KV-cached decoding, for the parent (layers 0-1 on
    rank 0, layer 2 on rank 1) and a child whose layer 1 is pruned (its cache slots differ)."""
    r, log = split_run
    assert "rank 0 holds layers 0-1 + embedding of model 0" in log and "rank 1 holds layers 2-2 + LM head of model 1" in log
    for model in ("parent_logits", "child_logits"):
        assert r[model] == {"plain": 0.0, "padded": 0.0, "decode": 0.0}
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
