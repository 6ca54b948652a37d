"""``python -m nfnets.pretrained convert --from deepmind|timm IN --to OUT.safetensors``.

Converts DeepMind's or timm's released NFNet weights into our own safetensors
file (see :func:`nfnets.pretrained.save`). User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence

import jax
import numpy as np

from nfnets.pretrained.deepmind import load_deepmind
from nfnets.pretrained.native import save
from nfnets.pretrained.timm import load_timm


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nfnets.pretrained", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert released weights to our safetensors")
    convert.add_argument("input", metavar="IN", help="DeepMind's F*_haiku.npz or timm's file")
    convert.add_argument("--from", dest="source", required=True, choices=("deepmind", "timm"))
    convert.add_argument("--to", dest="output", required=True, metavar="OUT.safetensors")
    convert.add_argument(
        "--variant",
        default=None,
        help="NFNet variant (f0 .. f6, or the timm name for --from timm); default: inferred",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 on success, 2 on a user error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.source == "deepmind":
            variables = load_deepmind(args.input, args.variant)
        else:
            variables = load_timm(args.input, args.variant)
        save(variables, args.output, metadata={"source": args.source, "input": args.input})
    except (OSError, ValueError, pickle.UnpicklingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    leaves = jax.tree.leaves(variables)
    count = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    print(f"wrote {args.output}: {len(leaves)} tensors, {count:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
