"""Why did batch norm break my validation accuracy? ``python -m nfnets.doctor --workdir DIR``.

Loads the run's config.json and latest checkpoint, re-estimates the population
statistics (PreciseBN), evaluates the test split with running, PreciseBN and
batch statistics, prints the worst layers and a verdict with the fix, and writes
doctor.json and doctor.png (see :mod:`nfnets.training.doctor`). Exit status 0
after a diagnosis (whatever it found), 2 when the workdir cannot be diagnosed.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nfnets.doctor", description=__doc__)
    parser.add_argument("--workdir", required=True, help="the training run's workdir")
    parser.add_argument("--batches", type=int, default=50, help="PreciseBN training batches")
    parser.add_argument("--out", default=None, help="where doctor.json/png go (default: workdir)")
    parser.add_argument("--top", type=int, default=10, help="worst layers to print")
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error(f"--top {args.top}: give a positive number of layers")

    import absl.logging

    absl.logging.set_verbosity(absl.logging.WARNING)  # orbax logs every restore at INFO
    from nfnets.training import doctor, doctor_report

    try:
        report = doctor.diagnose(args.workdir, batches=args.batches)
    except doctor.DoctorError as e:
        print(f"nfnets.doctor: error: {e}", file=sys.stderr)
        return 2
    print(doctor_report.format_report(report, top=args.top))
    if report["layers"]:
        paths = doctor_report.write_report(report, args.out or args.workdir)
        print(f"wrote {', '.join(paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
