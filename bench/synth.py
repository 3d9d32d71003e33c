"""Benchmark: synthetic-world generation speed, images/s per domain at 256x256 in one process on one core.

Compares `ullsam_nb.synth.synth_sample` (all objects rasterised at once from one distance transform) with, in the
same run,
  - the naive path: the same generator with `rasterize_naive`, which tests every pixel of the image against each
    object in turn (work grows as objects x pixels);
  - scikit-image's `random_shapes` (flat shapes, no texture, blur, noise or caption) as an outside baseline.
Throughput is counted on process CPU time (the fair one-core figure on a shared machine); wall time is reported
too. Also times `make_world` end to end (TIFF + JSONL writing included). Target: >= 50 images/s per domain.
Writes bench/results/synth.json.

    python bench/synth.py [--quick] [--size 256]
"""
import os
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"): os.environ.setdefault(v, "1")
import argparse, time, platform, tempfile
from pathlib import Path
import numpy as np
from skimage.draw import random_shapes
import ullsam_nb.synth as synth
import ullsam_nb.shapes as shapes
from ullsam_nb.basics import save_json

def rate(fn, n):
    "Images/s of `fn(i)` for i < n, on CPU time and on wall time (after one warm-up call)."
    fn(10_000)
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(n): fn(i)
    c, w = time.process_time() - c0, time.perf_counter() - w0
    return n / max(c, 1e-9), n / max(w, 1e-9)

def naive_sample(domain, seed, size):
    "`synth_sample` with the per-object full-image rasteriser swapped in."
    fast = synth.rasterize
    synth.rasterize = shapes.rasterize_naive
    try: return synth.synth_sample(domain, seed, size=size)
    finally: synth.rasterize = fast

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few images per domain")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--out", default=str(Path(__file__).parent/"results"/"synth.json"))
    a = ap.parse_args()
    n, n_ref = (12, 3) if a.quick else (60, 10)
    rows = []
    for dom in synth.ALL_DOMAINS:
        cpu, wall = rate(lambda i: synth.synth_sample(dom, i, size=a.size), n)
        ref_cpu, ref_wall = rate(lambda i: naive_sample(dom, i, a.size), n_ref)
        objs = np.mean([synth.synth_sample(dom, i, size=a.size).params["count"] for i in range(3)])
        rows.append(dict(domain=dom, images_per_s_cpu=round(cpu, 1), images_per_s_wall=round(wall, 1), mean_objects=round(float(objs), 1),
                         naive_images_per_s_cpu=round(ref_cpu, 2), speedup_vs_naive=round(cpu/ref_cpu, 1), meets_50=bool(cpu >= 50)))
    rs_cpu, rs_wall = rate(lambda i: random_shapes((a.size, a.size), max_shapes=30, min_size=8, max_size=40, channel_axis=None, rng=i), n)
    with tempfile.TemporaryDirectory() as tmp:
        m = 12 if a.quick else 60
        c0, w0 = time.process_time(), time.perf_counter()
        synth.make_world(tmp, m, seed=0, domains=synth.ALL_DOMAINS, size=a.size)
        world_cpu, world_wall = m/(time.process_time() - c0), m/(time.perf_counter() - w0)
    print(f"synthetic world at {a.size}x{a.size}, one process ({'quick' if a.quick else 'full'}: {n} images per domain, {n_ref} for the naive path)")
    print(f"{'domain':16s} {'img/s cpu':>10s} {'img/s wall':>10s} {'objects':>8s} {'naive img/s':>12s} {'speed-up':>9s}  >=50/s")
    for r in rows:
        print(f"{r['domain']:16s} {r['images_per_s_cpu']:10.1f} {r['images_per_s_wall']:10.1f} {r['mean_objects']:8.1f} {r['naive_images_per_s_cpu']:12.2f} {r['speedup_vs_naive']:8.1f}x  {'yes' if r['meets_50'] else 'NO'}")
    mean_cpu = np.mean([r["images_per_s_cpu"] for r in rows])
    print(f"{'skimage random_shapes (flat shapes only)':42s} {rs_cpu:8.1f} img/s cpu  (ours, mean over domains: {mean_cpu:.1f}; ratio {mean_cpu/rs_cpu:.2f})")
    print(f"make_world with TIFF/JSONL writing: {world_cpu:.1f} img/s cpu, {world_wall:.1f} img/s wall")
    save_json(dict(bench="synth", size=a.size, quick=a.quick, n_per_domain=n, n_naive=n_ref, rows=rows,
                   random_shapes_images_per_s_cpu=round(rs_cpu, 1), random_shapes_images_per_s_wall=round(rs_wall, 1),
                   make_world_images_per_s_cpu=round(world_cpu, 1), make_world_images_per_s_wall=round(world_wall, 1),
                   all_meet_50=all(r["meets_50"] for r in rows), python=platform.python_version(), machine=platform.machine(),
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), a.out)
    print(f"wrote {a.out}")

if __name__ == "__main__": main()
