"""The token cache on disk, read by position: a corpus larger than RAM trains as well as a small one.

    write_token_cache(path, chunks, n_train, seq_len, val, source)   # chunks: (k, seq_len) int arrays, in order
    train, val, fp = read_token_cache(path)                          # train: TokenSequences; val: a tensor

The file is a plain safetensors file (an 8-byte header length, a JSON header, raw little-endian
arrays; no pickle, nothing in it can run code) holding `train` and `val` as (N, seq_len) token ids,
stored as uint16 when every id fits (Llama-2, SmolLM2, Mistral) and uint32 otherwise (Llama-3's 128k
vocabulary): a quarter or a half of int64. Caches written before, as int64, read the same way.

`TokenSequences` never holds the training set: `train[idx]` reads just those rows with `os.pread`
(rows are contiguous, so a batch of 16 sequences is 16 reads) and returns them as int64, the way
the model's embedding wants them. Positional reads rather than a memory map, so the process's
address space and resident memory stay at the batch's size whatever the cache's (a map of a 100 GB
cache counts 100 GB against `ulimit -v`, and its touched pages against the process's RSS).
The data's fingerprint (a hash of the token ids as int64, the same value an in-memory tensor of
them gets from `utils.fingerprint`) is computed while writing and kept in the header's metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..errors import PuzzleError

# safetensors dtype names <-> numpy (little-endian)
DTYPES = {"U16": np.dtype("<u2"), "U32": np.dtype("<u4"), "I32": np.dtype("<i4"), "I64": np.dtype("<i8")}
FORMAT = "puzzlenas-tokens-1"


def storage_dtype(max_id: int) -> str:
    return "U16" if max_id < 2**16 else "U32" if max_id < 2**32 else "I64"


class _Hasher:
    """utils.fingerprint(train, val) computed chunk by chunk: the dtype and shape, then the int64 bytes."""

    def __init__(self):
        self.h = hashlib.sha256()

    def start(self, shape: tuple[int, ...]) -> None:
        self.h.update(str(torch.int64).encode() + str(tuple(shape)).encode())

    def update(self, rows: np.ndarray) -> None:
        self.h.update(np.ascontiguousarray(rows, dtype="<i8").tobytes())

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:16]


def _header(tensors: dict[str, tuple[str, tuple[int, int]]], metadata: dict[str, str]) -> bytes:
    entries, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = DTYPES[dtype].itemsize * shape[0] * shape[1]
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def write_token_cache(path: str | Path, chunks, n_train: int, seq_len: int, val, source: str,
                      max_id: int | None = None) -> str:
    """Write train (streamed from `chunks`, n_train rows in all) and val to `path` atomically
    (temp file, then os.replace). Returns the data's fingerprint. With `max_id` unknown the ids are
    stored as uint32 (any vocabulary up to 4 billion tokens)."""
    path = Path(path)
    val = np.asarray(val.numpy() if isinstance(val, torch.Tensor) else val)
    dtype = storage_dtype(max_id) if max_id is not None else "U32"
    npdt = DTYPES[dtype]
    hasher = _Hasher()
    hasher.start((n_train, seq_len))
    fp_meta = {"source": str(source), "format": FORMAT, "fingerprint": "0" * 16}  # fixed length, patched at the end
    head = _header({"train": (dtype, (n_train, seq_len)), "val": (dtype, (len(val), seq_len))}, fp_meta)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for rows in chunks:
                rows = np.asarray(rows.numpy() if isinstance(rows, torch.Tensor) else rows)
                if rows.ndim != 2 or rows.shape[1] != seq_len:
                    raise PuzzleError(f"token chunk of shape {rows.shape}, expected (k, {seq_len})")
                if rows.size and (rows.min() < 0 or rows.max() > np.iinfo(npdt).max):
                    raise PuzzleError(f"token ids outside 0..{np.iinfo(npdt).max} cannot be stored as {dtype}")
                hasher.update(rows)
                f.write(np.ascontiguousarray(rows, dtype=npdt).tobytes())
                written += len(rows)
            if written != n_train:
                raise PuzzleError(f"token cache: {written} training sequences written, {n_train} announced")
            hasher.start(val.shape)  # the same hash goes on, as utils.fingerprint(train, val) does
            hasher.update(val)
            f.write(np.ascontiguousarray(val, dtype=npdt).tobytes())
            fp = hasher.hexdigest()
            fp_meta["fingerprint"] = fp
            patched = _header({"train": (dtype, (n_train, seq_len)), "val": (dtype, (len(val), seq_len))}, fp_meta)
            assert len(patched) == len(head)
            f.seek(0)
            f.write(patched)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return fp


class TokenSequences:
    """(N, seq_len) token ids in a cache file, read on demand.

    Supports what training code does with a tensor of sequences: len(), .shape, .numel(),
    [i], [a:b], [index tensor / list / array] (-> int64 tensors of just those rows). Safe to use
    after fork (each process opens its own descriptor)."""

    def __init__(self, path: str | Path, offset: int, dtype: str, shape: tuple[int, int]):
        self.path, self.offset, self.dtype, self.np_dtype = Path(path), offset, dtype, DTYPES[dtype]
        self.shape = torch.Size(shape)
        self.row_bytes = self.np_dtype.itemsize * shape[1]
        self._fd, self._pid = None, None

    def __len__(self) -> int:
        return self.shape[0]

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dim(self) -> int:
        return 2

    def _fd_here(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _read_rows(self, start: int, count: int) -> np.ndarray:
        want = count * self.row_bytes
        buf = os.pread(self._fd_here(), want, self.offset + start * self.row_bytes)
        if len(buf) != want:
            raise PuzzleError(f"{self.path}: truncated token cache (rows {start}..{start + count}); delete it to rebuild")
        return np.frombuffer(buf, dtype=self.np_dtype).reshape(count, self.shape[1])

    def __getitem__(self, idx) -> torch.Tensor:
        n = len(self)
        if isinstance(idx, (int, np.integer)) or (isinstance(idx, torch.Tensor) and idx.dim() == 0):
            i = int(idx)
            if not -n <= i < n:
                raise IndexError(f"sequence {i} out of range for {n}")
            return self[[i % n]][0]
        if isinstance(idx, slice):
            start, stop, step = idx.indices(n)
            if step == 1:
                rows = self._read_rows(start, max(stop - start, 0))
                return torch.from_numpy(rows.astype(np.int64))
            idx = range(start, stop, step)
        index = np.asarray(idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"sequence index out of range for {n}")
        index = index % n if index.size else index
        out = np.empty((len(index), self.shape[1]), dtype=np.int64)
        order = np.argsort(index, kind="stable")
        sorted_idx = index[order]
        # consecutive rows in one read: a sequential pass (or a shuffled epoch's near neighbours) costs few calls
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        for run in np.split(np.arange(len(sorted_idx)), breaks):
            if not len(run):
                continue
            first, last = int(sorted_idx[run[0]]), int(sorted_idx[run[-1]])
            if last - first + 1 == len(run):
                out[order[run]] = self._read_rows(first, len(run))
            else:  # repeated indices: read the distinct rows once
                uniq = np.unique(sorted_idx[run])
                rows = self._read_rows(int(uniq[0]), int(uniq[-1] - uniq[0] + 1))
                out[order[run]] = rows[sorted_idx[run] - uniq[0]]
        return torch.from_numpy(out)

    def to(self, *args, **kwargs) -> torch.Tensor:
        """All of it as a tensor (what `.to(device)` on a tensor gives): only for a small set."""
        return self[:].to(*args, **kwargs)

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self):
        if self._fd is not None and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"TokenSequences({self.path.name}, shape={tuple(self.shape)}, stored as {self.dtype})"


def read_header(path: str | Path) -> tuple[dict, int]:
    """The safetensors header (JSON) and where the data starts; a damaged file is one line."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise PuzzleError(f"{path}: not a token cache (too short); delete it to rebuild")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 2**20:
            raise PuzzleError(f"{path}: not a token cache (header of {size} bytes); delete it to rebuild")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PuzzleError(f"{path}: damaged token cache header; delete it to rebuild") from None
    return header, 8 + size


