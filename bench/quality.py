"""Benchmark: does the toolkit's own SAM segment? Quality beside the classical floors, and speed on this CPU.

Scores the shipped `small` SAM (or --checkpoint) with box, point (one positive click) and automatic prompts, and in the
same run the floors given the same prompts (`evaluate.FLOORS`: the filled box, Otsu inside the box, the watershed
segment under the click, Otsu + distance watershed), on
  - a synthetic test split (seeds never used in training), reported for the demo's in-domain domains and for the
    domains the demo holds out, and
  - the real pairs in shared/data/real, per domain: the full images, and the right halves alone (pretraining only ever
    saw the left halves of these images: the right halves are the held-out part).
Every ground-truth instance of an image is prompted (mSA, SA50, Dice; mean over images). Large images are segmented in
tiles at native resolution; images whose boxes say the objects are small are enlarged first (`segmenter.object_zoom`),
and the same boxes at the native scale are scored too (`model:native`). Speed: encoder seconds per 512x512 image
(tiles included; also at the largest zoom) and decoder milliseconds per prompt, beside segment-anything's own
SamPredictor on the same model (the reference, same run).

    python bench/quality.py [--quick] [--checkpoint PATH] [--out bench/results/quality.json]
"""
import argparse, os, tempfile, time, platform, warnings, zlib
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import torch

PROTOCOLS = ("box", "point", "auto")
METRICS = ("mSA", "SA50", "dice")


def synthetic_test(n_per_domain, seed0=2_000_000_000):
    from ullsam_nb.synth import synth_sample, DOMAINS
    from ullsam_nb.demo import IN_DOMAINS
    out = []
    for d in DOMAINS + ["bbbc005"]:
        for k in range(n_per_domain):
            s = synth_sample(d, seed0 + 1000 * len(DOMAINS) + k * 7 + zlib.crc32(d.encode()) % 997, size=256)   # stable across processes
            group = "synthetic in-domain" if d in IN_DOMAINS else ("synthetic held-out" if d != "bbbc005" else "synthetic bbbc005")
            out.append(SimpleNamespace(image=s.image, labels=s.labels.astype(np.int64), pair=SimpleNamespace(domain=d, name=s.name), group=group))
    return out


def real_test(halves=("full", "right")):
    from ullsam_nb.pretrain import read_real_pairs
    out = []
    for half in halves:
        for p in read_real_pairs(half=half):
            if p.labels.max() == 0: continue
            out.append(SimpleNamespace(image=p.image, labels=p.labels.astype(np.int64), pair=SimpleNamespace(domain=p.domain, name=f"{p.name}:{half}"),
                                       group=f"real/{p.domain} ({half})"))
    return out


def score(model, samples, amg_side=0):
    "Per-image rows of the model (auto = the instance head; boxes of small objects zoomed), the floors, the model's boxes at the native scale (`model:native`), and with `amg_side` SAM's grid generator too (`model:amg`)."
    import pandas as pd
    from ullsam_nb.evaluate import evaluate_models, evaluate_floors
    rows = []
    for s in samples:
        img, _ = evaluate_models({"model": model}, [s], protocols=PROTOCOLS, progress_bar=False)
        fl = evaluate_floors([s], protocols=PROTOCOLS)
        native, _ = evaluate_models({"model:native": model}, [s], protocols=("box",), progress_bar=False, zoom=1)
        parts = [img, fl, native]
        if amg_side:
            amg, _ = evaluate_models({"model:amg": model}, [s], protocols=("auto",), progress_bar=False,
                                     amg=dict(method="amg", points_per_side=amg_side, pred_iou_thresh=0.7, stability_score_thresh=0.8))
            parts.append(amg)
        for df in parts:
            df = df.copy(); df["group"] = s.group; rows.append(df)
    return pd.concat(rows, ignore_index=True)


