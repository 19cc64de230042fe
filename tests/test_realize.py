"""Realize: a child assembled from parent blocks and library blocks.

    pytest tests/test_realize.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_tiny_parent

from puzzlenas.checkpoint.io import load_checkpoint, save_checkpoint
from puzzlenas.checkpoint.parent import prepare_parent
from puzzlenas.library.space import Alternative
from puzzlenas.realize import assemble_child, parent_choices


def test_child_of_parent_blocks_reproduces_parent_exactly(tmp_path):
    parent, _, _ = prepare_parent(str(_tiny_dir(tmp_path)), tmp_path / "w")
    child = assemble_child(parent, parent_choices(parent.config))
    save_checkpoint(child, tmp_path / "child")
    reloaded = load_checkpoint(tmp_path / "child")
    ids = torch.randint(0, 99, (2, 20))
    with torch.no_grad():
        assert torch.equal(parent(ids).logits, reloaded(ids).logits)


def _tiny_dir(tmp_path: Path) -> Path:
    make_tiny_parent("qwen3").save_pretrained(tmp_path / "parent")
    return tmp_path / "parent"


def test_realize_loads_trained_blocks_from_the_library(tmp_path):
    """A realized child's layer equals the library block file it was built from."""
    from puzzlenas.library.store import Library
    from puzzlenas.utils import model_fingerprint

    parent, _, _ = prepare_parent(str(_tiny_dir(tmp_path)), tmp_path / "w")
    lib = Library(tmp_path / "lib", model_fingerprint(parent))
    alt = Alternative(2, "ffn", "mlp", 48)
    torch.manual_seed(3)
    state = {"post_attention_layernorm.weight": torch.rand(64), "mlp.gate_proj.weight": torch.randn(48, 64),
             "mlp.up_proj.weight": torch.randn(48, 64), "mlp.down_proj.weight": torch.randn(64, 48)}
    lib.save_block(alt, state, {"file": lib.block_path(alt).name})
    choices = parent_choices(parent.config)
    choices[2] = (choices[2][0], alt)
    child = assemble_child(parent, choices, lib)
    for k, v in state.items():
        assert torch.equal(child.model.layers[2].state_dict()[k], v)
    assert child.model.layers[2].mlp.down_proj.in_features == 48
