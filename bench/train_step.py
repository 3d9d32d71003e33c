"""Benchmark: one uLLSAM joint training step (stage 3), images/s and peak memory, reference style vs ours.

Real size (GPU): SAM ViT-B (random weights) + a Llama-architecture LLM with InternLM2-1.8B's dimensions (hidden 2048,
24 layers, 16 heads, 8 KV heads, MLP 8192; random weights), 1024x1024 input, 4 prompted instances per image
(1 positive + 3 ring negatives), loss BCE + soft Dice on full-resolution logits, AdamW + clipping. In one run:

  reference   the reference code's way: the WHOLE model cast to bf16 (weights, grads and AdamW state in bf16),
              SAM's image encoder run TWICE per image (once for the MLLM branch, once for SAM), batch 1;
  ours        `ullsam_nb.train`'s step: fp32 master weights under bf16 autocast, the frozen LLM stored in bf16,
              the encoder run ONCE for both branches (`ULLSAM.image_features`), the fast SAM encoder
              (`ullsam_nb.encoder`), fused AdamW; batch 1 and the largest batch that fits;
  frozen_vlk  ours in `frozen_vlk` mode, steady state (encoder + LLM features cached after the first epoch):
              only mlp2, s/b, the prompt encoder and the mask decoder run per step.

Reported: images/s, step time, peak GPU memory, FLOP per step (torch's FlopCounterMode), the measured bf16 matmul
peak and the utilisation, the largest batch per mode that fits in 24 GB. `--quick` runs the tiny model on the CPU
(fp32 for ours; the reference still casts to bf16). Writes bench/results/train_step.json.

    python bench/train_step.py [--quick] [--steps 10] [--no-fit24]
"""
import argparse, copy, gc, time, platform, resource, types
from pathlib import Path
import torch
from ullsam_nb.basics import save_json, seed_everything, default_device

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
    world = make_world(Path(tempfile.mkdtemp())/"w", n=max(n_images, 1), seed=0, domains=["fluo_nuclei"], size=256)
    ds = InstanceDataset(folder_pairs(world), max_instances=4, prompt_sampler=sbr_prompt_sampler,
                         sam_size=model.image_size, mode=model.config.preprocess)
    return collate_instances([ds[i % len(ds)] for i in range(n_images)])


def build(mode, quick, dev, dtype_llm):
    from ullsam_nb.model import ULLSAM, UllsamConfig
    if quick: cfg = UllsamConfig(sam="tiny", llm="tiny", mode=mode)
    else: cfg = UllsamConfig(sam="vit_b", llm="random", llm_overrides=FULL_LLM, llm_dtype=dtype_llm, mode=mode)
    seed_everything(0)
    return ULLSAM.from_config(cfg).set_stage(3).to(dev).train()


def to_dev(batch, dev):
    return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}


def reference_model(model, dev):
    "The reference's setup: the whole model cast to bf16, and an `image_features` that runs the encoder twice."
    ref = model.to(torch.bfloat16)
    def image_features(self, images, image_keys=None):
        x = self.pixels(images).to(torch.bfloat16)
        vlk = self.vlk(self.sam.image_encoder(x))          # pass 1: the MLLM branch
        emb = self.sam.image_encoder(x)                    # pass 2: SAM's own branch
        return emb, vlk
    ref.image_features = types.MethodType(image_features, ref)
    return ref


def step_fn(model, batch, dev, autocast, fused):
    from ullsam_nb.model import joint_loss
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, **({"fused": True} if fused else {}))
    def step():
        ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else torch.autocast(dev.type, enabled=False)
        with ctx: loss = joint_loss(model, batch)["loss"]
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


def flops_of(step):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc: step()
    return fc.get_total_flops()


def matmul_peak(dev, n=8192, reps=20):
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16); b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3): a @ b
    sync(dev); t = time.perf_counter()
    for _ in range(reps): a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def free(*objs):
    for o in objs: del o
    gc.collect()
    if torch.cuda.is_available(): torch.cuda.empty_cache()


