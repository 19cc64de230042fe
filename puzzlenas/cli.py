"""The `puzzlenas` command line: one function per command, mapped in COMMANDS.

    puzzlenas convert PARENT OUT [--dtype float32]
    puzzlenas info CHECKPOINT
    puzzlenas bld CONFIG --workdir W [--set key=value ...]
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


def _load_cfg(args):
    from .config import load_config

    return load_config(args.config, args.set)


def _init_distributed():
    """Join the torchrun group when launched by torchrun (WORLD_SIZE > 1)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")


def cmd_bld(args: argparse.Namespace) -> None:
    from pathlib import Path

    import torch.distributed as dist

    from . import bld
    from .checkpoint.parent import prepare_parent
    from .config import save_config
    from .data import prepare_data
    from .utils import pick_device

    cfg = _load_cfg(args)
    _init_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_config(cfg, workdir / "config.yaml")
        parent, tokenizer, fp = prepare_parent(cfg.parent, workdir)
        data = prepare_data(cfg.data, tokenizer, workdir, model=parent, model_fingerprint=fp)
    if dist.is_initialized():  # rank 0 converts and caches; the others read its cache
        dist.barrier()
    if rank != 0:
        parent, tokenizer, fp = prepare_parent(cfg.parent, workdir)
        data = prepare_data(cfg.data, tokenizer, workdir, model=parent, model_fingerprint=fp)
    parent.to(pick_device())
    library = bld.run(cfg, workdir, parent, data, fp, progress=not args.quiet)
    if rank == 0:
        print(bld.summary_table(library))
    if dist.is_initialized():
        dist.destroy_process_group()


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

    p = sub.add_parser("bld", help="initialize and train the block library (blockwise local distillation)")
    _stage_arguments(p)
    p.set_defaults(func=cmd_bld)
    return parser


def _stage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--workdir", default="work", help="work directory (default: ./work)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


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
