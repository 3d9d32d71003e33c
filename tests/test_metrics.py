"ullsam_nb.metrics against a slow, obvious implementation on many random label maps; edge cases; the evaluate command."
import json
import numpy as np, pytest
from scipy import ndimage as ndi
from ullsam_nb.basics import InputError, shared_data_dir
from ullsam_nb.metrics import (SA_THRESHOLDS, iou_matrix, match_instances, instance_metrics, mean_metrics, pooled_metrics,
                               dice_score, mask_dice, mask_iou, prompted_metrics, counting_errors, classification_metrics,
                               segmentation_accuracy, evaluate_folder, label_pairs)
from ullsam_nb.evaluate import evaluate_cmd

THRESHOLDS = [round(0.5 + 0.05 * k, 2) for k in range(10)]


# ---------------------------------------------------------------- the direct (slow, obvious) reference
def direct_iou(gt, pred):
    gi = [int(i) for i in np.unique(gt) if i != 0]
    pi = [int(i) for i in np.unique(pred) if i != 0]
    iou = np.zeros((len(gi), len(pi)))
    for a, i in enumerate(gi):
        for b, j in enumerate(pi):
            m, n = gt == i, pred == j
            iou[a, b] = np.logical_and(m, n).sum() / np.logical_or(m, n).sum()
    return iou, gi, pi


def max_matching(ok):
    "Maximum bipartite matching size by augmenting paths (Kuhn)."
    match = {}
    def augment(a, seen):
        for b in range(ok.shape[1]):
            if ok[a, b] and b not in seen:
                seen.add(b)
                if b not in match or augment(match[b], seen):
                    match[b] = a
                    return True
        return False
    return sum(augment(a, set()) for a in range(ok.shape[0]))


def direct_metrics(gt, pred, thresholds=THRESHOLDS):
    iou, gi, pi = direct_iou(gt, pred)
    sa, tps = [], []
    for t in thresholds:
        tp = max_matching(iou >= t) if iou.size else 0
        fp, fn = len(pi) - tp, len(gi) - tp
        sa.append(1.0 if tp + fp + fn == 0 else (tp / (tp + fp + fn) if tp else 0.0))
        tps.append(tp)
    k = thresholds.index(0.5)
    tp, fp, fn = tps[k], len(pi) - tps[k], len(gi) - tps[k]
    empty = not (gi or pi)
    g, p = gt > 0, pred > 0
    return dict(tp=tps, SA=sa, mSA=sum(sa) / len(sa), SA50=sa[k], SA75=sa[thresholds.index(0.75)],
                precision=1.0 if empty else (tp / (tp + fp) if tp else 0.0),
                recall=1.0 if empty else (tp / (tp + fn) if tp else 0.0),
                F1=1.0 if empty else (2 * tp / (2 * tp + fp + fn) if tp else 0.0),
                dice=1.0 if not (g.any() or p.any()) else 2 * (g & p).sum() / (g.sum() + p.sum()), iou=iou, gi=gi, pi=pi)


def random_maps(seed):
    "Pairs of random label maps: pure noise (many exact-fraction IoUs, ties at 0.5) and perturbed copies (IoUs near thresholds)."
    rng = np.random.default_rng(seed)
    kind = seed % 3
    shape = tuple(rng.integers(3, 24, 2))
    if kind == 0:
        a = rng.integers(0, rng.integers(2, 8), shape); b = rng.integers(0, rng.integers(2, 8), shape)
    else:
        a = np.zeros(shape, np.int64)
        for i in range(1, rng.integers(2, 12)):
            r, c = rng.integers(0, shape[0]), rng.integers(0, shape[1])
            a[r:r + rng.integers(1, 8), c:c + rng.integers(1, 8)] = i * 3 + 1
        b = a.copy()
        if kind == 1:   # perturb boundaries
            noise = rng.random(shape) < 0.15
            b[noise] = ndi.grey_dilation(a, size=3)[noise]
        else:           # shift, merge, split, drop
            b = np.roll(b, rng.integers(-1, 2), axis=rng.integers(0, 2))
            ids = np.unique(b)[1:]
            if len(ids) > 1: b[b == ids[0]] = ids[1]
            if len(ids) > 2: b[b == ids[2]] = 0
    perm = rng.permutation(1000)[:max(a.max(), b.max()) + 1] + 1; perm[0] = 0
    return a, perm[b]      # non-contiguous, permuted prediction ids


@pytest.mark.parametrize("seed", range(300))
def test_against_direct(seed):
    a, b = random_maps(seed)
    d, r = direct_metrics(a, b), instance_metrics(a, b)
    assert r["tp"] == d["tp"]
    assert r["SA"] == d["SA"]
    for k in ("SA50", "SA75", "precision", "recall", "F1"): assert r[k] == d[k], k
    assert r["mSA"] == pytest.approx(d["mSA"], abs=1e-12) and r["dice"] == pytest.approx(d["dice"], abs=1e-12)
    iou, gi, pi = iou_matrix(a, b)
    np.testing.assert_array_equal(gi, d["gi"]); np.testing.assert_array_equal(pi, d["pi"])
    np.testing.assert_array_equal(iou, d["iou"])
    low = [0.1, 0.25, 0.5, 0.75]      # below 0.5 the assignment is not trivial
    assert instance_metrics(a, b, thresholds=low)["tp"] == direct_metrics(a, b, low)["tp"]


