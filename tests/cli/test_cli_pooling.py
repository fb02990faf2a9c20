"""``retrieval-jax extract --pooling``: every pooling of the library, on a tiny folder of
generated images.

The backbone is replaced by a tiny JAX network (a 4 x 4 average pool and a 1 x 1 conv,
ReLU: compiled in a moment) so that each pooling's descriptors can be checked against
the pooling applied to the network's maps directly, and CroW against a numpy reference
written from the paper's definition. The images' sides are multiples of 32, so the
extraction pads nothing and the two must agree exactly; they are not square, so R-MAC
has regions of three scales.
"""
import dataclasses
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import cli_fails, cli_run

SIZES = ((64, 96), (64, 96), (64, 96))   # one shape: one compilation per pooling


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TinyNet:
    """features(x) = relu(avgpool_4x4(x) K - 0.2): a [B, H/4, W/4, 8] map."""
    kernel: jax.Array
    stride: int = dataclasses.field(default=4, metadata=dict(static=True))

    def features(self, images):
        b, h, w, c = images.shape
        s = self.stride
        x = images.reshape(b, h // s, s, w // s, s, c).mean(axis=(2, 4))
        return jax.nn.relu(x @ self.kernel - 0.2)

    def feature_shape(self, height, width):
        return height // self.stride, width // self.stride


def _net():
    return TinyNet(jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.float32))


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A folder of three RGB images of different sizes, and the tiny network as every model."""
    rng = np.random.default_rng(1)
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[:h, :w]
        blob = np.exp(-((yy - rng.uniform(0, h)) ** 2 + (xx - rng.uniform(0, w)) ** 2) / (2 * 12.0 ** 2))
        pixels = 255 * np.clip(0.3 * rng.random((h, w, 3)) + blob[..., None] * rng.random(3), 0, 1)
        Image.fromarray(pixels.astype(np.uint8)).save(imgs / f"img{i}.png")
    backbones = importlib.import_module("retrieval_jax.backbones.efficientnet_lite")
    monkeypatch.setattr(backbones, "load_efficientnet_lite", lambda variant: _net())
    return imgs


def _maps(folder):
    from retrieval_jax.descriptors import load_image
    net = _net()
    return [np.asarray(net.features(jnp.asarray(load_image(folder / f"img{i}.png"))[None]))
            for i in range(len(SIZES))]


def _read(path):
    with np.load(path) as z:
        return z["X"], [str(n) for n in z["names"]], json.loads(str(z["config"]))


def _l2(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def crow_reference(fmap, a=2.0, b=2.0, eps=1e-12):
    """CroW (Kalantidis et al., ECCV-W 2016) of one map [H, W, C] in float64."""
    x = np.asarray(fmap, np.float64)
    z = x.sum(axis=-1)
    s = (z / (np.sum(z ** a) ** (1 / a))) ** (1 / b)
    q = (x > 0).mean(axis=(0, 1))
    omega = np.where(q > 0, np.log(q.sum() / (eps + np.where(q > 0, q, 1))), 0.0)
    return omega * np.einsum("hw,hwc->c", s, x)


@pytest.mark.parametrize("pooling", ["gem", "mac", "spoc", "rmac", "crow"])
def test_every_pooling_is_the_library_pooling_of_each_image(folder, tmp_path, pooling):
    from retrieval_jax.descriptors import pooling as lib
    out = tmp_path / f"{pooling}.npz"
    cli_run(["extract", folder, "-o", out, "--pooling", pooling, "--batch-size", 2])
    X, names, config = _read(out)
    assert names == ["img0.png", "img1.png", "img2.png"]          # sorted, relative to the folder
    assert config["pooling"] == pooling
    fn = {"gem": lambda m: lib.gem(m, p=3.0)}.get(pooling, getattr(lib, pooling))
    want = np.concatenate([np.asarray(fn(m)) for m in _maps(folder)])
    np.testing.assert_allclose(X, _l2(want), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-5)
    if pooling == "rmac":   # a sum of regional maxima, not the maximum over the map
        assert np.abs(X - _l2(np.concatenate([np.asarray(lib.mac(m)) for m in _maps(folder)]))).max() > 1e-3


def test_crow_against_the_papers_definition(folder, tmp_path):
    cli_run(["extract", folder, "-o", tmp_path / "c.npz", "--pooling", "crow"])
    X, _, _ = _read(tmp_path / "c.npz")
    want = np.stack([crow_reference(m[0]) for m in _maps(folder)])
    np.testing.assert_allclose(X, _l2(want), rtol=1e-4, atol=1e-6)


def test_names_are_relative_to_the_folder_however_it_is_given(folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli_run(["extract", "imgs", "-o", "rel.npz", "--pooling", "mac"])
    cli_run(["extract", folder.resolve(), "-o", tmp_path / "abs.npz", "--pooling", "mac"])
    cli_run(["extract", "./imgs/", "-o", "dot.npz", "--pooling", "mac"])
    for name in ("rel.npz", "abs.npz", "dot.npz"):
        assert _read(tmp_path / name)[1] == ["img0.png", "img1.png", "img2.png"], name


def test_unknown_pooling_is_refused(folder, tmp_path, capsys):
    cli_fails(["extract", folder, "-o", tmp_path / "x.npz", "--pooling", "vlad"], capsys, "invalid choice")


# ----------------------------------------------------------------------------- fs-egm, os-egm
CALLS = []


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CountingNet(TinyNet):
    """TinyNet that records the size of every image it sees."""

    def features(self, images):
        CALLS.append(tuple(images.shape[1:3]))
        return super().features(images)


@pytest.fixture
def scenes(tmp_path, monkeypatch):
    """Six images on a dim noisy background: a square of the same colour in every image and
    one of a colour of its own far from it, and CountingNet as every model."""
    rng = np.random.default_rng(2)
    imgs = tmp_path / "scenes"
    imgs.mkdir()
    shared = np.array([0.9, 0.3, 0.1])
    for i in range(6):
        pixels = 0.15 * rng.random((64, 96, 3))
        top, left = rng.integers(0, 48), rng.integers(0, 32)
        pixels[top:top + 16, left:left + 16] = shared + 0.05 * rng.random((16, 16, 3))
        top = rng.integers(0, 48)
        pixels[top:top + 16, 64:80] = rng.random(3) + 0.05 * rng.random((16, 16, 3))
        Image.fromarray((255 * np.clip(pixels, 0, 1)).astype(np.uint8)).save(imgs / f"s{i}.png")
    backbones = importlib.import_module("retrieval_jax.backbones.efficientnet_lite")
    net = CountingNet(_net().kernel)
    monkeypatch.setattr(backbones, "load_efficientnet_lite", lambda variant: net)
    CALLS.clear()
    return imgs


def _scene_maps(folder):
    from retrieval_jax.descriptors import load_image
    net = _net()
    return np.concatenate([np.asarray(net.features(jnp.asarray(load_image(p))[None]))
                           for p in sorted(folder.glob("s*.png"))])


@pytest.mark.slow  # end to end: make test-slow
def test_egm_poolings_are_the_discovery_drivers_descriptors(scenes, tmp_path):
    from retrieval_jax.discovery import discover
    cli_run(["extract", scenes, "-o", tmp_path / "os.npz", "--pooling", "os-egm", "--region-k", 2])
    # two passes over the folder: every image through the network twice, at its own size
    assert CALLS == [(64, 96)] * 12
    cli_run(["extract", scenes, "-o", tmp_path / "fs.npz", "--pooling", "fs-egm", "--region-k", 2])
    found = discover(_scene_maps(scenes), k=2, batch_size=1)
    for name, want in (("os", found.descriptors), ("fs", found.fs_descriptors)):
        X, names, config = _read(tmp_path / f"{name}.npz")
        assert names == [f"s{i}.png" for i in range(6)]
        assert config["pooling"] == f"{name}-egm" and config["region_k"] == 2
        np.testing.assert_allclose(X, want, rtol=1e-3, atol=1e-3)   # whitening of a few regions: float32 noise
        np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-4)
    assert not np.allclose(_read(tmp_path / "os.npz")[0], _read(tmp_path / "fs.npz")[0])


def test_whiten_dim_sets_the_egm_descriptors_dimension(scenes, tmp_path, capsys):
    cli_run(["extract", scenes, "-o", tmp_path / "w.npz", "--pooling", "os-egm", "--region-k", 2,
             "--whiten-dim", 3])
    X, _, config = _read(tmp_path / "w.npz")
    assert X.shape == (6, 3) and config["whiten_dim"] == 3
    np.testing.assert_allclose(np.linalg.norm(X, axis=1), 1.0, rtol=1e-4)
    # more dimensions than the feature maps have channels: a clean error
    cli_fails(["extract", scenes, "-o", tmp_path / "v.npz", "--pooling", "os-egm", "--region-k", 2,
               "--whiten-dim", 50], capsys, "whiten_dim = 50 exceeds the 8 channels")


def test_egm_pooling_skips_a_bad_image_once(scenes, tmp_path, capsys):
    (scenes / "broken.png").write_bytes(b"not a png")
    capsys.readouterr()
    cli_run(["extract", scenes, "-o", tmp_path / "a.npz", "--pooling", "os-egm", "--region-k", 2, "--skip-bad"])
    cap = capsys.readouterr()
    assert cap.err.count("warning: skipping unreadable image") == 1, cap.err
    assert "1 unreadable images skipped" in cap.out
    assert _read(tmp_path / "a.npz")[1] == [f"s{i}.png" for i in range(6)]
    cli_fails(["extract", scenes, "-o", tmp_path / "b.npz", "--pooling", "os-egm", "--region-k", 2], capsys,
              "broken.png")


def test_egm_pooling_refuses_a_region_graph_too_large_for_the_folder(scenes, tmp_path, capsys):
    cli_fails(["extract", scenes, "-o", tmp_path / "c.npz", "--pooling", "fs-egm", "--region-k", 500], capsys,
              "cannot extract descriptors")
