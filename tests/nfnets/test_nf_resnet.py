"""NF-ResNet: parameter counts, block structure, tiny forward/backward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.nf_resnet import NF_RESNET_DEPTHS, NFResNet

# torchvision's ResNet parameter counts (BN scale+bias per conv); an NF-ResNet
# replaces each BN by its WS conv's gain+bias and adds one SkipInit gain per block.
TORCHVISION = {50: 25_557_032, 101: 44_549_160, 152: 60_192_808}


def _shapes(model, size=32):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)


def _count(tree) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))


def test_nf_resnet50_has_25_56m_parameters():
    params = _shapes(NFResNet(depths=NF_RESNET_DEPTHS[50]))["params"]
    assert abs(_count(params) / 1e6 - 25.56) <= 0.05
    assert _count(params) == TORCHVISION[50] + 16
    assert params["stem_conv"]["kernel"].shape == (7, 7, 3, 64)
    block = params["stage1_block0"]
    assert block["conv0"]["kernel"].shape == (1, 1, 256, 128)
    assert block["conv1"]["kernel"].shape == (3, 3, 128, 128)
    assert block["conv2"]["kernel"].shape == (1, 1, 128, 512)
    assert block["conv_shortcut"]["kernel"].shape == (1, 1, 256, 512)
    assert "conv_shortcut" not in params["stage1_block1"] and "se" not in block
    assert params["head"]["kernel"].shape == (2048, 1000)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [101, 152])
def test_deeper_counts_match_torchvision_plus_skip_gains(depth):
    params = _shapes(NFResNet(depths=NF_RESNET_DEPTHS[depth]))["params"]
    assert _count(params) == TORCHVISION[depth] + sum(NF_RESNET_DEPTHS[depth])


def test_squeeze_excite_adds_its_dense_layers():
    depths = NF_RESNET_DEPTHS[26]
    plain = _count(_shapes(NFResNet(depths=depths))["params"])
    with_se = _count(_shapes(NFResNet(depths=depths, se_ratio=0.25))["params"])
    extra = 0
    for width, depth in zip((256, 512, 1024, 2048), depths, strict=True):
        hidden = int(0.25 * width)
        extra += depth * (width * hidden + hidden + hidden * width + width)
    assert with_se - plain == extra


TINY = dict(widths=(16, 32), depths=(1, 2), stem_width=8, num_classes=5)


def test_tiny_forward_backward_train_and_eval():
    model = NFResNet(small=True, se_ratio=0.5, dropout=0.3, stochastic_depth=0.5, **TINY)
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
    variables = jax.jit(
        lambda x: model.init({"params": jax.random.key(1, impl="rbg")}, x, train=False)
    )(x)

    @jax.jit
    def run(params, key):
        def loss(p):
            return jnp.mean(model.apply({"params": p}, x, train=True, rngs={"dropout": key}) ** 2)

        value, grads = jax.value_and_grad(loss)(params)
        logits, state = model.apply({"params": params}, x, train=False, mutable=["intermediates"])
        return value, grads, logits, state["intermediates"]

    value, grads, logits, inter = run(variables["params"], jax.random.key(2))
    assert logits.shape == (3, 5) and logits.dtype == jnp.float32
    assert np.isfinite(float(value))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    # Zero-initialised skip gains: the gradient reaches them but not the branch convs
    # of a block (their output is multiplied by 0), only shortcut/stem/head.
    assert float(jnp.abs(grads["stage1_block1"]["skip_gain"])) > 0
    assert float(jnp.abs(grads["stage1_block1"]["conv0"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(grads["stage1_block0"]["conv_shortcut"]["kernel"]).max()) > 0
    assert inter["stage1_block0"]["block_out"][0].shape == (3, 4, 4, 32)
    np.testing.assert_array_equal(
        inter["stage1_block1"]["block_out"][0], inter["stage1_block0"]["block_out"][0]
    )


def test_imagenet_stem_downsamples_by_four():
    model = NFResNet(**TINY)
    variables = _shapes(model)
    out, state = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]),
        variables,
        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
    )
    assert state["intermediates"]["stage0_block0"]["block_out"][0].shape == (2, 8, 8, 16)
    assert state["intermediates"]["stage1_block1"]["block_out"][0].shape == (2, 4, 4, 32)
    with pytest.raises(ValueError, match="minimum image size is 8x8"):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, train=False),
            variables,
            jax.ShapeDtypeStruct((2, 6, 6, 3), jnp.float32),
        )
