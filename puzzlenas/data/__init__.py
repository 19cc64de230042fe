"""Distillation data: text -> fixed-length token sequences, split and cached in the work directory.

Sources, by `data.path`:
  * a .txt file, a .jsonl file (one JSON object per line, `text_field`), a .parquet file, or a
    folder holding any of those (read in sorted order);
  * a Hugging Face dataset name ("wikitext:wikitext-2-raw-v1"), only when the hub is reachable;
  * None: the parent writes its own distillation text (sampled from BOS, cached), so the tool
    works with nothing but a model;
  * a path and `generated_fraction`: a mix, that fraction of the sequences written by the parent
    and the rest from the path (mixed_rows), so a narrow corpus cannot narrow the child.

Documents are joined with the tokenizer's EOS, cut into `seq_len` chunks, shuffled with
`seed`, and the first `val_sequences` chunks become validation. The result is cached as
`data/tokens-<key>.safetensors`; the key covers the files' sizes and mtimes, the tokenizer and
the data settings (when to re-tokenize). The data's fingerprint, which libraries and scores are
keyed to, is a hash of the tokens themselves, so a copied or touched file keeps its library.
Training sequences are read from that file by position, never loaded whole (see cache.py).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import PuzzleError
from ..utils import autocast_dtype, fingerprint
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


# A text or JSON-lines file larger than this is read in line-aligned blocks instead of whole, so a
# corpus larger than RAM streams; smaller files are read (and tokenized) exactly as they always were.
BLOCK_BYTES = 64 * 2**20


class _Continued(str):
    """A piece of a document that goes on in the next piece: no EOS after it."""


def _text_blocks(f: Path):
    """A big .txt file as line-aligned blocks of about BLOCK_BYTES (each tokenized as its own piece)."""
    with open(f, "rb") as fh:
        head = fh.read(1 << 20)
        if b"\0" in head:
            raise PuzzleError(f"{f}: a binary file (it holds NUL bytes), not text; give a UTF-8 .txt/.jsonl/.parquet file")
        fh.seek(0)
        line, offset, rest = 1, 0, b""
        while True:
            block = fh.read(BLOCK_BYTES)
            if not block and not rest:
                return
            data = rest + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            piece, rest = (data[:cut], data[cut:]) if cut > 0 else (data, b"")
            try:
                yield piece.decode("utf-8-sig" if offset == 0 else "utf-8")
            except UnicodeDecodeError as exc:
                where = line + piece[: exc.start].count(b"\n")
                raise PuzzleError(f"{f}:{where}: not UTF-8 text (byte 0x{piece[exc.start]:02x} at offset "
                                  f"{offset + exc.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None
            line += piece.count(b"\n")
            offset += len(piece)


def _json_lines(f: Path):
    """(line number, text) of a .jsonl file; a big one read line by line."""
    if f.stat().st_size <= BLOCK_BYTES:
        yield from enumerate(read_text_file(f).splitlines(), 1)
        return
    n = 0
    for block in _text_blocks(f):
        for line in block.splitlines():
            n += 1
            yield n, line


def iter_documents(path: Path, text_field: str = "text"):
    """The documents of a file or folder, in order, one at a time (see BLOCK_BYTES)."""
    for f in _files(path):
        if f.suffix in (".txt", ".raw"):
            if f.stat().st_size <= BLOCK_BYTES:
                yield read_text_file(f)
            else:  # one document in pieces: the EOS comes after the last (the empty closing piece)
                yield from (_Continued(piece) for piece in _text_blocks(f))
                yield ""
        elif f.suffix in (".jsonl", ".json"):
            for n, line in _json_lines(f):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise PuzzleError(f"{f}:{n}: not a JSON line") from None
                if not isinstance(row, dict) or text_field not in row:
                    raise PuzzleError(f"{f}:{n}: no field {text_field!r} (set data.text_field)")
                yield str(row[text_field])
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                table = pq.ParquetFile(f)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise PuzzleError(f"{f}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
            if text_field not in table.schema_arrow.names:
                raise PuzzleError(f"{f}: no column {text_field!r} (columns: {table.schema_arrow.names})")
            for batch in table.iter_batches(batch_size=4096, columns=[text_field]):
                yield from (str(x) for x in batch.column(0).to_pylist())
        else:
            raise PuzzleError(f"{f}: unsupported data file type {f.suffix!r} (accepted: {', '.join(TEXT_SUFFIXES)})")


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    return list(iter_documents(path, text_field))


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


def tokenize_documents(docs: list[str], tokenizer, seq_len: int, max_sequences: int) -> torch.Tensor:
    rows = list(token_rows(docs, tokenizer, seq_len, max_sequences))
    return torch.from_numpy(np.concatenate(rows)) if rows else torch.empty(0, seq_len, dtype=torch.long)


def token_rows(docs, tokenizer, seq_len: int, max_sequences: int):
    """(k, seq_len) int64 arrays, in order: the documents joined with EOS and cut into sequences,
    stopping at `max_sequences`. Streams: holds at most one document's tokens and a partial row."""
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    made = 0
    for doc in docs:
        buf.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if eos is not None and not isinstance(doc, _Continued):
            buf.append(eos)
        take = min(len(buf) // seq_len, max_sequences - made)
        if take:
            yield np.asarray(buf[: take * seq_len], dtype=np.int64).reshape(take, seq_len)
            del buf[: take * seq_len]
            made += take
        if made >= max_sequences:
            return


def sample_tokens(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:
    """(B, 1) token ids drawn from softmax(logits / temperature), (B, V), by inverse CDF: one uniform
    per row, found in the row's cumulative probabilities.

    Why not multinomial or an exponential race (argmax p_i / E_i): both draw V random numbers per
    row, and on a CPU drawing them took a third of the parent's generation time with a 49k
    vocabulary; one number per row and a cumulative sum cost a few milliseconds."""
    probs = torch.softmax(logits / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    u = torch.rand(logits.shape[0], 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    # the first token whose cumulative probability exceeds u: a token of probability 0 never is
    return torch.searchsorted(cdf, u, right=True).clamp_(max=logits.shape[-1] - 1)


class FilledKVCache:
    """A KV cache for decoding to a known length: each attention layer's keys and values are
    written in place into buffers of that length, and the layer attends to a view of the filled
    part. transformers' DynamicCache concatenates instead, copying a layer's whole cache at every
    step, which grows with the square of the length. Holds what DeciLM's attention asks of a
    cache (get_seq_length, update)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.filled: dict[int, int] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.filled.get(layer_idx, 0)

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int):
        """Append (B, KV, T, D) keys and values; return the layer's keys and values so far."""
        if layer_idx not in self.keys:
            B, H, _, D = k.shape
            self.keys[layer_idx] = k.new_empty(B, H, self.capacity, D)
            self.values[layer_idx] = v.new_empty(B, H, self.capacity, D)
        start = self.filled.get(layer_idx, 0)
        end = start + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"FilledKVCache: {end} positions exceed its capacity of {self.capacity}")
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        self.filled[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


@torch.no_grad()
def generate_sequences(model, tokenizer, n: int, seq_len: int, temperature: float, seed: int, batch: int = 64):
    """The parent's own text: `n` sequences sampled from BOS (Puzzle works with no data at all).

    Decoding reads every weight once per step whatever the batch, so a wide batch is cheap per token
    (SmolLM2 on a 2-core CPU: 64 sequences per step gave 1.5x the tokens/s of 16)."""
    from tqdm.auto import tqdm

    from ..model.modeling_decilm import DeciLMForCausalLM

    bos = tokenizer.bos_token_id if tokenizer is not None and tokenizer.bos_token_id is not None else model.config.bos_token_id
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    # puzzlenas's own model takes a FilledKVCache; any other (a parent split over the torchrun
    # ranks keeps its caches on its ranks, model/split.py) makes its own cache at the first step
    filled = isinstance(model, DeciLMForCausalLM)
    out = []
    for start in tqdm(range(0, n, batch), desc="generating distillation text", unit="batch"):
        b = min(batch, n - start)
        seq = torch.full((b, 1), bos, dtype=torch.long, device=device)
        cache = FilledKVCache(seq_len) if filled else None
        for step in range(seq_len - 1):
            step_in = seq if step == 0 else seq[:, -1:]
            result = model(step_in, cache=cache, use_cache=True)
            cache = result.cache if hasattr(result, "cache") and result.cache is not None else result.past_key_values
            nxt = sample_tokens(result.logits[:, -1].float().cpu(), temperature, gen).to(device)
            seq = torch.cat([seq, nxt], dim=1)
        out.append(seq.cpu())
    return torch.cat(out)


def mixed_rows(docs, tokenizer, model, cfg: DataConfig, wanted: int):
    """(k, seq_len) arrays: corpus sequences, then the parent's own, in the ratio data.generated_fraction.

    f = generated_fraction; at most G = min(generate_sequences, f * wanted) generated sequences (generation
    is the costly part), so the corpus gives C = G (1 - f) / f, or fewer if it holds fewer; then exactly
    g = round(c f / (1 - f)) <= G are generated for the c corpus sequences read, which puts the generated
    share g / (g + c) within half a sequence of f. The seeded shuffle of prepare_data then mixes them."""
    f = cfg.generated_fraction
    most = max(1, min(cfg.generate_sequences, round(f * wanted)))
    corpus = 0
    for chunk in token_rows(docs, tokenizer, cfg.seq_len, min(wanted - most, round(most * (1 - f) / f))):
        corpus += len(chunk)
        yield chunk
    generated = min(most, round(corpus * f / (1 - f)))
    log.info("data: %d corpus sequences mixed with %d generated by the parent (%.1f%% generated)", corpus, generated,
             100 * generated / max(1, generated + corpus))
    if generated:
        yield generate_sequences(writer_model(cfg, model), tokenizer, generated, cfg.seq_len, cfg.generate_temperature,
                                 cfg.seed).numpy()


def writer_model(cfg: DataConfig, model):
    """The model that writes the parent's text: the parent itself, or a bf16 copy of it when
    data.dtype resolves to bf16 and the parent is held in fp32. A copy, not autocast: the parent's
    weights do not require grad, so autocast casts every weight again at every decoding step
    (0.98x fp32's tokens/s, benchmarks/generation_throughput.py) where a copy wrote 1.8x. A parent
    split over the torchrun ranks (model/split.py) writes in its own precision: its other ranks
    hold their layers as loaded."""
    from ..model.split import SplitLM

    if isinstance(model, SplitLM):
        if cfg.dtype != "float32":
            log.info("data.dtype=%s: the split parent writes in its own precision (set dtype: bfloat16 to hold it in "
                     "bf16)", cfg.dtype)
        return model
    first = next(model.parameters())
    target = autocast_dtype(cfg.dtype, first.device)
    if target is None or first.dtype != torch.float32:
        return model
    log.info("data: a %s copy of the parent writes the distillation text (data.dtype=%s)", target, cfg.dtype)
    return copy.deepcopy(model).to(target)


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
        if cfg.generated_fraction is not None:  # a mix: the parent's own text is part of what is cached
            if model is None:
                raise PuzzleError("data.generated_fraction is set but no model was given to generate distillation text")
            stamp = [stamp, "mixed with self-generated", model_fingerprint]
            source = f"{cfg.path} mixed with text self-generated by the parent ({cfg.generated_fraction:.0%} of sequences)"
    else:
        if model is None:
            raise PuzzleError("data.path is not set and no model was given to generate distillation text")
        stamp, source = ["self-generated", model_fingerprint], "self-generated by the parent"
    tok_id = tokenizer_fingerprint(tokenizer)
    # a setting left unset is not hashed: caches made before it existed keep their key (they were
    # written in fp32); how the ranks share the parent (parallel) does not change the tokens
    unhashed = {"parallel"} | ({"generated_fraction"} if cfg.generated_fraction is None else set())
    unhashed |= {"dtype"} if cfg.dtype == "float32" else set()
    key = fingerprint(stamp, tok_id, cfg.model_dump(exclude=unhashed))
    cache_file = Path(workdir) / "data" / f"tokens-{key}.safetensors"
    if cache_file.is_file():
        train, val, fp = read_token_cache(cache_file)
        return TokenData(train, val, fp, source)

    wanted = cfg.max_train_sequences + cfg.val_sequences
    if cfg.path is None:
        n = min(cfg.generate_sequences, wanted)
        if n <= cfg.val_sequences:
            raise PuzzleError(f"data.generate_sequences={n} must exceed data.val_sequences={cfg.val_sequences}")
        sequences = generate_sequences(writer_model(cfg, model), tokenizer, n, cfg.seq_len, cfg.generate_temperature,
                                       cfg.seed)
        rows = [sequences.numpy()]
    else:
        if tokenizer is None:
            raise PuzzleError("the parent has no tokenizer; cannot tokenize data.path")
        path = Path(cfg.path).expanduser()
        docs = iter_documents(path, cfg.text_field) if path.exists() else _hub_documents(
            cfg.path, cfg.text_field, wanted * cfg.seq_len * 8
        )
        if cfg.generated_fraction is None:
            rows = token_rows(docs, tokenizer, cfg.seq_len, wanted)
        else:
            rows = mixed_rows(docs, tokenizer, model, cfg, wanted)
    # Tokens go to a spool file as they come, then into the cache in the seeded shuffled order: memory
    # stays at one chunk whatever the corpus's size.
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    spool = cache_file.with_name(f".{cache_file.name}.spool-{os.getpid()}")
    try:
        n, max_id = 0, 0
        with open(spool, "wb") as f:
            for chunk_rows in rows:
                f.write(np.ascontiguousarray(chunk_rows, dtype="<u4").tobytes())
                n += len(chunk_rows)
                max_id = max(max_id, int(chunk_rows.max()) if chunk_rows.size else 0)
        if n <= cfg.val_sequences:
            raise PuzzleError(
                f"data from {source} gives only {n} sequences of {cfg.seq_len} tokens; "
                f"need more than data.val_sequences={cfg.val_sequences}"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
        spooled = TokenSequences(spool, 0, "U32", (n, cfg.seq_len))
        val = spooled[order[: cfg.val_sequences]]
        step = max(1, (64 * 2**20) // spooled.row_bytes)
        train = (spooled[order[i : i + step]] for i in range(cfg.val_sequences, n, step))
        # The data's identity (what the library and scores are keyed to) is its content: the same text
        # copied elsewhere or touched keeps its libraries; file stamps only decide when to re-tokenize.
        fp = write_token_cache(cache_file, train, n - cfg.val_sequences, cfg.seq_len, val, source, max_id=max_id)
    finally:
        spool.unlink(missing_ok=True)
    log.info("data: %d train + %d val sequences of %d tokens from %s", n - cfg.val_sequences, cfg.val_sequences,
             cfg.seq_len, source)
    train, val, _ = read_token_cache(cache_file)
    return TokenData(train, val, fp, source)