def speed(model, reps=3):
    from segment_anything.predictor import SamPredictor
    from ullsam_nb.embeddings import embed_images
    from ullsam_nb.segmenter import segment_prompts, unit_uint8
    from ullsam_nb.segment import model_views
    from ullsam_nb.tiling import MAX_ZOOM
    rng = np.random.default_rng(0)
    image = (rng.random((512, 512)) * 255).astype(np.uint8)
    views = model_views(model, image)
    t_enc = []
    for _ in range(reps):
        t = time.perf_counter(); embed_images(model, views, cache=False); t_enc.append(time.perf_counter() - t)
    big = model_views(model, image, zoom=MAX_ZOOM)        # the same image when its objects are small enough for the largest zoom
    t = time.perf_counter(); embed_images(model, big, cache=False); t_zoom = time.perf_counter() - t
    crop = unit_uint8(image)[:256, :256]
    emb = embed_images(model, [crop], cache=False)[0]
    boxes = np.array([[x, y, x + 20, y + 20] for x, y in rng.integers(0, 230, (32, 2))], np.float32)
    clicks = (boxes[:, :2] + 10)[:, None]
    t_ours, t_ref, t_click = [], [], []
    pred = SamPredictor(model); pred.set_image(crop)
    for _ in range(reps):
        t = time.perf_counter(); segment_prompts(model, crop, boxes=boxes, embedding=emb); t_ours.append((time.perf_counter() - t) / len(boxes))
        t = time.perf_counter(); segment_prompts(model, crop, points=clicks, point_labels=np.ones((len(clicks), 1)), multimask=True, embedding=emb)
        t_click.append((time.perf_counter() - t) / len(clicks))      # lone clicks: four masks, then the instance head's snap and trim (boxes: the trim) when the weights have it
        t = time.perf_counter()
        for b in boxes: pred.predict(box=b, multimask_output=False)
        t_ref.append((time.perf_counter() - t) / len(boxes))
    return dict(tiles_per_512=len(views), encoder_s_per_512=min(t_enc), encoder_s_per_512_at_max_zoom=t_zoom, tiles_per_512_at_max_zoom=len(big), prompt_ms_batched=1000 * min(t_ours), click_ms_batched=1000 * min(t_click),
                prompt_ms_reference_samprediction=1000 * min(t_ref), ratio_reference_over_ours=min(t_ref) / min(t_ours),
                threads=torch.get_num_threads())


def table(df):
    piv = df.groupby(["group", "protocol", "model"])[list(METRICS)].mean().round(3)
    n = df.groupby(["group", "protocol", "model"]).size().rename("n")
    return piv.join(n)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 synthetic images per domain, real full images only")
    ap.add_argument("--checkpoint", default=None, help="model to score (default: the shipped small SAM)")
    ap.add_argument("--n-per-domain", type=int, default=10)
    ap.add_argument("--amg-side", type=int, default=16, help="also score SAM's grid generator (points per side) on the synthetic split; 0: skip")
    ap.add_argument("--out", default="bench/results/quality.json")
    a = ap.parse_args()
    os.environ.setdefault("ULLSAM_CACHE_DIR", tempfile.mkdtemp())
    os.environ["ULLSAM_QUIET"] = "1"
    warnings.simplefilter("ignore")
    from ullsam_nb.segment import load_segmenter
    from ullsam_nb.basics import save_json
    import pandas as pd
    model = load_segmenter(checkpoint=a.checkpoint).eval()
    n = 2 if a.quick else a.n_per_domain
    synth, real = synthetic_test(n), real_test(("full",) if a.quick else ("full", "right"))
    t0 = time.perf_counter()
    df = pd.concat([score(model, synth, a.amg_side), score(model, real)], ignore_index=True)
    wall = time.perf_counter() - t0
    tab = table(df)
    with pd.option_context("display.max_rows", 500, "display.width", 200):
        print(tab.to_string())
    sp = speed(model)
    print("\nspeed (this CPU):", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in sp.items()})
    verdict = {}
    for (g, prot), sub in df.groupby(["group", "protocol"]):
        m = sub[sub.model == "model"]["mSA"].mean()
        native = sub[sub.model == "model:native"]["mSA"]
        floors = sub[sub.model.str.startswith("floor:")].groupby("model")["mSA"].mean()
        verdict[f"{g} | {prot}"] = dict(model=round(float(m), 4), **{k: round(float(v), 4) for k, v in floors.items()},
                                        beats_floors=bool((m > floors).all()))
        if len(native): verdict[f"{g} | {prot}"]["native_scale"] = round(float(native.mean()), 4)
        if sub.model.eq("model:amg").any(): verdict[f"{g} | {prot}"]["amg"] = round(float(sub[sub.model == "model:amg"]["mSA"].mean()), 4)
    print("\nmodel vs floors (mSA):")
    for k, v in verdict.items(): print(f"  {k:40s} {v}")
    save_json(dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                   checkpoint=a.checkpoint or "shipped small", quick=a.quick, wall_s=wall,
                   table=tab.reset_index().to_dict(orient="records"), verdict=verdict, speed=sp), a.out)
    print(f"\nwrote {a.out} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