def read_token_cache(path: str | Path) -> tuple[TokenSequences, torch.Tensor, str]:
    """(train read on demand, val in memory, the data's fingerprint)."""
    path = Path(path)
    header, data_start = read_header(path)
    parts = {}
    for name in ("train", "val"):
        entry = header.get(name)
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES or len(entry.get("shape", ())) != 2:
            raise PuzzleError(f"{path}: no usable {name!r} array in the token cache; delete it to rebuild")
        begin, end = entry["data_offsets"]
        shape = tuple(int(x) for x in entry["shape"])
        if end - begin != DTYPES[entry["dtype"]].itemsize * shape[0] * shape[1]:
            raise PuzzleError(f"{path}: {name!r} size does not match its shape; delete it to rebuild")
        parts[name] = TokenSequences(path, data_start + begin, entry["dtype"], shape)
    if path.stat().st_size < max(p.offset + p.numel() * p.np_dtype.itemsize for p in parts.values()):
        raise PuzzleError(f"{path}: truncated token cache; delete it to rebuild")
    train, val = parts["train"], parts["val"][:]
    fp = (header.get("__metadata__") or {}).get("fingerprint")
    if not fp:  # a cache from before the fingerprint was stored: hash it once, a chunk at a time
        hasher = _Hasher()
        hasher.start(tuple(train.shape))
        step = max(1, (64 * 2**20) // train.row_bytes)
        for start in range(0, len(train), step):
            hasher.update(train._read_rows(start, min(step, len(train) - start)))
        hasher.start(tuple(val.shape))
        hasher.update(val.numpy())
        fp = hasher.hexdigest()
    return train, val, fp
