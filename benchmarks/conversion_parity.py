"""Max |logit difference| between each parent and its DeciLM conversion, in float32.

    python benchmarks/conversion_parity.py

Tiny random parents of each family (random biases and norms) on random tokens, and the real
SmolLM2-135M (GGUF) on the first 512 tokens of WikiText-2 test.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import FAMILIES, SHARED_DATA, make_tiny_parent  # noqa: E402

from puzzlenas.checkpoint import convert_parent, load_parent  # noqa: E402


def max_diff(parent, child, ids) -> float:
    with torch.no_grad():
        return (parent(ids).logits - child(ids).logits).abs().max().item()


def main() -> None:
    rows = []
    torch.manual_seed(0)
    ids = torch.randint(0, 99, (2, 64))
    for family in FAMILIES:
        parent = make_tiny_parent(family)
        rows.append((f"tiny {family}", parent.config.model_type, max_diff(parent, convert_parent(parent), ids)))
    parent, tokenizer = load_parent("smollm2")
    text = (SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw").read_text()[:20000]
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :512]
    rows.append(("SmolLM2-135M (GGUF Q4_1)", "llama", max_diff(parent, convert_parent(parent), ids)))
    print(f"| {'parent':<26} | {'family':<7} | {'max abs logit diff':>18} |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 20}|")
    for name, family, diff in rows:
        print(f"| {name:<26} | {family:<7} | {diff:>18.2e} |")


if __name__ == "__main__":
    main()
