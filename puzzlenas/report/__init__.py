"""The run's report: report/report.md, report/report.html and two PNG figures.

Reads artifacts only (config.yaml, search/solutions.json, baselines/*/solution.json,
eval/results.json, stages/*.json, costs/*.json); no stage imports this module, and every number
shown comes from those files.
"""

from __future__ import annotations

import html
import json
import platform
from pathlib import Path

import yaml

from ..library.space import Alternative
from ..utils import atomic_write_text
from ..workdir import (
    BASELINES,
    REFINE,
    SELECTION,
    SOLUTIONS,
    SearchResult,
    Selection,
    SolutionRecord,
    baseline_file,
    read_baseline,
    read_selection,
    read_solutions,
)

COLORS = {"gqa": "#4c72b0", "linear": "#dd8452", "no_op": "#d9d9d9", "mlp": "#55a868"}


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def architecture_figure(solution: SolutionRecord, out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    layers = [(Alternative.from_name(a), Alternative.from_name(f)) for a, f in solution.layers]
    largest = max((f.size for _, f in layers if f.kind == "mlp"), default=1)
    fig, ax = plt.subplots(figsize=(6, max(3, 0.22 * len(layers) + 1)))
    for i, pair in enumerate(layers):
        for col, a in enumerate(pair):
            alpha = 0.35 + 0.65 * a.size / largest if a.kind == "mlp" else 1.0  # lighter = narrower
            ax.add_patch(plt.Rectangle((col, len(layers) - 1 - i), 0.95, 0.9, color=COLORS[a.kind], alpha=alpha))
            ax.text(col + 0.47, len(layers) - 1 - i + 0.45, a.short, ha="center", va="center", fontsize=7)
    ax.set_xlim(0, 2)
    ax.set_ylim(0, len(layers))
    ax.set_xticks([0.47, 1.47], ["attention", "FFN"])
    ax.set_yticks([len(layers) - 1 - i + 0.45 for i in range(len(layers))], [str(i) for i in range(len(layers))],
                  fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.08), ncol=4, fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def quality_speed_figure(solutions: SearchResult, baselines: dict[str, SolutionRecord | str], results: dict | None,
                         out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 2 if results else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.5 * ncols, 4))
    axes = axes if ncols > 1 else [axes]
    ax = axes[0]
    xs = [s.predicted_speedup for s in solutions.solutions]
    ys = [s.damage for s in solutions.solutions]
    ax.scatter(xs, ys, label="MIP solutions", color=COLORS["gqa"])
    for name, b in baselines.items():
        if not isinstance(b, str):  # a string: why the baseline cannot reach the target
            ax.scatter([b.predicted_speedup], [b.damage], marker="s", label=f"{name} baseline")
    ax.scatter([1.0], [0.0], marker="*", s=150, color="black", label="parent")
    ax.set_xlabel("predicted speed-up")
    ax.set_ylabel(f"summed replace-1-block {solutions.metric}")
    ax.set_title("search: predicted")
    ax.legend(fontsize=8)
    if results:
        ax = axes[1]
        for name, r in results["models"].items():
            ax.scatter([r["speed"]["total_speedup"]], [r["kl"]], marker="*" if name == "parent" else "o", s=80)
            ax.annotate(name, (r["speed"]["total_speedup"], r["kl"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel("measured speed-up (scenario)")
        ax.set_ylabel("KL to parent (held-out)")
        ax.set_title("evaluation: measured")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def selection_section(selection: Selection) -> list[str]:
    """Markdown lines: every candidate's predicted score and measured KL, and which was chosen."""
    from ..realize.selection import format_selection

    src = selection.sources
    used = [f"{name}: {s['what']}" + (" (also used by eval)" if s.get("overlaps_eval") else "")
            for name, s in src.items() if "unavailable" not in s]
    lines = ["## Selection among the diverse solutions", "",
             f"Solution {selection.chosen} chosen: {selection.reason}.", ""]
    lines += [f"- {u}" for u in used]
    if selection.domain_only:
        lines.append(f"- WikiText-2 not used ({src['wikitext2']['unavailable']}): chosen on domain text only")
    return lines + ["", format_selection(selection), ""]


def refine_section(record: dict) -> list[str]:
    """Markdown lines: the interaction-corrected search's rounds (search/refine.json)."""
    m = record["metric"]
    lines = ["## Interaction-corrected search", "",
             f"Each round re-scored every alternative inside the previous round's child ({record.get('tokens', '?')} "
             f"tokens of scoring text) and solved again; stopped: {record['stopped']}. The search keeps the "
             f"solutions of the round whose child measured lowest: round {record.get('kept', len(record['rounds']) - 1)}.",
             "", f"| round | scores | predicted {m} of its child | measured {m} of its child | layers changed |",
             "|---|---|---|---|---|"]
    for r in record["rounds"]:
        measured = f"{r['measured']:.4f}" if "measured" in r else ""
        lines.append(f"| {r['round']} | {r['scores']} | {r['predicted']:.4f} | {measured} | {len(r.get('changed_layers', []))} |")
    return lines + [""]


# The parent's measured time per scenario may stray this far from its cost profile's before the
# report says so: rounds within one eval spread about +-10 % on a shared 2-core machine.
PROFILE_DRIFT = 0.2


def speed_section(records: dict, results: dict, estimated: bool = False) -> list[str]:
    """Markdown lines: each model's predicted and measured speed-up and seconds per scenario, and a
    warning when the parent itself ran at another speed than when the costs stage profiled it.

    `records`: model name in results -> its SolutionRecord (None: nothing predicted). The parent's
    predicted time is any record's predicted time x its predicted speed-up (both come from the
    same profile); an `estimated` (roofline) profile's seconds are not compared. On a host whose
    cache is shared with other tenants, decode time changes with their load, and not in proportion
    to a model's bytes, so then the predicted speed-ups do not hold."""
    models = results["models"]
    rows = [(name, rec) for name, rec in records.items() if rec is not None and name in models]
    lines = [f"## Predicted vs measured speed (in {results.get('engine', 'torch')})", "",
             "| model | predicted | measured | predicted s per scenario | measured s per scenario |",
             "|---|---|---|---|---|"]
    if not rows:
        return lines[:2] + ["No model with a predicted speed was evaluated.", ""]
    reference = results.get("reference", "parent")
    parent_measured = models[reference]["speed"]["total_s"] if reference in models else None
    parent_predicted = rows[0][1].predicted_speedup * rows[0][1].predicted["total_s"]
    if parent_measured is not None:
        lines.append(f"| {reference} | 1.00x | 1.00x | {parent_predicted:.3f} | {parent_measured:.3f} |")
    for name, rec in rows:
        speed = models[name]["speed"]
        lines.append(f"| {name} | {rec.predicted_speedup:.2f}x | {speed['total_speedup']:.2f}x | "
                     f"{rec.predicted['total_s']:.3f} | {speed['total_s']:.3f} |")
    lines.append("")
    if parent_measured is not None and not estimated:
        ratio = parent_measured / parent_predicted
        if abs(ratio - 1) > PROFILE_DRIFT:
            lines += [f"The parent took {parent_measured:.3f} s per scenario here against "
                      f"{parent_predicted:.3f} s when the costs stage profiled it ({ratio:.2f}x): the machine ran "
                      "under another load than then, so the predicted speed-ups may not hold (on a host that "
                      "shares its cache with other tenants, decode time changes with their load and not in "
                      "proportion to a model's bytes). `puzzlenas run --from costs` profiles again and redoes "
                      "the search and what follows it.", ""]
    return lines


def sweep_section(sweep_md: str) -> list[str]:
    """Markdown lines: the Pareto sweep's table and plot, as `puzzlenas sweep` wrote them."""
    body = sweep_md.split("\n", 1)[1] if sweep_md.startswith("# ") else sweep_md  # its own title goes
    return ["## Pareto sweep", "", body.strip(), ""]


def write_report(workdir: str | Path) -> Path:
    workdir = Path(workdir)
    out = workdir / "report"
    out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((workdir / "config.yaml").read_text()) if (workdir / "config.yaml").is_file() else {}
    solutions = read_solutions(workdir) if (workdir / SOLUTIONS).is_file() else None
    results = _load(workdir / "eval" / "results.json")
    baselines = {name: read_baseline(workdir, name) for name in sorted(BASELINES)
                 if (workdir / baseline_file(name)).is_file()}
    stages = {p.stem: _load(p) for p in sorted((workdir / "stages").glob("*.json"))}
    selection = read_selection(workdir) if (workdir / SELECTION).is_file() else None
    # written by `puzzlenas sweep`; sweep.json last, so its presence means the table is complete
    sweep = (out / "sweep.md").read_text() if (out / "sweep.json").is_file() and (out / "sweep.md").is_file() else None
    md = ["# puzzlenas run report", ""]
    md += ["## Configuration and hardware", "",
           f"- parent: `{cfg.get('parent')}`; work directory: `{workdir}`",
           f"- machine: {platform.machine()}, {platform.system()} {platform.release()}, Python {platform.python_version()}"]
    if solutions:
        label = " (estimated)" if solutions.estimated else " (measured)"
        md.append(f"- cost profile: {solutions.device}{label}; scoring metric: {solutions.metric}")
        md.append("- budgets: " + ", ".join(f"{k} <= {v:.4g}" for k, v in solutions.budgets.items()))
    md += ["", "<details><summary>resolved config.yaml</summary>", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).strip(),
           "```", "</details>", ""]
    images = []
    if solutions and solutions.solutions:
        k = cfg.get("gkd", {}).get("solution", 0)
        if selection and (k == "auto" or not isinstance(k, int)):
            k = selection.chosen  # gkd.solution: auto, resolved by the realize stage
        chosen = solutions.solutions[min(int(k) if isinstance(k, int) else 0, len(solutions.solutions) - 1)]
        images.append(architecture_figure(chosen, out / "architecture.png", f"chosen child: solution {chosen.rank}"))
        md += ["## Chosen child", "", f"Solution {chosen.rank}: predicted speed-up {chosen.predicted_speedup:.2f}x, "
               f"{chosen.params / 1e6:.1f} M parameters, summed {solutions.metric} {chosen.damage:.4f}.", "",
               "![architecture](architecture.png)", ""]
        refined = _load(workdir / REFINE)
        kept = refined.get("kept", len(refined["rounds"]) - 1) if refined else None
        if refined and refined["rounds"][kept]["layers"] == solutions.solutions[0].layers_json():  # not a stale one
            md += refine_section(refined)
        if selection:
            md += selection_section(selection)
        images.append(quality_speed_figure(solutions, baselines, results, out / "quality_vs_speed.png"))
        md += ["## Quality vs speed", "", "![quality vs speed](quality_vs_speed.png)", "",
               "| candidate | predicted speed-up | summed damage | params (M) |", "|---|---|---|---|"]
        for s in solutions.solutions:
            md.append(f"| solution {s.rank} | {s.predicted_speedup:.2f}x | {s.damage:.4f} | {s.params / 1e6:.1f} |")
        for name, b in baselines.items():
            if isinstance(b, str):
                md.append(f"| {name} baseline | not reachable: {b} | | |")
                continue
            md.append(f"| {name} baseline ({b.description or ''}) | {b.predicted_speedup:.2f}x | "
                      f"{b.damage:.4f} | {b.params / 1e6:.1f} |")
        md.append("")
    if results:
        from ..eval import format_results

        md += ["## Evaluation", "", format_results(results)]
        records = {"child": chosen if solutions and solutions.solutions else None}
        records.update({f"{name} baseline": None if isinstance(b, str) else b for name, b in baselines.items()})
        md += speed_section(records, results, estimated=bool(solutions and solutions.estimated))
    if sweep:
        md += sweep_section(sweep)
    if stages:
        md += ["## Time and tokens per stage", "", "| stage | wall time (s) | tokens |", "|---|---|---|"]
        from ..stages import STAGES

        for name, s in sorted(stages.items(), key=lambda kv: STAGES.index(kv[0]) if kv[0] in STAGES else 99):
            md.append(f"| {name} | {s.get('seconds', 0):.0f} | {s.get('tokens', '')} |")
        md.append("")
    text = "\n".join(md) + "\n"
    atomic_write_text(out / "report.md", text)
    atomic_write_text(out / "report.html", _html(text))
    return out / "report.md"


def _html(markdown: str) -> str:
    """A small, dependency-free rendering: headings, tables, images, lists, code blocks."""
    body, in_table, in_code = [], False, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-: "):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : line.rindex(")")]
            body.append(f'<img src="{html.escape(src)}" style="max-width:100%">')
        elif line.startswith("- "):
            body.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.startswith("<"):
            body.append(line)
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:60em;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>puzzlenas report</title><style>{style}</style></head><body>{''.join(body)}</body></html>"
