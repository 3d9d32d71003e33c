"""Benchmark: one uLLSAM joint training step (stage 3), images/s, peak memory and model-FLOP utilisation.

Real size (GPU): SAM ViT-B (random weights) + a Llama-architecture LLM with InternLM2-1.8B's dimensions (hidden 2048,
24 layers, 16 heads, 8 KV heads, MLP 8192; random weights), 1024x1024 input, 4 prompted instances per image
(1 positive + 3 ring negatives), loss BCE + soft Dice on full-resolution logits, AdamW + clipping. In one run:

  reference   the reference code's way: the WHOLE model cast to bf16 (weights, grads and AdamW state in bf16),
              SAM's image encoder (segment-anything's) run TWICE per image (MLLM branch, SAM branch), batch 1;
  ours        `ullsam_nb.train`'s step: fp32 master weights under bf16 autocast, the frozen LLM stored in bf16,
              the encoder run ONCE for both branches, the fast SAM encoder (attention `auto`), fused AdamW;
              batch 1 and larger batches (--batches);
  frozen_vlk  ours in `frozen_vlk` mode, steady state: encoder + LLM features cached on the device after the first
              step (the image keys computed once), so only mlp2, s/b, the prompt encoder and the mask decoder run;
              batched (--fvlk-batch).

FLOPs: `ullsam_nb.encoder.count_flops` (torch's FlopCounterMode, with every SDPA kernel counted, grouped-query
attention included, and the fast encoder counted as the reference's formulation). Model FLOPs per image are those of
`ours` (one encoder pass); utilisation (MFU) = model FLOPs per image x images/s / the measured bf16 matmul peak; the
reference's two encoder passes are extra work, not model FLOPs. frozen_vlk's row uses its own step's FLOPs.
Also: the largest batch per mode (reference, baseline, ullsam, frozen_vlk) whose step stays under 24 GiB (CUDA).

`--quick` (alias `--cpu-smoke`): tiny SAM + tiny LLM (with grouped-query attention) on the CPU, every path and the
FLOP count exercised, no speed claim. Writes bench/results/train_step.json (or --out).

    python bench/train_step.py [--quick] [--steps 10] [--batches 1,8,32] [--fvlk-batch 32] [--no-fit24]
"""
import argparse, gc, time, platform, resource, types
from pathlib import Path
import torch
from ullsam_nb.basics import save_json, seed_everything, default_device
from ullsam_nb.encoder import count_flops, use_fast_encoder

FULL_LLM = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                intermediate_size=8192, max_position_embeddings=4096)


def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize()


def make_batch(model, n_images, quick):
    "A collated batch of `n_images` synthetic images with 4 SBR-prompted instances each, at the model's input size."
    import tempfile
    from ullsam_nb.synth import make_world
    from ullsam_nb.data import folder_pairs, InstanceDataset, collate_instances
    from ullsam_nb.sbr import sbr_prompt_sampler
    world = make_world(Path(tempfile.mkdtemp())/"w", n=min(max(n_images, 1), 8), seed=0, domains=["fluo_nuclei"], size=256)
    ds = InstanceDataset(folder_pairs(world), max_instances=4, prompt_sampler=sbr_prompt_sampler,
                         sam_size=model.image_size, mode=model.config.preprocess)
    items = [ds[i % len(ds)] for i in range(n_images)]
    if n_images > len(ds):        # distinct images (frozen_vlk caches per image): flip the repeats
        for i in range(len(ds), n_images):
            items[i] = dict(items[i], input_image=torch.flip(items[i]["input_image"], dims=(-1,)) + 1e-3 * (i // len(ds)))
    return collate_instances(items)


def build(mode, quick, dev, dtype_llm):
    from ullsam_nb.model import ULLSAM
    from ullsam_nb.model_config import UllsamConfig
    if quick: cfg = UllsamConfig(sam="tiny", llm="tiny", mode=mode)
    else: cfg = UllsamConfig(sam="vit_b", llm="random", llm_overrides=FULL_LLM, llm_dtype=dtype_llm, mode=mode)
    seed_everything(0)
    return ULLSAM.from_config(cfg).set_stage(3).to(dev).train()


def to_dev(batch, dev):
    return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}


def reference_model(model):
    "The reference's setup: the whole model cast to bf16, and an `image_features` that runs the encoder twice."
    ref = model.to(torch.bfloat16)
    def image_features(self, images, image_keys=None):
        x = self.pixels(images).to(torch.bfloat16)
        vlk = self.vlk(self.sam.image_encoder(x))          # pass 1: the MLLM branch
        emb = self.sam.image_encoder(x)                    # pass 2: SAM's own branch
        return emb, vlk
    ref.image_features = types.MethodType(image_features, ref)
    return ref


def step_fn(model, batch, dev, autocast, fused, image_keys=None):
    from ullsam_nb.model import joint_loss
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **({"fused": True} if fused else {}))
    def step():
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else torch.autocast(dev.type, enabled=False)
        with ctx: loss = joint_loss(model, batch, image_keys=image_keys)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    return step


