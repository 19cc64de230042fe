"""Cost profiles from whole-model variants (costs/variants.py), against an engine whose times are
known: the profile must give back the shared part and every sub-block's cost, and add up to the
parent's measured time when the engine does not add up its layers."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import make_tiny_parent

from puzzlenas.checkpoint import convert_parent
from puzzlenas.costs.variants import measure_variants_profile
from puzzlenas.engines.base import Engine, ModelTimings, Scenario
from puzzlenas.library.space import Alternative

SHARED = (2.0e-3, 3.0e-4)  # (prefill, one decode step) of the embedding, LM head and overhead
STEPS = 8


def block_time(block: dict) -> tuple[float, float]:
    """What one layer of a timed checkpoint costs this fake engine, by its block config."""
    attn, ffn = block["attention"], block["ffn"]
    a = (0.0, 0.0) if attn.get("no_op") else (1.0e-3 + 2.0e-4 * attn["num_key_value_heads"], 1.0e-4)
    f = (0.0, 0.0) if ffn.get("no_op") else (ffn["intermediate_size"] * 1.0e-5, ffn["intermediate_size"] * 2.0e-6)
    return a[0] + f[0], a[1] + f[1]


class FakeEngine(Engine):
    """Times a checkpoint folder from its config: shared + the sum of its layers' costs, or, with
    `superadditive`, the layers' sum scaled up with how much of the parent is left (no engine adds up
    exactly), plus a little noise that differs round by round."""

    name = "fake"

    def __init__(self, parent_blocks: tuple[float, float], superadditive: float = 0.0):
        self.parent_blocks, self.superadditive = parent_blocks, superadditive

    def time_models(self, models, scenario, repeats, warmup=1, groups=None, dtype="float32", progress=False):
        out = []
        for group in groups or [list(models)]:
            timings = {name: ModelTimings(decode_steps=STEPS) for name in group}
            for r in range(repeats):
                for name in group:
                    blocks = json.loads((Path(models[name]) / "config.json").read_text())["block_configs"]
                    p, d = (sum(x) for x in zip(*(block_time(b) for b in blocks)))
                    scale = 1 + self.superadditive * (p / self.parent_blocks[0])
                    noise = 1 + 1e-4 * ((r % 3) - 1)
                    prefill = (SHARED[0] + p * scale) * noise
                    timings[name].add(prefill, prefill + STEPS * (SHARED[1] + d * scale) * noise)
            out.append(timings)
        return out


def profile(tmp_path, superadditive: float):
    parent = convert_parent(make_tiny_parent("llama"))
    cfg = parent.config
    n, kv, size = cfg.num_hidden_layers, cfg.block_configs[0].attention.num_key_value_heads, cfg.block_configs[0].ffn.intermediate_size
    alternatives = [a for layer in range(n) for a in (
        Alternative(layer, "attention", "gqa", kv), Alternative(layer, "attention", "gqa", 1), Alternative(layer, "attention", "no_op"),
        Alternative(layer, "ffn", "mlp", size), Alternative(layer, "ffn", "mlp", size // 2), Alternative(layer, "ffn", "no_op"))]
    parent_block = block_time({"attention": {"num_key_value_heads": kv}, "ffn": {"intermediate_size": size}})
    engine = FakeEngine((n * parent_block[0], n * parent_block[1]), superadditive)
    out = measure_variants_profile(parent, None, engine, alternatives, Scenario(1, 16, STEPS + 1), "float32", warmup=0,
                                   repeats=5, scratch=tmp_path / "variants", progress=False)
    return out, n, kv, size


def test_an_additive_engine_gives_back_the_shared_part_and_every_block(tmp_path):
    out, n, kv, size = profile(tmp_path, superadditive=0.0)
    for phase, expected in zip(("prefill_s", "decode_s"), SHARED):
        assert math.isclose(out["shared"][phase], expected, rel_tol=1e-3), (phase, out["shared"])
        assert math.isclose(out["additivity"][phase], 1.0, rel_tol=1e-3)
    for shape, block in [(("attention", "gqa", kv), {"num_key_value_heads": kv}), (("attention", "gqa", 1), {"num_key_value_heads": 1})]:
        want = block_time({"attention": block, "ffn": {"no_op": True}})
        assert all(math.isclose(out["shapes"][shape][p], w, rel_tol=1e-3) for p, w in zip(("prefill_s", "decode_s"), want))
    want = block_time({"attention": {"no_op": True}, "ffn": {"intermediate_size": size // 2}})
    assert math.isclose(out["shapes"][("ffn", "mlp", size // 2)]["prefill_s"], want[0], rel_tol=1e-3)
    assert out["shapes"][("ffn", "no_op", None)] == {"prefill_s": 0.0, "decode_s": 0.0}
    assert "shared-only" in out["variants"] and out["variants"]["shared-only"]["layers_changed"] == 2 * n - 1
    assert not out["warnings"]


def test_the_profile_adds_up_to_the_parents_measured_time_when_the_engine_does_not(tmp_path):
    """Each layer costs this engine more the more of the parent is left (up to 30 %), so taking all of
    one kind of sub-block off saves more than their share: the profile still predicts the parent's
    measured time, with its layers scaled by a factor it records."""
    out, n, kv, size = profile(tmp_path, superadditive=0.3)
    parent_shapes = (("attention", "gqa", kv), ("ffn", "mlp", size))
    for phase in ("prefill_s", "decode_s"):
        predicted = out["shared"][phase] + n * sum(out["shapes"][s][phase] for s in parent_shapes)
        assert math.isclose(predicted, out["parent_measured"][phase], rel_tol=1e-9)
        assert abs(out["additivity"][phase] - 1) > 0.03
        assert out["shared"][phase] > 0
