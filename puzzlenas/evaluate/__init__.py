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
  lm-eval      zero-shot accuracy via lm-evaluation-harness on the local task files
               (task configs shipped in puzzlenas/evaluate/tasks, the model passed as an object)
  speed        prefill and decode tokens/s for the scenario, timed in the target engine
               (cfg.target.engine: puzzlenas's PyTorch model, or vLLM from the checkpoint folders),
               every model in the same run and in turns (A B C A B C ...), and each speed-up vs
               the parent as the median of its per-round ratios, with their min and max
Results: eval/results.json and eval/results.md.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import PuzzleError
from ..utils import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)
TASK_DIR = Path(__file__).parent / "tasks"


@torch.no_grad()
def wikitext_perplexity(model, tokenizer, path: Path, context: int = 512, max_tokens: int | None = None,
                        batch_size: int = 8) -> dict:
    if not path.is_file():
        raise PuzzleError(f"WikiText-2 test file {path} not found (set eval.task_data_dir)")
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
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


def lm_eval_accuracy(model, tokenizer, data_dir: Path, tasks: list[str], work: Path, limit: int | None,
                     batch_size: int = 8) -> dict:
    """Zero-shot accuracies from lm-evaluation-harness, the model passed as a loaded object."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise PuzzleError("lm-eval is not installed: pip install -e '.[eval]'") from None
    missing = [t for t in tasks if not (data_dir / t).exists()]
    if missing:
        raise PuzzleError(f"eval data for {missing} not found under {data_dir} (set eval.task_data_dir)")
    names = write_task_configs(data_dir, work / "tasks", tasks)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=0, limit=limit,
                                      task_manager=TaskManager(include_path=str(work / "tasks")),
                                      log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    out = {}
    for task, name in zip(tasks, names):
        r = results["results"][name]
        out[task] = {k.split(",")[0]: v for k, v in r.items() if k.split(",")[0] in ("acc", "acc_norm", "perplexity")
                     and isinstance(v, (int, float))}
    return out


def evaluate_models(models: dict, parent_name: str, tokenizer, cfg, val_ids: torch.Tensor, out_dir: Path,
                    skip_lm_eval: bool = False, progress: bool = True, paths: dict | None = None) -> dict:
    """Every metric for every model in `models` (name -> model); `parent_name` is the reference.
    `paths` (name -> checkpoint folder) is needed when the target engine serves from folders (vLLM)."""
    if tokenizer is None:
        raise PuzzleError("evaluation needs a tokenizer; the parent checkpoint has none")
    e = cfg.eval
    data_dir = Path(e.task_data_dir)
    parent = models[parent_name]
    results: dict[str, dict] = {}
    for name, model in models.items():
        log.info("evaluating %s", name)
        r: dict = {"params": sum(p.numel() for p in model.parameters())}
        r["wikitext2"] = wikitext_perplexity(model, tokenizer, data_dir / "wikitext-2-raw" / "wiki.test.raw",
                                             e.ppl_context, e.ppl_max_tokens, e.batch_size)
        r.update(kl_and_agreement(model, parent, val_ids[: e.kl_sequences], e.batch_size))
        if not skip_lm_eval and e.tasks:
            r["tasks"] = lm_eval_accuracy(model, tokenizer, data_dir, e.tasks, out_dir, e.limit, e.batch_size)
        results[name] = r
    speed, scenario = measure_speed(models, parent_name, cfg, paths)
    for name in results:
        results[name]["speed"] = speed[name]
    report = {"scenario": scenario.__dict__, "engine": cfg.target.engine, "reference": parent_name,
              "limit_per_task": e.limit, "ppl_max_tokens": e.ppl_max_tokens, "models": results}
    atomic_write_json(out_dir / "results.json", report)
    atomic_write_text(out_dir / "results.md", format_results(report))
    return report


def measure_speed(models: dict, parent_name: str, cfg, paths: dict | None = None):
    """Scenario timings of every model in the target engine, in turns, and speed-ups vs the parent
    (median of per-round ratios, with min and max)."""
    from ..engines import Scenario, get_engine, speedup_stats

    engine = get_engine(cfg.target.engine)
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
                     "total_speedup": ratios["total"]["median"], "spread": ratios, "engine": engine.name,
                     "rounds": t.to_dict()}
    return out, scenario


def format_results(report: dict) -> str:
    models = report["models"]
    tasks = sorted({t for r in models.values() for t in r.get("tasks", {})})
    head = ["model", "params (M)", "wikitext2 ppl", "KL", "agree"] + [f"{t} acc" for t in tasks] + [
        "prefill x", "decode x", "total x"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name, r in models.items():
        row = [name, f"{r.get('params', 0) / 1e6:.1f}", f"{r['wikitext2']['perplexity']:.2f}", f"{r['kl']:.4f}",
               f"{r['agreement']:.3f}"]
        row += [f"{r.get('tasks', {}).get(t, {}).get('acc', float('nan')):.3f}" for t in tasks]
        s = r["speed"]
        total = f"{s['total_speedup']:.2f}"
        if "spread" in s and name != report["reference"]:
            total += f" ({s['spread']['total']['min']:.2f}-{s['spread']['total']['max']:.2f})"
        row += [f"{s['prefill_speedup']:.2f}", f"{s['decode_speedup']:.2f}", total]
        lines.append("| " + " | ".join(row) + " |")
    sc = report["scenario"]
    lines.append("")
    rounds = next(iter(models.values()))["speed"].get("rounds", {})
    lines.append(f"Speed in {report.get('engine', 'torch')}: batch {sc['batch_size']}, prompt {sc['prompt_len']}, "
                 f"{sc['generate_len']} generated tokens; x = speed-up over {report['reference']}, models timed in "
                 f"turns in the same run, median of {len(rounds.get('total_s', [])) or 'the'} per-round ratios "
                 f"(min-max in brackets). lm-eval: zero-shot, "
                 f"{report['limit_per_task'] or 'all'} examples per task. Perplexity over "
                 f"{next(iter(models.values()))['wikitext2']['tokens']} WikiText-2 test tokens.")
    return "\n".join(lines) + "\n"
