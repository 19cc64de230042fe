"""A Pareto sweep: several throughput targets from one library and one score set.

    puzzlenas sweep CONFIG --targets 1.2 1.5 2.0 --workdir W

data, bld, score and costs run once in W (skipped when done, as in `run`). The target the config
itself names (search.throughput) runs in W, as `puzzlenas run` would; every other target gets
its own work directory W/sweep/<t>x/ whose parent/, data/, library/, scores/, costs/ and
eval-memo/ (eval/memo.py: the parent's quality is measured once) are links to W's and whose
stage markers of those four stages are copies of W's, so its pipeline starts at search and
never trains a block: search, realize (with selection), gkd, baselines, eval and
report, each skipped when done, so a killed sweep resumes where it stopped. Every child and
baseline is distilled with the same gkd section (the same token budget).

Targets evaluated before in W with the same settings (W's own run, an earlier sweep's folders) join
the table: `puzzlenas sweep --targets 2.0` after a run at 1.2x gives both.

Writes W/report/sweep.json, sweep.md (per target: child, width and depth baselines with KL,
WikiText-2 perplexity, mean accuracy and measured speed-up with its min-max) and sweep.png
(quality against measured speed, all targets), and W/report/report.md with them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .config import PuzzleConfig
from .errors import PuzzleError
from .utils import atomic_write_json, atomic_write_text
from .workdir import SELECTION, baseline_file, read_baseline, read_selection, read_solutions

log = logging.getLogger(__name__)

SHARED = ("data", "bld", "score", "costs")  # run once in W; the targets only read their outputs
# eval-memo: the quality each model measured (eval/memo.py), so every target reuses the parent's
SHARED_PATHS = ("parent", "data", "library", "scores", "costs", "eval-memo")
PER_TARGET = ["search", "realize", "gkd", "baselines", "eval", "report"]
MODELS = {"child": "child", "width": "width baseline", "depth": "depth baseline"}  # row -> name in eval results


def target_label(target: float) -> str:
    """A target's name in the table and its folder: 1.2 -> "1.2x"."""
    return f"{target:g}x"


def target_dir(workdir: Path, target: float) -> Path:
    return Path(workdir) / "sweep" / target_label(target)


def target_folder(cfg: PuzzleConfig, workdir: Path, target: float) -> Path:
    """Where a target's stages run: W itself for the target the config names (what `puzzlenas run`
    computes there, so a sweep over a finished run reuses its child and baselines instead of
    distilling them again in a copy), else W/sweep/<t>x/."""
    own = cfg.search.throughput is not None and abs(float(target) - cfg.search.throughput) < 1e-9
    return Path(workdir) if own else target_dir(workdir, target)


def link_shared(workdir: Path, sub: Path) -> None:
    """Make `sub` read W's upstream artifacts: relative links to its folders, copies of its markers."""
    sub.mkdir(parents=True, exist_ok=True)
    for name in SHARED_PATHS:
        link, source = sub / name, workdir / name
        if not source.exists():
            continue
        rel = os.path.relpath(source, sub)
        if link.is_symlink() and os.readlink(link) == rel:
            continue
        if link.exists() or link.is_symlink():  # something else in its place: never train or copy beside it
            raise PuzzleError(f"{link} exists and is not a link to {source}; move it away to rerun the sweep")
        link.symlink_to(rel, target_is_directory=True)
    for stage in SHARED:
        marker = workdir / "stages" / f"{stage}.json"
        if not marker.is_file():
            raise PuzzleError(f"stage {stage!r} has not finished in {workdir}")
        (sub / "stages").mkdir(exist_ok=True)
        atomic_write_json(sub / "stages" / f"{stage}.json", json.loads(marker.read_text()))


