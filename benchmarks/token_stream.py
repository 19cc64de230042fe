"""Training batches from a token cache several times larger than the memory the reader may use.

    python benchmarks/token_stream.py [--limit 256MiB] [--factor 4] [--seq-len 4096] [--batch 16] [--steps 400]

Each step in a fresh process whose address space is capped at what it has after its imports plus
`limit` (RLIMIT_AS, so the cap is hard: a bigger allocation or memory map fails):
  * write a cache of `factor x limit` bytes of random Llama-3 token ids (uint32, streamed a chunk
    at a time, as prepare_data does);
  * puzzlenas's reader draws `steps` batches of `batch` random sequences from all of the cache,
    first cold (the file's pages dropped from the page cache with posix_fadvise), then the same
    batches again, warm;
  * the previous way, `safetensors.torch.load_file` of the whole cache, under the same cap.
Prints time per batch (median and min-max), tokens/s, and how much the process's resident memory
grew. The cache is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def cap_address_space(limit: int) -> int:
    """RLIMIT_AS = what the process maps now + limit; returns the cap."""
    cap = status("VmSize") + limit
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    return cap


def worker(args) -> None:
    import torch

    from puzzlenas.data.cache import read_token_cache

    path = Path(args.path)
    rss0 = status("VmRSS")
    cap_address_space(args.limit)
    out: dict = {}
    if args.mode == "write":  # the cache itself built under the cap, streamed a chunk at a time
        from puzzlenas.data.cache import write_token_cache

        n, rng = args.rows, np.random.default_rng(0)
        chunk = max(1, (16 * 2**20) // (4 * args.seq_len))
        chunks = (rng.integers(0, 128_256, (min(chunk, n - s), args.seq_len), dtype=np.uint32) for s in range(0, n, chunk))
        t = time.perf_counter()
        write_token_cache(path, chunks, n, args.seq_len, np.zeros((4, args.seq_len), dtype=np.int64), "benchmark",
                          max_id=128_255)
        out = {"ok": True, "seconds": time.perf_counter() - t}
    elif args.mode == "load_file":
        from safetensors.torch import load_file

        t = time.perf_counter()
        try:
            tensors = load_file(path)
            out = {"ok": True, "seconds": time.perf_counter() - t, "rows": int(tensors["train"].shape[0])}
        except (MemoryError, OSError, RuntimeError) as exc:  # what a failed map or allocation raises
            out = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
    else:
        train, _, _ = read_token_cache(path)
        rng = np.random.default_rng(0)
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: the file's clean pages leave the page cache
        os.close(fd)
        runs = {}
        draws = [torch.from_numpy(rng.integers(0, len(train), args.batch)) for _ in range(args.steps)]
        for phase in ("cold", "warm"):  # warm: the same batches again, now in the page cache
            times, checksum = [], 0
            for idx in draws:
                t = time.perf_counter()
                batch = train[idx]
                times.append(time.perf_counter() - t)
                checksum += int(batch[:, :: 512].sum())
            runs[phase] = {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * min(times),
                           "max_ms": 1e3 * max(times), "tokens_s": args.batch * train.shape[1] / float(np.median(times))}
        # spot check against the bytes on disk: the reader returns the right rows
        row = int(rng.integers(0, len(train)))
        raw = np.fromfile(path, dtype="<u4", count=train.shape[1], offset=train.offset + row * train.row_bytes)
        out = {"ok": bool(np.array_equal(train[row].numpy(), raw)), "runs": runs, "rows": len(train)}
    out["rss_growth"] = status("VmHWM") - rss0
    print(json.dumps(out))


def parse_size(text: str) -> int:
    from puzzlenas.config import parse_size as ps

    return int(ps(text))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", default="256MiB", help="address space the reader may add to what its imports took")
    ap.add_argument("--factor", type=float, default=4.0, help="cache size as a multiple of --limit")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--worker", choices=["write", "reader", "load_file"], dest="mode")
    ap.add_argument("--rows", type=int, default=0)
    ap.add_argument("--path")
    args = ap.parse_args()
    args.limit = parse_size(args.limit) if isinstance(args.limit, str) else args.limit
    if args.mode:
        return worker(args)

    row_bytes = 4 * args.seq_len
    n = int(args.factor * args.limit // row_bytes)
    path = Path(args.dir) / f"token_stream_bench-{os.getpid()}.safetensors"
    results = {}
    try:
        for mode in ("write", "reader", "load_file"):
            cmd = [sys.executable, __file__, "--worker", mode, "--path", str(path), "--limit", str(args.limit),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--seq-len", str(args.seq_len),
                   "--rows", str(n)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
            results[mode] = json.loads(lines[-1]) if lines else {"ok": False, "error": f"exit {proc.returncode}: "
                                                                  + (proc.stderr.strip().splitlines() or [""])[-1][:80]}
            if mode == "write" and not results[mode].get("ok"):
                raise SystemExit(f"writing the cache failed: {results[mode]}")
        size = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    w = results["write"]
    write_s = w["seconds"]

    gib = 2**30
    print(f"cache: {n} sequences x {args.seq_len} tokens, uint32, {size / gib:.2f} GiB on disk, written under the "
          f"same cap in {write_s:.1f} s ({size / write_s / 2**20:.0f} MiB/s, resident memory +{w['rss_growth'] / 2**20:.0f} MiB); "
          f"cap: imports + {args.limit / 2**20:.0f} MiB of address space ({size / args.limit:.1f}x smaller than the cache)\n")
    print("| reader | batches | per batch, median (min-max) | tokens/s | resident memory growth | result |")
    print("|---|---|---|---|---|---|")
    r = results["reader"]
    if "runs" in r:
        for phase, x in r["runs"].items():
            print(f"| puzzlenas TokenSequences, {phase} | {args.steps} x {args.batch} | {x['median_ms']:.2f} ms "
                  f"({x['min_ms']:.2f}-{x['max_ms']:.2f}) | {x['tokens_s'] / 1e6:.1f} M | {r['rss_growth'] / 2**20:.0f} MiB "
                  f"| {'rows match the file' if r['ok'] else 'WRONG ROWS'} |")
    else:
        print(f"| puzzlenas TokenSequences | - | - | - | - | failed: {r.get('error')} |")
    lf = results["load_file"]
    what = f"loaded in {lf['seconds']:.1f} s" if lf.get("ok") else f"fails: {lf.get('error')}"
    print(f"| safetensors load_file (whole cache) | - | - | - | {lf.get('rss_growth', 0) / 2**20:.0f} MiB | {what} |")


if __name__ == "__main__":
    main()
