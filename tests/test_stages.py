"""The stage contract: every stage is one function (cfg, workdir) in the pipeline's list, and the
per-stage commands run those same functions, leaving the same stage markers as `puzzlenas run`.

    python -m pytest -q tests/test_stages.py
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import yaml
from test_faults import assert_one_line_error

from puzzlenas.cli import main
from puzzlenas.pipeline import STAGE_RUNNERS
from puzzlenas.stages import STAGES


def test_every_stage_is_one_function_of_cfg_and_workdir():
    assert list(STAGE_RUNNERS) == STAGES
    for name, fn in STAGE_RUNNERS.items():
        params = list(inspect.signature(fn).parameters)
        assert params[:2] == ["cfg", "workdir"], (name, params)


def cli(capsys, *args) -> tuple[int, list[str], str]:
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the measuring device's name counts threads: keep it the same for every call
    try:
        rc = main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return rc, out.err.strip().splitlines(), out.out


@pytest.fixture
def tiny_cfg(tiny_run):
    raw = yaml.safe_load(tiny_run.read_text())
    raw["bld"]["tokens"], raw["gkd"]["tokens"], raw["score"]["sequences"] = 512, 256, 2  # seconds per stage
    tiny_run.write_text(yaml.safe_dump(raw))
    return tiny_run


def test_stage_commands_leave_the_markers_run_builds_on(tiny_cfg, tmp_path, capsys):
    work = tmp_path / "w"
    rc, err, _ = cli(capsys, "score", tiny_cfg, "--workdir", work, "--quiet")  # nothing before it ran
    assert_one_line_error(rc, err, "'data' has not run yet", "puzzlenas bld")

    for command in ("bld", "score", "costs", "search", "realize"):
        rc, err, out = cli(capsys, command, tiny_cfg, "--workdir", work, "--quiet")
        assert rc == 0, (command, err)
    markers = {p.stem: json.loads(p.read_text()) for p in (work / "stages").glob("*.json")}
    assert set(markers) == {"data", "bld", "score", "costs", "search", "realize"}
    assert "solution" in out or (work / "realized").is_dir()

    # a second command call finds its stage done with the same inputs: skipped, not redone
    rc, _, out = cli(capsys, "score", tiny_cfg, "--workdir", work, "--quiet")
    assert rc == 0 and "score      skipped" in out

    # `run` builds on the commands' work: their stages are skipped, the rest run
    rc, err, out = cli(capsys, "run", tiny_cfg, "--workdir", work, "--quiet")
    assert rc == 0, err
    status = dict(line.split(None, 1) for line in out.splitlines() if line.split(None, 1)[:1] and line.split()[0] in STAGES)
    for stage in ("data", "bld", "score", "costs", "search", "realize"):
        assert status[stage] == "skipped", (stage, status)
    for stage in ("gkd", "baselines", "eval", "report"):
        assert status[stage].startswith("done"), (stage, status)
    after = {p.stem: json.loads(p.read_text()) for p in (work / "stages").glob("*.json")}
    for stage, marker in markers.items():
        assert after[stage]["fingerprint"] == marker["fingerprint"], stage
