"""The token cache read by position: same rows and fingerprint as the in-memory tensors, old int64
caches still read, and reading batches does not bring the training set into memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from puzzlenas.data.cache import TokenSequences, read_token_cache, write_token_cache
from puzzlenas.errors import PuzzleError
from puzzlenas.utils import atomic_save_safetensors, fingerprint


def _rows(n, seq_len, vocab, seed):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, vocab, (n, seq_len))).long()


@pytest.mark.parametrize("vocab, stored", [(99, "U16"), (128_256, "U32")])
def test_rows_and_fingerprint_equal_the_in_memory_tensors(tmp_path, vocab, stored):
    train, val = _rows(1000, 12, vocab, 0), _rows(7, 12, vocab, 1)
    path = tmp_path / "tokens-x.safetensors"
    chunks = [train[i : i + 130] for i in range(0, 1000, 130)]  # streamed in uneven chunks
    fp = write_token_cache(path, chunks, 1000, 12, val, "test", max_id=vocab - 1)
    assert fp == fingerprint(train, val)  # the same identity an in-memory cache had: libraries stay valid
    got, got_val, got_fp = read_token_cache(path)
    assert isinstance(got, TokenSequences) and got.dtype == stored and got_fp == fp
    assert got.shape == (1000, 12) and len(got) == 1000 and got.numel() == 12000
    assert torch.equal(got_val, val) and got_val.dtype == torch.int64
    idx = torch.tensor([999, 3, 3, 4, 5, 500, 0, -1])  # repeats, a run, negative
    assert torch.equal(got[idx], train[idx]) and got[idx].dtype == torch.int64
    assert torch.equal(got[10:20], train[10:20]) and torch.equal(got[::97], train[::97])
    assert torch.equal(got[-2], train[-2]) and torch.equal(got[np.int64(7)], train[7])
    assert torch.equal(got.to("cpu"), train)
    with pytest.raises(IndexError):
        got[torch.tensor([1000])]
    from safetensors.torch import load_file  # a valid safetensors file for any other reader

    assert torch.equal(load_file(path)["train"].long(), train)


def test_a_cache_written_before_as_int64_reads_with_its_old_fingerprint(tmp_path):
    train, val = _rows(50, 8, 99, 2), _rows(4, 8, 99, 3)
    path = tmp_path / "tokens-old.safetensors"
    atomic_save_safetensors({"train": train, "val": val}, path, {"source": "old"})  # the previous writer
    got, got_val, fp = read_token_cache(path)
    assert got.dtype == "I64" and fp == fingerprint(train, val)
    assert torch.equal(got[torch.arange(50).flip(0)], train.flip(0)) and torch.equal(got_val, val)


def test_damaged_caches_are_one_line_errors(tmp_path):
    path = tmp_path / "tokens-bad.safetensors"
    path.write_bytes(b"\x05")
    with pytest.raises(PuzzleError, match="not a token cache"):
        read_token_cache(path)
    write_token_cache(path, [_rows(20, 8, 99, 0)], 20, 8, _rows(2, 8, 99, 1), "t", max_id=98)
    path.write_bytes(path.read_bytes()[:-40])  # cut short
    with pytest.raises(PuzzleError, match="truncated") as info:
        read_token_cache(path)
    assert "\n" not in str(info.value)
    with pytest.raises(PuzzleError, match="announced"):
        write_token_cache(tmp_path / "t2.safetensors", [_rows(5, 8, 99, 0)], 6, 8, _rows(1, 8, 99, 0), "t")
    assert not list(tmp_path.glob(".t2*"))  # no half-written file left


def _rss_anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status")


def test_drawing_batches_keeps_the_training_set_on_disk(tmp_path):
    """160 MB of tokens; a few hundred random batches across all of it must not grow the process's
    own memory by more than a few batches (a whole-file load would add 160 MB or more)."""
    n, seq_len = 10_000, 4096  # uint32: 164 MB
    path = tmp_path / "tokens-big.safetensors"
    rng = np.random.default_rng(0)
    chunks = (rng.integers(0, 128_000, (1000, seq_len), dtype=np.uint32) for _ in range(n // 1000))
    write_token_cache(path, chunks, n, seq_len, np.zeros((2, seq_len), dtype=np.int64), "t", max_id=127_999)
    train, _, _ = read_token_cache(path)
    before = _rss_anon()
    total = 0
    for _ in range(300):
        batch = train[torch.from_numpy(rng.integers(0, n, 16))]
        total += int(batch[:, 0].sum())
    grown = _rss_anon() - before
    assert grown < 40 * 2**20, grown
    assert batch.shape == (16, seq_len) and batch.dtype == torch.int64


def test_prepare_data_serves_the_cache_by_position(tmp_path):
    from conftest import make_tiny_tokenizer

    from puzzlenas.config import DataConfig
    from puzzlenas.data import prepare_data

    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 400)
    cfg = DataConfig(path=str(text), seq_len=16, val_sequences=4)
    tok = make_tiny_tokenizer()
    first = prepare_data(cfg, tok, tmp_path / "w")
    again = prepare_data(cfg, tok, tmp_path / "w")
    assert isinstance(first.train, TokenSequences) and first.train.dtype == "U16"
    assert again.fingerprint == first.fingerprint == fingerprint(first.train[:], first.val)
    idx = torch.tensor([5, 0, 17])
    assert torch.equal(first.train[idx], again.train[idx])


def _old_prepare(docs, tok, cfg):
    """What prepare_data did before streaming: every token in memory, cut, shuffled, split."""
    ids = []
    for doc in docs:
        ids.extend(tok(doc, add_special_tokens=False).input_ids)
        ids.append(tok.eos_token_id)
        if len(ids) >= (cfg.max_train_sequences + cfg.val_sequences) * cfg.seq_len:
            break
    n = len(ids) // cfg.seq_len
    seqs = torch.tensor(ids[: n * cfg.seq_len]).view(n, cfg.seq_len)[: cfg.max_train_sequences + cfg.val_sequences]
    seqs = seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(cfg.seed))]
    return seqs[cfg.val_sequences :], seqs[: cfg.val_sequences]


@pytest.mark.parametrize("block", [None, 200])  # None: files read whole; 200 bytes: the big-file path
def test_streamed_tokenization_gives_the_old_sequences(tmp_path, monkeypatch, block):
    from conftest import make_tiny_tokenizer

    import puzzlenas.data as data_mod
    from puzzlenas.config import DataConfig

    if block:
        monkeypatch.setattr(data_mod, "BLOCK_BYTES", block)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"line {i}: the cat sat on the mat.\n" for i in range(60)))
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": f"doc {i} a dog ran"}) + "\n" for i in range(80)))
    tok = make_tiny_tokenizer()
    for max_train in (30, 10_000):  # stops early / uses everything
        cfg = DataConfig(path=str(corpus), seq_len=16, val_sequences=4, max_train_sequences=max_train)
        got = data_mod.prepare_data(cfg, tok, tmp_path / f"w{max_train}")
        docs = ["".join(f"line {i}: the cat sat on the mat.\n" for i in range(60))]
        docs += [f"doc {i} a dog ran" for i in range(80)]
        want_train, want_val = _old_prepare(docs, tok, cfg)
        # with blocks the file is tokenized a block at a time: for this per-character tokenizer the same ids
        assert torch.equal(got.train[:], want_train) and torch.equal(got.val, want_val)
        assert got.fingerprint == fingerprint(want_train, want_val)
        assert not list((tmp_path / f"w{max_train}" / "data").glob(".*"))  # no spool left behind


def test_a_big_file_is_read_in_blocks_with_errors_naming_the_line(tmp_path, monkeypatch):
    import puzzlenas.data as data_mod

    monkeypatch.setattr(data_mod, "BLOCK_BYTES", 64)
    text = "".join(f"row {i} some words here\n" for i in range(40))
    f = tmp_path / "big.txt"
    f.write_text(text)
    blocks = list(data_mod.iter_documents(f))  # pieces of one document, closed by an empty piece
    assert len(blocks) > 5 and "".join(blocks) == text and all(b.endswith("\n") for b in blocks[:-1])
    assert blocks[-1] == "" and not isinstance(blocks[-1], data_mod._Continued)
    f.write_bytes(text.encode() + "caf\u00e9\n".encode("latin-1"))
    with pytest.raises(PuzzleError, match=r"big.txt:41: not UTF-8"):
        list(data_mod.iter_documents(f))
    j = tmp_path / "big.jsonl"
    j.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(30)) + "{oops\n")
    with pytest.raises(PuzzleError, match=r"big.jsonl:31: not a JSON line"):
        list(data_mod.iter_documents(j))