def time_steps(step, dev, n, warmup=2):
    for _ in range(warmup): step()
    sync(dev)
    if dev.type == "cuda": torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(n): step()
    sync(dev)
    dt = (time.perf_counter() - t) / n
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return dt, peak


def flops_of(step, model):
    "FLOPs of one training step (forward, backward, optimiser) of `model`, the fast encoder counted as the reference."
    return count_flops(step, modules=model)


def matmul_peak(dev, n=8192, reps=20):
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16); b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3): a @ b
    sync(dev); t = time.perf_counter()
    for _ in range(reps): a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def free():
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()


def largest_batch(model, quick, dev, autocast, fused, limit_gib=24.0, cap=64, steady=False):
    "Largest power-of-two batch (up to `cap`) whose step keeps peak GPU memory under `limit_gib` (None off CUDA)."
    if dev.type != "cuda": return None
    best, b, tried = 0, 1, {}
    while b <= cap:
        try:
            batch = to_dev(make_batch(model, b, quick), dev)
            keys = model.image_keys(model.pixels(batch["input_image"])) if steady else None
            step = step_fn(model, batch, dev, autocast=autocast, fused=fused, image_keys=keys)
            _, peak = time_steps(step, dev, 1, warmup=1)
            tried[b] = round(peak, 2)
            ok = peak <= limit_gib
        except torch.cuda.OutOfMemoryError:
            tried[b], ok = "out of memory", False
        batch = step = None
        if hasattr(model, "clear_feature_cache"): model.clear_feature_cache()
        free()
        if not ok: break
        best, b = b, b * 2
    return dict(batch=best, peak_gib_by_batch=tried)