@pytest.mark.parametrize("seed", range(40))
def test_matching_is_one_to_one_and_optimal(seed):
    a, b = random_maps(seed)
    for t in (0.2, 0.5, 0.75):
        m = match_instances(a, b, t)
        assert len(set(m["gt_ids"])) == len(m["gt_ids"]) and len(set(m["pred_ids"])) == len(m["pred_ids"])
        assert (m["iou"] >= t).all()
        iou, _, _ = direct_iou(a, b)
        assert len(m["gt_ids"]) == (max_matching(iou >= t) if iou.size else 0)


def test_real_crop_against_direct():
    p = shared_data_dir("dsb2018", "nuclei_512_mask.tif")
    if p is None: pytest.skip("shared data absent")
    from ullsam_nb.io import read_labels
    gt = read_labels(p)[:160, :160]
    pred = ndi.grey_dilation(gt, size=3) * (np.random.default_rng(0).random(gt.shape) > 0.02)   # fatter, a little noise
    d, r = direct_metrics(gt, pred), instance_metrics(gt, pred)
    assert r["tp"] == d["tp"] and r["SA"] == d["SA"]
    assert instance_metrics(gt, gt)["mSA"] == 1.0


def test_edge_cases():
    z = np.zeros((5, 5), np.uint8)
    a = np.zeros((5, 5), np.uint16); a[1:3, 1:3] = 7
    for g, p in [(a, z), (z, a)]:
        r = instance_metrics(g, p)
        assert all(r[k] == 0.0 for k in ("mSA", "SA50", "SA75", "precision", "recall", "F1", "dice"))
    r = instance_metrics(z, z)
    assert all(r[k] == 1.0 for k in ("mSA", "SA50", "SA75", "precision", "recall", "F1", "dice"))
    assert (r["n_gt"], r["n_pred"]) == (0, 0)
    assert segmentation_accuracy(0, 0, 0) == 1.0 and segmentation_accuracy(0, 1, 0) == 0.0
    r = instance_metrics(np.zeros((0, 0), np.uint8), np.zeros((0, 0), np.uint8))
    assert r["mSA"] == 1.0
    with pytest.raises(InputError, match="shape mismatch"): instance_metrics(a, a[:4])
    with pytest.raises(InputError, match="integer"): instance_metrics(a, a.astype(np.float32))
    with pytest.raises(InputError, match="negative"): instance_metrics(a.astype(np.int32) - 1, a)


@pytest.mark.parametrize("seed", range(5))
def test_dtypes_and_ids_do_not_matter(seed):
    a, b = random_maps(seed + 1)
    ref = instance_metrics(a, b)
    for dg in (np.uint8, np.int32, np.uint32, np.uint64):
        for dp in (np.uint16, np.int64, np.uint32):
            if a.max() > np.iinfo(dg).max or b.max() > np.iinfo(dp).max: continue
            assert instance_metrics(a.astype(dg), b.astype(dp))["SA"] == ref["SA"]
    big = np.where(a > 0, a.astype(np.uint64) * 97_000_001 % (2**32 - 1) + 1, 0).astype(np.uint32)   # huge, sparse ids
    assert len(np.unique(big)) == len(np.unique(a))
    assert instance_metrics(big, b)["SA"] == ref["SA"]


def test_pooled_vs_mean():
    g1 = np.zeros((8, 8), np.uint8); g1[:2, :2] = 1; g1[4:6, 4:6] = 2; g1[0:2, 5:7] = 3
    p1 = g1.copy()
    g2 = np.zeros((8, 8), np.uint8); g2[2:4, 2:4] = 1
    p2 = np.zeros((8, 8), np.uint8)
    res = [instance_metrics(g1, p1), instance_metrics(g2, p2)]
    m, p = mean_metrics(res), pooled_metrics(res)
    assert m["SA50"] == 0.5 and p["SA50"] == 3 / 4
    assert m["aggregate"] == "mean over images" and p["aggregate"].startswith("pooled")
    assert p["dice"] == pytest.approx(2 * 12 / (16 + 12))
    assert (p["n_gt"], p["n_pred"]) == (4, 3)
    with pytest.raises(InputError): pooled_metrics([])
    with pytest.raises(InputError, match="different thresholds"):
        pooled_metrics([res[0], instance_metrics(g1, p1, thresholds=[0.5, 0.75])])


