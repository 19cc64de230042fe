"""Evaluation: what users care about, parent and child side by side, measured in one run.

    puzzlenas eval CHECKPOINT [--parent PARENT] [--workdir W]

Per model:
  perplexity   WikiText-2 raw test, the standard sliding-window protocol (the Hugging Face
               "perplexity of fixed-length models" recipe): the whole file as one token stream,
               windows of `ppl_context` tokens moved by half a window, each window scoring only
               the tokens no earlier window scored, so every token is predicted once with at least
               ppl_context/2 tokens of context (except at the start). `ppl_max_tokens` caps the
               stream on slow machines (None = the whole file); the cap is reported.
  kl, agreement  mean per-token KL(parent || model) and top-1 agreement on held-out sequences
  lm-eval      zero-shot accuracy via lm-evaluation-harness, the model passed as an object: any lm-eval
               task name; the shipped ones (tasks/*.yaml) read a local copy when one is configured,
               everything else comes from the hub (data.py says where data comes from). `limit` items
               per task (all when a task has fewer), each accuracy with its standard error, and
               each task's chance level (chance_levels): how much of the parent's margin above
               chance a model keeps (above_chance), since a task the parent answers at chance
               cannot show what a child kept
  speed        prefill and decode tokens/s for the scenario, timed in the target engine
               (cfg.target.engine: puzzlenas's PyTorch model, or vLLM from the checkpoint folders),
               every model in the same run and in turns (A B C A B C ...), and each speed-up vs
               the parent as the median of its per-round ratios, with their min and max
Results: eval/results.json and eval/results.md.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PuzzleError
from ..utils import atomic_write_json, atomic_write_text
from .data import TASK_DIR, EvalData, resolve_eval_data

log = logging.getLogger(__name__)


@torch.no_grad()
def wikitext_perplexity(model, tokenizer, text: str, context: int = 512, max_tokens: int | None = None,
                        batch_size: int = 8) -> dict:
    """`text`: the whole WikiText-2 raw test file (EvalData.wikitext_text())."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    device = next(model.parameters()).device
    stride = context // 2
    windows = []  # (begin, end, number of new tokens to score)
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        windows.append((begin, end, end - prev_end))
        prev_end = end
        if end == len(ids):
            break
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        length = max(e - b for b, e, _ in group)
        batch = torch.zeros(len(group), length, dtype=torch.long)
        labels = torch.full((len(group), length), -100, dtype=torch.long)
        mask = torch.zeros(len(group), length, dtype=torch.long)
        for j, (b, e, new) in enumerate(group):
            batch[j, : e - b] = ids[b:e]
            mask[j, : e - b] = 1
            labels[j, e - b - new : e - b] = ids[e - new : e]
        logits = model(batch.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(device), reduction="sum",
                               ignore_index=-100)
        nll += loss.item()
        count += (labels[:, 1:] != -100).sum().item()
    return {"perplexity": float(torch.exp(torch.tensor(nll / count))), "tokens": count, "context": context,
            "stride": stride}


@torch.no_grad()
def kl_and_agreement(model, parent, ids: torch.Tensor, batch_size: int = 8) -> dict:
    device = next(model.parameters()).device
    kl, agree, n = 0.0, 0, 0
    for start in range(0, len(ids), batch_size):
        x = ids[start : start + batch_size].to(device)
        m = F.log_softmax(model(x, use_cache=False).logits[:, :-1].float(), -1)
        p = F.log_softmax(parent(x, use_cache=False).logits[:, :-1].float(), -1)
        kl += F.kl_div(m, p, log_target=True, reduction="sum").item()
        agree += (m.argmax(-1) == p.argmax(-1)).sum().item()
        n += m.shape[0] * m.shape[1]
    return {"kl": kl / n, "agreement": agree / n, "tokens": n}


def write_task_configs(data_dir: Path, out_dir: Path, tasks: list[str]) -> list[str]:
    """Fill the shipped task templates with the data location; returns lm-eval task names."""
    names = []
    for task in tasks:
        template = TASK_DIR / f"{task}.yaml"
        if not template.is_file():
            available = sorted(p.stem for p in TASK_DIR.glob("*.yaml"))
            raise PuzzleError(f"unknown eval task {task!r} (available: {', '.join(available)})")
        text = template.read_text().replace("{data_dir}", str(data_dir.resolve()))
        atomic_write_text(out_dir / f"{task}.yaml", text)
        names.append(f"local_{task}")
    return names


