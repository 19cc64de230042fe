"""gkd.solution: auto. Realize measures every diverse solution's child against the parent on held-out
text and carries the lowest KL forward, whatever the predicted damage says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_faults
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, make_tiny_parent, make_tiny_tokenizer

from puzzlenas.config import PuzzleConfig
from puzzlenas.errors import PuzzleError
from puzzlenas.pipeline import run_pipeline, run_realize
from puzzlenas.realize.selection import chosen_solution


@pytest.fixture(scope="module")
def realized(tmp_path_factory) -> tuple[PuzzleConfig, Path]:
    root = tmp_path_factory.mktemp("selection")
    make_tiny_parent("llama").save_pretrained(root / "parent")
    make_tiny_tokenizer().save_pretrained(root / "parent")
    raw = test_faults.fault_config(root / "parent")
    raw["search"] = {"throughput": 1.2, "solutions": 3, "diversity": 0.5}
    cfg = PuzzleConfig(**raw)
    assert cfg.gkd.solution == "auto"  # the default
    run_pipeline(cfg, root / "work", stages=["data", "bld", "score", "costs", "search", "realize"], progress=False)
    return cfg, root / "work"


def independent_kl(cfg, work: Path) -> list[float]:
    """Mixed KL(parent || child) of every solution, computed here from the files: the validation
    sequences eval does not use and the tail of WikiText-2, each source weighing the same."""
    from puzzlenas.library.store import Library
    from puzzlenas.pipeline import load_context
    from puzzlenas.realize import assemble_child, choices_from_solution
    from puzzlenas.workdir import read_solutions

    ctx = load_context(cfg, work, torch.device("cpu"))  # the parent and the data stage's sequences
    parent, val = ctx.parent.eval(), ctx.data.val
    seq_len = val.shape[1]
    domain = val[cfg.eval.kl_sequences :].long()
    ids = ctx.tokenizer((SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text(), return_tensors="pt").input_ids[0]
    wiki = ids[len(ids) - len(domain) * seq_len :].reshape(len(domain), seq_len)
    library = Library(work / "library", ctx.parent_fingerprint, ctx.data.fingerprint)
    out = []
    for s in read_solutions(work).solutions:
        child = assemble_child(parent, choices_from_solution(s), library)
        kls = []
        with torch.no_grad():
            for x in (domain, wiki):
                p = F.log_softmax(parent(x).logits[:, :-1].double(), -1)
                q = F.log_softmax(child(x).logits[:, :-1].double(), -1)
                kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
        out.append(sum(kls) / 2)
    return out


def test_selection_picks_the_measured_best(realized):
    cfg, work = realized
    selection = json.loads((work / "search" / "selection.json").read_text())
    assert [c["rank"] for c in selection["candidates"]] == [0, 1, 2]
    assert not selection["domain_only"] and selection["sources"]["wikitext2"]["sequences"] > 0
    mine = independent_kl(cfg, work)
    for c, kl in zip(selection["candidates"], mine):
        assert c["kl"]["mixed"] == pytest.approx(kl, rel=1e-3, abs=1e-6)
    assert sorted(mine)[0] < 0.99 * sorted(mine)[1]  # one clear best: the choice means something
    best = min(range(3), key=lambda i: mine[i])
    assert selection["chosen"] == best == chosen_solution(cfg, work)
    assert (work / "realized" / f"solution{best}" / "config.json").is_file()
    marker = json.loads((work / "stages" / "realize.json").read_text())
    assert set(marker["outputs"]) == {"search/selection.json", f"realized/solution{best}"}
    assert marker["solution"] == best
    assert not (work / "search" / "selection.partial.json").exists()


def test_measured_order_wins_over_predicted_order(realized, tmp_path):
    """Damages rewritten so that the measured best is predicted worst: it is still chosen."""
    import shutil

    cfg, work = realized
    work2 = tmp_path / "work"
    shutil.copytree(work, work2, symlinks=True)
    measured = {c["rank"]: c["kl"]["mixed"] for c in json.loads((work2 / "search" / "selection.json").read_text())["candidates"]}
    best = min(measured, key=measured.get)
    solutions = json.loads((work2 / "search" / "solutions.json").read_text())
    for s in solutions["solutions"]:
        s["damage"] = 1.0 - measured[s["rank"]] if s["rank"] != best else 10.0  # the measured best looks worst
    (work2 / "search" / "solutions.json").write_text(json.dumps(solutions))
    run_realize(cfg, work2, progress=False)
    selection = json.loads((work2 / "search" / "selection.json").read_text())
    assert selection["chosen"] == best != selection["predicted_best"]
    assert "lowest predicted damage" in selection["reason"]
    # a number still forces that solution; a stale selection is refused rather than used
    assert chosen_solution(cfg.model_copy(update={"gkd": cfg.gkd.model_copy(update={"solution": 2})}), work2) == 2
    solutions["solutions"][0]["layers"], solutions["solutions"][1]["layers"] = (solutions["solutions"][1]["layers"],
                                                                                  solutions["solutions"][0]["layers"])
    (work2 / "search" / "solutions.json").write_text(json.dumps(solutions))
    with pytest.raises(PuzzleError, match="earlier search result"):
        chosen_solution(cfg, work2)


def test_killed_selection_resumes_after_the_last_measured_candidate(realized, tmp_path, monkeypatch):
    import shutil

    from puzzlenas.realize import selection as sel

    cfg, work = realized
    work2 = tmp_path / "work"
    shutil.copytree(work, work2, symlinks=True)
    reference = json.loads((work2 / "search" / "selection.json").read_text())
    measure, calls = sel.measure, []

    def killed_at_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill while the second candidate is measured
        return measure(*args)

    monkeypatch.setattr(sel, "measure", killed_at_second)
    with pytest.raises(KeyboardInterrupt):
        run_realize(cfg, work2, progress=False)
    assert list(json.loads((work2 / "search" / "selection.partial.json").read_text())["candidates"]) == ["0"]
    calls.clear()
    monkeypatch.setattr(sel, "measure", lambda *a: (calls.append(1), measure(*a))[1])
    run_realize(cfg, work2, progress=False)
    assert len(calls) == 2  # solutions 1 and 2 only
    assert json.loads((work2 / "search" / "selection.json").read_text()) == reference
