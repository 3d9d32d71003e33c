"""Benchmark: instance metrics (IoU table, matching at 10 thresholds, SA/mSA, P/R/F1, Dice) for one image pair.

Compares `ullsam_nb.metrics.instance_metrics` with, in the same run,
  - the direct implementation: a boolean mask per instance, a loop over all pairs, a maximum matching by augmenting
    paths (only up to a few hundred instances: its cost grows with pairs x pixels);
  - a dense-Hungarian reference: our one-pass IoU matrix, then `linear_sum_assignment` on the full matrix at
    every threshold (the usual way, e.g. elf/stardist style), to isolate the matching cost.
Target: 1,000 instances each in under 1 s on this CPU. Writes bench/results/metrics.json.

    python bench/metrics.py [--quick]
"""
import argparse, time, platform, statistics
from pathlib import Path
import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.draw import disk
from ullsam_nb.basics import save_json
from ullsam_nb.metrics import instance_metrics, iou_matrix, segmentation_accuracy, SA_THRESHOLDS


def pair(n, seed=0, cell=32):
    "A ground-truth map with `n` disks on a jittered grid and a prediction: moved, resized, 5% missed, 5% extra; uint32 ids."
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n * 1.06)))
    gt = np.zeros((side * cell, side * cell), np.uint32); pred = np.zeros_like(gt)
    cells = rng.permutation(side * side)
    gid, pid = rng.permutation(10 * n) + 1, rng.permutation(10 * n) + 1
    for k in range(n):
        r, c = divmod(int(cells[k]), side)
        ctr = np.array([r, c]) * cell + cell / 2 + rng.uniform(-3, 3, 2)
        rad = rng.uniform(7, 12)
        gt[disk(ctr, rad, shape=gt.shape)] = gid[k]
        if rng.random() > 0.05:
            pred[disk(ctr + rng.normal(0, 1.5, 2), rad * rng.uniform(0.8, 1.2), shape=gt.shape)] = pid[k]
    for k in range(n, n + n // 20):
        r, c = divmod(int(cells[k]), side)
        pred[disk(np.array([r, c]) * cell + cell / 2, rng.uniform(5, 10), shape=gt.shape)] = pid[k]
    return gt, pred


def direct_metrics(gt, pred):
    "The obvious way: masks, all pairs, augmenting-path matching per threshold."
    gi, pi = [i for i in np.unique(gt) if i], [i for i in np.unique(pred) if i]
    gm, pm = [gt == i for i in gi], [pred == j for j in pi]
    iou = np.array([[np.logical_and(m, q).sum() / np.logical_or(m, q).sum() for q in pm] for m in gm])
    def max_matching(ok):
        match = {}
        def augment(a, seen):
            for b in np.flatnonzero(ok[a]):
                if b not in seen:
                    seen.add(b)
                    if b not in match or augment(match[b], seen): match[b] = a; return True
            return False
        return sum(augment(a, set()) for a in range(ok.shape[0]))
    tps = [max_matching(iou >= t) for t in SA_THRESHOLDS]
    return [segmentation_accuracy(tp, len(pi) - tp, len(gi) - tp) for tp in tps]


def dense_hungarian_metrics(gt, pred):
    "One-pass IoU matrix, then a full-size assignment at every threshold."
    iou, gi, pi = iou_matrix(gt, pred)
    sa = []
    for t in SA_THRESHOLDS:
        ok = (iou >= t).astype(float)
        r, c = linear_sum_assignment(ok, maximize=True)
        tp = int(ok[r, c].sum())
        sa.append(segmentation_accuracy(tp, len(pi) - tp, len(gi) - tp))
    return sa


def timed(fn, *args, reps=1):
    ts, out = [], None
    for _ in range(reps):
        t = time.perf_counter(); out = fn(*args); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3, out


def main(quick=False):
    sizes = [25, 100, 1000] if quick else [25, 100, 250, 1000, 4000]
    direct_max = 100 if quick else 250
    rows = []
    for n in sizes:
        gt, pred = pair(n)
        reps = 3 if quick else (10 if n <= 1000 else 3)
        ours_ms, r = timed(instance_metrics, gt, pred, reps=reps)
        dense_ms, sa_dense = timed(dense_hungarian_metrics, gt, pred, reps=max(1, reps // 3))
        assert sa_dense == r["SA"], "dense reference disagrees"
        direct_ms = None
        if n <= direct_max:
            direct_ms, sa_direct = timed(direct_metrics, gt, pred)
            assert sa_direct == r["SA"], "direct reference disagrees"
        rows.append(dict(instances_gt=r["n_gt"], instances_pred=r["n_pred"], shape=list(gt.shape), mSA=round(r["mSA"], 4),
                         ours_ms=round(ours_ms, 2), dense_hungarian_ms=round(dense_ms, 2),
                         direct_ms=None if direct_ms is None else round(direct_ms, 1),
                         ratio_dense=round(dense_ms / ours_ms, 1),
                         ratio_direct=None if direct_ms is None else round(direct_ms / ours_ms, 1)))
    print(f"{'gt/pred inst':>13} {'image':>10} {'ours ms':>9} {'dense-Hung ms':>14} {'direct ms':>10} {'dense/ours':>10} {'direct/ours':>11}")
    for r in rows:
        dm = "-" if r["direct_ms"] is None else f"{r['direct_ms']:.1f}"
        dr = "-" if r["ratio_direct"] is None else f"{r['ratio_direct']:.0f}x"
        print(f"{r['instances_gt']:>6}/{r['instances_pred']:<6} {'x'.join(map(str, r['shape'])):>10} {r['ours_ms']:>9.2f} "
              f"{r['dense_hungarian_ms']:>14.1f} {dm:>10} {r['ratio_dense']:>9.1f}x {dr:>11}")
    res = dict(benchmark="metrics", quick=quick, target="1,000 instances each in < 1 s",
               machine=platform.processor() or platform.machine(), python=platform.python_version(), rows=rows)
    save_json(res, Path(__file__).parent / "results" / "metrics.json")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions (CPU smoke run)")
    main(ap.parse_args().quick)
