"""What the benchmarks that study a finished work directory share: the options `--workdir W`,
`--set KEY=VALUE` and `--quiet`, and opening W's configuration (W/config.yaml, with the
overrides) and its context (parent, data, tokenizer), as the pipeline's stages do."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first paragraph of the script's docstring, with the shared options."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--quiet", action="store_true")
    return ap


def open_run(args: argparse.Namespace):
    """(W, its config, its pipeline context); logging at INFO unless --quiet."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    from puzzlenas.config import load_config
    from puzzlenas.pipeline import context

    work = Path(args.workdir)
    cfg = load_config(work / "config.yaml", args.set)
    return work, cfg, context(cfg, work)
