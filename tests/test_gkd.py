"""Global distillation (GKD): the pruned child heals, and a killed run resumes to the same weights.

    pytest tests/test_gkd.py
"""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import GKD_CFG, kill_at_step, make_tiny_parent, max_weight_diff, prepare_gkd_workdir, start_cli

from puzzlenas import gkd
from puzzlenas.checkpoint.io import load_checkpoint


@pytest.fixture
def gkd_workdir(tmp_path):
    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    raw = {"parent": str(tmp_path / "parent"), **GKD_CFG}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path, raw


def test_gkd_lowers_validation_kl(gkd_workdir):
    tmp, raw = gkd_workdir
    cfg, parent, data = prepare_gkd_workdir(tmp / "w", raw)
    out = gkd.run(cfg, tmp / "w", parent, data, progress=False)
    done = json.loads((tmp / "w" / "gkd" / "done.json").read_text())
    assert done["val_kl_after"] < 0.7 * done["val_kl_before"], done
    child = load_checkpoint(out)
    assert [b.attention.kind for b in child.config.block_configs] == ["gqa", "no_op", "gqa"]
    log = [json.loads(x) for x in (tmp / "w" / "gkd" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 64 and "val_kl" in log[-1]


def test_gkd_resume_after_sigkill(gkd_workdir):
    tmp, raw = gkd_workdir
    for name in ("ref", "killed"):
        prepare_gkd_workdir(tmp / name, raw)
    opts = ["--set", "gkd.tokens=32768", "--quiet"]
    ref = start_cli(["distill", str(tmp / "cfg.yaml"), "--workdir", str(tmp / "ref"), *opts])
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    state = tmp / "killed" / "gkd" / "state.pt"
    killed_at = kill_at_step(start_cli(["distill", str(tmp / "cfg.yaml"), "--workdir", str(tmp / "killed"), *opts]), state, 20)
    assert killed_at is not None and killed_at < 256
    assert not (tmp / "killed" / "child").exists()
    resumed = start_cli(["distill", str(tmp / "cfg.yaml"), "--workdir", str(tmp / "killed"), *opts])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "resuming GKD from step" in out
    assert max_weight_diff(tmp / "ref" / "child", tmp / "killed" / "child") < 1e-5


def test_gkd_distills_again_when_its_settings_change(gkd_workdir):
    """A finished child is reused only for the same recipe: the same step count at another
    learning rate (which the old step-count check let through) is a new child."""
    tmp, raw = gkd_workdir
    cfg, parent, data = prepare_gkd_workdir(tmp / "w", raw)
    cfg.gkd.tokens = 1024
    gkd.run(cfg, tmp / "w", parent, data, progress=False)
    done_file = tmp / "w" / "gkd" / "done.json"
    first = json.loads(done_file.read_text())
    gkd.run(cfg, tmp / "w", parent, data, progress=False)  # same recipe: reused, not trained again
    assert json.loads(done_file.read_text()) == first
    cfg.gkd.optim.lr = cfg.gkd.optim.lr / 10
    gkd.run(cfg, tmp / "w", parent, data, progress=False)
    second = json.loads(done_file.read_text())
    assert second["recipe"] != first["recipe"] and second["steps"] == first["steps"]
    assert second["child_fingerprint"] != first["child_fingerprint"]
    cfg.gkd.val_every = 1  # logging only: the same recipe
    gkd.run(cfg, tmp / "w", parent, data, progress=False)
    assert json.loads(done_file.read_text()) == second


def test_gkd_with_untouched_layers_frozen_trains_only_the_new_blocks(gkd_workdir):
    """gkd.untouched_lr_scale=0: what the child shares with the parent keeps the parent's weights
    bit for bit, the new block learns and the KL goes down; a scale between 0 and 1 puts the
    shared weights in a group at that fraction of the learning rate."""
    import torch

    from puzzlenas.checkpoint.io import save_checkpoint
    from puzzlenas.library.space import Alternative
    from puzzlenas.realize import assemble_child, parent_choices
    from puzzlenas.training import adamw, optimizer_step

    tmp, raw = gkd_workdir
    cfg, parent, data = prepare_gkd_workdir(tmp / "w", raw)
    choices = parent_choices(parent.config)  # layer 1: no attention, a half-width FFN from scratch
    half = parent.config.block_configs[1].ffn.intermediate_size // 2
    choices[1] = (Alternative(1, "attention", "no_op"), Alternative(1, "ffn", "mlp", half))
    source = tmp / "w" / "realized" / "solution0"
    save_checkpoint(assemble_child(parent, choices, random_weights=True), source, overwrite=True)
    cfg.gkd.untouched_lr_scale = 0
    out = gkd.run(cfg, tmp / "w", parent, data, progress=False)
    done = json.loads((tmp / "w" / "gkd" / "done.json").read_text())
    assert done["val_kl_after"] < 0.7 * done["val_kl_before"], done
    before, after = load_checkpoint(source), load_checkpoint(out)
    untouched = gkd.untouched_parameters(after, parent.config)
    new = {n for n, _ in after.named_parameters()} - untouched
    assert new == {"model.layers.1.post_attention_layernorm.weight", "model.layers.1.mlp.gate_proj.weight",
                   "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    b, a = before.state_dict(), after.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in untouched)
    assert all(not torch.equal(a[n], b[n]) for n in new)

    groups = gkd.parameter_groups(after, untouched, 0.1)
    optimizer = adamw(groups, cfg.gkd.optim)
    optimizer_step(optimizer, after.parameters(), 1e-3, 0)
    assert [len(g["params"]) for g in optimizer.param_groups] == [len(new), len(untouched)]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-4])