def main(quick=False, steps=None, fit24=True, batches=None, fvlk_batch=None, out=None):
    dev = torch.device("cpu") if quick else default_device()
    if not quick and dev.type != "cuda": print("no GPU: running --quick on the CPU"); quick, dev = True, torch.device("cpu")
    steps = steps or (2 if quick else 10)
    gpu = dev.type == "cuda"
    batches = batches or ([1, 2] if quick else [1, 8, 32])
    fvlk_batch = fvlk_batch or (4 if quick else 32)
    rows, fit = [], {}

    def measure(name, model, batch_images, autocast, fused, encoder_passes, steady=False):
        try:
            batch = to_dev(make_batch(model, batch_images, quick), dev)
            keys = model.image_keys(model.pixels(batch["input_image"])) if steady else None
            step = step_fn(model, batch, dev, autocast, fused, image_keys=keys)
            dt, peak = time_steps(step, dev, steps)
            fl = flops_of(step, model)
            row = dict(variant=name, batch=batch_images, encoder_passes=encoder_passes, step_s=round(dt, 4),
                       images_per_s=round(batch_images / dt, 2), peak_mem_gib=round(peak, 2),
                       tflop_per_step=round(fl / 1e12, 4), gflop_per_image=round(fl / 1e9 / batch_images, 2))
        except torch.cuda.OutOfMemoryError:
            row = dict(variant=name, batch=batch_images, skipped="out of memory")
        free()
        rows.append(row); print(row, flush=True)
        return row

    def autocast_fused(): return dict(autocast=gpu, fused=gpu)

    # ours, joint (then the same model, reference-style, so the LLM is built once)
    model = build("ullsam", quick, dev, None if quick else "bfloat16")
    sam_encoder = model.sam.image_encoder
    use_fast_encoder(model.sam)
    for b in batches:
        measure("ours joint (fp32 master + bf16 autocast, encoder x1)" if gpu else "ours joint (fp32, encoder x1)",
                model, b, encoder_passes=1, **autocast_fused())
    if fit24: fit["ullsam"] = largest_batch(model, quick, dev, **autocast_fused())
    model.sam.image_encoder = sam_encoder                    # segment-anything's encoder, same parameters
    model = reference_model(model)
    measure("reference (bf16 cast, encoder x2)", model, 1, autocast=True, fused=False, encoder_passes=2)
    if fit24: fit["reference"] = largest_batch(model, quick, dev, autocast=True, fused=False)
    model = sam_encoder = None; free()
    # ours, frozen_vlk (steady state: features cached on the device, image keys computed once)
    model = build("frozen_vlk", quick, dev, None if quick else "bfloat16")
    use_fast_encoder(model.sam)
    model.feature_cache_device = None                        # the model's device
    for b in sorted({1, fvlk_batch}):
        measure("ours frozen_vlk (cached features, steady state)", model, b, encoder_passes=0, steady=True, **autocast_fused())
        model.clear_feature_cache()
    if fit24: fit["frozen_vlk"] = largest_batch(model, quick, dev, steady=True, **autocast_fused())
    model = None; free()
    if fit24 and gpu:                                        # baseline: SAM alone (no VLK path)
        model = build("baseline", quick, dev, None); use_fast_encoder(model.sam)
        fit["baseline"] = largest_batch(model, quick, dev, **autocast_fused())
        model = None; free()

    ok = [r for r in rows if "images_per_s" in r]
    ref_ips = next(r["images_per_s"] for r in ok if r["variant"].startswith("reference"))
    ours1 = next(r for r in ok if r["variant"].startswith("ours joint") and r["batch"] == 1)
    model_gflop = ours1["gflop_per_image"]                   # one encoder pass: the model's FLOPs per image
    for r in ok: r["speedup_vs_reference"] = round(r["images_per_s"] / ref_ips, 2)
    res = dict(bench="train_step", quick=quick, device=str(dev), gpu=torch.cuda.get_device_name() if gpu else None,
               torch=torch.__version__, python=platform.python_version(), steps=steps, rows=rows,
               model_gflop_per_image=model_gflop,
               model="tiny SAM + tiny LLM (CPU)" if quick else "SAM ViT-B + Llama with InternLM2-1.8B dims (random weights)")
    if gpu:
        peak = matmul_peak(dev)
        res["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
        for r in ok:
            per_image = (r["gflop_per_image"] if "frozen_vlk" in r["variant"] else model_gflop) * 1e9
            r["mfu"] = round(per_image * r["images_per_s"] / peak, 3)
            r["limit_images_per_s"] = round(peak / per_image, 1)
    if fit24: res["largest_batch_24gib"] = fit
    print(f"\n{'variant':58s} {'batch':>5} {'img/s':>9} {'x ref':>7} {'peak GiB':>9} {'GFLOP/img':>10} {'MFU':>6}")
    for r in rows:
        if "images_per_s" not in r: print(f"{r['variant']:58s} {r['batch']:>5} {r['skipped']}"); continue
        print(f"{r['variant']:58s} {r['batch']:>5} {r['images_per_s']:>9.2f} {r['speedup_vs_reference']:>7.2f} "
              f"{r['peak_mem_gib']:>9.2f} {r['gflop_per_image']:>10.1f} {str(r.get('mfu', '-')):>6}")
    if fit24 and gpu: print("largest batch in 24 GiB:", {k: v["batch"] for k, v in fit.items()})
    if quick: print("(CPU --quick: peak memory is the process's max RSS; the reference runs bf16 on the CPU, which is slow there)")
    out = Path(out) if out else Path(__file__).parent/"results"/"train_step.json"
    save_json(res, out)
    print(f"wrote {out}")
    return res


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", "--cpu-smoke", dest="quick", action="store_true", help="tiny models on the CPU")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batches", default=None, help="comma list of batch sizes for ours joint (default 1,8,32)")
    ap.add_argument("--fvlk-batch", type=int, default=None, help="frozen_vlk steady-state batch (default 32)")
    ap.add_argument("--no-fit24", dest="fit24", action="store_false", help="skip the largest-batch-in-24-GiB search")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/train_step.json)")
    a = ap.parse_args(argv)
    a.batches = [int(b) for b in a.batches.split(",")] if a.batches else None
    return a


if __name__ == "__main__":
    a = parse()
    main(a.quick, a.steps, a.fit24, a.batches, a.fvlk_batch, a.out)
