"""The data stage's cost: SmolLM2-135M writing its own distillation text, in fp32 and in bf16.

    python benchmarks/generation_throughput.py [--batch 64] [--seq-len 256] [--rounds 3]

With no data.path the parent samples its distillation text from BOS (data.generate_sequences):
on a CPU that is the data stage's whole cost, and the default preset's 528 sequences take about
ten minutes. Does bf16 buy it back where the CPU runs bf16 natively, as it does for BLD and GKD?
Three ways to write the same text, per precision:
  fp32           what data.prepare_data does by default (data.dtype: float32)
  bf16 autocast  the fp32 parent under torch.autocast (BLD and GKD train so); its weights do not
                 require grad, so autocast casts each of them again at every decoding step
  bf16 weights   a bf16 copy of the parent (1.5x the memory while it writes): what
                 data.dtype: bfloat16 (or auto, where bf16 is native) does
This prints, per way:
  tok/s      generated tokens per second, median over --rounds rounds of one batch each, the
             precisions interleaved round by round (this machine is shared), with the spread
  fp32 NLL   the fp32 parent's mean negative log-likelihood of the text written (nats per token):
             the text is the parent's whichever way wrote it if this is the same in every row,
             within the spread between rounds
Every round uses another seed, the same for each way.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64, help="sequences per round (generate_sequences' batch)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "puzzlenas-bench"))
    args = ap.parse_args(argv)

    from puzzlenas.checkpoint.parent import prepare_parent
    from puzzlenas.data import generate_sequences
    from puzzlenas.utils import cpu_bf16_is_faster

    torch.manual_seed(0)
    parent, tokenizer, _ = prepare_parent("smollm2", Path(args.cache))
    parent.eval()

    @torch.no_grad()
    def nll(seqs: torch.Tensor) -> float:
        total = 0.0
        for chunk in seqs.split(8):  # 8 x 256 x 49k fp32 logits: 400 MB at a time
            logits = parent(chunk).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        return total.item() / (seqs.shape[0] * (seqs.shape[1] - 1))

    bf16_copy = copy.deepcopy(parent).to(torch.bfloat16)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    precisions = {"fp32": (parent, contextlib.nullcontext), "bf16 autocast": (parent, autocast),
                  "bf16 weights": (bf16_copy, contextlib.nullcontext)}
    rates = {k: [] for k in precisions}
    nlls = {k: [] for k in precisions}
    for r in range(args.rounds):
        for name, (model, precision) in precisions.items():
            t = time.perf_counter()
            with precision():
                seqs = generate_sequences(model, tokenizer, args.batch, args.seq_len, 1.0, seed=r, batch=args.batch)
            rates[name].append(args.batch * (args.seq_len - 1) / (time.perf_counter() - t))
            nlls[name].append(nll(seqs))

    print(f"\nSmolLM2-135M, {args.batch} sequences x {args.seq_len} tokens per round, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads; CPU bf16 matmul native (measured): {cpu_bf16_is_faster()}\n")
    print("| precision | tok/s median | tok/s min-max | fp32 NLL of the text, median (min-max) |")
    print("|---|---|---|---|")
    base = statistics.median(rates["fp32"])
    for name in precisions:
        med = statistics.median(rates[name])
        print(f"| {name} | {med:.0f} ({med / base:.2f}x) | {min(rates[name]):.0f}-{max(rates[name]):.0f} | "
              f"{statistics.median(nlls[name]):.3f} ({min(nlls[name]):.3f}-{max(nlls[name]):.3f}) |")


if __name__ == "__main__":
    main()
