"""The old ``retrieval_jax.features`` paths keep every name they exported (one release)."""
import importlib
import subprocess
import sys

import pytest

import retrieval_jax.features as features

OLD_MODULES = {
    "backbones": "retrieval_jax.backbones.efficientnet_lite",
    "resnet_vgg": "retrieval_jax.backbones.resnet_vgg",
    "torch_pickle": "retrieval_jax.backbones.torch_pickle",
    "extract": "retrieval_jax.descriptors.extraction",
    "pooling": "retrieval_jax.descriptors.pooling",
    "whitening": "retrieval_jax.descriptors.whitening",
    "losses": "retrieval_jax.training.losses",
    "train": "retrieval_jax.training",
    "finetune": "retrieval_jax.training.finetune",
    "saliency": "retrieval_jax.explanation.saliency",
    "regional": "retrieval_jax.diffusion.regional",
}
NEW_HOMES = ("retrieval_jax.backbones", "retrieval_jax.descriptors", "retrieval_jax.training",
             "retrieval_jax.explanation", "retrieval_jax.diffusion.regional",
             "retrieval_jax.backbones.surgery", "retrieval_jax.data.feature_maps")


@pytest.mark.parametrize("old", sorted(OLD_MODULES))
def test_old_module_names_are_the_new_objects(old):
    shim = importlib.import_module(f"retrieval_jax.features.{old}")
    assert shim.__all__
    homes = [importlib.import_module(m) for m in NEW_HOMES + (OLD_MODULES[old],)]
    for name in shim.__all__:
        obj = getattr(shim, name)
        assert any(getattr(h, name, None) is obj for h in homes), (old, name)


def test_package_exports_unchanged():
    assert len(features.__all__) == 53
    for name in features.__all__:
        assert getattr(features, name) is not None
    assert features.extraction is importlib.import_module("retrieval_jax.features.extract")
    from retrieval_jax.descriptors import extract
    assert features.extract is extract and features.gem is importlib.import_module(
        "retrieval_jax.descriptors.pooling").gem
    from retrieval_jax.features.extract import Extracted, extract as old_extract  # noqa: F401
    assert old_extract is extract


def test_no_module_shares_a_name_with_its_function():
    import retrieval_jax.descriptors as d
    assert callable(d.extract) and d.extraction.extract is d.extract


def test_shims_import_silently():
    code = ("import warnings; warnings.simplefilter('error'); "
            "import retrieval_jax.features, retrieval_jax.features.extract, "
            "retrieval_jax.features.finetune, retrieval_jax.features.train")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""