def run_sweep(cfg: PuzzleConfig, workdir: str | Path, targets: list[float], progress: bool = True) -> dict:
    """The shared stages once, every target's stages in its folder, then the combined table and plot."""
    from .pipeline import run_pipeline

    workdir = Path(workdir)
    if not targets:
        raise PuzzleError("sweep: give at least one target (--targets 1.2 1.5 2.0)")
    if any(t <= 0 for t in targets) or len(set(targets)) != len(targets):
        raise PuzzleError(f"sweep: targets must be distinct and positive (got {', '.join(f'{t:g}' for t in targets)})")
    from .preflight import check_inputs

    check_inputs(cfg, workdir, [*SHARED, *PER_TARGET])  # e.g. WikiText-2 for eval: before hours of BLD, not after
    for stage, status in run_pipeline(cfg, workdir, stages=list(SHARED), progress=progress).items():
        log.info("sweep: %-9s %s", stage, status)
    (workdir / "eval-memo").mkdir(exist_ok=True)
    evaluated = {}  # table label -> the folder its rows come from
    for t in targets:
        sub = target_folder(cfg, workdir, t)
        if sub != workdir:
            link_shared(workdir, sub)
        cfg_t = target_config(cfg, t)
        log.info("sweep: target %gx in %s", t, sub)
        for stage, status in run_pipeline(cfg_t, sub, stages=PER_TARGET, progress=progress).items():
            log.info("sweep %gx: %-9s %s", t, stage, status)
        evaluated[target_label(t)] = sub
    for t, sub in evaluated_targets(cfg, workdir, skip=set(evaluated)):  # `sweep --targets 2` after a run at 1.2
        log.info("sweep: %gx evaluated before in %s with these settings: in the table", t, sub)
        evaluated[target_label(t)] = sub
    order = sorted(evaluated, key=lambda label: float(label[:-1]))
    folders = {k: os.path.relpath(evaluated[k], workdir) for k in order}
    sweep = {"targets": [float(label[:-1]) for label in order], "engine": cfg.target.engine,
             "gkd_tokens": cfg.gkd.tokens, "rows": {k: target_rows(evaluated[k]) for k in order}, "folders": folders}
    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    sweep_figure(sweep, out / "sweep.png")
    atomic_write_text(out / "sweep.md", "# Pareto sweep\n\n![sweep](sweep.png)\n\n" + format_sweep(sweep) + "\n")
    atomic_write_json(out / "sweep.json", sweep)  # its presence means the table and plot are complete
    if "." in folders.values():
        # W's report is then its own target's report stage: redo it there, so the marker records the
        # report.md that now holds the sweep section (else the next run would see it changed)
        run_pipeline(cfg, workdir, only="report", progress=progress)
    else:
        from .report import write_report

        write_report(workdir)  # W's report: the sweep section alone (W has no search or eval of its own)
    return sweep


def target_config(cfg: PuzzleConfig, target: float) -> PuzzleConfig:
    """The config with search.throughput set to `target`: what a target's stages run with."""
    cfg_t = cfg.model_copy(deep=True)
    cfg_t.search = cfg_t.search.model_copy(update={"throughput": float(target)})
    return cfg_t


def evaluated_targets(cfg: PuzzleConfig, workdir: Path, skip: set[str]) -> list[tuple[float, Path]]:
    """Targets not labelled in `skip` ("1.2x", as the table labels them) whose evaluation in W (the config's own target) or W/sweep/<t>x/ is
    finished and up to date with `cfg`: every stage from data to eval has the fingerprint these settings
    give it, so its rows are what this sweep would have computed. A folder evaluated with other settings
    (another GKD budget, another config's target in W) stays out of the table."""
    from .costs import device_name
    from .pipeline import stage_done, stage_fingerprints
    from .utils import pick_device

    candidates = {}
    if cfg.search.throughput is not None:
        candidates[cfg.search.throughput] = Path(workdir)
    for folder in sorted((Path(workdir) / "sweep").glob("*x")):
        try:
            candidates.setdefault(float(folder.name[:-1]), folder)
        except ValueError:
            continue  # not a target's folder
    device = device_name(pick_device())
    found = []
    for t, sub in sorted(candidates.items()):
        if target_label(t) in skip or not (sub / "eval" / "results.json").is_file():
            continue
        if stage_done(sub, "eval", stage_fingerprints(target_config(cfg, t), device)["eval"]):
            found.append((t, sub))
        else:
            log.info("sweep: %gx in %s was evaluated with other settings: left out of the table", t, sub)
    return found


