"""Distillation data: text -> fixed-length token sequences, split and cached in the work directory.

Sources, by `data.path`:
  * a .txt file, a .jsonl file (one JSON object per line, `text_field`), a .parquet file, or a
    folder holding any of those (read in sorted order);
  * a Hugging Face dataset name ("wikitext:wikitext-2-raw-v1"), only when the hub is reachable;
  * None: the parent writes its own distillation text (sampled from BOS, cached), so the tool
    works with nothing but a model.

Documents are joined with the tokenizer's EOS, cut into `seq_len` chunks, shuffled with
`seed`, and the first `val_sequences` chunks become validation. The result is cached as
`data/tokens-<key>.safetensors`; the key covers the files' sizes and mtimes, the tokenizer and
the data settings (when to re-tokenize). The data's fingerprint, which libraries and scores are
keyed to, is a hash of the tokens themselves, so a copied or touched file keeps its library.
Training sequences are read from that file by position, never loaded whole (see cache.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DataConfig
from ..errors import PuzzleError
from ..utils import fingerprint
from .cache import TokenSequences, read_token_cache, write_token_cache

log = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet")


@dataclass
class TokenData:
    train: TokenSequences | torch.Tensor  # (N, seq_len); indexing gives int64 rows, read from disk
    val: torch.Tensor  # (M, seq_len) int64, in memory (data.val_sequences is small)
    fingerprint: str
    source: str


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise PuzzleError(f"data folder {path} holds no {', '.join(TEXT_SUFFIXES)} files")
    return files


def read_text_file(f: Path) -> str:
    """A text file's content; a binary or non-UTF-8 file is an error naming it (no silent U+FFFD)."""
    data = f.read_bytes()
    if b"\0" in data[: 1 << 20]:
        raise PuzzleError(f"{f}: a binary file (it holds NUL bytes), not text; give a UTF-8 .txt/.jsonl/.parquet file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PuzzleError(f"{f}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); convert it, "
                          f"e.g. iconv -f latin1 -t utf-8") from None


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    docs: list[str] = []
    for f in _files(path):
        if f.suffix in (".txt", ".raw"):
            docs.append(read_text_file(f))
        elif f.suffix in (".jsonl", ".json"):
            for n, line in enumerate(read_text_file(f).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise PuzzleError(f"{f}:{n}: not a JSON line") from None
                if not isinstance(row, dict) or text_field not in row:
                    raise PuzzleError(f"{f}:{n}: no field {text_field!r} (set data.text_field)")
                docs.append(str(row[text_field]))
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(f)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise PuzzleError(f"{f}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
            if text_field not in table.column_names:
                raise PuzzleError(f"{f}: no column {text_field!r} (columns: {table.column_names})")
            docs.extend(str(x) for x in table.column(text_field).to_pylist())
        else:
            raise PuzzleError(f"{f}: unsupported data file type {f.suffix!r} (accepted: {', '.join(TEXT_SUFFIXES)})")
    return docs


def _hub_documents(name: str, text_field: str, limit_chars: int) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise PuzzleError(f"data.path={name!r} is not a local path, and the `datasets` package is missing") from None
    dataset, _, subset = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset, subset or None, split="train", streaming=True)
    except Exception as exc:  # the hub raises many types; all mean "cannot get it"
        raise PuzzleError(f"data.path={name!r}: not a local path and not loadable from the hub ({type(exc).__name__})") from None
    docs, total = [], 0
    for row in ds:
        docs.append(str(row[text_field]))
        total += len(docs[-1])
        if total >= limit_chars:
            break
    return docs


def chunk(token_ids: list[int], seq_len: int) -> torch.Tensor:
    n = len(token_ids) // seq_len
    return torch.tensor(token_ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def tokenize_documents(docs: list[str], tokenizer, seq_len: int, max_sequences: int) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_sequences * seq_len:
            break
    return chunk(ids, seq_len)[:max_sequences]


@torch.no_grad()
def generate_sequences(model, tokenizer, n: int, seq_len: int, temperature: float, seed: int, batch: int = 64):
    """The parent's own text: `n` sequences sampled from BOS (Puzzle works with no data at all).

    Decoding reads every weight once per step whatever the batch, so a wide batch is cheap per token
    (SmolLM2 on a 2-core CPU: 64 sequences per step gave 1.5x the tokens/s of 16)."""
    from tqdm.auto import tqdm

    bos = tokenizer.bos_token_id if tokenizer is not None and tokenizer.bos_token_id is not None else model.config.bos_token_id
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, n, batch), desc="generating distillation text", unit="batch"):
        b = min(batch, n - start)
        seq = torch.full((b, 1), bos, dtype=torch.long, device=device)
        cache = None
        logits = None
        for _ in range(seq_len - 1):
            step_in = seq if cache is None else seq[:, -1:]
            result = model(step_in, cache=cache, use_cache=True)
            cache = result.cache if hasattr(result, "cache") and result.cache is not None else result.past_key_values
            logits = result.logits[:, -1].float().cpu() / temperature
            # Exponential race: argmax(p_i / E_i), E_i ~ Exp(1), draws i with probability p_i, exactly
            # as multinomial does, at a fraction of its cost for a 50k vocabulary.
            race = torch.empty_like(logits).exponential_(generator=gen)
            nxt = (torch.softmax(logits, dim=-1) / race).argmax(dim=-1, keepdim=True).to(device)
            seq = torch.cat([seq, nxt], dim=1)
        out.append(seq.cpu())
    return torch.cat(out)


