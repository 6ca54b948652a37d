"""Experiments reproducing the literature's normalization claims (one module per claim).

Run one as ``python -m experiments.<name> [--quick] [--only KEY] [--out
docs/experiments] [--force]``: ``batch_size``, ``running_stats``, ``sync``, ``agc``,
``cost``. The shared machinery (cells, resume, outputs) is :mod:`experiments.grid`;
the results and their reading are in ``docs/experiments.md``.
"""
