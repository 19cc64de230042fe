"""The parent's own distillation text: the sampler draws from the parent's distribution, and the
parent writes in the precision data.dtype names.

    python -m pytest -q tests/test_generation.py
"""

from __future__ import annotations

import pytest
import torch

from puzzlenas.data import generate_sequences, prepare_data, sample_tokens, writer_model


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_tokens_follow_the_softmax_and_never_draw_a_zero_probability_token(temperature):
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, float("-inf"), 0.0, 3.0, -3.0])
    rows = 40_000
    draws = sample_tokens(logits.expand(rows, -1), temperature, torch.Generator().manual_seed(0))
    assert draws.shape == (rows, 1) and draws.dtype == torch.long

    counts = torch.bincount(draws[:, 0], minlength=len(logits)).double()
    p = torch.softmax(logits.double() / temperature, dim=0)
    se = (p * (1 - p) / rows).sqrt()
    assert counts[4] == 0  # probability 0
    assert ((counts / rows - p).abs() <= 5 * se + 1e-12).all(), (counts / rows, p)
    # the same seed, the same draws
    again = sample_tokens(logits.expand(rows, -1), temperature, torch.Generator().manual_seed(0))
    assert torch.equal(again, draws)


def test_a_row_with_one_possible_token_always_draws_it():
    logits = torch.full((64, 10), float("-inf"))
    logits[:, 9] = 0.0  # the last id: no rounding of the cumulative sum may run past it
    assert (sample_tokens(logits, 1.0, torch.Generator().manual_seed(1)) == 9).all()


def _parent():
    from conftest import make_tiny_parent

    from puzzlenas.checkpoint import convert_parent

    return convert_parent(make_tiny_parent("llama"))


def test_data_dtype_picks_the_writer_and_an_explicit_precision_gets_its_own_cache(tmp_path):
    """data.dtype=bfloat16: a bf16 copy of the parent writes (the parent itself stays fp32), and its
    text is cached under its own key; float32 (the default) writes with the parent as it is."""
    from conftest import make_tiny_tokenizer

    from puzzlenas.config import DataConfig

    parent, tok = _parent(), make_tiny_tokenizer()
    assert writer_model(DataConfig(), parent) is parent
    writer = writer_model(DataConfig(dtype="bfloat16"), parent)
    assert writer is not parent and {p.dtype for p in writer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in parent.parameters()} == {torch.float32}
    seqs = generate_sequences(writer, None, n=3, seq_len=6, temperature=1.0, seed=0)
    assert seqs.shape == (3, 6) and (seqs[:, 0] == parent.config.bos_token_id).all()

    made = {}
    for dtype in ("float32", "bfloat16", "float32"):
        cfg = DataConfig(seq_len=8, generate_sequences=12, val_sequences=4, dtype=dtype)
        data = prepare_data(cfg, tok, tmp_path, model=parent, model_fingerprint="tiny")
        made.setdefault(dtype, data.fingerprint)
        assert data.fingerprint == made[dtype]  # the second float32 call reads its cache
    assert len(list((tmp_path / "data").glob("tokens-*.safetensors"))) == 2


def test_the_filled_cache_decodes_what_the_dynamic_cache_decodes():
    """Decoding with keys and values written in place (FilledKVCache) gives the logits that
    transformers' DynamicCache gives, step for step, and its capacity is enforced."""
    from transformers.cache_utils import DynamicCache

    from puzzlenas.data import FilledKVCache

    parent = _parent()
    ids = torch.randint(3, parent.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    caches = {"filled": FilledKVCache(9), "dynamic": DynamicCache()}
    for t in range(ids.shape[1]):
        step = ids[:, : t + 1] if t == 0 else ids[:, t : t + 1]
        logits = {name: parent(step, cache=cache, use_cache=True).logits for name, cache in caches.items()}
        assert torch.equal(logits["filled"], logits["dynamic"]), t
    full = parent(ids).logits[:, -1]
    torch.testing.assert_close(logits["filled"][:, -1], full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="capacity of 9"):
        parent(ids[:, :1], cache=caches["filled"], use_cache=True)
