"""Benchmark: SAM ViT image encoder, images/s, segment-anything's `ImageEncoderViT` against `ullsam_nb.encoder`.

In one process and on the same random weights (the fast variants share the reference's parameters):
  sam        segment-anything's ImageEncoderViT (explicit attention matrices, window copies);
  mask       FastImageEncoder, SDPA with the decomposed rel-pos bias as an additive float mask;
  augment    FastImageEncoder, SDPA on a query/key augmented with the bias factors (no mask);
  flex       FastImageEncoder, FlexAttention with the bias in a score_mod (compiled kernel on CUDA; CPU: forward only);
  compiled   torch.compile(FastImageEncoder(attention="auto")), i.e. augment on CUDA; timed only in bf16 unless
             --compile-all. Also available (not run by default): compiled-mask, compiled-augment, compiled-flex.
Precisions: fp32 (TF32 off), bf16 (both models cast to bf16), amp (fp32 weights, bf16 autocast).
Modes: fwd (no_grad) and fwdbwd (forward + backward of a random output gradient, parameter grads reset each step).
Timing: warm-up iterations, then each iteration timed alone (CUDA events on a GPU), median reported; two input sets
alternate. FLOPs per image come from torch.utils.flop_counter.FlopCounterMode on the *reference* (on the meta device);
on CUDA the bf16 matmul peak is measured in the same run (8192^3 products) and each row reports the fraction of it
that the reference's FLOPs per second reach. Writes bench/results/sam_encoder.json (or --out).

    python bench/sam_encoder.py                       # CUDA: vit_b at 1024^2, batch 1 and 8, all variants
    python bench/sam_encoder.py --models vit_b,vit_l,vit_h --batch 8 --precision bf16
    python bench/sam_encoder.py --quick               # CPU, tiny config at 256^2, batch 1 and 2 (under a minute
                                                      # on an idle 2-core CPU; a proof of the script, not a speed claim)
"""
import argparse, copy, os, platform, statistics, time
from pathlib import Path
import torch
from torch.utils.flop_counter import FlopCounterMode
from segment_anything.modeling import ImageEncoderViT
from ullsam_nb.basics import save_json
from ullsam_nb.encoder import FastImageEncoder, encoder_config, random_image_encoder

VARIANTS = ("sam", "mask", "augment", "flex", "compiled")
EXTRA_VARIANTS = ("compiled-mask", "compiled-augment", "compiled-flex")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp": torch.float32}


def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def median_seconds(fn, dev, warmup, iters):
    "Median wall time of `fn()` over `iters` runs after `warmup` runs (CUDA events on a GPU)."
    for _ in range(warmup): fn()
    sync(dev)
    times = []
    for _ in range(iters):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); fn(); end.record(); end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)


def bf16_matmul_peak(dev, n=8192, iters=20):
    "Measured bf16 matmul FLOP/s on `dev` (random operands)."
    a, b = torch.randn(n, n, device=dev, dtype=torch.bfloat16), torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    return 2*n**3 / median_seconds(lambda: a @ b, dev, 5, iters)


def flops_per_image(name, img_size):
    "(forward, forward+backward) FLOPs per image of the reference encoder, counted on the meta device."
    with torch.device("meta"):
        enc = ImageEncoderViT(**encoder_config(name, img_size=img_size))
        x = torch.randn(1, 3, img_size, img_size)
        with FlopCounterMode(display=False) as fc: enc(x)
        fwd = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc: enc(x).sum().backward()
        return fwd, fc.get_total_flops()


def make_model(variant, ref, args):
    "The module timed for `variant`, on `ref`'s (shared) parameters."
    if variant == "sam": return ref
    if variant.startswith("compiled"):
        attention = variant.partition("-")[2] or "auto"
        return torch.compile(FastImageEncoder.from_sam(ref, attention=attention), mode=args.compile_mode, dynamic=False)
    return FastImageEncoder.from_sam(ref, attention=variant)


def run_case(model, x_sets, g, mode, precision, dev):
    "A zero-argument step function for one (model, mode, precision)."
    params = [p for p in model.parameters()]
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "amp")
    it = [0]
    def step():
        x = x_sets[it[0] % len(x_sets)]; it[0] += 1
        if mode == "fwd":
            with torch.no_grad(), amp: return model(x)
        for p in params: p.grad = None
        with amp: out = model(x)
        out.backward(g.to(out.dtype))
        return out
    return step


