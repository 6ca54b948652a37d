"""Runs every benchmark and prints their markdown tables: ``python -m benchmarks.run``.

Each benchmark module has a ``main()`` that prints its table; results are
recorded by hand in ``docs/benchmarks.md`` together with the machine line.
"""

import importlib

BENCHMARKS = ("benchmarks.norms_bench", "benchmarks.models_bench")


def main() -> None:
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            print(f"({name} not present, skipped)")
            continue
        print(f"\n## {name}\n")
        module.main()


if __name__ == "__main__":
    main()
