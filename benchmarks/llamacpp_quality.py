"""Quality of a finished run's models as llama.cpp serves them: each exported to GGUF in the run's
`target.gguf_type`, WikiText-2 perplexity and top-1 agreement with the parent computed in llama.cpp,
beside the PyTorch f32 perplexity on the same windows (not run in CI).

    PUZZLENAS_LLAMACPP_THREADS=1 python benchmarks/llamacpp_quality.py runs/qvs-llamacpp [--tokens 8192]

Windows: consecutive, non-overlapping 512-token pieces of the WikiText-2 test file (the first
--tokens tokens), every position scored, so the numbers are comparable between models but not with
`eval`'s sliding-window perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import torch

from puzzlenas.checkpoint.convert import resolve_parent_path
from puzzlenas.checkpoint.io import load_checkpoint
from puzzlenas.export import export_gguf

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def nll_and_argmax(logits: np.ndarray, ids: list[int]) -> tuple[float, np.ndarray]:
    lg = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    nll = torch.nn.functional.cross_entropy(lg[:-1], torch.tensor(ids[1:]), reduction="sum").item()
    return nll, lg.argmax(-1).numpy()


def llama_windows(path: Path, windows: list[list[int]], threads: int) -> list[np.ndarray]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                          logits_all=True, verbose=False)
    try:
        out = []
        for w in windows:
            llm.reset()
            llm.eval(w)
            out.append(np.array(llm.scores[: len(w)], dtype=np.float32))
        return out
    finally:
        llm.close()


def main() -> None:
    import os

    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("workdir")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--type", default=None, help="GGUF type (default: the run's target.gguf_type)")
    args = ap.parse_args()
    work = Path(args.workdir)
    done = json.loads((work / "stages" / "eval.json").read_text())
    cfg = done.get("config", {})
    gguf_type = args.type or cfg.get("target", {}).get("gguf_type", "q8_0")
    parent_src = resolve_parent_path(cfg.get("parent", "smollm2"))
    tokenizer_src = parent_src if parent_src.is_file() and parent_src.suffix == ".gguf" else None
    models = {"parent": work / "parent", "child": work / "child", "width baseline": work / "baselines" / "width" / "child",
              "depth baseline": work / "baselines" / "depth" / "child"}
    models = {k: v for k, v in models.items() if (v / "config.json").is_file()}
    tokenizer = AutoTokenizer.from_pretrained(work / "parent")
    text = (SHARED / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    ids = tokenizer(text[: 8 * args.tokens]).input_ids[: args.tokens]
    windows = [ids[i: i + 512] for i in range(0, len(ids) - 511, 512)]
    n = sum(len(w) - 1 for w in windows)
    threads = int(os.environ.get("PUZZLENAS_LLAMACPP_THREADS") or os.cpu_count() or 1)
    rows, parent_top = {}, None
    with tempfile.TemporaryDirectory(prefix="puzzlenas-llq-") as tmp:
        for name, folder in models.items():
            gguf = export_gguf(folder, Path(tmp) / f"{name.replace(' ', '_')}.gguf", gguf_type, tokenizer=tokenizer_src)
            ours = llama_windows(gguf, windows, threads)
            model = load_checkpoint(folder, dtype=torch.float32).eval()
            with torch.no_grad():
                ref = [model(torch.tensor([w])).logits[0].numpy() for w in windows]
            del model
            ll = [nll_and_argmax(o, w) for o, w in zip(ours, windows)]
            rl = [nll_and_argmax(r, w) for r, w in zip(ref, windows)]
            top = np.concatenate([a for _, a in ll])
            parent_top = top if name == "parent" else parent_top
            rows[name] = {"llama_ppl": math.exp(sum(x for x, _ in ll) / n), "torch_ppl": math.exp(sum(x for x, _ in rl) / n),
                          "agree_parent": float((top == parent_top).mean()),
                          "agree_own_f32": float((top == np.concatenate([a for _, a in rl])).mean()),
                          "gguf_mib": gguf.stat().st_size / 2**20}
            print(name, rows[name], flush=True)
    print(f"\n{work}: WikiText-2, {n} scored tokens in {len(windows)} windows of 512; GGUF {gguf_type}; "
          f"llama.cpp {threads} thread(s)\n")
    print("| model | GGUF MiB | ppl llama.cpp | ppl PyTorch f32 | ratio | top-1 = parent's (llama.cpp) | top-1 = own f32 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['gguf_mib']:.1f} | {r['llama_ppl']:.2f} | {r['torch_ppl']:.2f} | "
              f"{r['llama_ppl'] / r['torch_ppl']:.4f} | {r['agree_parent']:.3f} | {r['agree_own_f32']:.3f} |")
    (work / f"llamacpp-quality-{gguf_type}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