def test_mask_scores_and_prompted():
    g = np.zeros((2, 6, 6), bool); g[0, :3, :3] = True; g[1, 3:, 3:] = True
    p = np.zeros_like(g); p[0, :3, :2] = True
    np.testing.assert_allclose(mask_iou(p, g), [6 / 9, 0.0]); np.testing.assert_allclose(mask_dice(p, g), [12 / 15, 0.0])
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0 and mask_dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    lab = g[0] * 4 + g[1] * 9
    pm = prompted_metrics(p, lab, [4, 9])
    np.testing.assert_allclose(pm["iou"], [6 / 9, 0.0]); assert pm["mean_dice"] == pytest.approx(0.4)
    assert dice_score(lab, lab) == 1.0
    with pytest.raises(InputError): mask_iou(p, g[:1])


def test_counting_and_classification():
    c = counting_errors([4, 8], [5, 6])
    assert c["mae"] == 1.5 and c["rmse"] == pytest.approx(np.sqrt(2.5)) and c["mean_error"] == -0.5
    assert c["mean_relative_error"] == pytest.approx((0.25 + 0.25) / 2)
    assert np.isnan(counting_errors([0], [3])["mean_relative_error"])
    with pytest.raises(InputError): counting_errors([1, 2], [1])
    k = classification_metrics([0, 1, 2, 2], [0, 2, 2, 2], labels=[0, 1, 2, 3])
    np.testing.assert_array_equal(k["confusion"], [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 0, 0]])
    assert k["accuracy"] == 0.75 and k["macro_f1"] == pytest.approx((1 + 0 + 0.8 + 0) / 4)
    perfect = classification_metrics(["x", "y"], ["x", "y"])
    assert perfect["macro_f1"] == 1.0 and perfect["labels"] == ["x", "y"]


# ---------------------------------------------------------------- the evaluate command
@pytest.fixture
def folders(tmp_path):
    from ullsam_nb.io import write_labels
    rng = np.random.default_rng(0)
    for k in range(3):
        a, b = random_maps(10 + k)
        write_labels(tmp_path / "gt" / f"img{k}.tif", a.astype(np.uint16))
        write_labels(tmp_path / "pred" / f"img{k}.tif", b.astype(np.uint16))
    return tmp_path


def test_evaluate_cmd_writes_json(folders, capsys):
    out = folders / "res" / "eval.json"
    assert evaluate_cmd(str(folders / "pred"), str(folders / "gt"), out=str(out)) == 0
    printed = capsys.readouterr().out
    assert "img0" in printed and "mean over images" in printed and "pooled" in printed
    rep = json.loads(out.read_text())
    assert set(rep) == {"per_image", "mean", "pooled"}
    keys = {"mSA", "SA50", "SA75", "dice", "F1", "precision", "recall"}
    assert [r["name"] for r in rep["per_image"]] == ["img0", "img1", "img2"]
    assert all(set(r) == keys | {"name"} for r in rep["per_image"])
    assert set(rep["mean"]) == keys and set(rep["pooled"]) == keys
    for k in range(3):
        a, b = random_maps(10 + k)
        assert rep["per_image"][k]["mSA"] == pytest.approx(direct_metrics(a, b)["mSA"], abs=1e-12)
    assert rep["mean"]["mSA"] == pytest.approx(np.mean([r["mSA"] for r in rep["per_image"]]))
    assert not [p for p in out.parent.iterdir() if p.name != "eval.json"]      # no temp files left behind


def test_evaluate_missing_pair(folders):
    (folders / "pred" / "img1.tif").unlink()
    with pytest.raises(InputError, match="img1.tif"): evaluate_folder(folders / "pred", folders / "gt")


def test_evaluate_extra_prediction(folders):
    (folders / "pred" / "img1.tif").rename(folders / "pred" / "other.tif")
    with pytest.raises(InputError, match="img1.tif"): evaluate_folder(folders / "pred", folders / "gt")
    (folders / "gt" / "img1.tif").unlink()
    with pytest.raises(InputError, match="other.tif"): evaluate_folder(folders / "pred", folders / "gt")


def test_evaluate_size_mismatch(folders):
    from ullsam_nb.io import write_labels
    write_labels(folders / "pred" / "img2.tif", np.zeros((3, 3), np.uint16))
    with pytest.raises(InputError) as e: evaluate_folder(folders / "pred", folders / "gt")
    assert "size mismatch" in str(e.value) and "pred/img2.tif" in str(e.value) and "gt/img2.tif" in str(e.value)


def test_evaluate_matches_by_stem_and_empty(folders, tmp_path):
    from ullsam_nb.io import read_labels, write_labels
    p = folders / "pred" / "img0.tif"
    write_labels(folders / "pred" / "img0.png", read_labels(p))      # same stem, another extension
    p.unlink()
    assert [n for n, _, _ in label_pairs(folders / "pred", folders / "gt")] == ["img0", "img1", "img2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no label maps"): evaluate_folder(folders / "pred", tmp_path / "empty")
    with pytest.raises(InputError, match="not a folder"): evaluate_folder(tmp_path / "nope", folders / "gt")
