"""configs/default.py uses the learning rate that the validation split chose."""

from __future__ import annotations

from configs import default
from experiments import default_config, grid, protocol


def test_default_uses_the_validation_choice():
    path = grid.REPO / "docs" / "experiments" / "default_config.json"
    chosen = default_config.choose(grid.load_results(path).get("cells", []))
    if chosen is None:  # the cells have not all run: the claim is pending, nothing to check
        assert "pending" in default_config.summary(grid.load_results(path).get("cells", []))
        return
    assert default.get_config().learning_rate == chosen


def test_choose_is_by_validation_not_test():
    entries = []
    for lr, val, test in ((0.003, 0.90, 0.95), (0.01, 0.92, 0.91), (0.03, 0.91, 0.90)):
        for seed in protocol.SEEDS:
            entries.append(
                {
                    "key": f"lr{lr:g}_s{seed}",
                    "seed": seed,
                    "test_loss": 0.3,
                    "test_accuracy": test,
                    "validation_accuracy": val,
                }
            )
    assert default_config.choose(entries) == 0.01
    assert default_config.choose(entries[:-1]) is None
    assert "**0.01**" in default_config.summary(entries)
