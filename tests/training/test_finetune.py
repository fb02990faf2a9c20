"""Fine-tuning the GeM head / last conv block on COIL-20.

The fine-tuning run and the saliency of the fine-tuned model (frozen maps of all 1440
images, a 100-step training run, two gradient compilations through the backbone) are
marked slow (`make test-slow`); the head's starting point is checked on 8 images."""
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import require_data
from retrieval_jax.data import load_coil20
from retrieval_jax.diffusion import ranking_from_scores
from retrieval_jax.evaluation import label_map
from retrieval_jax.backbones.surgery import backbone_feature_maps, conv_head_params
from retrieval_jax.descriptors import gem, l2_normalize
from retrieval_jax.explanation.saliency import similarity_saliency
from retrieval_jax.training import load_checkpoint
from retrieval_jax.training.finetune import embed_with_head, finetune_head, head_model, init_head, load_head

SIZE = 48          # COIL-20 images resized 128 -> 48: 2 x 2 feature maps, ~5 s for all 1440
TRAIN_STEPS = 100


def _heldout_map(desc, labels):
    """Label mAP: each image queries the others of the same set, itself excluded."""
    desc = np.asarray(desc, np.float64)
    ids = np.arange(len(desc))
    return label_map(ranking_from_scores(desc @ desc.T, exclude=ids), labels)


@pytest.fixture(scope="module")
def lite0_coil():
    """EfficientNet-Lite0 and the COIL-20 images at SIZE px."""
    root = require_data("coil20")
    from retrieval_jax.backbones import load_efficientnet_lite
    return load_efficientnet_lite("lite0"), load_coil20(root, size=SIZE, images=True)


@pytest.fixture(scope="module")
def coil(lite0_coil):
    """Frozen EfficientNet-Lite0 maps of all 1440 COIL-20 images (input of the last conv block)."""
    backbone, data = lite0_coil
    maps = backbone_feature_maps(backbone, data.images, pre_head=True)
    return backbone, data, maps


def test_head_starts_at_imagenet_gem(lite0_coil):
    backbone, data = lite0_coil
    maps = backbone_feature_maps(backbone, data.images[:8], pre_head=True)
    params = init_head(maps, conv_head=conv_head_params(backbone))
    rgb = np.repeat(data.images[:8, :, :, None], 3, axis=-1)
    reference = l2_normalize(gem(backbone.features(rgb), 3.0))
    np.testing.assert_allclose(embed_with_head(params, maps), reference, atol=1e-5)
    # the whitening-only head on last-conv maps starts at the same descriptor
    last = backbone_feature_maps(backbone, data.images[:8])
    np.testing.assert_allclose(embed_with_head(init_head(last), last), reference, atol=1e-5)


@pytest.mark.slow
def test_finetuning_improves_heldout_objects(coil, tmp_path):
    backbone, data, maps = coil
    train, test = data.labels < 10, data.labels >= 10          # objects 1-10 / 11-20
    head0 = init_head(maps[train], conv_head=conv_head_params(backbone))
    before = _heldout_map(embed_with_head(head0, maps[test]), data.labels[test])

    ckpt = tmp_path / "head.npz"
    params, history = finetune_head(maps[train], data.labels[train], steps=TRAIN_STEPS, lr=1e-3,
                                    margin=0.3, seed=0, conv_head=conv_head_params(backbone),
                                    checkpoint=ckpt)
    after = _heldout_map(embed_with_head(params, maps[test]), data.labels[test])
    # measured (100 steps, seeds 0-3): 0.9614 -> 0.9835, 0.9802, 0.9833, 0.9769, i.e. +0.016
    # to +0.022 (the missed fraction roughly halves); lr = 0 leaves the gain at exactly 0.
    assert 0.93 < before < 0.98, before
    assert after - before > 0.008, (before, after)

    assert history["loss"].shape == (TRAIN_STEPS,) and np.isfinite(history["loss"]).all()
    assert history["loss"][-10:].mean() < 0.5 * history["loss"][:10].mean()
    assert float(history["p"][0]) == pytest.approx(3.0)
    # checkpoint round trip
    restored = load_head(ckpt)
    for k in ("p", "proj", "bias"):
        np.testing.assert_array_equal(restored[k], params[k])
    assert "step" in load_checkpoint(ckpt)
    assert int(load_checkpoint(ckpt)["step"]) == TRAIN_STEPS


@pytest.mark.slow
def test_saliency_of_finetuned_model_on_coil(coil):
    """head_model reproduces embed_with_head end to end; its gradient saliency is finite,
    in [0, 1], and larger on the object than on the black background."""
    backbone, data, maps = coil
    params = init_head(conv_head=conv_head_params(backbone))
    params = dict(params, p=jnp.float32(2.5),
                  conv_kernel=params["conv_kernel"] * (1.0 + 0.1 * jnp.cos(jnp.arange(1280.0))))
    features, pooling = head_model(backbone, params)
    rgb = np.repeat(data.images[[0, 1]].astype(np.float32)[..., None] / 255.0, 3, axis=-1)
    desc = embed_with_head(params, maps[[0, 1]])
    np.testing.assert_allclose(l2_normalize(pooling(features(rgb))), desc, atol=1e-5)
    sal = np.asarray(similarity_saliency(features, pooling, rgb[0], desc[1]))
    assert sal.shape == (SIZE, SIZE) and np.isfinite(sal).all()
    assert sal.min() == 0.0 and sal.max() == pytest.approx(1.0)
    obj = data.images[0] > 40
    assert 0.1 < obj.mean() < 0.9
    assert sal[obj].mean() > sal[~obj].mean()
    clipped = np.asarray(similarity_saliency(backbone, gem, rgb[0], desc[1], percentile=90.0))
    assert clipped.shape == (SIZE, SIZE) and (clipped == 1.0).mean() >= 0.09


def test_finetune_head_validates():
    maps = np.ones((6, 2, 2, 4), np.float32)
    with pytest.raises(ValueError, match="labels"):
        finetune_head(maps, np.zeros(5, int), steps=1)
    with pytest.raises(ValueError, match="two classes"):
        finetune_head(maps, np.zeros(6, int), steps=1, batch=2, negatives=1)
    with pytest.raises(ValueError, match="train must be"):
        finetune_head(maps, np.arange(6) % 2, steps=1, batch=2, negatives=1, train=("conv",))
