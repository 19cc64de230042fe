"""BLD at an equal token budget: batch size x learning rate, judged by each block's held-out error.

    python benchmarks/bld_settings.py --workdir W [--tokens 49152] [--variants 8:1e-4,2:1e-3,2:3e-3]

W is a work directory whose data stage has finished (e.g. `puzzlenas run --only data`); its
config.yaml is the configuration used. Every variant trains W's whole library again, from the same
initializations on the same batches' tokens (the same budget: `--tokens`), differing only in batch
size (sequences per optimizer step) and peak learning rate: at CPU budgets BLD makes a few dozen
optimizer steps, and what a block learns in them decides how much of the parent a child keeps.
It prints, per kind of alternative, the mean normalized MSE of the block's output against the
parent sub-block's on the data's validation sequences (`val nmse`, the number BLD minimizes, on
text it did not train on), at initialization and after training, and the mean of their ratio.
Variants go to W/bld-settings/<batch>x<lr>-<tokens>tok/library; the table to W/bld-settings.md.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import defaultdict
from pathlib import Path

from workdir_cli import open_run, parser

log = logging.getLogger("bld_settings")


def parse_variants(text: str) -> list[tuple[int, float]]:
    """"8:1e-4,2:3e-3" -> [(8, 1e-4), (2, 3e-3)]: batch:lr."""
    out = []
    for item in filter(None, text.split(",")):
        batch, lr = item.split(":")
        out.append((int(batch), float(lr)))
    return out


def kind_of(record: dict) -> str:
    """'attention gqa1', 'ffn mlp768', 'attention linear': one row of the table per kind."""
    return f"{record['sub']} {record['kind']}{record['size'] if record['size'] is not None else ''}"


def nmse_by_kind(library_dir: Path) -> dict[str, dict]:
    """Mean val nmse at initialization and trained, and the mean trained/init ratio, per kind."""
    groups = defaultdict(list)
    for f in sorted((library_dir / "blocks").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("val_nmse_init") is not None and r.get("val_nmse") is not None:  # trained blocks only
            groups[kind_of(r)].append((r["val_nmse_init"], r["val_nmse"]))
    return {k: {"blocks": len(v), "init": statistics.mean(a for a, _ in v), "trained": statistics.mean(b for _, b in v),
                "ratio": statistics.mean(b / a for a, b in v)} for k, v in sorted(groups.items())}


def main(argv: list[str] | None = None) -> str:
    ap = parser(__doc__)
    ap.add_argument("--tokens", type=int, default=None, help="BLD tokens per variant (default: the config's bld.tokens)")
    ap.add_argument("--variants", default="8:1e-4,2:1e-3,2:3e-3", help="batch:lr, comma-separated")
    args = ap.parse_args(argv)
    work, cfg, ctx = open_run(args)

    from puzzlenas import bld
    from puzzlenas.utils import atomic_write_json, atomic_write_text

    tokens = args.tokens or cfg.bld.tokens
    results = {}
    for batch, lr in parse_variants(args.variants):
        c = cfg.model_copy(deep=True)
        c.bld.tokens, c.bld.batch_size, c.bld.optim.lr = tokens, batch, lr
        name = f"{batch}x{lr:g}-{tokens}tok"  # the budget is in the name: variants at several budgets side by side
        out = work / "bld-settings" / name
        t0 = time.perf_counter()
        bld.run(c, out, ctx.parent, ctx.data, ctx.parent_fingerprint, progress=not args.quiet)
        results[name] = {"batch": batch, "lr": lr, "steps": bld.steps(c.bld, ctx.data.train.shape[1]),
                         "wall_s": time.perf_counter() - t0, "kinds": nmse_by_kind(out / "library")}
        log.info("%s: %s", name, results[name])
    kinds = sorted({k for r in results.values() for k in r["kinds"]})
    head = ["BLD batch x peak lr", "steps", *(f"{k}: init -> trained (ratio)" for k in kinds), "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cells = [name, str(r["steps"])]
        for k in kinds:
            m = r["kinds"].get(k)
            cells.append(f"{m['init']:.4f} -> {m['trained']:.4f} ({m['ratio']:.3f})" if m else "")
        cells.append(f"{r['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = (f"workdir {work}, {tokens} BLD tokens per variant, seq_len {ctx.data.train.shape[1]}; mean normalized "
            f"MSE per kind of alternative on the {ctx.data.val.shape[0]} validation sequences (a block's ratio: "
            f"trained / init, then averaged)\n\n" + "\n".join(lines))
    atomic_write_json(work / "bld-settings.json", {"tokens": tokens, "variants": results})
    atomic_write_text(work / "bld-settings.md", text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
