"""Run by tests/test_split.py under torchrun (2 gloo processes): a tiny parent and a pruned child,
split over the ranks (model/split.py), against whole copies of them on rank 0. Rank 0 writes what
both gave to the JSON file named by argv[1].

    torchrun --nproc-per-node 2 tests/split_worker.py OUT.json [--lm-eval]
"""

from __future__ import annotations

import copy
import json
import logging
import sys

import torch
from conftest import SHARED_DATA, make_tiny_parent, make_tiny_tokenizer, pruned_choices

from puzzlenas.checkpoint import convert_parent
from puzzlenas.data import generate_sequences
from puzzlenas.eval import kl_and_agreement, wikitext_perplexity
from puzzlenas.model.split import LayerSplit
from puzzlenas.realize import assemble_child
from puzzlenas.training import init_distributed, teardown


def build(key: str):
    """The same model on every rank, from seeds alone: "parent" or "child" (layer 1 pruned)."""
    parent = convert_parent(make_tiny_parent("llama")).eval()
    return parent if key == "parent" else assemble_child(parent, pruned_choices(parent.config)).eval()


def logits_checks(split_model, whole) -> dict:
    """Max |difference| of the logits: plain, with right padding, and decoding with a KV cache."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 80, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    out = {"plain": (split_model(ids, use_cache=False).logits - whole(ids, use_cache=False).logits).abs().max().item(),
           "padded": (split_model(ids, attention_mask=mask, use_cache=False).logits
                      - whole(ids, attention_mask=mask, use_cache=False).logits).abs().max().item()}
    steps = []
    a = split_model(ids[:, :5], use_cache=True)
    b = whole(ids[:, :5], use_cache=True)
    for t in range(5, 11):
        a = split_model(ids[:, t : t + 1], cache=a.past_key_values, use_cache=True)
        b = whole(ids[:, t : t + 1], cache=b.past_key_values, use_cache=True)
        steps.append((a.logits - b.logits).abs().max().item())
    out["decode"] = max(steps)
    # the caller's own cache object passed at every step, as engines/torch_engine.py times a model
    from transformers.cache_utils import DynamicCache

    mine, theirs = DynamicCache(), DynamicCache()
    steps = [(split_model(ids[:, :5], cache=mine, use_cache=True).logits
              - whole(ids[:, :5], cache=theirs, use_cache=True).logits).abs().max().item()]
    for t in range(5, 11):
        steps.append((split_model(ids[:, t : t + 1], cache=mine, use_cache=True).logits
                      - whole(ids[:, t : t + 1], cache=theirs, use_cache=True).logits).abs().max().item())
    out["decode_given_cache"] = max(steps)
    return out


def lm_eval_loglikelihoods(model, tokenizer) -> list:
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu")
    pairs = [("The cat sat on the", " mat."), ("Alice was", " beginning to get very tired"), ("Hello", " world"),
             ("(1, 2, 3)", " and 4"), ("No", "!")]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    return [list(r) for r in lm.loglikelihood(requests)]


def main() -> None:
    out_file, with_lm_eval = sys.argv[1], "--lm-eval" in sys.argv
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    init_distributed()
    split = LayerSplit(build, "eval.parallel=layers")
    if split.rank > 0:
        split.serve()
        teardown()
        return
    try:
        whole = {key: build(key) for key in ("parent", "child")}
        parent = split.share(copy.deepcopy(whole["parent"]), "parent")
        child = split.load("child")
        tok = make_tiny_tokenizer()
        text = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text()[:3000]
        ids = torch.randint(3, 80, (5, 24), generator=torch.Generator().manual_seed(2))
        r = {"params": [parent.num_parameters(), sum(p.numel() for p in whole["parent"].parameters())],
             "parent_logits": logits_checks(parent, whole["parent"]),
             "child_logits": logits_checks(child, whole["child"])}
        r["generated"] = [generate_sequences(m, tok, n=5, seq_len=12, temperature=1.0, seed=3, batch=3).tolist()
                          for m in (parent, whole["parent"])]
        r["perplexity"] = [wikitext_perplexity(m, tok, text, context=32, max_tokens=300, batch_size=3)
                           for m in (parent, whole["parent"])]
        r["kl"] = [kl_and_agreement(child, parent, ids, batch_size=2),
                   kl_and_agreement(whole["child"], whole["parent"], ids, batch_size=2)]
        if with_lm_eval:
            r["lm_eval"] = [lm_eval_loglikelihoods(m, tok) for m in (parent, whole["parent"])]
        split.free(child)
        with open(out_file, "w") as f:
            json.dump(r, f)
    finally:
        split.stop()
        teardown()


if __name__ == "__main__":
    main()