def largest_batch(kind, quick, dev, limit_gib=24.0, cap=64):
    "Largest power-of-two batch whose step stays under `limit_gib` of peak GPU memory (None on CPU)."
    if dev.type != "cuda": return None
    best, b = 0, 1
    while b <= cap:
        try:
            model = build("frozen_vlk" if kind == "frozen_vlk" else "ullsam", quick, dev, "bfloat16")
            if kind == "reference": model = reference_model(model, dev)
            elif not quick:
                from ullsam_nb.encoder import use_fast_encoder
                use_fast_encoder(model.sam)
            batch = to_dev(make_batch(model, b, quick), dev)
            step = step_fn(model, batch, dev, autocast=True, fused=True)
            _, peak = time_steps(step, dev, 1, warmup=1)
            ok = peak <= limit_gib
        except torch.cuda.OutOfMemoryError:
            ok = False
        free(); torch.cuda.empty_cache()
        if not ok: break
        best, b = b, b * 2
    return best


def main(quick=False, steps=None, fit24=True):
    dev = torch.device("cpu") if quick else default_device()
    if not quick and dev.type != "cuda": print("no GPU: running --quick on the CPU"); quick, dev = True, torch.device("cpu")
    steps = steps or (3 if quick else 10)
    gpu = dev.type == "cuda"
    rows = []

    def measure(name, model, batch_images, autocast, fused, encoder_passes):
        batch = to_dev(make_batch(model, batch_images, quick), dev)
        step = step_fn(model, batch, dev, autocast, fused)
        dt, peak = time_steps(step, dev, steps)
        fl = flops_of(step) if gpu else None
        row = dict(variant=name, batch=batch_images, encoder_passes=encoder_passes, step_s=round(dt, 4),
                   images_per_s=round(batch_images / dt, 2), peak_mem_gib=round(peak, 2),
                   tflop_per_step=None if fl is None else round(fl / 1e12, 2))
        rows.append(row); print(row)
        return row

    # reference style
    ref = reference_model(build("ullsam", quick, dev, None), dev)
    measure("reference (bf16 cast, encoder x2)", ref, 1, autocast=True, fused=False, encoder_passes=2)
    free(ref)
    # ours, joint
    ours = build("ullsam", quick, dev, None if quick else "bfloat16")
    if not quick:
        from ullsam_nb.encoder import use_fast_encoder
        use_fast_encoder(ours.sam)
    measure("ours joint (fp32 master + bf16 autocast, encoder x1)" if gpu else "ours joint (fp32, encoder x1)",
            ours, 1, autocast=gpu, fused=gpu, encoder_passes=1)
    free(ours)
    # ours, frozen_vlk (steady state: features cached)
    fz = build("frozen_vlk", quick, dev, None if quick else "bfloat16")
    measure("ours frozen_vlk (cached features)", fz, 1, autocast=gpu, fused=gpu, encoder_passes=0)
    free(fz)

    ref_ips = rows[0]["images_per_s"]
    for r in rows: r["speedup_vs_reference"] = round(r["images_per_s"] / ref_ips, 2)
    res = dict(bench="train_step", quick=quick, device=str(dev), gpu=torch.cuda.get_device_name() if gpu else None,
               torch=torch.__version__, python=platform.python_version(), steps=steps, rows=rows,
               model="tiny SAM + tiny LLM (CPU)" if quick else "SAM ViT-B + Llama with InternLM2-1.8B dims (random weights)")
    if gpu:
        peak = matmul_peak(dev)
        res["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
        for r in rows:
            if r["tflop_per_step"]:
                r["utilisation"] = round(r["tflop_per_step"] * 1e12 * r["images_per_s"] / r["batch"] / peak, 3)
                r["limit_images_per_s"] = round(peak / (r["tflop_per_step"] * 1e12 / r["batch"]), 1)
        if fit24:
            res["largest_batch_24gib"] = {k: largest_batch(k, quick, dev) for k in ("reference", "ours", "frozen_vlk")}
    print(f"\n{'variant':58s} {'batch':>5} {'img/s':>9} {'x ref':>7} {'peak GiB':>9} {'TFLOP':>7}")
    for r in rows:
        print(f"{r['variant']:58s} {r['batch']:>5} {r['images_per_s']:>9.2f} {r['speedup_vs_reference']:>7.2f} "
              f"{r['peak_mem_gib']:>9.2f} {str(r['tflop_per_step']):>7}")
    if quick: print("(CPU --quick: peak memory is the process's max RSS; the reference runs bf16 on the CPU, which is slow there)")
    out = Path(__file__).parent/"results"/"train_step.json"
    save_json(res, out)
    print(f"wrote {out}")
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-fit24", dest="fit24", action="store_false", help="skip the largest-batch-in-24-GB search")
    a = ap.parse_args()
    main(a.quick, a.steps, a.fit24)
