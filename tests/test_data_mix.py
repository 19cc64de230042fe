"""data.generated_fraction: the parent's own text mixed with a corpus, by a ratio of sequences.

    python -m pytest -q tests/test_data_mix.py
"""

from __future__ import annotations

import pytest
import yaml

from puzzlenas.config import config_from_dict, load_config
from puzzlenas.errors import PuzzleError


def _prepare(cfg_path, work, overrides):
    from puzzlenas.checkpoint.parent import prepare_parent
    from puzzlenas.data import prepare_data

    cfg = load_config(cfg_path, overrides)
    parent, tokenizer, fp = prepare_parent(cfg.parent, work)
    return cfg, tokenizer, prepare_data(cfg.data, tokenizer, work, model=parent, model_fingerprint=fp)


def _generated(data, bos: int) -> tuple[int, int]:
    """(sequences the parent wrote, all sequences): the parent's start with BOS, the corpus's never do
    (its text is tokenized without special tokens)."""
    rows = [data.train[i : i + 1] for i in range(len(data.train))] + [data.val]
    return sum(int((r[:, 0] == bos).sum()) for r in rows), sum(len(r) for r in rows)


@pytest.mark.parametrize("fraction", [0.25, 0.5])
def test_the_mix_has_the_stated_fraction_and_its_own_fingerprint(tiny_run, tmp_path, fraction):
    from puzzlenas.pipeline import stage_fingerprints

    mix = [f"data.generated_fraction={fraction}", "data.generate_sequences=16"]
    cfg, tok, data = _prepare(tiny_run, tmp_path / "mix", mix)
    generated, total = _generated(data, tok.bos_token_id)
    assert generated > 0 and total > generated
    assert abs(generated - fraction * total) <= 1, (generated, total)
    assert generated <= 16 and total <= cfg.data.max_train_sequences + cfg.data.val_sequences
    assert "mixed" in data.source

    _, _, again = _prepare(tiny_run, tmp_path / "again", mix)  # deterministic: the same tokens elsewhere
    assert again.fingerprint == data.fingerprint
    plain_cfg, _, plain = _prepare(tiny_run, tmp_path / "plain", [])
    assert _generated(plain, tok.bos_token_id)[0] == 0
    assert plain.fingerprint != data.fingerprint
    assert stage_fingerprints(plain_cfg, "x")["data"] != stage_fingerprints(cfg, "x")["data"]


def test_a_small_corpus_shrinks_the_generated_part_to_keep_the_ratio(tiny_run, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Down the rabbit hole, and what Alice found there. " * 12)  # ~19 sequences of 32 characters
    cfg, tok, data = _prepare(tiny_run, tmp_path / "w", [f"data.path={short}", "data.generated_fraction=0.5",
                                                         "data.generate_sequences=64", "data.val_sequences=4"])
    generated, total = _generated(data, tok.bos_token_id)
    assert total < 40 and abs(generated - 0.5 * total) <= 1, (generated, total)


def test_mix_config_errors_are_one_line(tiny_run):
    raw = yaml.safe_load(tiny_run.read_text())
    with pytest.raises(PuzzleError) as exc:
        config_from_dict({**raw, "data": {"generated_fraction": 0.5}}, "cfg.yaml")
    assert "generated_fraction" in str(exc.value) and "data.path" in str(exc.value) and "\n" not in str(exc.value)
    for bad in (0, 1, 1.5):
        with pytest.raises(PuzzleError, match=r"cfg.yaml: data.generated_fraction: "):
            config_from_dict({**raw, "data": {**raw["data"], "generated_fraction": bad}}, "cfg.yaml")
