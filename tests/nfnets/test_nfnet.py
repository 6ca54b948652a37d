"""NFNet: published parameter counts (eval_shape), block internals, tiny forward passes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.nfnet import (
    NFNET_PLUS_WIDTHS,
    NFNET_VARIANTS,
    NFNet,
    NFNetBlock,
    check_nfnet_config,
)

# Published parameter counts in millions (Brock et al., 2021, Table 1/Appendix).
PUBLISHED_M = {"f0": 71.5, "f1": 132.6, "f2": 193.8, "f3": 254.9, "f4": 316.1, "f5": 377.2,
               "f6": 438.4}  # fmt: skip


@functools.cache
def _param_shapes(variant: str, plus: bool = False):
    row = NFNET_VARIANTS[variant]
    widths = {"widths": NFNET_PLUS_WIDTHS} if plus else {}
    model = NFNet(depths=row.depths, dropout=row.dropout, **widths)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)[
        "params"
    ]


def _count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(PUBLISHED_M))
def test_published_parameter_counts(variant):
    millions = _count(_param_shapes(variant)) / 1e6
    assert abs(millions - PUBLISHED_M[variant]) <= 0.05, (variant, millions)


def test_f0_counts_71_49m_and_block_internals():
    params = _param_shapes("f0")
    assert round(_count(params) / 1e6, 2) == 71.49
    block = params["stage2_block0"]
    assert set(block) == {"conv0", "conv1", "conv1b", "conv2", "conv_shortcut", "se", "skip_gain"}
    # mid = 0.5 * 1536 = 768 -> 6 groups of width 128.
    assert block["conv0"]["kernel"].shape == (1, 1, 512, 768)
    assert block["conv1"]["kernel"].shape == (3, 3, 128, 768)
    assert block["conv1b"]["kernel"].shape == (3, 3, 128, 768)
    assert block["conv2"]["kernel"].shape == (1, 1, 768, 1536)
    assert block["conv_shortcut"]["kernel"].shape == (1, 1, 512, 1536)
    assert block["se"]["fc0"]["kernel"].shape == (1536, 768)
    assert block["se"]["fc1"]["kernel"].shape == (768, 1536)
    assert block["skip_gain"].shape == ()
    for conv in ("conv0", "conv1", "conv1b", "conv2", "conv_shortcut"):
        assert (
            block[conv]["gain"].shape
            == block[conv]["bias"].shape
            == (block[conv]["kernel"].shape[-1],)
        )
    assert "conv_shortcut" not in params["stage2_block1"]
    # Stem 16-32-64-128, head 1x1 conv to 2 * 1536, dense to 1000 classes.
    assert [params[f"stem_conv{i}"]["kernel"].shape[-1] for i in range(4)] == [16, 32, 64, 128]
    assert params["final_conv"]["kernel"].shape == (1, 1, 1536, 3072)
    assert params["head"]["kernel"].shape == (3072, 1000)


def test_plus_variant_rounds_mid_width_to_group_width():
    params = _param_shapes("f0", plus=True)
    # Stage width 384: mid 192 rounds down to one group of 128, as in the reference.
    assert params["stage0_block0"]["conv1"]["kernel"].shape == (3, 3, 128, 128)
    assert params["stage1_block0"]["conv1"]["kernel"].shape == (3, 3, 128, 384)
    assert params["head"]["kernel"].shape == (4096, 1000)


TINY = dict(widths=(16, 32), depths=(1, 2), group_width=8, stem_width=8, num_classes=5)


def test_block_starts_as_identity_and_sows():
    # Real init of one block: SkipInit gain 0 makes a non-transition block the identity.
    block = NFNetBlock(
        features=16, mid=16, groups=2, stride=1, beta=0.9, alpha=0.2, se_ratio=0.5,
        stochastic_depth=0.0, activation="gelu",
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))

    @jax.jit
    def init_and_apply(x):
        variables = block.init({"params": jax.random.key(1, impl="rbg")}, x, train=False)
        y, state = block.apply(variables, x, train=False, mutable=["intermediates"])
        params = {**variables["params"], "skip_gain": jnp.ones(())}
        y1 = block.apply({"params": params}, x, train=False)
        return variables["params"], y, state["intermediates"], y1

    params, y, inter, y1 = init_and_apply(x)
    assert float(params["skip_gain"]) == 0.0
    np.testing.assert_array_equal(params["conv1"]["gain"], np.ones(16))
    np.testing.assert_array_equal(params["conv1"]["bias"], np.zeros(16))
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(inter["block_out"][0], y)
    branch = inter["branch_out"][0]
    assert branch.shape == x.shape and float(jnp.std(branch)) > 0
    # With gain 1 the block adds alpha times its branch output.
    np.testing.assert_allclose(y1, x + 0.2 * branch, rtol=1e-5, atol=1e-6)


def test_intermediates_per_block_and_stride_pattern():
    model = NFNet(small=True, **TINY)
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x
    )
    _, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]), variables, x
    )
    inter = state["intermediates"]
    assert sorted(inter) == ["stage0_block0", "stage1_block0", "stage1_block1"]
    assert inter["stage0_block0"]["block_out"][0].shape == (2, 16, 16, 16)
    assert inter["stage1_block1"]["branch_out"][0].shape == (2, 8, 8, 32)


def test_bf16_compute_keeps_f32_params_and_logits():
    model = NFNet(small=True, dtype=jnp.bfloat16, **TINY)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(
        lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x
    )
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]), variables, x
    )
    assert out.dtype == jnp.float32
    assert state["intermediates"]["stage1_block1"]["block_out"][0].dtype == jnp.bfloat16


def test_errors_name_the_numbers():
    with pytest.raises(ValueError, match="group width 128 does not divide the stage width 200"):
        check_nfnet_config(NFNet(widths=(256, 200, 1536, 1536)))
    with pytest.raises(ValueError, match="one entry per stage"):
        check_nfnet_config(NFNet(widths=(256, 512)))
    model = NFNet(**{**TINY, "num_classes": 3})
    with pytest.raises(ValueError, match="minimum image size is 8x8"):
        jax.eval_shape(
            lambda x: model.init({"params": jax.random.key(0)}, x, train=False),
            jax.ShapeDtypeStruct((1, 4, 4, 3), jnp.float32),
        )
