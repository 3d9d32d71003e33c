"""Benchmark: uLLSAM prompt sampling (4 instances, 1 positive + 3 SBR ring negatives) per 1024x1024 label map.

Compares `ullsam_nb.prompts.ullsam_prompts` (one find_objects pass, windowed morphology) with a naive full-image
reference (np.unique for the ids, erosion and Euclidean distance transform of the whole image per instance), in the
same run, and prints the ratio. Writes bench/results/prompts.json.

    python bench/prompts.py [--quick]
"""
import argparse, time, platform, statistics
from pathlib import Path
import numpy as np
from scipy import ndimage as ndi
from skimage.draw import disk
from ullsam_nb.basics import shared_data_dir, save_json
from ullsam_nb.prompts import ullsam_prompts


def naive_prompts(lab, n_instances=4, n_negative=3, seed=0):
    "Reference: the obvious full-image computation (same sampling rules, no windows)."
    rng = np.random.default_rng(seed)
    ids = np.unique(lab); ids = ids[ids != 0]
    ids = np.sort(rng.choice(ids, size=min(n_instances, len(ids)), replace=False))
    out = []
    for i in ids:
        inst = lab == i
        rr, cc = np.nonzero(ndi.binary_erosion(inst, iterations=10, border_value=0))
        if not len(rr): rr, cc = np.nonzero(inst)
        k = rng.integers(len(rr)); pos = (cc[k], rr[k])
        d = ndi.distance_transform_edt(~inst)
        rr, cc = np.nonzero((d >= 9) & (d <= 11) & ~inst)
        pick = rng.choice(len(rr), size=n_negative, replace=len(rr) < n_negative)
        out.append((pos, np.stack([cc[pick], rr[pick]], 1)))
    return ids, out


def tiled_dsb2018():
    p = shared_data_dir("dsb2018", "nuclei_512_mask.tif")
    if p is None: return None
    import tifffile
    m = tifffile.imread(p).astype(np.uint32)
    off = int(m.max())
    tiles = [np.where(m > 0, m + k * off, 0) for k in range(4)]
    return np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])


def synthetic_disks(n=600, size=1024, seed=0):
    rng = np.random.default_rng(seed)
    lab = np.zeros((size, size), np.uint16)
    for i in range(1, n + 1):
        lab[disk(rng.uniform(0, size, 2), rng.uniform(6, 22), shape=lab.shape)] = i
    return lab


def time_ms(fn, maps, reps):
    ts = []
    for r in range(reps):
        for k, lab in enumerate(maps):
            t = time.perf_counter(); fn(lab, seed=r * 1000 + k); ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), min(ts)


def main(quick=False):
    maps = {"synthetic disks": synthetic_disks()}
    dsb = tiled_dsb2018()
    if dsb is not None: maps["DSB2018 tiled 2x2"] = dsb
    reps_ours, reps_naive = (5, 1) if quick else (40, 4)
    rows = []
    for name, lab in maps.items():
        n_inst = len(np.unique(lab)) - 1
        ours_med, ours_min = time_ms(ullsam_prompts, [lab], reps_ours)
        naive_med, naive_min = time_ms(naive_prompts, [lab], reps_naive)
        rows.append(dict(image=name, shape=list(lab.shape), instances=n_inst, sampled=4,
                         ours_ms_median=round(ours_med, 2), ours_ms_min=round(ours_min, 2),
                         naive_ms_median=round(naive_med, 2), speedup=round(naive_med / ours_med, 1)))
    print(f"{'image':22} {'shape':>11} {'inst':>5} {'ours ms (med/min)':>18} {'naive ms':>9} {'ratio':>6}")
    for r in rows:
        print(f"{r['image']:22} {'x'.join(map(str, r['shape'])):>11} {r['instances']:>5} "
              f"{r['ours_ms_median']:>9.2f}/{r['ours_ms_min']:<8.2f} {r['naive_ms_median']:>9.1f} {r['speedup']:>5.1f}x")
    res = dict(benchmark="prompts", quick=quick, target="< 50 ms per 1024x1024 image, 4 of several hundred instances",
               machine=platform.processor() or platform.machine(), python=platform.python_version(), rows=rows)
    save_json(res, Path(__file__).parent / "results" / "prompts.json")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few repetitions (CPU smoke run)")
    main(ap.parse_args().quick)
