"""Train from a config file: ``python train.py --config configs/default.py --workdir runs/x``.

Override any config value on the command line, e.g. ``--config.batch_size=256``
or ``--config.model_kwargs.widths="(32, 64)"``; unknown keys are rejected with
the list of valid ones. A norm's own settings are
``--config.model_kwargs.norm_kwargs.KEY=VALUE`` (e.g. ``num_groups=8``). Rerunning
with the same ``--workdir`` resumes from its latest checkpoint (the config must
match the checkpoint's); a finished run is left alone unless ``--extend`` (train
on to a larger num_epochs / num_train_steps) or ``--restart`` (delete its outputs
and start over). SIGTERM / Ctrl-C saves a checkpoint, then exits. User errors
(bad values, missing or corrupt data, divergence) print one line and exit 1.
Outputs (in the workdir): metrics.jsonl, tensorboard/, checkpoints/,
summary.json, training_curves.png. The library lives in ``nfnets.training``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file (get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (resumes if it has checkpoints).")
_EXTEND = flags.DEFINE_bool(
    "extend", False, "Resume, even a finished run, with a longer num_epochs / num_train_steps."
)
_RESTART = flags.DEFINE_bool(
    "restart", False, "Delete the workdir's checkpoints, metrics and summary; start over."
)
_NORM_OVERRIDES: dict = {}  # --config.model_kwargs.norm_kwargs.KEY=VALUE, set by _parse_flags


def _config_path(argv: list[str]) -> str:
    """The --config file named in ``argv`` (without a ``:argument``), or the default."""
    path = next(
        (a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
        None,
    )
    if path is None and "--config" in argv:
        i = argv.index("--config")
        path = argv[i + 1] if i + 1 < len(argv) else None
    return (path or "configs/default.py").split(":", 1)[0]


def _explain_override_error(argv: list[str]) -> str | None:
    """A readable message when a --config.<key> override names a key the config lacks."""
    import importlib.util

    from nfnets.training.plan import unknown_overrides, valid_keys

    path = _config_path(argv)
    try:
        spec = importlib.util.spec_from_file_location("_config_for_check", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception:  # noqa: BLE001 - only to improve an error message
        return None
    bad = unknown_overrides(config, argv)
    if not bad:
        return None
    return (
        f"unknown config key(s) {bad} in the overrides; {path} has no such field. "
        f"Fix the spelling (valid keys: {', '.join(valid_keys(config))}) or add the field "
        "to configs/common.py."
    )


def _parse_flags(argv: list[str]) -> list[str]:
    from nfnets.training.plan import split_norm_overrides

    path = _config_path(argv)
    if not os.path.isfile(path):
        sys.exit(
            f"train.py: error: --config {path}: no such file; pass a config file such as "
            "configs/default.py (the list is in configs/)"
        )
    argv, norm_overrides = split_norm_overrides(argv)
    _NORM_OVERRIDES.update(norm_overrides)
    # config_flags also scans sys.argv for --config.* keys: hide these there too.
    sys.argv[:] = split_norm_overrides(sys.argv)[0]
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = _explain_override_error(argv) or str(e)
        sys.exit(f"train.py: error: {message}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        message = _explain_override_error(argv)
        sys.exit(f"train.py: error: {message or e}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.key=value")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required, e.g. --workdir runs/default")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from nfnets.training import ConfigError, train
    from nfnets.training.datasets import DataError, DatasetNotFoundError
    from nfnets.training.health import TrainingDiverged
    from nfnets.training.outputs import MetricsFileError
    from nfnets.training.plan import apply_norm_overrides

    try:
        config = _CONFIG.value
        apply_norm_overrides(config, _NORM_OVERRIDES)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        # config_flags wraps a failing get_config(); its first line names the cause.
        cause = e.__cause__ or e
        sys.exit(f"train.py: error: --config {_config_path(sys.argv)}: {cause}".splitlines()[0])
    try:
        train(config, _WORKDIR.value, restart=_RESTART.value, extend=_EXTEND.value)
    except (
        ConfigError,
        DatasetNotFoundError,
        DataError,
        MetricsFileError,
        TrainingDiverged,
    ) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