def lm_eval_accuracy(model, tokenizer, data: EvalData, tasks: list[str], work: Path, limit: int | None,
                     batch_size: int = 8) -> dict:
    """Zero-shot scores from lm-evaluation-harness, the model passed as a loaded object:
    task -> {metric: value, metric_stderr: its standard error, "n": items scored}."""
    with _environment(_offline_if_local(data, tasks)):
        return _lm_eval_accuracy(model, tokenizer, data, tasks, work, limit, batch_size)


def _offline_if_local(data: EvalData, tasks: list[str]) -> dict[str, str]:
    """Everything local: keep `datasets` from asking the hub about the json builder (slow or hanging
    without network); only for one call, so a hub task still reaches the hub and nothing loaded later
    in this process (a tokenizer saved with `local_files_only`) sees the setting."""
    local = [t for t in tasks if data.has_local(t)]
    return {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"} if local and len(local) == len(tasks) else {}


def _task_manager(data: EvalData, tasks: list[str], work: Path):
    """lm-eval's TaskManager for `tasks`, and the name it knows each one by (local_<task> for the
    shipped configs reading the local copy)."""
    from lm_eval.tasks import TaskManager

    local = [t for t in tasks if data.has_local(t)]
    names = dict(zip(local, write_task_configs(data.local, work / "tasks", local))) if local else {}
    names.update({t: t for t in tasks if t not in names})
    # lm-eval's own task index takes ~10 s to build: only when a task needs it
    manager = TaskManager(include_path=str(work / "tasks") if local else None, include_defaults=len(local) < len(tasks))
    return manager, names


def chance_levels(data: EvalData, tasks: list[str], work: Path, limit: int | None) -> dict[str, float | None]:
    """Task -> the accuracy of answering at random, over the items lm-eval scores (the first `limit`
    of each leaf task): the mean of 1 / (number of choices) for a multiple-choice task, 0 for a
    loglikelihood task (its accuracy is an exact greedy match of the continuation; no guess reaches
    it), None for any other kind. A property of the task files alone, so it is computed once per
    evaluation and holds for results read from the memo too."""
    with _environment(_offline_if_local(data, tasks)):
        manager, names = _task_manager(data, tasks, work)
        out: dict[str, float | None] = {}
        for task in tasks:
            levels: list[float] = []
            for leaf in manager.load(names[task])["tasks"].values():
                docs = list(itertools.islice(leaf.eval_docs, limit))
                if leaf.OUTPUT_TYPE == "multiple_choice":
                    levels += [1 / len(leaf.doc_to_choice(doc)) for doc in docs]
                elif leaf.OUTPUT_TYPE == "loglikelihood":
                    levels += [0.0] * len(docs)
                else:  # generation: no chance level that holds in general
                    levels = []
                    break
            out[task] = sum(levels) / len(levels) if levels else None
    return out


# Which accuracy the chance comparison uses: lm-eval's length-normalized choice where the task
# reports one (the figure usually published for ARC and OpenBookQA: plain acc favours short
# answers, which puts SmolLM2 below chance on both), else acc. One metric per task, fixed in
# advance, so that no model's best metric is picked after the fact.
CHANCE_METRICS = ("acc_norm", "acc")


def above_chance(report: dict) -> dict | None:
    """How much of the reference model's margin above chance each model keeps.

    Per task with a chance level: the metric (CHANCE_METRICS), whether the reference is above chance
    by more than twice its standard error, and per model (value - chance) / (reference - chance) with
    its standard error (first-order, the two scores taken as independent: an upper bound when the
    two models tend to get the same items right, as a child and its parent do). `kept` is each model's mean of that ratio over the
    tasks where the reference is above chance, `kept_stderr` its standard error; None when no task
    is (then the tasks cannot tell what a model kept). None without chance levels (results written
    before they were computed)."""
    chance, models, ref = report.get("chance"), report["models"], report["reference"]
    if not chance or "tasks" not in models[ref]:
        return None
    rows: dict[str, dict] = {}
    for task, level in chance.items():
        scores = models[ref]["tasks"].get(task, {})
        metric = next((m for m in CHANCE_METRICS if m in scores), None)
        if level is None or metric is None:
            continue
        margin, ref_se = scores[metric] - level, scores.get(f"{metric}_stderr", 0.0)
        counted = margin > 2 * ref_se
        kept, kept_se = {}, {}
        for name, r in models.items():
            s = r.get("tasks", {}).get(task, {})
            if counted and metric in s:
                kept[name] = (s[metric] - level) / margin
                kept_se[name] = 0.0 if name == ref else (
                    s.get(f"{metric}_stderr", 0.0) ** 2 + (kept[name] * ref_se) ** 2) ** 0.5 / margin
        rows[task] = {"metric": metric, "chance": level, "counted": counted, "kept": kept, "kept_stderr": kept_se}
    counted = [t for t, row in rows.items() if row["counted"]]
    have = {name for name in models if counted and all(name in rows[t]["kept"] for t in counted)}
    kept = {name: sum(rows[t]["kept"][name] for t in counted) / len(counted) if name in have else None
            for name in models}
    kept_se = {name: sum(rows[t]["kept_stderr"][name] ** 2 for t in counted) ** 0.5 / len(counted)
               if name in have else None for name in models}
    return {"tasks": rows, "counted": counted, "kept": kept, "kept_stderr": kept_se}


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """Set environment variables that are not set yet, and restore them afterwards."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _lm_eval_accuracy(model, tokenizer, data: EvalData, tasks: list[str], work: Path, limit: int | None,
                      batch_size: int) -> dict:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise PuzzleError("lm-eval is not installed: pip install -e '.[eval]'") from None
    manager, names = _task_manager(data, tasks, work)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    # bootstrap_iters=0: lm-eval's bootstrap of perplexity takes minutes; the standard errors are
    # computed from the logged per-item scores instead (task_scores)
    results = lm_eval.simple_evaluate(model=lm, tasks=[names[t] for t in tasks], num_fewshot=0, limit=limit,
                                      task_manager=manager, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    return {task: task_scores(results, names[task]) for task in tasks}


def _leaf_tasks(results: dict, name: str) -> list[str]:
    subtasks = results.get("group_subtasks", {}).get(name)
    if not subtasks:
        return [name]
    return [leaf for sub in subtasks for leaf in _leaf_tasks(results, sub)]


def task_scores(results: dict, name: str) -> dict:
    """One task's (or group's) metrics from lm-eval's results, each 0/1-per-item metric with its
    standard error: the sample standard deviation of the per-item scores over sqrt(n), which is what
    lm-eval reports as acc_stderr. Attached only where the mean of the per-item scores is the value
    lm-eval reports (so never to perplexity, and a group's is over all its items)."""
    samples = [s for leaf in _leaf_tasks(results, name) for s in results.get("samples", {}).get(leaf, [])]
    out: dict = {}
    for key, value in results["results"][name].items():
        metric, _, filt = key.partition(",")
        if metric.endswith("_stderr") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        label = metric if filt in ("", "none") else f"{metric} ({filt})"
        out[label] = float(value)
        scores = [s[metric] for s in samples if s.get("filter", "none") == (filt or "none") and metric in s]
        if len(scores) > 1 and all(x in (0, 1) for x in scores) and abs(sum(scores) / len(scores) - value) < 1e-9:
            p, n = sum(scores) / len(scores), len(scores)
            out[f"{label}_stderr"] = (p * (1 - p) / (n - 1)) ** 0.5  # = sample sd / sqrt(n) for 0/1 scores
            out["n"] = n
    if "n" not in out:
        out["n"] = len({(s.get("doc_id"), s.get("doc_hash")) for s in samples})
    return out


def evaluate_models(models: dict, parent_name: str, tokenizer, cfg, val_ids: torch.Tensor, out_dir: Path,
                    skip_lm_eval: bool = False, progress: bool = True, paths: dict | None = None,
                    memo_dir: Path | None = None) -> dict:
    """Every metric for every model in `models` (name -> model); `parent_name` is the reference.
    `paths` (name -> checkpoint folder) is needed when the target engine serves from folders (vLLM).
    With `memo_dir`, a model's quality (not its speed) measured before with the same weights, parent
    and settings is read from there instead of measured again (memo.py)."""
    if tokenizer is None:
        raise PuzzleError("evaluation needs a tokenizer; the parent checkpoint has none")
    e = cfg.eval
    data = resolve_eval_data(e)
    tasks = [] if skip_lm_eval else e.tasks
    problem = data.problem(tasks)  # the command checked this at its start; the data may have moved since
    if problem:
        raise PuzzleError(problem)
    wikitext = data.wikitext_text()
    # before any model is measured: a task whose files lm-eval cannot read stops here, not after
    chance = chance_levels(data, tasks, out_dir, e.limit) if tasks else None
    parent = models[parent_name]
    memo = None
    from ..training import rank_world

    if memo_dir is not None and not _split_ranks(parent) and rank_world()[1] == 1:  # under torchrun: a rank's share
        from ..workdir import file_fingerprint
        from .data import local_task_files
        from .memo import QualityMemo, settings_of

        settings = settings_of(e, tasks, data.source)
        settings["task_files"] = {t: file_fingerprint(data.local / local_task_files()[t]) for t in tasks if data.has_local(t)}
        memo = QualityMemo(memo_dir, parent, settings, wikitext, val_ids[: e.kl_sequences])
    results: dict[str, dict] = {}
    for name, model in models.items():
        key = memo.key(model) if memo else None
        kept = memo.get(key) if memo else None
        if kept is not None:
            log.info("%s: quality as measured before (the same weights, parent and settings: %s)", name,
                     Path(memo_dir) / f"{key}.json")
            results[name] = kept
            continue
        log.info("evaluating %s", name)
        # num_parameters: a model split over the ranks (model/split.py) holds only its share here
        r: dict = {"params": model.num_parameters() if hasattr(model, "num_parameters")
                   else sum(p.numel() for p in model.parameters())}
        r["wikitext2"] = wikitext_perplexity(model, tokenizer, wikitext, e.ppl_context, e.ppl_max_tokens, e.batch_size)
        r.update(kl_and_agreement(model, parent, val_ids[: e.kl_sequences], e.batch_size))
        if tasks:
            r["tasks"] = lm_eval_accuracy(model, tokenizer, data, tasks, out_dir, e.limit, e.batch_size)
        results[name] = r
        if memo:
            memo.put(key, name, r)
    speed, scenario = measure_speed(models, parent_name, cfg, paths)
    for name in results:
        results[name]["speed"] = speed[name]
    engine = speed[parent_name]["engine"] if _split_ranks(parent) else cfg.target.engine
    report = {"scenario": scenario.__dict__, "engine": engine, "reference": parent_name,
              "limit_per_task": e.limit, "ppl_max_tokens": e.ppl_max_tokens, "eval_data": data.source,
              "models": results}
    if tasks:
        report["chance"] = chance
    atomic_write_json(out_dir / "results.json", report)
    atomic_write_text(out_dir / "results.md", format_results(report))
    return report


def measure_speed(models: dict, parent_name: str, cfg, paths: dict | None = None):
    """Scenario timings of every model in the target engine, in turns, and speed-ups vs the parent
    (median of per-round ratios, with min and max)."""
    from ..engines import Scenario, get_engine, speedup_stats

    engine = get_engine(cfg.target.engine)
    label = engine.name
    ranks = _split_ranks(models[parent_name])
    if ranks:  # eval.parallel=layers: no one device holds these models, so they are timed as they run here
        engine, label = get_engine("torch"), f"torch, layers split over {ranks} ranks"
        log.warning("eval.parallel=layers: speed timed in puzzlenas's PyTorch model with every model's layers split "
                    "over %d ranks (pipelined, one rank busy at a time), not in target.engine=%s", ranks, cfg.target.engine)
    sc = cfg.costs.scenario
    scenario = Scenario(sc.batch_size, sc.prompt_len, sc.generate_len)
    if engine.name == "torch":
        sources = models
    else:
        missing = [n for n in models if not paths or n not in paths]
        if missing:
            raise PuzzleError(f"timing in {engine.name} needs checkpoint folders; none for {', '.join(missing)}")
        sources = {n: paths[n] for n in models}
    log.info("timing %d models in %s, %d rounds", len(sources), engine.name, cfg.eval.speed_repeats)
    timings = engine.time_models(sources, scenario, repeats=cfg.eval.speed_repeats, warmup=1,
                                 dtype=engine.serving_dtype(cfg.costs.dtype))[0]
    B, P, G = scenario.batch_size, scenario.prompt_len, scenario.generate_len
    out = {}
    for name, t in timings.items():
        s = t.summary()
        ratios = speedup_stats(timings[parent_name], t)
        out[name] = {**s, "prefill_tok_s": B * P / s["prefill_s"], "decode_tok_s": B * G / s["decode_s"],
                     "prefill_speedup": ratios["prefill"]["median"], "decode_speedup": ratios["decode"]["median"],
                     "total_speedup": ratios["total"]["median"], "spread": ratios, "engine": label,
                     "rounds": t.to_dict()}
    return out, scenario


def _split_ranks(model) -> int:
    """The ranks a model split over by model/split.py runs on; 0 for a whole model."""
    return getattr(model, "split_ranks", 0)


def primary_metric(scores: dict) -> str | None:
    """The metric a task's column shows: acc when it has one, else its first score."""
    metrics = [k for k in scores if k != "n" and not k.endswith("_stderr")]
    return "acc" if "acc" in metrics else (metrics[0] if metrics else None)


def format_score(scores: dict, metric: str | None) -> str:
    """'0.412 ± 0.022': the value and its standard error (lm-eval's), or 'n/a'."""
    if metric is None or metric not in scores:
        return "n/a"
    se = scores.get(f"{metric}_stderr")
    return f"{scores[metric]:.3f}" + (f" ± {se:.3f}" if se is not None else "")


def format_results(report: dict) -> str:
    models = report["models"]
    tasks = sorted({t for r in models.values() for t in r.get("tasks", {})})
    shown = {t: next((primary_metric(r["tasks"][t]) for r in models.values() if t in r.get("tasks", {})), None)
             for t in tasks}
    head = ["model", "params (M)", "wikitext2 ppl", "KL", "agree"] + [f"{t} {shown[t]}" for t in tasks] + [
        "prefill x", "decode x", "total x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in models.items():
        row = [name, f"{r.get('params', 0) / 1e6:.1f}", f"{r['wikitext2']['perplexity']:.2f}", f"{r['kl']:.4f}",
               f"{r['agreement']:.3f}"]
        row += [format_score(r.get("tasks", {}).get(t, {}), shown[t]) for t in tasks]
        s = r["speed"]
        total = f"{s['total_speedup']:.2f}"
        if "spread" in s and name != report["reference"]:
            total += f" ({s['spread']['total']['min']:.2f}-{s['spread']['total']['max']:.2f})"
        row += [f"{s['prefill_speedup']:.2f}", f"{s['decode_speedup']:.2f}", total]
        lines.append("| " + " | ".join(row) + " |")
    sc = report["scenario"]
    lines.append("")
    rounds = next(iter(models.values()))["speed"].get("rounds", {})
    counts = {t: next(r["tasks"][t].get("n") for r in models.values() if t in r.get("tasks", {})) for t in tasks}
    items = ", ".join(f"{t} {n}" for t, n in counts.items() if n is not None)
    lm_eval = (f" lm-eval: zero-shot, items per task: {items} (limit {report['limit_per_task'] or 'none'}); "
               "± = standard error of the mean over items." if tasks else "")
    lines.append(f"Speed in {report.get('engine', 'torch')}: batch {sc['batch_size']}, prompt {sc['prompt_len']}, "
                 f"{sc['generate_len']} generated tokens; x = speed-up over {report['reference']}, models timed in "
                 f"turns in the same run, median of {len(rounds.get('total_s', [])) or 'the'} per-round ratios "
                 f"(min-max in brackets).{lm_eval} Perplexity over "
                 f"{next(iter(models.values()))['wikitext2']['tokens']} WikiText-2 test tokens"
                 f"{' from ' + report['eval_data'] if report.get('eval_data') else ''}.")
    lines += format_above_chance(report)
    return "\n".join(lines) + "\n"


def format_above_chance(report: dict) -> list[str]:
    """The chance table under the results: each task's chance level, every model's score on the
    task's chance metric, and the share of the reference's margin above chance each model keeps."""
    summary = above_chance(report)
    if not summary or not summary["tasks"]:
        return []
    models, ref = report["models"], report["reference"]
    head = ["task", "metric", "chance"] + list(models)
    lines = ["", "Against chance (a task counts only where the reference is more than 2 standard errors above it):",
             "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for task, row in summary["tasks"].items():
        cells = [task, row["metric"], f"{row['chance']:.3f}"]
        for name, r in models.items():
            cell = format_score(r.get("tasks", {}).get(task, {}), row["metric"])
            if name == ref and not row["counted"]:
                cell += " (not above chance: not counted)"
            elif name in row["kept"] and name != ref:
                cell += f" ({row['kept'][name]:.0%} ± {row['kept_stderr'][name]:.0%})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    kept = ["n/a" if v is None else f"**{v:.0%}**" + (f" ± {summary['kept_stderr'][name]:.0%}" if name != ref else "")
            for name, v in summary["kept"].items()]
    lines.append("| margin above chance kept | | | " + " | ".join(kept) + " |")
    lines += ["", f"Kept = (model - chance) / ({ref} - chance), averaged over "
              f"{', '.join(summary['counted']) or 'no task'}; ± its standard error (first order, the two scores "
              "taken as independent). Chance: 1 / choices per item (0 where the score is an exact greedy match). "
              "Metric: acc_norm where the task has it, else acc."]
    return lines