def target_rows(sub: Path) -> dict:
    """Per model of one target: KL, WikiText-2 perplexity, mean accuracy and measured speed-up."""
    results = json.loads((sub / "eval" / "results.json").read_text())
    solutions = read_solutions(sub)
    chosen = read_selection(sub).chosen if (sub / SELECTION).is_file() else None
    from .eval import above_chance

    chance = above_chance(results) or {"kept": {}, "kept_stderr": {}}  # None: evaluated before chance levels
    rows = {}
    for row, name in MODELS.items():
        r = results["models"].get(name)
        if r is None:  # a baseline that cannot reach the target
            baseline = read_baseline(sub, row) if (sub / baseline_file(row)).is_file() else None
            why = baseline if isinstance(baseline, str) else None
            rows[row] = {"missing": why or "not evaluated"}
            continue
        accs = [s[m] for s in r.get("tasks", {}).values() for m in [_primary(s)] if m is not None]
        spread = r["speed"].get("spread", {}).get("total", {})
        rows[row] = {"kl": r["kl"], "agreement": r["agreement"], "wikitext2_ppl": r["wikitext2"]["perplexity"],
                     "mean_accuracy": sum(accs) / len(accs) if accs else None, "params": r.get("params"),
                     "kept_above_chance": chance["kept"].get(name),
                     "kept_above_chance_stderr": chance["kept_stderr"].get(name),
                     "speedup": r["speed"]["total_speedup"], "speedup_min": spread.get("min"),
                     "speedup_max": spread.get("max")}
    rows["child"]["solution"] = chosen
    rows["child"]["predicted_speedup"] = solutions.solutions[chosen or 0].predicted_speedup if "kl" in rows[
        "child"] else None
    return rows


def _primary(scores: dict):
    from .eval import primary_metric

    return primary_metric(scores)


def format_sweep(sweep: dict) -> str:
    lines = ["| target | model | KL | WikiText-2 ppl | mean accuracy | margin above chance kept | "
             "measured speed-up (min-max) |", "|---|---|---|---|---|---|---|"]
    for target, rows in sweep["rows"].items():
        for row, r in rows.items():
            if "missing" in r:
                lines.append(f"| {target} | {row} | not reachable: {r['missing']} | | | | |")
                continue
            acc = "n/a" if r["mean_accuracy"] is None else f"{r['mean_accuracy']:.3f}"
            kept = ("n/a" if r.get("kept_above_chance") is None
                    else f"{r['kept_above_chance']:.0%} ± {r['kept_above_chance_stderr']:.0%}")
            spread = (f" ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})" if r.get("speedup_min") is not None else "")
            label = f"child (solution {r['solution']})" if row == "child" and r.get("solution") is not None else row
            lines.append(f"| {target} | {label} | {r['kl']:.4f} | {r['wikitext2_ppl']:.2f} | {acc} | {kept} | "
                         f"{r['speedup']:.2f}x{spread} |")
    lines += ["", f"Every model distilled with gkd.tokens={sweep['gkd_tokens']}; speed-ups measured in "
              f"{sweep['engine']} against the parent in each target's own eval run (median of per-round ratios). "
              "Mean accuracy: each task's acc. Margin above chance kept: (model - chance) / (parent - chance) "
              "over the tasks where the parent is more than 2 standard errors above chance, acc_norm where "
              "the task has it (eval/results.md lists them)."]
    return "\n".join(lines)


def sweep_figure(sweep: dict, out: Path) -> Path:
    """KL and WikiText-2 perplexity against measured speed-up: one point per target and model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"child": "o", "width": "s", "depth": "^"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "kl", "KL to parent (held-out)"), (axes[1], "wikitext2_ppl", "WikiText-2 ppl")):
        for row, marker in markers.items():
            # joined in target order: one line per model kind across the targets
            pts = [(r[row]["speedup"], r[row][key], t) for t, r in sweep["rows"].items() if "kl" in r.get(row, {})]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=row)
            for x, y, t in pts:
                ax.annotate(t, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "wikitext2_ppl":
            ax.set_yscale("log")  # a collapsed baseline is 10-20x the child's perplexity
        ax.set_xlabel("measured speed-up (scenario)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("quality vs measured speed, all targets")
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, out)
    return out

