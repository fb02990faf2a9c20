"""experiments.object_discovery: the scene generator (boxes, masks, determinism) and, marked
slow, the whole benchmark in --quick mode on real COIL-20 objects."""

import numpy as np
import pytest

from conftest import assert_valid_png, read_csv, require_data
from experiments import object_discovery as od


def _objects(seed=0, m=6, side=32):
    """Grey objects on black: a bright disc with a dark hole and a few dark specks, two per label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    out = []
    for i in range(m):
        r = side * rng.uniform(0.2, 0.45)
        cy, cx = rng.uniform(r, side - r, 2)
        img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, rng.integers(60, 256, (side, side)), 0)
        img[int(cy), int(cx)] = 0                                  # a hole: filled, pasted as black
        img[0, 0] = 3                                              # background noise below the threshold
        out.append(img.astype(np.uint8))
    return np.stack(out), np.repeat(np.arange(m // 2), 2)


def test_boxes_hold_exactly_the_pasted_pixels_on_a_black_background():
    objects, labels = _objects()
    black = {"black": np.zeros((50, 70), np.uint8)}
    s = od.make_scenes(objects, labels, per_object=2, distractors=2, size=40, seed=3, backgrounds=black)
    assert s.images.shape == (8, 40, 40) and s.images.dtype == np.uint8
    assert list(s.labels) == [0, 0, 1, 1, 2, 2, -1, -1]
    assert list(s.objects) == list(range(6))
    for img, box, mask, label in zip(s.images, s.boxes, s.masks, s.labels):
        if label < 0:
            assert (box == -1).all() and not mask.any() and not img.any()
            continue
        top, left, bottom, right = box
        assert 0 <= top < bottom <= 40 and 0 <= left < right <= 40
        # every non-zero pixel of the scene is a pasted one, inside the box, and the box is tight
        rows, cols = np.nonzero(img)
        assert (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1) == tuple(box)
        assert not mask[:top].any() and not mask[bottom:].any()
        assert not mask[:, :left].any() and not mask[:, right:].any()
        assert (img[~mask] == 0).all() and mask[img > 0].all()


def test_each_object_scene_pastes_one_of_its_own_images():
    objects, labels = _objects(seed=1)
    black = {"black": np.zeros((64, 64), np.uint8)}
    s = od.make_scenes(objects, labels, per_object=2, distractors=0, size=32, seed=0, backgrounds=black,
                       scale=(1.0, 1.0))
    # at scale 1 and the objects' own size the scene is the object, pasted unresized
    for img, src, label in zip(s.images, s.sources, s.labels):
        assert labels[src] == label
        keep = od.object_mask(objects[src])
        assert np.array_equal(img > 0, keep & (objects[src] > 0))
        assert np.array_equal(img[objects[src] > od.OBJECT_THRESHOLD], objects[src][objects[src] > od.OBJECT_THRESHOLD])
    assert sorted(s.sources[s.labels == 0]) == [0, 1]           # two poses, drawn without replacement


def test_scenes_are_deterministic_by_seed_on_the_photographs():
    objects, labels = _objects(seed=2)
    a = od.make_scenes(objects, labels, per_object=2, distractors=3, size=48, seed=7)
    b = od.make_scenes(objects, labels, per_object=2, distractors=3, size=48, seed=7)
    c = od.make_scenes(objects, labels, per_object=2, distractors=3, size=48, seed=8)
    for field in ("images", "labels", "boxes", "masks", "sources"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.backgrounds == b.backgrounds and set(a.backgrounds) <= set(od.BACKGROUNDS)
    assert not np.array_equal(a.images, c.images)
    # the clutter is real: the background around each object is not flat
    for img, mask, label in zip(a.images, a.masks, a.labels):
        assert img[~mask].std() > 1.0


def test_make_scenes_refuses_bad_input():
    objects, labels = _objects()
    with pytest.raises(ValueError, match="fewer than per_object"):
        od.make_scenes(objects, labels, per_object=3, distractors=0, size=32, seed=0)
    with pytest.raises(ValueError, match="scale"):
        od.make_scenes(objects, labels, per_object=1, distractors=0, size=32, seed=0, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="one label each"):
        od.make_scenes(objects, labels[:-1], per_object=1, distractors=0, size=32, seed=0)


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    require_data("coil20")
    out = tmp_path_factory.mktemp("object_discovery")
    assert od.main(["--quick", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_quick_run_writes_the_tables_and_pictures(quick_out):
    rows = read_csv(quick_out / "results.csv")
    got = {(r["backbone"], r["descriptor"], r["method"]) for r in rows}
    want = {(b, d, m) for b in od.QUICK["backbones"] for d in od.DESCRIPTORS for m in od.METHOD_NAMES}
    assert got == want and len(rows) == len(got)
    nobj = od.QUICK["objects"]
    for r in rows:
        assert 0.0 < float(r["map"]) <= 1.0, r
        if r["descriptor"] in od.POOLINGS and r["method"] == "knn":
            # 3 positives among 29 other scenes: a random ranking's mAP is near 0.15
            assert float(r["map"]) > 1.5 / nobj, r
    sal = read_csv(quick_out / "saliency.csv")
    assert {r["map"] for r in sal} == {"FS", "OS"}
    for r in sal:
        # both maps put more of their mass in the box than its share of the scene
        assert 0.0 < float(r["box_share"]) < float(r["mean"]) <= 1.0, r
    md = (quick_out / "results.md").read_text()
    assert "| GeM |" in md and "| OS.EGM |" in md and "Saliency precision" in md
    assert_valid_png(quick_out / "object_discovery.png")
    assert_valid_png(quick_out / "overlays.png")