def rel_err(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(args):
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # fp32 means fp32
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    peak = bf16_matmul_peak(dev) if dev.type == "cuda" else None
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"device: {dev_name}; torch {torch.__version__}" + (f"; measured bf16 matmul peak {peak/1e12:.0f} TFLOP/s" if peak else ""))
    rows, flops = [], {}
    for name in args.models:
        fwd_flops, fb_flops = flops_per_image(name, args.img_size)
        flops[name] = dict(fwd=fwd_flops, fwdbwd=fb_flops)
        print(f"{name} @ {args.img_size}^2: {fwd_flops/1e9:.1f} GFLOP/image forward, {fb_flops/1e9:.1f} forward+backward")
        base = random_image_encoder(name, seed=0, img_size=args.img_size).to(dev)
        for precision in args.precision:
            ref = copy.deepcopy(base).to(DTYPES[precision]) if precision == "bf16" else base
            for batch in args.batch:
                shape = (batch, 3, args.img_size, args.img_size)
                x_sets = [torch.randn(shape, device=dev, dtype=DTYPES[precision]) for _ in range(2)]
                for mode in args.mode:
                    g, ref_out = None, None
                    for variant in args.variants:
                        row = dict(model=name, img_size=args.img_size, batch=batch, precision=precision, mode=mode,
                                   variant=variant)
                        skip = None
                        if variant == "flex" and dev.type != "cuda" and mode == "fwdbwd": skip = "no CPU backward"
                        compiled = variant.startswith("compiled")
                        if compiled and precision != "bf16" and not args.compile_all: skip = "bf16 only"
                        if compiled and dev.type != "cuda" and not args.compile_all: skip = "CUDA only"
                        if skip:
                            rows.append({**row, "skipped": skip}); continue
                        try:
                            model = make_model(variant, ref, args).train(mode == "fwdbwd")
                            if g is None:
                                with torch.no_grad(): g = torch.randn_like(ref(x_sets[0][:1]).float())
                                g = g.expand(batch, *g.shape[1:]).contiguous()
                            step = run_case(model, x_sets, g, mode, precision, dev)
                            with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=precision == "amp"):
                                out = model(x_sets[0])
                            if ref_out is None: ref_out = out
                            row["rel_err_vs_sam"] = rel_err(out, ref_out)
                            t = median_seconds(step, dev, args.warmup, args.iters)
                            row.update(seconds=t, images_per_s=batch/t)
                            if peak: row["frac_bf16_peak"] = batch/t * flops[name][mode] / peak
                        except torch.OutOfMemoryError:
                            row["skipped"] = "out of memory"
                        except Exception as e:          # one broken variant must not lose the others' numbers
                            row["skipped"] = f"error: {type(e).__name__}: {str(e)[:200]}"
                        finally:
                            model = step = None
                            if dev.type == "cuda": torch.cuda.empty_cache()
                        rows.append(row)
                        print_row(row, rows)
    result = dict(device=dev_name, torch=torch.__version__, peak_bf16_flops=peak, tf32=False, flops_per_image=flops,
                  settings=dict(vars(args)), rows=rows)
    save_json(result, args.out)
    print_table(rows)
    print(f"wrote {args.out}")
    return result


def _speedup(row, rows):
    base = [r for r in rows if r.get("variant") == "sam" and "images_per_s" in r and
            all(r[k] == row[k] for k in ("model", "img_size", "batch", "precision", "mode"))]
    return row["images_per_s"] / base[0]["images_per_s"] if base and "images_per_s" in row else None


def _fmt(row, rows):
    sp = _speedup(row, rows)
    cells = [row["model"], f"{row['img_size']}", f"{row['batch']}", row["precision"], row["mode"], row["variant"]]
    if "images_per_s" not in row: return cells + [row.get("skipped", "")]
    return cells + [f"{row['images_per_s']:.2f}", f"{row['seconds']*1e3:.1f}", f"{sp:.2f}x" if sp else "-",
                    f"{100*row['frac_bf16_peak']:.1f}%" if "frac_bf16_peak" in row else "-",
                    f"{row['rel_err_vs_sam']:.1e}"]

HEAD = ["model", "size", "batch", "prec", "mode", "variant", "img/s", "ms/iter", "vs sam", "%bf16pk", "err"]

def print_row(row, rows): print("  " + "  ".join(_fmt(row, rows)), flush=True)

def print_table(rows):
    lines = [HEAD] + [_fmt(r, rows) for r in rows]
    widths = [max(len(l[i]) for l in lines if i < len(l)) for i in range(len(HEAD))]
    print()
    for l in lines: print("  ".join(c.ljust(w) for c, w in zip(l, widths)))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=None, help="comma list of vit_b, vit_l, vit_h, tiny (default vit_b)")
    p.add_argument("--batch", default=None, help="comma list of batch sizes (default 1,8)")
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16, amp")
    p.add_argument("--mode", default="fwd,fwdbwd", help="comma list of fwd, fwdbwd")
    p.add_argument("--variants", default=None, help=f"comma list of {', '.join(VARIANTS + EXTRA_VARIANTS)} (default: the first five; --quick: "
                   "sam,mask,augment, since FlexAttention on the CPU is only the unfused reference)")
    p.add_argument("--img-size", type=int, default=None, help="image side (default 1024; --quick 256)")
    p.add_argument("--warmup", type=int, default=None); p.add_argument("--iters", type=int, default=None)
    p.add_argument("--compile-mode", default="default", help="torch.compile mode of `compiled`")
    p.add_argument("--compile-all", action="store_true", help="also compile in fp32/amp and on the CPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu (--quick: cpu)")
    p.add_argument("--quick", "--cpu-smoke", dest="quick", action="store_true", help="small CPU run: tiny config at 256^2, batch 1,2")
    p.add_argument("--out", default=str(Path(__file__).parent/"results"/"sam_encoder.json"))
    a = p.parse_args(argv)
    if a.quick: a.device = a.device or "cpu"
    a.models = (a.models or ("tiny" if a.quick else "vit_b")).split(",")
    a.batch = [int(b) for b in (a.batch or ("1,2" if a.quick else "1,8")).split(",")]
    a.variants = (a.variants or ("sam,mask,augment" if a.quick else ",".join(VARIANTS))).split(",")
    a.precision, a.mode = a.precision.split(","), a.mode.split(",")
    a.img_size = a.img_size or (256 if a.quick else 1024)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    a.iters = a.iters or (5 if a.quick else 10)
    for v in a.variants:
        if v not in VARIANTS + EXTRA_VARIANTS: p.error(f"unknown variant {v!r}")
    return a


if __name__ == "__main__":
    main(parse())
