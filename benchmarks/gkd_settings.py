"""More learning per CPU-second: GKD at an equal token budget, batch size x learning rate.

    python benchmarks/gkd_settings.py --workdir W [--tokens 8192] [--variants 8:5e-5,8:2e-4,2:1e-4,2:3e-4]
    python benchmarks/gkd_settings.py --workdir W --variants 2:2e-4:float32,2:2e-4:bfloat16
    python benchmarks/gkd_settings.py --workdir W --tokens 131072 --variants 2:5e-4 --with-run-child

W is a work directory whose realize stage has finished (e.g. `puzzlenas run --preset quick`); its
config.yaml is the configuration used and its chosen solution (search/selection.json) the child.
Every variant distills that same realized child from the same batches' tokens (the same budget:
`--tokens`), differing only in batch size (sequences per optimizer step), peak learning rate and,
when a variant names one, the training precision (gkd.dtype; else the config's): at budgets of a
few thousand tokens the default (8 sequences per step) makes only a handful of optimizer steps, and
on a CPU with native bf16 the precision decides how many tokens an hour buys. Each variant's child is measured against the parent:
  KL val         the GKD validation KL (data.val[:eval.kl_sequences]) before and after
  KL held-out    on the validation sequences GKD does not see, and on WikiText-2 sequences
  WikiText-2 ppl eval.ppl_context / eval.ppl_max_tokens, from the start of the test file
  tok/s          the variant's own training throughput (seconds in gkd's done.json; this machine,
                 whatever else ran on it)
--with-run-child adds a row for W's own distilled child (W/child, gkd's done.json): the run's
own GKD setting, measured the same way, without distilling it again.
Variants go to W/gkd-settings/<batch>x<lr>[-<dtype>]-<tokens>tok/; the table to W/gkd-settings.md.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from workdir_cli import open_run, parser

log = logging.getLogger("gkd_settings")


def parse_variants(text: str) -> list[tuple[int, float, str | None]]:
    """"8:5e-5,2:2e-4:bfloat16" -> [(8, 5e-5, None), (2, 2e-4, "bfloat16")]: batch:lr[:dtype]."""
    out = []
    for item in filter(None, text.split(",")):  # "" -> none: only the parent, realized and --with-run-child rows
        batch, lr, *dtype = item.split(":")
        out.append((int(batch), float(lr), dtype[0] if dtype else None))
    return out


def main(argv: list[str] | None = None) -> str:
    ap = parser(__doc__)
    ap.add_argument("--tokens", type=int, default=8192, help="GKD tokens per variant")
    ap.add_argument("--variants", default="8:5e-5,8:2e-4,2:1e-4,2:3e-4",
                    help="batch:lr[:dtype], comma-separated (dtype: float32, bfloat16 or auto)")
    ap.add_argument("--with-run-child", action="store_true",
                    help="also measure W's own distilled child (W/child): the run's GKD setting, not trained again")
    args = ap.parse_args(argv)
    work, cfg, ctx = open_run(args)

    from puzzlenas import gkd
    from puzzlenas.checkpoint.io import load_checkpoint
    from puzzlenas.eval import kl_and_agreement, wikitext_perplexity
    from puzzlenas.eval.data import resolve_eval_data
    from puzzlenas.realize.selection import chosen_solution, selection_sequences
    from puzzlenas.utils import atomic_write_json, atomic_write_text
    from puzzlenas.workdir import realized_dir

    source = work / realized_dir(chosen_solution(cfg, work))
    held_out, sources = selection_sequences(cfg, ctx.data.val, ctx.tokenizer)
    eval_text = resolve_eval_data(cfg.eval).wikitext_text()
    e = cfg.eval

    def measure(model) -> dict:
        out = {f"kl_{k}": kl_and_agreement(model, ctx.parent, ids, e.batch_size)["kl"] for k, ids in held_out.items()}
        out["ppl"] = wikitext_perplexity(model, ctx.tokenizer, eval_text, e.ppl_context, e.ppl_max_tokens,
                                         e.batch_size)["perplexity"]
        return out

    def trained_row(name: str, batch: int, lr: float, gkd_dir: Path, child) -> dict:
        """A distilled child's row: its GKD run's record (gkd_dir/done.json) and its measures."""
        done = json.loads((gkd_dir / "done.json").read_text())
        return {"variant": name, "batch": batch, "lr": lr, "steps": done["steps"], "tokens": done["tokens"],
                "tok_s": done["tokens"] / done["seconds"], "val_kl_before": done["val_kl_before"],
                "val_kl_after": done["val_kl_after"], **measure(child)}

    rows = [{"variant": "parent", **measure(ctx.parent)}]
    rows.append({"variant": "realized, no GKD", **measure(load_checkpoint(source).eval())})
    if args.with_run_child:
        g = cfg.gkd
        rows.append(trained_row(f"W/child: {g.batch_size}x{g.optim.lr:g}-{g.tokens}tok", g.batch_size, g.optim.lr,
                                work / "gkd", load_checkpoint(work / "child").eval()))
    for batch, lr, dtype in parse_variants(args.variants):
        c = cfg.model_copy(deep=True)
        c.gkd.tokens, c.gkd.batch_size, c.gkd.optim.lr = args.tokens, batch, lr
        c.gkd.dtype = dtype or c.gkd.dtype
        c.gkd.val_every = c.gkd.checkpoint_every = 10**6  # validation only at the start and the end
        # the token budget is in the name, so variants at several budgets are kept side by side (a folder
        # distilled with another recipe would be distilled again over the old one)
        name = f"{batch}x{lr:g}" + (f"-{dtype}" if dtype else "") + f"-{args.tokens}tok"
        out = work / "gkd-settings" / name
        t0 = time.perf_counter()
        child_dir = gkd.distill(c, source, out / "child", out / "gkd", ctx.parent, ctx.data, ctx.tokenizer,
                                progress=not args.quiet)
        wall = time.perf_counter() - t0
        child = load_checkpoint(child_dir).eval()
        rows.append({**trained_row(name, batch, lr, out / "gkd", child), "wall_s": wall})
        log.info("%s: %s", name, rows[-1])
        del child
    kls = [k for k in rows[0] if k.startswith("kl_")]
    head = ["GKD batch x peak lr[-dtype]", "steps", "tokens", "val KL before -> after", *(f"KL {k[3:]}" for k in kls),
            "WikiText-2 ppl", "tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        trained = "steps" in r
        cells = [r["variant"], str(r.get("steps", "")), str(r.get("tokens", "")),
                 f"{r['val_kl_before']:.4f} -> {r['val_kl_after']:.4f}" if trained else "",
                 *(f"{r[k]:.4f}" for k in kls), f"{r['ppl']:.2f}", f"{r['tok_s']:.0f}" if trained else ""]
        lines.append("| " + " | ".join(cells) + " |")
    what = "; ".join(f"{k}: {v.get('what', v.get('unavailable'))}" for k, v in sources.items())
    text = (f"workdir {work}, child {source.name}, {args.tokens} GKD tokens per variant, seq_len "
            f"{ctx.data.train.shape[1]}; held-out KL on {what}; ppl on {e.ppl_max_tokens} WikiText-2 tokens, "
            f"context {e.ppl_context}\n\n" + "\n".join(lines))
    atomic_write_json(work / "gkd-settings.json", {"rows": rows, "sources": sources, "tokens": args.tokens})
    atomic_write_text(work / "gkd-settings.md", text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
