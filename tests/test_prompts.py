"Geometry, determinism and fallbacks of the prompt samplers (ullsam_nb.prompts) on real and synthetic label maps."
import numpy as np, pytest
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse
from ullsam_nb.basics import shared_data_dir, InputError
from ullsam_nb.prompts import (instance_ids, instance_slices, sample_instance_ids, boxes_from_labels, positive_points,
                               boundary_ring_points, ullsam_prompts, PromptSet)


def read_mask(p):
    try:
        from ullsam_nb.io import read_labels
        return read_labels(p)
    except ImportError:
        import tifffile
        return tifffile.imread(p)


def real_masks():
    out = []
    d = shared_data_dir("dsb2018", "nuclei_512_mask.tif")
    if d is not None: out.append(d)
    r = shared_data_dir("real")
    if r is not None: out += sorted(r.glob("*/masks/*.tif"))
    return out


REAL = real_masks()


def synthetic(seed, size=(160, 200), n=25):
    "Random ellipses (touching allowed, later ones overwrite), some cut by the border, plus tiny specks."
    rng = np.random.default_rng(seed)
    lab = np.zeros(size, np.int32)
    for i in range(1, n + 1):
        r, c = rng.integers(-5, size[0] + 5), rng.integers(-5, size[1] + 5)
        a, b = rng.uniform(2, 25, 2)
        rr, cc = ellipse(r, c, a, b, shape=size, rotation=rng.uniform(0, np.pi))
        lab[rr, cc] = i * 7 + 3          # non-contiguous ids
    lab[3:5, 100:102] = 999              # a 2x2 speck
    lab[size[0] - 1, 0] = 1000           # a single corner pixel
    return lab


def check_prompts(lab, ps: PromptSet, erosion=10, inner=9.0, outer=11.0):
    "Every positive inside its instance (and its eroded core, when that exists); every negative in the ring, outside."
    for i, pts, pl, box in zip(ps.ids, ps.points, ps.point_labels, ps.boxes):
        inst = lab == i
        rr, cc = np.nonzero(inst)
        np.testing.assert_array_equal(box, [cc.min(), rr.min(), cc.max(), rr.max()])
        x, y = pts[0].astype(int); assert pl[0] == 1 and inst[y, x]
        core = ndi.binary_erosion(inst, iterations=erosion, border_value=0)
        if core.any(): assert core[y, x]
        d = ndi.distance_transform_edt(~inst)     # full image, recomputed
        ring = (d >= inner) & (d <= outer) & ~inst
        for (x, y), l in zip(pts[1:].astype(int), pl[1:]):
            assert l == 0 and not inst[y, x]
            if ring.any(): assert ring[y, x], (i, x, y, d[y, x])


@pytest.mark.skipif(not REAL, reason="shared real data absent")
@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_masks_geometry(path):
    lab = read_mask(path)
    ids = instance_ids(lab)
    np.testing.assert_array_equal(ids, np.setdiff1d(np.unique(lab), [0]))
    for seed in range(3):
        ps = ullsam_prompts(lab, n_instances=6, seed=seed)
        assert len(ps) == min(6, len(ids))
        check_prompts(lab, ps)


@pytest.mark.parametrize("seed", range(6))
def test_synthetic_geometry(seed):
    lab = synthetic(seed)
    ps = ullsam_prompts(lab, n_instances=None, seed=seed)
    np.testing.assert_array_equal(ps.ids, instance_ids(lab))
    check_prompts(lab, ps)


def naive_positive(lab, i, rng, erosion=10):
    inst = lab == i
    rr, cc = np.nonzero(ndi.binary_erosion(inst, iterations=erosion, border_value=0))
    if len(rr):
        k = rng.integers(len(rr)); return cc[k], rr[k]
    return None


def naive_ring(lab, i, rng, n=3, inner=9.0, outer=11.0):
    inst = lab == i
    d = ndi.distance_transform_edt(~inst)
    rr, cc = np.nonzero((d >= inner) & (d <= outer) & ~inst)
    pick = rng.choice(len(rr), size=n, replace=len(rr) < n)
    return np.stack([cc[pick], rr[pick]], 1)


