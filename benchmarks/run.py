"""Runs every benchmark and prints their markdown tables: ``python -m benchmarks.run``.

Each benchmark module has a ``main()`` that prints its table (with the machine);
the recorded results are in ``docs/benchmarks.md``.
"""

from benchmarks import (
    collectives_bench,
    models_bench,
    norms_bench,
    parallel_bench,
    pipeline_bench,
)


def main() -> None:
    for module in (norms_bench, collectives_bench, pipeline_bench, parallel_bench, models_bench):
        print(f"\n## {module.__name__}\n", flush=True)
        module.main()


if __name__ == "__main__":
    main()
