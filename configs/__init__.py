"""Experiment configs: each file's ``get_config()`` returns a locked-schema ConfigDict.

Every config starts from ``configs.common.base_config()``, which declares every key
the trainer reads (so ``--config.<key>=value`` overrides of unknown keys are
rejected) and only sets values. ``nfnets.training.plan.validate`` checks them and
``nfnets.training.plan.make_plan`` computes derived values after overrides.
"""