@pytest.mark.parametrize("seed", range(3))
def test_window_equals_full_image(seed):
    "The windowed sampler draws exactly what a full-image computation draws with the same generator."
    lab = synthetic(seed)
    ids = instance_ids(lab)
    pos = positive_points(lab, ids, rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    for i, p in zip(ids, pos):
        q = naive_positive(lab, i, rng)
        if q is not None: np.testing.assert_array_equal(p, q)
    neg = boundary_ring_points(lab, ids, rng=np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    for i, p in zip(ids, neg): np.testing.assert_array_equal(p, naive_ring(lab, i, rng))


def test_determinism():
    lab = synthetic(0)
    a, b, c = ullsam_prompts(lab, seed=3), ullsam_prompts(lab, seed=3), ullsam_prompts(lab, seed=4)
    for f in ("ids", "points", "point_labels", "boxes"): np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.points, c.points)
    np.testing.assert_array_equal(boxes_from_labels(lab, jitter=0.2, rng=1), boxes_from_labels(lab, jitter=0.2, rng=1))
    np.testing.assert_array_equal(sample_instance_ids(lab, 5, rng=2), sample_instance_ids(lab, 5, rng=2))


def test_tiny_instances_fallback_to_centroid():
    lab = np.zeros((50, 50), np.uint16)
    lab[10:13, 20:23] = 4          # 3x3: centroid (11, 21)
    lab[40, 5] = 8                 # single pixel
    lab[30:33, 30:45] = 6; lab[31, 31:45] = 0   # thin "C": centroid in the gap
    p = positive_points(lab, [4, 8, 6])
    np.testing.assert_array_equal(p[:2], [[21, 11], [5, 40]])
    x, y = p[2].astype(int); assert lab[y, x] == 6
    rr, cc = np.nonzero(lab == 6); cy, cx = rr.mean(), cc.mean()
    assert np.isclose(np.hypot(x - cx, y - cy), np.hypot(cc - cx, rr - cy).min())


def test_border_instances():
    "Instances cut by the image border: positives keep > erosion steps from the cut, negatives stay in the image."
    lab = np.zeros((100, 100), np.uint8)
    lab[disk((0, 50), 30, shape=lab.shape)] = 1          # cut by the top edge
    lab[disk((99, 99), 15, shape=lab.shape)] = 2         # in a corner
    lab[50:60, 0:3] = 3                                  # thin sliver on the left edge
    ps = ullsam_prompts(lab, n_instances=None, seed=0)
    check_prompts(lab, ps)
    x, y = ps.points[0, 0]; assert y > 10                # eroded from the image border too
    assert (ps.points >= 0).all() and (ps.points <= 99).all()


def test_ring_fallbacks():
    lab = np.ones((40, 40), np.uint8); lab[:, -4:] = 0     # no pixel 9..11 px away: fall back to any non-instance pixel
    neg = boundary_ring_points(lab, [1], n=5, rng=0)
    assert (neg[0, :, 0] >= 36).all()
    lab = np.ones((30, 60), np.uint8); lab[:, 52:] = 0; lab[:, 45:52] = 2   # other instance at 1..7 px, background at 8..15 (L1 > 10 exists)
    d = ndi.distance_transform_edt(lab != 1)
    assert ((d >= 9) & (d <= 11)).any()                  # here the ring exists: plain case
    neg = boundary_ring_points(lab, [1], n=4, rng=0, inner=20, outer=25)   # ring beyond the image: outside a 10-step dilation
    assert (neg[0, :, 0] > 44 + 10).all()
    assert np.isnan(boundary_ring_points(np.full((6, 6), 3, np.uint8), [3])).all()
    ps = ullsam_prompts(np.full((6, 6), 3, np.uint8))
    np.testing.assert_array_equal(ps.point_labels, [[1, -1, -1, -1]])


def test_absent_and_empty():
    lab = np.zeros((21, 31), np.uint8)
    np.testing.assert_array_equal(positive_points(lab, [5]), [[15, 10]])   # image centre
    assert len(ullsam_prompts(lab)) == 0
    with pytest.raises(InputError, match="id 5"): boxes_from_labels(lab, [5])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint32, np.int64, np.uint64])
def test_dtypes_and_huge_ids(dtype):
    lab = synthetic(1).astype(dtype)
    a = ullsam_prompts(lab, seed=0)
    b = ullsam_prompts(synthetic(1), seed=0)
    np.testing.assert_array_equal(a.points, b.points)
    if np.iinfo(dtype).max >= 2**32 - 1:
        big = synthetic(1).astype(np.uint32); big[big == 10] = 4_000_000_000
        assert 4_000_000_000 in instance_slices(big)
        check_prompts(big, ullsam_prompts(big, n_instances=None))


def test_bad_labels():
    with pytest.raises(InputError): ullsam_prompts(np.zeros((4, 4), np.float32))
    with pytest.raises(InputError): ullsam_prompts(np.dstack([np.zeros((4, 4)), np.ones((4, 4)), np.zeros((4, 4))]).astype(np.uint8))
    # one rule for every label map (`io.as_label_map`): a grey mask saved with equal colour channels is one map
    assert len(ullsam_prompts(np.dstack([np.eye(4, dtype=np.uint8)] * 3)).boxes) == 1
    with pytest.raises(InputError): ullsam_prompts(-np.ones((4, 4), np.int16))
