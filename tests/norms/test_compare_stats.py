"""compare_batch_stats against a float64 numpy reference of its formula."""

import numpy as np
import pytest

import norms


def _reference(mu_run, var_run, mu_pop, var_pop, eps):
    shift = np.abs(mu_run - mu_pop) / np.sqrt(var_pop + eps)
    ratio = np.abs(np.log((var_run + eps) / (var_pop + eps)))
    return shift.max(), shift.mean(), ratio.max(), ratio.mean()


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    pop = {"bn": {"mean": rng.normal(size=8), "var": rng.uniform(0.1, 2, 8), "count": 5}}
    report = norms.compare_batch_stats(pop, pop)
    assert report["bn"]["mean_shift_max"] == 0.0
    assert report["bn"]["var_log_ratio_max"] == 0.0
    assert report["bn"]["channels"] == 8


def test_known_offsets_give_the_formula():
    eps = 1e-5
    var_pop = np.array([1.0, 4.0, 0.25], np.float32)
    mu_pop = np.array([0.0, 1.0, -1.0], np.float32)
    # Shift by (3, 1, 0.5) sigma, variances x e, /e, x1 (up to eps).
    mu_run = mu_pop + np.array([3.0, 1.0, 0.5]) * np.sqrt(var_pop + eps)
    var_run = (var_pop + eps) * np.exp([1.0, -1.0, 0.0]) - eps
    running = {"stage1": {"block0": {"bn1": {"mean": mu_run, "var": var_run, "count": 3}}}}
    population = {"stage1": {"block0": {"bn1": {"mean": mu_pop, "var": var_pop, "count": 9}}}}
    got = norms.compare_batch_stats(running, population, eps=eps)["stage1/block0/bn1"]
    np.testing.assert_allclose(got["mean_shift_max"], 3.0, rtol=1e-6)
    np.testing.assert_allclose(got["mean_shift_mean"], 1.5, rtol=1e-6)
    np.testing.assert_allclose(got["var_log_ratio_max"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(got["var_log_ratio_mean"], 2.0 / 3.0, rtol=1e-6)


def test_random_trees_match_float64_reference():
    rng = np.random.default_rng(1)
    eps = 1e-3
    shapes = {"a": 4, "b": 16}
    running, population = {}, {}
    for name, c in shapes.items():
        running[name] = norms.BatchNormState(
            mean=rng.normal(size=c).astype(np.float32),
            var=rng.uniform(0.01, 3, c).astype(np.float32),
            count=np.int32(7),
        )
        population[name] = {
            "mean": rng.normal(size=c).astype(np.float32),
            "var": rng.uniform(0.01, 3, c).astype(np.float32),
        }
    report = norms.compare_batch_stats(running, population, eps=eps)
    assert list(report) == ["a", "b"]
    for name in shapes:
        r, p = running[name], population[name]
        want = _reference(
            *(np.asarray(v, np.float64) for v in (r.mean, r.var, p["mean"], p["var"])), eps
        )
        got = report[name]
        keys = ("mean_shift_max", "mean_shift_mean", "var_log_ratio_max", "var_log_ratio_mean")
        np.testing.assert_allclose([got[k] for k in keys], want, rtol=1e-12)


def test_variance_only_layers_report_no_mean_shift():
    running = {"evo": {"var": np.array([2.0, 1.0])}}
    population = {"evo": {"var": np.array([1.0, 1.0])}}
    got = norms.compare_batch_stats(running, population, eps=0.0)["evo"]
    assert got["mean_shift_max"] is None
    np.testing.assert_allclose(got["var_log_ratio_max"], np.log(2.0), rtol=1e-12)


def test_missing_layer_and_shape_mismatch_are_named():
    running = {"x": {"mean": np.zeros(3), "var": np.ones(3)}}
    with pytest.raises(ValueError, match=r"no population statistics for \['x'\]"):
        norms.compare_batch_stats(running, {"y": {"mean": np.zeros(3), "var": np.ones(3)}})
    with pytest.raises(ValueError, match=r"x has var of shape \(3,\).*\(4,\)"):
        norms.compare_batch_stats(running, {"x": {"mean": np.zeros(4), "var": np.ones(4)}})
    with pytest.raises(ValueError, match="eps must be >= 0"):
        norms.compare_batch_stats(running, running, eps=-1.0)
