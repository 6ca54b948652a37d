"""Experiments reproducing the literature's normalization claims (one module per claim).

Every experiment follows the evidence protocol of :mod:`experiments.protocol`
(validation split, one architecture, one recipe chosen on validation by
:mod:`experiments.recipe`, paired seeds, intervals, verdicts by code). Run one as
``python -m experiments.<name> [--quick] [--only KEY] [--stale-code] [--out
docs/experiments] [--force]``, all in order as ``python -m experiments.run_all``;
``python -m experiments.report`` regenerates every page from the JSON. The shared
machinery (cells, resume, outputs) is :mod:`experiments.grid`; the results and
their reading are in ``docs/experiments.md``.
"""
