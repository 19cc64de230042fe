"""The Puzzle paper's ablations at small scale, every variant at the same throughput target and the
same GKD token budget.

    python benchmarks/ablations.py [--config puzzlenas/presets/quick.yaml] [--workdir runs/ablations]
                                   [--target 1.5] [--variants mip,greedy] [--set k=v ...]

Variants (one axis changed at a time against "MIP"):
  MIP                 MIP search on KL scores, BLD-trained blocks, GKD with KL + hidden cosine
  greedy              greedy search (least damage per second saved, swap by swap) instead of the MIP
  random              random cheaper pairs in random layers until the target holds (seed = cfg.seed)
  init-only blocks    the library's blocks straight from initialization (no BLD), scored and searched
  LM-loss scores      the MIP on replace-1-block LM-loss increase instead of KL
  GKD KL only         GKD with KL alone (no hidden-state cosine)
  GKD LM loss         GKD with next-token cross-entropy alone

Data, BLD, scoring and costs run once in <workdir>/base (the pipeline's own stages, resumable); the
init-only library and its scores live in <workdir>/init-only (the scores file holds every metric, so
LM-loss scores need no second scoring pass). Each variant is realized, distilled and evaluated in
<workdir>/variants/<name>/ (a finished variant with the same inputs is not redone). Evaluation: held-out
KL to the parent (the data's validation split), WikiText-2 perplexity and mean lm-eval accuracy over
eval.tasks (eval data: eval.task_data_dir or $PUZZLENAS_DATA). Writes <workdir>/ablations.md and .json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from puzzlenas.errors import PuzzleError
from puzzlenas.workdir import (
    SCORES,
    CostProfile,
    ScoreSet,
    SolutionRecord,
    read_cost_profile,
    read_scores,
    write_solutions,
)

log = logging.getLogger("ablations")

GKD_LOSSES = {"KL + cosine": (1.0, 1.0, 0.0), "KL": (1.0, 0.0, 0.0), "LM loss": (0.0, 0.0, 1.0)}  # kl, cos, lm weights
VARIANTS = {  # name: (search, library, scoring metric, GKD loss)
    "MIP": ("mip", "bld", "kl", "KL + cosine"),
    "greedy": ("greedy", "bld", "kl", "KL + cosine"),
    "random": ("random", "bld", "kl", "KL + cosine"),
    "init-only blocks": ("mip", "init", "kl", "KL + cosine"),
    "LM-loss scores": ("mip", "bld", "lm_loss", "KL + cosine"),
    "GKD KL only": ("mip", "bld", "kl", "KL"),
    "GKD LM loss": ("mip", "bld", "kl", "LM loss"),
}


def slug(name: str) -> str:
    return name.lower().replace(" ", "-").replace("+", "plus")


def build_init_library(cfg, root: Path, ctx, device):
    """A library whose blocks are BLD's starting points (the same initialization, zero training steps)."""
    from puzzlenas.bld import _fresh_state, _record_untrained
    from puzzlenas.library.space import build_unit, enumerate_pairs, is_parent_alternative, target_alternatives
    from puzzlenas.library.store import Library

    parent = ctx.parent
    library = Library(root / "library", ctx.parent_fingerprint, ctx.data.fingerprint)
    alternatives = target_alternatives(cfg, parent.config)
    trainable = [a for a in alternatives if a.trainable and not is_parent_alternative(a, parent.config)]
    units = [*trainable, *enumerate_pairs(cfg.bld.coupled, cfg.search_space, parent.config)]
    todo = [a for a in units if not library.is_done(a)]
    if todo:
        log.info("initializing %d blocks without BLD", len(todo))
        blocks = {a: build_unit(parent.config, a).to(device) for a in todo}
        state = _fresh_state(cfg, parent, ctx.data, blocks, [a.name for a in todo], 0, device)
        for a in todo:
            described = {"attention": a.attention.name, "ffn": a.ffn.name} if a.sub == "pair" else {"kind": a.kind, "size": a.size}
            record = {"layer": a.layer, "sub": a.sub, **described, "init": state["init_method"][a.name], "tokens": 0,
                      "val_nmse_init": state["val_init"][a.name], "val_nmse": state["val_init"][a.name],
                      "file": library.block_path(a).name}
            weights = {k: v.float() if v.is_floating_point() else v for k, v in state["blocks"][a.name].items()}
            library.save_block(a, weights, record)
    _record_untrained(library, alternatives, trainable, parent.config)
    library.write_index({"alternatives": [a.name for a in alternatives]})
    return library


