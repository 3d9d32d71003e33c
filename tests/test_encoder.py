"""Fast SAM image encoder vs segment-anything's ImageEncoderViT (CPU, random weights, fresh random inputs per test).

Error criterion everywhere: relative error to the reference's norm, ||fast - ref|| / ||ref||.
fp32: < 1e-5. bf16: < 3e-2 against the fp32 reference, and no worse than about twice the reference's own bf16 error.
"""
import os, pytest, torch, torch.nn as nn
from segment_anything.modeling import ImageEncoderViT
from ullsam_nb.encoder import (FastImageEncoder, fast_image_encoder, random_image_encoder, encoder_config,
                               sam_encoder_kwargs, rel_pos_attention, use_fast_encoder)

# heavy tests run only with ULLSAM_SLOW=1 (e.g. `ULLSAM_SLOW=1 pytest tests/test_encoder.py`)
slow = pytest.mark.skipif(not os.environ.get("ULLSAM_SLOW"), reason="slow: set ULLSAM_SLOW=1")

def rel_err(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()

# name -> (config name, overrides): padded windows (16 grid, window 6 / 5), unpadded (12 grid, window 6),
# no relative / absolute positions, odd head count
CONFIGS = {
    "tiny": ("tiny", {}),
    "pad_w5": ("tiny", dict(window_size=5, num_heads=2, global_attn_indexes=(2,))),
    "no_pad": ("tiny", dict(img_size=192)),
    "no_rel_pos": ("tiny", dict(use_rel_pos=False, depth=2, global_attn_indexes=(1,))),
    "no_abs_pos": ("tiny", dict(use_abs_pos=False, depth=2, global_attn_indexes=(0,))),
}

def _pair(cfg, **kw):
    name, over = CONFIGS[cfg]
    ref = random_image_encoder(name, **over).eval()
    return ref, FastImageEncoder.from_sam(ref, **kw)

def _images(ref, b): return torch.randn(b, 3, ref.img_size, ref.img_size)

CASES = [(c, m) for c in CONFIGS for m in ("mask", "augment")] + [("tiny", "flex"), ("pad_w5", "flex")]

@pytest.mark.parametrize("cfg,method", CASES)
def test_fp32_same_function(cfg, method):
    ref, fast = _pair(cfg, attention=method)
    for b in ((1, 3) if method == "mask" else (3,)):
        x = _images(ref, b)
        with torch.no_grad(): expected, got = ref(x), fast(x)
        assert got.shape == expected.shape
        assert rel_err(got, expected) < 1e-5, (cfg, method, b, rel_err(got, expected))

def test_batch_items_independent():
    "Each image's embedding does not depend on the others in the batch."
    ref, fast = _pair("tiny")
    x = _images(ref, 5)
    with torch.no_grad(): whole, single = fast(x), fast(x[3:4])
    assert rel_err(whole[3:4], single) < 1e-5

@pytest.mark.parametrize("method", ["mask", "augment"])
def test_bf16_autocast(method):
    ref, fast = _pair("tiny", attention=method)
    x = _images(ref, 3)
    with torch.no_grad():
        expected = ref(x)
        with torch.autocast("cpu", dtype=torch.bfloat16): r16, f16 = ref(x), fast(x)
    assert torch.isfinite(f16).all()
    e_ref, e_fast = rel_err(r16, expected), rel_err(f16, expected)
    assert e_fast < 3e-2 and e_fast < 2*e_ref + 1e-3, (e_fast, e_ref)

def test_bf16_weights():
    "Both encoders cast to bf16 (`.to(torch.bfloat16)`) against the fp32 reference."
    ref, _ = _pair("tiny")
    x = _images(ref, 2)
    with torch.no_grad():
        expected = ref(x)
        ref16 = random_image_encoder("tiny").eval(); ref16.load_state_dict(ref.state_dict()); ref16.to(torch.bfloat16)
        fast16 = FastImageEncoder.from_sam(ref16)
        r16, f16 = ref16(x.bfloat16()), fast16(x.bfloat16())
    assert f16.dtype == torch.bfloat16
    e_ref, e_fast = rel_err(r16, expected), rel_err(f16, expected)
    assert e_fast < 5e-2 and e_fast < 2*e_ref + 1e-3, (e_fast, e_ref)

@pytest.mark.parametrize("cfg", ["tiny", "no_pad"])
@pytest.mark.parametrize("method", ["mask", "augment"])
def test_gradients_match(cfg, method):
    name, over = CONFIGS[cfg]
    ref = random_image_encoder(name, **over).train()
    fast = FastImageEncoder.from_sam(ref, share=False, attention=method)
    x = _images(ref, 3)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = ref(xr)
    g = torch.randn_like(out)
    out.backward(g); fast(xf).backward(g)
    assert rel_err(xf.grad, xr.grad) < 1e-4
    ref_p = dict(ref.named_parameters())
    for n, p in fast.named_parameters():
        assert p.grad is not None, n
        assert rel_err(p.grad, ref_p[n].grad) < 1e-4, (n, rel_err(p.grad, ref_p[n].grad))

def test_shared_parameters_train_together():
    "With share=True an optimiser step on the reference changes the fast encoder too."
    ref = random_image_encoder("tiny").train()
    fast = FastImageEncoder.from_sam(ref)
    assert {id(p) for p in fast.parameters()} == {id(p) for p in ref.parameters()}
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    fast(_images(ref, 1)).square().mean().backward()
    opt.step()
    ref.eval(); fast.eval()
    x = _images(ref, 1)
    with torch.no_grad(): assert rel_err(fast(x), ref(x)) < 1e-5

def test_copy_is_independent():
    ref, fast = _pair("tiny", share=False)
    with torch.no_grad(): fast.blocks[0].attn.qkv.weight.add_(1.0)
    assert not torch.equal(fast.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.weight)

def test_loads_reference_checkpoint(tmp_path):
    "An ImageEncoderViT state dict saved to disk loads strictly (weights_only) into FastImageEncoder."
    ref = random_image_encoder("tiny").eval()
    torch.save(ref.state_dict(), tmp_path/"enc.pth")
    fast = FastImageEncoder(**encoder_config("tiny")).eval()
    fast.load_state_dict(torch.load(tmp_path/"enc.pth", weights_only=True), strict=True)
    assert list(fast.state_dict()) == list(ref.state_dict())
    x = _images(ref, 2)
    with torch.no_grad(): assert rel_err(fast(x), ref(x)) < 1e-5

def test_kwargs_roundtrip_and_activation():
    ref = ImageEncoderViT(**encoder_config("tiny", act_layer=lambda: nn.GELU(approximate="tanh")))
    kw = sam_encoder_kwargs(ref)
    assert kw["global_attn_indexes"] == (1, 3) and kw["window_size"] == 6 and kw["norm_layer"](8).eps == 1e-6
    fast = FastImageEncoder.from_sam(ref)
    assert fast.blocks[0].mlp.act.approximate == "tanh"

def test_use_fast_encoder_in_sam():
    from segment_anything.modeling import Sam, PromptEncoder, MaskDecoder, TwoWayTransformer
    from segment_anything import SamPredictor
    sam = Sam(random_image_encoder("tiny"),
              PromptEncoder(embed_dim=64, image_embedding_size=(16, 16), input_image_size=(256, 256), mask_in_chans=16),
              MaskDecoder(transformer_dim=64, transformer=TwoWayTransformer(depth=2, embedding_dim=64, mlp_dim=256,
                          num_heads=2), iou_head_hidden_dim=64)).eval()
    img = (torch.rand(200, 180, 3)*255).to(torch.uint8).numpy()
    pred = SamPredictor(sam); pred.set_image(img); expected = pred.get_image_embedding()
    use_fast_encoder(sam)
    assert isinstance(sam.image_encoder, FastImageEncoder)
    pred = SamPredictor(sam); pred.set_image(img)
    assert rel_err(pred.get_image_embedding(), expected) < 1e-5
    masks, scores, _ = pred.predict(box=torch.tensor([20, 30, 120, 150]).numpy(), multimask_output=False)
    assert masks.shape == (1, 200, 180)

@slow
def test_vit_b_architecture_small_image():
    "ViT-B's real block layout (12 blocks, 12 heads, window 14 -> 16 grid padded to 28) at 256^2."
    ref = random_image_encoder("vit_b", img_size=256).eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        expected = ref(x)
        for m in ("mask", "augment"):
            assert rel_err(FastImageEncoder.from_sam(ref, attention=m)(x), expected) < 1e-5

@slow
@pytest.mark.parametrize("method", ["augment", "flex"])   # flex: falls back to the mask under a CPU compile
def test_torch_compile_cpu(method):
    ref = random_image_encoder("tiny").eval()
    fast = fast_image_encoder(ref, compile=True, attention=method)
    x = _images(ref, 2)
    with torch.no_grad(): assert rel_err(fast(x), ref(x)) < 1e-5


# --- issue 17: the attention rule, measure-once, FLOP counting, every mode on the fast encoder, the device script ---
import importlib.util, json, subprocess, sys
from pathlib import Path
import torch.nn.functional as F
import ullsam_nb.encoder as E

ROOT = Path(__file__).resolve().parents[1]

def _bench(name):
    "Import bench/<name>.py as a module."
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT/"bench"/f"{name}.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

def test_auto_attention_per_device_and_call_never_flex():
    "CUDA's auto is the path measured fastest there (augment, forward and training), never FlexAttention."
    for training in (False, True):
        assert E.resolve_attention("auto", "cuda", training) == "augment"
        assert E.resolve_attention("auto", "cpu", training) == "mask"
    assert "flex" not in E.AUTO_ATTENTION.values()
    assert E.resolve_attention("math", "cuda") == "math"

def _spy_methods(monkeypatch):
    seen = []
    real = E.rel_pos_attention
    def spy(*a, **k):
        seen.append(a[6] if len(a) > 6 else k.get("method", "mask")); return real(*a, **k)
    monkeypatch.setattr(E, "rel_pos_attention", spy)
    return seen

def test_auto_distinguishes_forward_only_and_training(monkeypatch):
    monkeypatch.setitem(E.AUTO_ATTENTION, ("cpu", "infer"), "augment")
    monkeypatch.setitem(E.AUTO_ATTENTION, ("cpu", "train"), "mask")
    seen = _spy_methods(monkeypatch)
    ref, fast = _pair("tiny")
    x = _images(ref, 1)
    with torch.no_grad(): fast(x)
    assert set(seen) == {"augment"}
    seen.clear(); fast(x).sum().backward()
    assert set(seen) == {"mask"}
    seen.clear(); fast.requires_grad_(False); fast(x)        # frozen encoder: forward-only even with grad enabled
    assert set(seen) == {"augment"}

def _tiny_batch(model, n=2):
    import tempfile
    from ullsam_nb.synth import make_world
    from ullsam_nb.data import folder_pairs, InstanceDataset, collate_instances
    from ullsam_nb.sbr import sbr_prompt_sampler
    pairs = folder_pairs(make_world(Path(tempfile.mkdtemp())/"w", n=n, seed=0, domains=["fluo_nuclei"], size=256))
    ds = InstanceDataset(pairs, max_instances=3, prompt_sampler=sbr_prompt_sampler, sam_size=model.image_size,
                         mode=model.config.preprocess)
    return pairs, collate_instances([ds[i] for i in range(n)])

def test_frozen_vlk_features_never_take_flex(monkeypatch):
    "With CUDA's rule, frozen_vlk's no-grad feature pass runs augment and never reaches FlexAttention."
    from ullsam_nb.model import ULLSAM, joint_loss
    from ullsam_nb.model_config import UllsamConfig
    for kind in ("infer", "train"): monkeypatch.setitem(E.AUTO_ATTENTION, ("cpu", kind), E.AUTO_ATTENTION[("cuda", kind)])
    def no_flex(*a, **k): raise AssertionError("FlexAttention reached")
    monkeypatch.setattr(E, "_flex_attention", no_flex)
    seen = _spy_methods(monkeypatch)
    model = ULLSAM.from_config(UllsamConfig(sam="tiny", llm="tiny", mode="frozen_vlk", fast_encoder=True)).set_stage(3).train()
    _, batch = _tiny_batch(model)
    joint_loss(model, batch)["loss"].backward()
    assert seen and set(seen) == {"augment"}

def test_measure_once_and_remember(monkeypatch):
    E._MEASURED.clear()
    ref, fast = _pair("tiny", attention="measure")
    x = _images(ref, 1)
    with torch.no_grad(): got, expected = fast(x), ref(x)
    assert rel_err(got, expected) < 1e-5
    table = json.loads(E.attention_cache_file().read_text())
    (key, rec), = table[E.device_name("cpu")].items()
    assert "|infer" in key and rec["attention"] in rec["seconds"] and rec["attention"] in ("mask", "augment", "math")
    E._MEASURED.clear()
    monkeypatch.setattr(E, "_time_path", lambda *a, **k: pytest.fail("timed again"))
    with torch.no_grad(): fast(x)                          # a new process reads the file instead of timing again
    E._MEASURED.clear()

def test_measure_picks_the_fastest(monkeypatch):
    E._MEASURED.clear()
    times = {"mask": 3.0, "augment": 1.0, "math": 2.0}
    monkeypatch.setattr(E, "_time_path", lambda enc, x, m, training, iters: times[m])
    ref, fast = _pair("tiny")
    assert E.measure_attention(fast, _images(ref, 1)) == "augment"
    times["augment"] = 9.0
    assert E.measure_attention(fast, _images(ref, 1)) == "augment"          # remembered
    assert E.measure_attention(fast, _images(ref, 1), force=True) == "math"  # re-measured on request
    E._MEASURED.clear()

def test_count_flops_fused_attention_and_gqa():
    "torch's counter sees no CPU SDPA kernel (0 FLOPs) and raised on grouped-query attention in torch 2.11."
    q = torch.randn(2, 8, 64, 32, requires_grad=True)
    k, v = torch.randn(2, 2, 64, 32, requires_grad=True), torch.randn(2, 2, 64, 32, requires_grad=True)
    fwd = E.count_flops(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert fwd == E.attention_flops(q.shape, k.shape, v.shape) == 2*2*8*64*64*64
    both = E.count_flops(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True).sum().backward())
    assert both - fwd == 2*2*8*64*64*(3*32 + 2*32)

def test_count_flops_fast_encoder_as_reference():
    from torch.utils.flop_counter import FlopCounterMode
    ref, fast = _pair("tiny", attention="augment")
    x = _images(ref, 1)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc: ref(x)
        assert E.count_flops(fast, x, modules=fast) == fc.get_total_flops()
    assert fast.attention == "augment"

def test_train_step_flops_count_the_llm_attention():
    "bench/train_step.py's FLOPs of a joint step with the tiny (grouped-query) LLM include its attention."
    from torch.utils.flop_counter import FlopCounterMode
    ts = _bench("train_step")
    model = ts.build("ullsam", True, torch.device("cpu"), None)
    assert model.vlk.llm.config.num_key_value_heads < model.vlk.llm.config.num_attention_heads
    use_fast_encoder(model.sam)
    batch = ts.make_batch(model, 1, True)
    step = ts.step_fn(model, batch, torch.device("cpu"), autocast=False, fused=False)
    ours = ts.flops_of(step, model)
    with FlopCounterMode(display=False) as fc: step()
    assert ours > fc.get_total_flops() > 0

@pytest.mark.parametrize("mode", ["baseline", "ullsam", "frozen_vlk"])
def test_every_mode_trains_and_evaluates_with_the_fast_encoder(mode):
    "The CPU twin of the notebook's `#| cuda` cell: two joint steps and a point-prompt evaluation per mode."
    from ullsam_nb.model import ULLSAM, joint_loss
    from ullsam_nb.model_config import UllsamConfig
    from ullsam_nb.data import load_pairs
    from ullsam_nb.evaluate import evaluate_models
    model = ULLSAM.from_config(UllsamConfig(sam="tiny", llm="tiny", mode=mode, fast_encoder=True)).set_stage(3).train()
    assert isinstance(model.sam.image_encoder, FastImageEncoder)
    pairs, batch = _tiny_batch(model)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    for _ in range(2):
        loss = joint_loss(model, batch)["loss"]
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss)
    per_image, _ = evaluate_models({mode: model.eval()}, load_pairs(pairs)[0], protocols=("point",), progress_bar=False)
    assert len(per_image) == 2 and per_image["dice"].notna().all()

@slow
def test_gpu_tests_script_cpu_smoke(tmp_path):
    "bench/gpu_tests.sh --cpu-smoke runs every stage at tiny size and writes the summary JSON and one JSON per bench."
    r = subprocess.run(["bash", "bench/gpu_tests.sh", "--cpu-smoke"], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)},
                       capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path/"gpu_tests.json").read_text())
    assert r.returncode == 0 and summary["passed"], r.stdout[-3000:] + r.stderr[-3000:]
    assert set(summary["stages"]) == {"cuda", "pretrain", "encoder_b", "encoder_lh", "train_step", "vlk"}
    ts = summary["stages"]["train_step"]["result"]
    assert all(row["tflop_per_step"] > 0 for row in ts["rows"])
    assert len(list(tmp_path.iterdir())) <= 8                       # what the device tool brings back
