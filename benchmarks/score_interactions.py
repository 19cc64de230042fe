"""Does correcting the additive estimate find better children? Additive vs refined search, same target.

    python benchmarks/score_interactions.py --workdir W [--targets 1.5,2] [--rounds 3] [--max-changes K] [--set k=v ...]

W is a work directory whose data, bld, score and costs stages have finished (e.g. one of
`puzzlenas run --preset quick`); its config.yaml is the configuration used. Per target:
  additive   the plain MIP on summed replace-1-block damage (search.refine_rounds=0)
  refined    the same, then search.refine_rounds rounds of re-scoring inside the child and solving
             again (search/refine.py)
Both are one solution at the same throughput target from the same library, scores and costs, and
each child is assembled from the library (no GKD) and measured against the parent:
  KL scoring text    on the scoring sequences, data.val[:score.sequences]: the text refinement saw
  KL held-out        on data.val[score.sequences:], text neither scoring nor refinement saw
  KL WikiText-2      on sequences from the end of the WikiText-2 raw test file
  WikiText-2 ppl     eval.ppl_context / eval.ppl_max_tokens, from the start of that file
Searches go to W/interactions/<target>/{additive,refined}/search/; the table to W/interactions-<targets>.md.
"""

from __future__ import annotations

import json
import logging
import time

from workdir_cli import open_run, parser

log = logging.getLogger("score_interactions")


def measure(child, ctx, cfg, seqs: dict, eval_text: str) -> dict:
    from puzzlenas.eval import kl_and_agreement, wikitext_perplexity

    out = {name: kl_and_agreement(child, ctx.parent, ids, cfg.eval.batch_size)["kl"] for name, ids in seqs.items()}
    out["ppl"] = wikitext_perplexity(child, ctx.tokenizer, eval_text, cfg.eval.ppl_context, cfg.eval.ppl_max_tokens,
                                     cfg.eval.batch_size)["perplexity"]
    return out


def main(argv: list[str] | None = None) -> str:
    ap = parser(__doc__)
    ap.add_argument("--targets", default="1.5,2", help="throughput targets, e.g. 1.5,2")
    ap.add_argument("--rounds", type=int, default=3, help="search.refine_rounds of the refined search")
    ap.add_argument("--max-changes", type=int, default=None, help="search.refine_max_changes: layers a round may change (0: any; default: the config's)")
    args = ap.parse_args(argv)
    work, cfg, ctx = open_run(args)

    from puzzlenas import search
    from puzzlenas.config import parse_factor
    from puzzlenas.eval.data import resolve_eval_data
    from puzzlenas.library.space import target_alternatives
    from puzzlenas.pipeline import open_library
    from puzzlenas.realize import assemble_child, choices_from_solution
    from puzzlenas.realize.selection import selection_sequences
    from puzzlenas.search.refine import make_hook
    from puzzlenas.utils import atomic_write_json, atomic_write_text
    from puzzlenas.workdir import read_cost_profile, read_scores

    library = open_library(work, ctx)
    scores = read_scores(work)
    profile = read_cost_profile(work)
    alternatives = [a.name for a in target_alternatives(cfg, ctx.parent.config)]
    n = cfg.score.sequences
    val = ctx.data.val
    if len(val) <= n:
        raise SystemExit(f"data.val_sequences={len(val)} leaves no held-out text after score.sequences={n}")
    seqs = {"scoring": val[:n], "held-out": val[n:]}
    wiki, sources = selection_sequences(cfg, val, ctx.tokenizer)
    if "wikitext2" in wiki:
        seqs["wikitext2"] = wiki["wikitext2"]
    eval_text = resolve_eval_data(cfg.eval).wikitext_text()

    # the trust region: --max-changes, else the config's search.refine_max_changes (0 / null: none)
    k = cfg.search.refine_max_changes if args.max_changes is None else (args.max_changes or None)
    parent_ppl = measure(ctx.parent, ctx, cfg, {}, eval_text)["ppl"]
    rows = []
    for target in (parse_factor(t) for t in args.targets.split(",")):
        for kind in ("additive", "refined"):
            c = cfg.model_copy(deep=True)
            c.search.throughput, c.search.solutions = target, 1
            c.search.refine_rounds = args.rounds if kind == "refined" else 0
            c.search.refine_max_changes = k
            out = work / "interactions" / f"{target:g}x" / (kind if kind == "additive" else f"{kind}-k{k or 'any'}")
            t0 = time.perf_counter()
            hook = make_hook(c, out, ctx.parent, ctx.data, library, progress=not args.quiet) if kind == "refined" else None
            sol = search.run(c, out, scores, profile, alternatives, hook).solutions[0]
            seconds = time.perf_counter() - t0
            record = json.loads((out / "search" / "refine.json").read_text()) if kind == "refined" else None
            child = assemble_child(ctx.parent, choices_from_solution(sol), library)
            m = measure(child, ctx, cfg, seqs, eval_text)
            del child
            rows.append({"target": target, "search": kind, "predicted_speedup": sol.predicted_speedup,
                         "damage": sol.damage, "layers": sol.layers_json(), "search_seconds": seconds,
                         "rounds": len(record["rounds"]) - 1 if record else 0,
                         "stopped": record["stopped"] if record else "", "refine": record, **m})
            log.info("%gx %s: %s", target, kind, {k: rows[-1][k] for k in ("damage", *seqs, "ppl")})
    for r in rows:  # layers where the refined child differs from the additive one
        base = next(x for x in rows if x["target"] == r["target"] and x["search"] == "additive")
        r["changed_layers"] = [i for i, (a, b) in enumerate(zip(base["layers"], r["layers"])) if a != b]
    table = format_table(rows, parent_ppl, list(seqs))
    head = (f"workdir {work}, score.sequences={n} x {val.shape[1]} tokens, held-out {len(val) - n} x {val.shape[1]}, "
            f"WikiText-2 KL on {len(seqs.get('wikitext2', []))} x {val.shape[1]} "
            f"({sources['wikitext2'].get('what', sources['wikitext2'].get('unavailable'))}), "
            f"ppl on {cfg.eval.ppl_max_tokens} tokens, context {cfg.eval.ppl_context}; refined: up to {args.rounds} rounds"
            + (f", at most {k} layers changed per round" if k else ", any number of layers changed per round"))
    text = head + "\n\n" + table
    name = "interactions-" + "-".join(f"{t}x" for t in args.targets.split(",")) + f"-k{k or 'any'}"
    atomic_write_json(work / f"{name}.json", {"parent_ppl": parent_ppl, "rows": rows, "sources": sources})
    atomic_write_text(work / f"{name}.md", text + "\n")
    print(text)
    return text


def format_table(rows: list[dict], parent_ppl: float, kls: list[str]) -> str:
    names = {"scoring": "KL scoring text", "held-out": "KL held-out", "wikitext2": "KL WikiText-2"}
    head = ["target", "search", "rounds", "predicted speed-up", "predicted KL", *(names[k] for k in kls),
            "WikiText-2 ppl", "layers changed", "search time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| - | parent | | 1.00x | 0 | " + " | ".join("0" for _ in kls) + f" | {parent_ppl:.2f} | | |"]
    for r in rows:
        cells = [f"{r['target']:g}x", r["search"], str(r["rounds"]) + (f" ({r['stopped'].split(':')[0]})" if r["stopped"] else ""),
                 f"{r['predicted_speedup']:.3f}x", f"{r['damage']:.4f}", *(f"{r[k]:.4f}" for k in kls),
                 f"{r['ppl']:.2f}", str(len(r["changed_layers"])), f"{r['search_seconds']:.0f} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