def find_solution(cfg, search_kind: str, metric: str, scores: ScoreSet, profile: CostProfile, alternatives: list[str],
                  out: Path) -> SolutionRecord:
    from puzzlenas import search
    from puzzlenas.search import heuristics

    if search_kind == "mip":
        c = cfg.model_copy(deep=True)
        c.score.metric = metric
        c.search.solutions = 1
        return search.run(c, out, scores, profile, alternatives).solutions[0]
    result = heuristics.run(cfg, scores, profile, alternatives, search_kind, metric=metric)
    write_solutions(out, result)
    return result.solutions[0]


def mean_accuracy(tasks: dict) -> tuple[float | None, float | None]:
    """Mean of the tasks' primary metrics and its standard error (tasks independent)."""
    from puzzlenas.eval import primary_metric

    values, ses = [], []
    for scores in tasks.values():
        m = primary_metric(scores)
        if m is None:
            continue
        values.append(scores[m])
        ses.append(scores.get(f"{m}_stderr", 0.0))
    if not values:
        return None, None
    return sum(values) / len(values), sum(s * s for s in ses) ** 0.5 / len(values)


def evaluate_model(model, ctx, cfg, eval_data, work: Path) -> dict:
    from puzzlenas.eval import kl_and_agreement, lm_eval_accuracy, wikitext_perplexity

    e = cfg.eval
    r = {"kl": kl_and_agreement(model, ctx.parent, ctx.data.val[: e.kl_sequences], e.batch_size)["kl"],
         "ppl": wikitext_perplexity(model, ctx.tokenizer, eval_data.wikitext_text(), e.ppl_context, e.ppl_max_tokens,
                                    e.batch_size)["perplexity"]}
    r["tasks"] = lm_eval_accuracy(model, ctx.tokenizer, eval_data, e.tasks, work, e.limit, e.batch_size) if e.tasks else {}
    r["acc"], r["acc_stderr"] = mean_accuracy(r["tasks"])
    return r


def run_variant(cfg, name: str, spec: tuple, ctx, libraries: dict, scores: dict[str, ScoreSet], profile: CostProfile,
                alternatives: list[str], eval_data, workdir: Path, progress: bool) -> dict:
    from puzzlenas import gkd
    from puzzlenas.checkpoint.io import load_checkpoint, save_checkpoint
    from puzzlenas.eval import kl_and_agreement
    from puzzlenas.realize import assemble_child, choices_from_solution
    from puzzlenas.utils import atomic_write_json, fingerprint

    search_kind, library_kind, metric, loss = spec
    vdir = workdir / "variants" / slug(name)
    t0 = time.perf_counter()
    sol = find_solution(cfg, search_kind, metric, scores[library_kind], profile, alternatives, vdir)
    c = cfg.model_copy(deep=True)
    c.gkd.kl_weight, c.gkd.cosine_weight, c.gkd.lm_weight = GKD_LOSSES[loss]
    key = fingerprint(sol.layers_json(), scores[library_kind].fingerprint, c.gkd.model_dump(mode="json"),
                      c.eval.model_dump(mode="json", exclude={"task_data_dir"}))
    result_file = vdir / "result.json"
    if result_file.is_file() and json.loads(result_file.read_text()).get("key") == key:
        log.info("variant %s: done (inputs unchanged)", name)
        return json.loads(result_file.read_text())
    for other in sorted((workdir / "variants").glob("*/result.json")):
        earlier = json.loads(other.read_text())
        if earlier.get("key") == key and earlier["variant"] != name:
            # the same child, library, scores, GKD and eval: training and evaluation are deterministic, so
            # its numbers are this variant's (e.g. greedy finding the MIP's child)
            log.info("variant %s: the same child and settings as %s; its results reused", name, earlier["variant"])
            result = {**earlier, "variant": name, "search": search_kind, "library": library_kind, "metric": metric,
                      "damage": sol.damage, "same_as": earlier.get("same_as", earlier["variant"]),
                      "seconds": time.perf_counter() - t0}
            atomic_write_json(result_file, result)
            return result
    log.info("variant %s: predicted %.2fx, damage %.4f (%s)", name, sol.predicted_speedup, sol.damage, metric)
    realized, built_from = vdir / "realized", vdir / "realized_from.json"
    child = assemble_child(ctx.parent, choices_from_solution(sol), libraries[library_kind])
    kl_before = kl_and_agreement(child, ctx.parent, ctx.data.val[: cfg.eval.kl_sequences], cfg.eval.batch_size)["kl"]
    # save again only for a new child: an unchanged source lets a killed GKD resume
    if not (realized / "config.json").is_file() or not built_from.is_file() or json.loads(built_from.read_text()) != sol.layers_json():
        save_checkpoint(child, realized, ctx.tokenizer, overwrite=True)
        atomic_write_json(built_from, sol.layers_json())
    del child
    gkd.distill(c, realized, vdir / "child", vdir / "gkd", ctx.parent, ctx.data, ctx.tokenizer, progress)
    done = json.loads((vdir / "gkd" / "done.json").read_text())
    device = next(ctx.parent.parameters()).device
    child = load_checkpoint(vdir / "child").to(device).eval()
    scores_out = evaluate_model(child, ctx, cfg, eval_data, vdir / "eval")
    result = {"variant": name, "key": key, "search": search_kind, "library": library_kind, "metric": metric,
              "gkd_loss": loss, "gkd_tokens": done["tokens"], "predicted_speedup": sol.predicted_speedup,
              "damage": sol.damage, "kl_before": kl_before, **scores_out, "seconds": time.perf_counter() - t0}
    atomic_write_json(result_file, result)
    return result


