"""Parent vs puzzlenas child vs width and depth baselines at 1.5x and 2.0x (not run in CI).

    python benchmarks/quality_vs_speed.py [--config configs/smollm2_gutenberg.yaml] [--workdir runs/qvs]
                                          [--engine torch|vllm] [--targets 1.5 2.0] [--set key=value ...]

Runs the whole pipeline on SmolLM2-135M with real text from ../shared/data once per target in
one work directory: data, BLD, scoring and costs are computed once and reused; search, realize,
GKD, baselines and evaluation are redone per target. Prints, per target, KL to the parent,
WikiText-2 perplexity, mean lm-eval accuracy and the measured speed-up, and saves each target's
eval/results.json as results-<target>x.json in the work directory. With --engine, costs are measured,
the search space restricted and speed timed in that engine (target.engine); speed-ups are medians of
per-round ratios, all models timed in turns in one run, with their min-max.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from puzzlenas.config import load_config
from puzzlenas.pipeline import run_pipeline

ROWS = ["parent", "child", "width baseline", "depth baseline"]


def mean_accuracy(tasks: dict) -> tuple[float, float]:
    """Mean accuracy over the tasks that report one, and its standard error (the tasks' items are
    independent: sqrt(sum of squared standard errors) / number of tasks)."""
    scored = [t for t in tasks.values() if "acc" in t]
    if not scored:
        return float("nan"), float("nan")
    se = sum(t.get("acc_stderr", float("nan")) ** 2 for t in scored) ** 0.5 / len(scored)
    return sum(t["acc"] for t in scored) / len(scored), se


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "smollm2_gutenberg.yaml"))
    ap.add_argument("--workdir", default="runs/quality_vs_speed")
    ap.add_argument("--targets", type=float, nargs="+", default=[1.5, 2.0])
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--engine", default=None, help="target.engine: torch | vllm (default: the config's)")
    args = ap.parse_args()
    if args.engine:
        args.set.append(f"target.engine={args.engine}")
    workdir = Path(args.workdir)
    tables = {}
    for target in args.targets:
        cfg = load_config(args.config, [*args.set, f"search.throughput={target}"])
        run_pipeline(cfg, workdir, progress=True)
        shutil.copy(workdir / "eval" / "results.json", workdir / f"results-{target}x.json")
        tables[target] = json.loads((workdir / "eval" / "results.json").read_text())
    cfg = load_config(args.config, args.set)
    print(f"\nSmolLM2-135M, data {cfg.data.path}, BLD {cfg.bld.tokens} tokens, GKD {cfg.gkd.tokens} tokens per model, "
          f"lm-eval limit {cfg.eval.limit}/task, WikiText-2 {cfg.eval.ppl_max_tokens or 'all'} tokens, "
          f"speed in {cfg.target.engine}")
    print("\n| target | model | KL | WikiText-2 ppl | mean lm-eval acc ± s.e. | measured speed-up (min-max) |")
    print("|---|---|---|---|---|---|")
    for target, report in tables.items():
        for name in ROWS:
            r = report["models"].get(name)
            if r is None:
                print(f"| {target}x | {name} | not reachable | | | |")
                continue
            mean_acc, se = mean_accuracy(r.get("tasks", {}))
            sp = r["speed"]
            spread = sp.get("spread", {}).get("total")
            speed = f"{sp['total_speedup']:.2f}x" + (f" ({spread['min']:.2f}-{spread['max']:.2f})" if spread else "")
            print(f"| {target}x | {name} | {r['kl']:.4f} | {r['wikitext2']['perplexity']:.2f} | {mean_acc:.3f} ± {se:.3f} | {speed} |")


if __name__ == "__main__":
    main()
