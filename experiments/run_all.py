"""Runs the evidence grid in order: the recipe first, then every experiment that uses it.

``python -m experiments.run_all [--quick] [--out DIR] [--workdir-root DIR]
[--data-dir DIR]``: each stage is ``python -m experiments.<name>`` with the same
arguments, so a stage resumes where it stopped (finished cells are in its JSON and
are not rerun) and an interrupted grid resumes by running this again. A stage
that reads the recipe (:func:`experiments.protocol.load_recipe`) needs the recipe
stage to have chosen it, hence the order.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence

STAGES = ("recipe", "batch_size", "default_config")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return
    for name in STAGES:
        start = time.time()
        print(f"[run_all] stage {name}: python -m experiments.{name} {' '.join(args)}", flush=True)
        module = importlib.import_module(f"experiments.{name}")
        module.grid.main(module.EXPERIMENT, args)
        print(f"[run_all] stage {name} done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