def format_table(rows: list[dict], parent: dict) -> str:
    def acc(r):
        return "n/a" if r.get("acc") is None else f"{r['acc']:.3f} ± {r['acc_stderr']:.3f}"

    lines = ["| variant | predicted speed-up | predicted damage | KL before GKD | KL after GKD | WikiText-2 ppl | mean acc | wall |",
             "|---|---|---|---|---|---|---|---|",
             f"| parent | 1.00x | 0 | 0 | 0 | {parent['ppl']:.2f} | {acc(parent)} | |"]
    for r in rows:
        label = r["variant"] + (f" (same child as {r['same_as']})" if r.get("same_as") else "")
        lines.append(f"| {label} | {r['predicted_speedup']:.2f}x | {r['damage']:.4f} ({r['metric']}) | "
                     f"{r['kl_before']:.4f} | {r['kl']:.4f} | {r['ppl']:.2f} | {acc(r)} | {r['seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def search_damage(args) -> str:
    """Predicted summed damage (KL) of MIP, greedy and random (mean of 5 seeds) at several targets."""
    from puzzlenas.config import load_config, parse_factor
    from puzzlenas.library.space import target_alternatives
    from puzzlenas.pipeline import _profile_name, parent_config
    from puzzlenas.utils import pick_device

    base = Path(args.workdir) / "base"
    cfg = load_config(args.config, args.set)
    if not (base / SCORES).is_file():
        raise PuzzleError(f"{base / SCORES} not found; run the benchmark (or its base stages) first")
    scores = read_scores(base)
    profile = read_cost_profile(base, _profile_name(cfg, pick_device()))
    alternatives = [a.name for a in target_alternatives(cfg, parent_config(base))]
    lines = ["| target | MIP | greedy | random (mean of 5 seeds) |", "|---|---|---|---|"]
    for target in (parse_factor(t) for t in args.search_only.split(",")):
        cfg.search.throughput = target
        mip = find_solution(cfg, "mip", "kl", scores, profile, alternatives, Path(args.workdir) / "search-only").damage
        greedy = find_solution(cfg, "greedy", "kl", scores, profile, alternatives, Path(args.workdir) / "search-only").damage
        rand = [find_solution(cfg.model_copy(update={"seed": s}), "random", "kl", scores, profile, alternatives,
                              Path(args.workdir) / "search-only").damage for s in range(5)]
        lines.append(f"| {target:g}x | {mip:.3f} | {greedy:.3f} | {sum(rand) / len(rand):.3f} |")
    print("\n".join(lines))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "puzzlenas" / "presets" / "quick.yaml"))
    ap.add_argument("--workdir", default="runs/ablations")
    ap.add_argument("--target", default="1.5", help="throughput target, e.g. 1.5 or 1.5x")
    ap.add_argument("--variants", default=None, help="comma-separated subset (names as in the table, or their slugs)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--search-only", metavar="TARGETS", default=None,
                    help="e.g. 1.3,1.5,2: only the searches' summed damage at these targets, from <workdir>/base's "
                         "finished scores and costs (no training)")
    args = ap.parse_args(argv)
    if args.search_only:
        return search_damage(args)

    from puzzlenas.config import load_config, parse_factor
    from puzzlenas.eval.data import resolve_eval_data
    from puzzlenas.library.space import target_alternatives
    from puzzlenas.pipeline import _profile_name, context, open_library, run_pipeline, shared_context
    from puzzlenas.score import run as score
    from puzzlenas.utils import atomic_write_json, atomic_write_text, pick_device

    target = parse_factor(args.target)
    cfg = load_config(args.config, [*args.set, f"search.throughput={target}"])
    chosen = dict(VARIANTS)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        by_key = {**{slug(k): k for k in VARIANTS}, **{k.lower(): k for k in VARIANTS}}
        unknown = [v for v in wanted if v.lower() not in by_key]
        if unknown:
            raise PuzzleError(f"unknown variant {unknown[0]!r} (known: {', '.join(slug(k) for k in VARIANTS)})")
        chosen = {by_key[v.lower()]: VARIANTS[by_key[v.lower()]] for v in wanted}
    eval_data = resolve_eval_data(cfg.eval)
    problem = eval_data.problem(cfg.eval.tasks)  # before hours of training, not after
    if problem:
        raise PuzzleError(problem)
    workdir = Path(args.workdir)
    base, device = workdir / "base", pick_device()
    progress = not args.quiet
    with shared_context():
        run_pipeline(cfg, base, stages=["data", "bld", "score", "costs"], progress=progress)
        ctx = context(cfg, base)
        profile = read_cost_profile(base, _profile_name(cfg, device))
        alternatives = [a.name for a in target_alternatives(cfg, ctx.parent.config)]
        libraries = {"bld": open_library(base, ctx)}
        scores = {"bld": read_scores(base)}
        if any(spec[1] == "init" for spec in chosen.values()):
            libraries["init"] = build_init_library(cfg, workdir / "init-only", ctx, device)
            scores["init"] = score(cfg, workdir / "init-only", ctx.parent, ctx.data, libraries["init"], progress)
        parent_file = workdir / "parent_eval.json"
        parent_key = cfg.eval.model_dump(mode="json", exclude={"task_data_dir"})
        if parent_file.is_file() and json.loads(parent_file.read_text()).get("key") == parent_key:
            parent = json.loads(parent_file.read_text())
        else:
            parent = {"key": parent_key, **evaluate_model(ctx.parent, ctx, cfg, eval_data, workdir / "parent_eval")}
            atomic_write_json(parent_file, parent)
        rows = [run_variant(cfg, name, spec, ctx, libraries, scores, profile, alternatives, eval_data, workdir, progress)
                for name, spec in chosen.items()]
    budgets = (f"target {target:g}x ({profile.device}{', estimated' if profile.estimated else ''}), "
               f"BLD {cfg.bld.tokens:,} tokens/block, scoring {cfg.score.sequences} x {cfg.data.seq_len} tokens, "
               f"GKD {cfg.gkd.tokens:,} tokens, eval: KL on {cfg.eval.kl_sequences} held-out sequences, WikiText-2 "
               f"{cfg.eval.ppl_max_tokens or 'all'} tokens, "
               + (f"{cfg.eval.limit or 'all'} items x {', '.join(cfg.eval.tasks)}" if cfg.eval.tasks else "no lm-eval tasks"))
    table = format_table(rows, parent) + "\n\n" + budgets
    atomic_write_text(workdir / "ablations.md", table + "\n")
    atomic_write_json(workdir / "ablations.json", {"budgets": budgets, "parent": parent, "variants": rows})
    print(table)
    return table


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        main()
    except PuzzleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)  # bad input, as the CLI