def tokenizer_fingerprint(tokenizer) -> str:
    """What the tokenizer does, not where it was loaded from (the parent's cache moves it)."""
    if tokenizer is None:
        return "none"
    probe = "The quick brown fox, 1234 jumps; over\nthe lazy dog's \"den\"."
    return fingerprint(len(tokenizer), tokenizer(probe).input_ids, tokenizer.eos_token_id, tokenizer.bos_token_id)


def prepare_data(cfg: DataConfig, tokenizer, workdir: Path, model=None, model_fingerprint: str = "") -> TokenData:
    """Token sequences for training and validation, from cache when nothing changed.
    `model_fingerprint` identifies the parent when it writes its own text."""
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and cfg.seq_len > max_positions:
        raise PuzzleError(f"data.seq_len={cfg.seq_len} exceeds the parent's max_position_embeddings={max_positions}")
    if cfg.path is not None:
        path = Path(cfg.path).expanduser()
        if path.exists():
            stamp = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in _files(path)]
        elif cfg.path.startswith(("/", ".", "~")) or Path(cfg.path).suffix in TEXT_SUFFIXES:
            raise PuzzleError(f"data.path {cfg.path!r} does not exist")
        else:
            stamp = [cfg.path]
        source = cfg.path
    else:
        if model is None:
            raise PuzzleError("data.path is not set and no model was given to generate distillation text")
        stamp, source = ["self-generated", model_fingerprint], "self-generated by the parent"
    tok_id = tokenizer_fingerprint(tokenizer)
    key = fingerprint(stamp, tok_id, cfg.model_dump())
    cache_file = Path(workdir) / "data" / f"tokens-{key}.safetensors"
    if cache_file.is_file():
        train, val, fp = read_token_cache(cache_file)
        return TokenData(train, val, fp, source)

    wanted = cfg.max_train_sequences + cfg.val_sequences
    if cfg.path is None:
        n = min(cfg.generate_sequences, wanted)
        if n <= cfg.val_sequences:
            raise PuzzleError(f"data.generate_sequences={n} must exceed data.val_sequences={cfg.val_sequences}")
        sequences = generate_sequences(model, tokenizer, n, cfg.seq_len, cfg.generate_temperature, cfg.seed)
    else:
        if tokenizer is None:
            raise PuzzleError("the parent has no tokenizer; cannot tokenize data.path")
        path = Path(cfg.path).expanduser()
        docs = read_documents(path, cfg.text_field) if path.exists() else _hub_documents(
            cfg.path, cfg.text_field, wanted * cfg.seq_len * 8
        )
        sequences = tokenize_documents(docs, tokenizer, cfg.seq_len, wanted)
    if len(sequences) <= cfg.val_sequences:
        raise PuzzleError(
            f"data from {source} gives only {len(sequences)} sequences of {cfg.seq_len} tokens; "
            f"need more than data.val_sequences={cfg.val_sequences}"
        )
    order = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(cfg.seed))
    sequences = sequences[order]
    train, val = sequences[cfg.val_sequences :], sequences[: cfg.val_sequences]
    # The data's identity (what the library and scores are keyed to) is its content: the same text
    # copied elsewhere or touched keeps its libraries; file stamps only decide when to re-tokenize.
    fp = write_token_cache(cache_file, [train], len(train), cfg.seq_len, val, source, max_id=int(sequences.max()))
    log.info("data: %d train + %d val sequences of %d tokens from %s", len(train), len(val), cfg.seq_len, source)
    del sequences, train  # from here on the training set is read from the cache, as on every later run
    train, val, _ = read_token_cache(cache_file)
    return TokenData(train, val, fp, source)
