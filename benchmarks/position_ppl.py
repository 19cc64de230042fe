"""Where a child loses to its parent along the context: WikiText-2 perplexity by token position.

    python benchmarks/position_ppl.py --workdir W [--models realized/solution0,child] [--windows 16]

W is a work directory (its config.yaml and parent); --models are checkpoint folders relative to W
(or absolute). The start of the WikiText-2 raw test file is cut into --windows windows of
eval.ppl_context tokens, no overlap, each read from its first token; every model's next-token loss
is pooled by position range (1-63, 64-127, 128-255, ... up to the context) and printed as a
perplexity per range, with its ratio to the parent's. eval's perplexity slides a window of
eval.ppl_context tokens by half of it, so past the first window it scores only the second half of
each: positions that BLD, scoring and GKD never see when data.seq_len is shorter than that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from workdir_cli import open_run, parser


def position_ranges(context: int, first: int = 64) -> list[tuple[int, int]]:
    """[(1, 64), (64, 128), (128, 256), ..., (context/2, context)]: positions of predicted tokens."""
    edges = [1]
    edge = first
    while edge < context:
        edges.append(edge)
        edge *= 2
    edges.append(context)
    return list(zip(edges[:-1], edges[1:]))


@torch.no_grad()
def position_nll(model, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(windows, context - 1): the loss of predicting token t+1 from tokens 0..t."""
    device = next(model.parameters()).device
    rows = []
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        rows.append(F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").cpu())
    return torch.cat(rows)


def main(argv: list[str] | None = None) -> str:
    ap = parser(__doc__)
    ap.add_argument("--models", default="realized/solution0,child", help="checkpoint folders, comma-separated")
    ap.add_argument("--windows", type=int, default=16)
    args = ap.parse_args(argv)
    work, cfg, ctx = open_run(args)

    from pathlib import Path

    from puzzlenas.checkpoint.io import load_checkpoint
    from puzzlenas.eval.data import resolve_eval_data

    e = cfg.eval
    ids = ctx.tokenizer(resolve_eval_data(e).wikitext_text(), return_tensors="pt").input_ids[0]
    windows = ids[: args.windows * e.ppl_context].view(args.windows, e.ppl_context)
    ranges = position_ranges(e.ppl_context)
    models = [("parent", ctx.parent)] + [(m, None) for m in filter(None, args.models.split(","))]
    rows = []
    for name, model in models:
        model = model if model is not None else load_checkpoint(Path(work, name)).eval()
        nll = position_nll(model, windows, e.batch_size)
        # nll[:, t] predicts the token at position t + 1
        rows.append((name, [torch.exp(nll[:, a - 1 : b - 1].mean()).item() for a, b in ranges]))
    parent = rows[0][1]
    head = ["model", *(f"positions {a}-{b - 1}" for a, b in ranges)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ppl in rows:
        cells = [f"{p:.2f}" + ("" if name == "parent" else f" ({p / q:.2f}x)") for p, q in zip(ppl, parent)]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    text = (f"workdir {work}: WikiText-2 perplexity by position, {args.windows} windows of {e.ppl_context} tokens "
            f"from the start of the test file; data.seq_len {cfg.data.seq_len}\n\n" + "\n".join(lines))
    print(text)
    return text


if __name__ == "__main__":
    main()
