"""The `puzzlenas` command line: one function per command, mapped in COMMANDS.

    puzzlenas convert PARENT OUT [--dtype float32]
    puzzlenas info CHECKPOINT
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import PuzzleError
from .model import BlockConfigError


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoint import convert_parent, load_parent, save_checkpoint
    from .checkpoint.io import parse_dtype

    dtype = parse_dtype(args.dtype)
    parent, tokenizer = load_parent(args.parent, dtype=dtype)
    child = convert_parent(parent, copy=False)
    out = save_checkpoint(child, args.out, tokenizer)
    print(f"wrote {out}")


def cmd_info(args: argparse.Namespace) -> None:
    from .checkpoint import checkpoint_summary

    print(checkpoint_summary(args.checkpoint).format())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puzzlenas", description="Distillation-based NAS for Llama-family LLMs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a parent (HF directory, .gguf, or 'smollm2') to DeciLM format")
    p.add_argument("parent")
    p.add_argument("out")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="per-layer table and totals of a DeciLM checkpoint")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except (PuzzleError, BlockConfigError) as exc:
        print(f"puzzlenas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("puzzlenas: interrupted", file=sys.stderr)
        return 130
    return 0
