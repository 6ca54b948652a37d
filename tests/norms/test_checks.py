"""One per-channel parameter check (norms.checks) behind every norm: same message everywhere."""

import jax.numpy as jnp
import numpy as np
import pytest

import norms
from norms.checks import channel_params, require_spatial

X = np.ones((2, 6, 3, 3), np.float32)  # NCHW: channels on axis 1
BAD = jnp.ones(5)
GOOD = jnp.ones(6)
STATE = norms.init_batch_norm_state(6)
CALLS = {
    "batch_norm": lambda s: norms.batch_norm(X, STATE, s, train=True, axis=1),
    "batch_renorm": lambda s: norms.batch_renorm(
        X, norms.init_batch_renorm_state(6), s, train=True, axis=1
    ),
    "group_norm": lambda s: norms.group_norm(X, s, num_groups=2, axis=1),
    "layer_norm": lambda s: norms.layer_norm(X, s, axis=1),
    "instance_norm": lambda s: norms.instance_norm(X, s, axis=1),
    "filter_response_norm": lambda s: norms.filter_response_norm(X, s, axis=1),
    "rms_norm": lambda s: norms.rms_norm(X, s, axis=1),
    "dynamic_tanh": lambda s: norms.dynamic_tanh(X, 0.5, s, axis=1),
    "derf": lambda s: norms.derf(X, 0.5, 0.0, s, axis=1),
    "switchable_norm": lambda s: norms.switchable_norm(
        X, STATE, s, None, jnp.zeros(3), jnp.zeros(3), train=True, axis=1
    ),
    "evonorm_b0": lambda s: norms.evonorm_b0(X, STATE, s, None, GOOD, train=True, axis=1),
    "evonorm_s0": lambda s: norms.evonorm_s0(X, s, None, GOOD, num_groups=2, axis=1),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_every_norm_names_parameter_shape_input_shape_channels_and_axis(name):
    CALLS[name](GOOD)  # the right shape passes
    msg = (
        rf"{name}: scale has shape \(5,\) but the input of shape \(2, 6, 3, 3\) "
        r"has 6 channels on axis 1"
    )
    with pytest.raises(ValueError, match=msg):
        CALLS[name](BAD)


def test_channel_params_casts_keeps_none_and_order():
    s, b, v = channel_params(
        "f", (2, 3), 1, jnp.float32, scale=np.ones(3, np.float64), bias=None, v=[1, 2, 3]
    )
    assert b is None and s.dtype == jnp.float32 and v.dtype == jnp.float32
    np.testing.assert_array_equal(v, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"f: v has shape \(2,\).*\(2, 3\) has 3 channels"):
        channel_params("f", (2, 3), 1, v=jnp.ones(2))


def test_require_spatial_names_the_shape_and_the_reason():
    require_spatial(3, (2, 4, 3), "f", "why")
    with pytest.raises(ValueError, match=r"f: input of shape \(2, 3\) has no spatial axis; the IN"):
        require_spatial(2, (2, 3), "f", "the IN branch needs one")
