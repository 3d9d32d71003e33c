"""ullsam_nb.model on CPU with the tiny SAM + tiny LLM: every mode's shapes, baseline == plain SAM, encoder once,
gradients per stage, save/load, checkpoints (official layout at full size: set ULLSAM_SLOW=1)."""
import os
import numpy as np
import pytest
import torch
from ullsam_nb.basics import InputError
from ullsam_nb.data import InstanceDataset, collate_instances, folder_pairs
from ullsam_nb.io import read_image, read_labels
from ullsam_nb.model import ULLSAM, joint_forward, joint_loss
from ullsam_nb.model_config import MODES, PARTS, UllsamConfig, stage_name
from ullsam_nb.prompts import ullsam_prompts
from ullsam_nb.sam import build_sam
from ullsam_nb.decode import decode_prompts, prompts_to_input
from ullsam_nb.segmenter import segment_prompts
from ullsam_nb.sbr import sbr_prompt_sampler
from ullsam_nb.synth import make_world
from ullsam_nb.vlsa import no_mask_dense_prompt

slow = pytest.mark.skipif(not os.environ.get("ULLSAM_SLOW"), reason="slow: set ULLSAM_SLOW=1")


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("model_cache")


@pytest.fixture(autouse=True)
def _shared_model_cache(module_cache, monkeypatch):
    "One cache folder for this module (still a temp dir), so the tiny LLM is built once, not per test."
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(module_cache))
    monkeypatch.setenv("ULLSAM_QUIET", "1")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return folder_pairs(make_world(tmp_path_factory.mktemp("w") / "world", n=2, seed=0, size=96))


@pytest.fixture(scope="module")
def batch(world):
    ds = InstanceDataset(world, max_instances=4, prompt_sampler=sbr_prompt_sampler, sam_size=256, mode="ullsam")
    return collate_instances([ds[0], ds[1]])


def make(mode, **kw):
    return ULLSAM.from_config(UllsamConfig(mode=mode, **kw))


@pytest.mark.parametrize("mode", MODES)
def test_shapes_every_mode(mode, batch):
    m = make(mode)
    out = joint_forward(m, batch)
    n = int(batch["n_instances"].sum())
    assert out["logits"].shape == out["targets"].shape == (n, 256, 256)
    assert out["iou"].shape == (n,) and out["counts"].tolist() == batch["n_instances"].tolist()
    assert set(out["targets"].unique().tolist()) <= {0.0, 1.0}
    emb, vlk = m.image_features(batch["input_image"])
    assert emb.shape == (2, 64, 16, 16)
    assert (vlk is None) == (mode == "baseline")
    if vlk is not None: assert vlk.shape == emb.shape
    r = joint_loss(m, batch, boundary_weight=0.5)
    assert set(r) == {"loss", "bce", "dice", "boundary", "n_instances"} and torch.isfinite(r["loss"])
    multi = m.forward_instances(batch["input_image"], batch["prompts"], batch["info"], multimask=True)
    assert multi["logits"].shape == (n, 3, 256, 256) and multi["iou"].shape == (n, 3)


def test_baseline_is_plain_sam(world, batch):
    base, plain = make("baseline"), build_sam("tiny", seed=0)
    image, labels = read_image(world[0].image_path), read_labels(world[0].mask_path)
    ps = ullsam_prompts(labels, seed=1)
    m0, s0 = segment_prompts(plain, image, points=ps.points, point_labels=ps.point_labels, mode="ullsam", cache=False)
    m1, s1 = base.segment(image, points=ps.points, point_labels=ps.point_labels)
    assert torch.equal(m0, m1) and torch.allclose(s0, s1)
    with torch.no_grad():
        out = joint_forward(base, batch)["logits"]
        emb = plain.image_encoder(batch["input_image"])
        info, p = batch["info"][0], batch["prompts"][0]
        c, l, _ = prompts_to_input(info, p.points, p.point_labels, None)
        low, _ = decode_prompts(plain, emb[:1], c, l, None)
        ref = torch.nn.functional.interpolate(low, (256, 256), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(out[: len(p)], ref, atol=1e-6)


def test_dense_prompt_replaces_no_mask_embed(world):
    m = make("ullsam")
    _, _, dense = m.prepare_image(read_image(world[0].image_path))
    nm = no_mask_dense_prompt(m.sam.prompt_encoder)
    assert dense.shape == nm.shape and not torch.allclose(dense, nm)
    # the VLSA map is LN(vlk)*s+b: per position, channel mean b and std |s|
    assert torch.allclose(dense.mean(1), torch.zeros(1, 16, 16), atol=1e-5)
    assert torch.allclose(dense.std(1, unbiased=False), torch.full((1, 16, 16), 0.1), atol=1e-3)


@pytest.mark.parametrize("mode", ["baseline", "ullsam"])
def test_encoder_runs_once(mode, batch, world):
    m = make(mode)
    calls = []
    h = m.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    joint_loss(m, batch)["loss"].backward()
    assert len(calls) == 1                       # one batched call for both images and both branches
    m.segment(read_image(world[0].image_path), points=np.array([[10.0, 10.0]]))
    assert len(calls) == 2
    h.remove()


def test_frozen_vlk_caches_and_matches_ullsam(batch):
    a, f = make("ullsam"), make("frozen_vlk")
    calls = []
    f.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        la, lf = joint_forward(a, batch)["logits"], joint_forward(f, batch)["logits"]
        joint_forward(f, batch)
    assert torch.allclose(la, lf, atol=1e-5)
    assert len(calls) == 1 and len(f._features) == 2        # second pass served from the cache
    key = f.frozen_fingerprint()
    with torch.no_grad(): f.vlk.mlp1[1].weight.add_(0.01)   # frozen weights changed -> new key, recomputed
    assert f.frozen_fingerprint() != key
    with torch.no_grad(): joint_forward(f, batch)
    assert len(calls) == 2


def _grad_parts(m):
    "Parts with at least one nonzero gradient, and the names of parameters with a gradient."
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    parts = {name for name, mod in m.parts().items() for p in mod.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return parts, with_grad


@pytest.mark.parametrize("mode,stage", [("baseline", 3), ("ullsam", 1), ("ullsam", 2), ("ullsam", 3),
                                        ("frozen_vlk", 1), ("frozen_vlk", 3)])
def test_gradients_reach_exactly_the_stage_parts(mode, stage, batch):
    m = make(mode).set_stage(stage).train()
    trainable = {n for n, _ in m.named_trainable_parameters()}
    assert all(p.requires_grad == (n in trainable) for n, p in m.named_parameters())
    if stage == 3: loss = joint_loss(m, batch, boundary_weight=1.0)["loss"]
    else: loss = m.caption_loss(batch["input_image"], batch["caption"])
    loss.backward()
    parts, with_grad = _grad_parts(m)
    assert parts == set(m.stage_parts())          # every trained part gets gradient ...
    assert with_grad <= trainable                 # ... and nothing frozen does
    assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
    if mode == "ullsam" and stage == 3: assert "mlp1" in parts and "llm" not in parts   # through the frozen LLM
    for name, mod in m.parts().items():           # frozen parts stay in eval mode while training
        assert mod.training == (name in m.stage_parts())


def test_stage_policy_errors():
    with pytest.raises(InputError, match="has no stage"): make("baseline").set_stage(2)
    with pytest.raises(InputError, match="no LLM"): make("baseline").caption_loss(torch.zeros(1, 3, 256, 256), ["x"])
    assert stage_name("2") == "caption_sft"
    cfg = UllsamConfig(stage_parts={"joint": ["mask_decoder"]})
    m = ULLSAM.from_config(cfg)
    assert {n.split(".")[1] for n, _ in m.named_trainable_parameters()} == {"mask_decoder"}


@pytest.mark.parametrize("mode", MODES)
def test_save_load_round_trip(mode, batch, tmp_path, world):
    m = make(mode).set_stage(3)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in m.trainable_parameters(): p.add_(0.01 * torch.randn_like(p))
    m.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    r = ULLSAM.load(tmp_path)
    assert r.config == m.config
    sd0, sd1 = m.state_dict(), r.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    with torch.no_grad():
        assert torch.equal(joint_forward(m, batch)["logits"], joint_forward(r, batch)["logits"])
    image = read_image(world[1].image_path)
    a, b = m.segment(image, points=np.array([[20.0, 30.0]])), r.segment(image, points=np.array([[20.0, 30.0]]))
    assert torch.equal(a[0], b[0])


def test_load_as_frozen_vlk_and_errors(tmp_path):
    m = make("ullsam"); m.save(tmp_path / "a")
    f = ULLSAM.load(tmp_path / "a", mode="frozen_vlk")
    assert f.config.mode == "frozen_vlk" and "image_encoder" not in f.stage_parts(3)
    with pytest.raises(InputError, match="config.json missing"): ULLSAM.load(tmp_path / "nothing")
    b = make("baseline"); b.save(tmp_path / "b")
    with pytest.raises(InputError, match="do not fit"): ULLSAM.load(tmp_path / "b", mode="ullsam")


def test_config_json(tmp_path):
    cfg = UllsamConfig(mode="frozen_vlk", preprocess="sam", s_init=0.2, llm_overrides={"num_hidden_layers": 2})
    assert UllsamConfig.from_json(cfg.to_json(tmp_path / "c.json")) == cfg
    with pytest.raises(InputError, match="preprocess"): UllsamConfig(preprocess="imagenet")
    with pytest.raises(InputError, match="image_size"): ULLSAM.from_config(UllsamConfig(mode="baseline", image_size=1024))


def test_sam_preprocessing_and_input_frame_prompts(world):
    m = make("ullsam", preprocess="sam")
    image = read_image(world[0].image_path)
    masks, scores = m.segment(image, points=np.array([[40.0, 40.0]]), point_labels=np.array([1]))
    assert masks.shape == (1, *image.shape[:2])
    out = m.forward_instances([image], [dict(points=np.array([[[50.0, 50.0]]]))])   # input-frame prompts, labels default 1
    assert out["logits"].shape == (1, 256, 256)


def test_micro_sam_checkpoint(tmp_path, batch):
    src = build_sam("tiny", seed=3)
    torch.save({"model_state": {"sam." + k: v for k, v in src.state_dict().items()}, "epoch": 1}, tmp_path / "best.pt")
    m = ULLSAM.from_config(UllsamConfig(mode="ullsam", sam_checkpoint=str(tmp_path / "best.pt")))
    assert all(torch.equal(v, m.sam.state_dict()[k]) for k, v in src.state_dict().items())


@slow
def test_official_vit_b_checkpoint(tmp_path):
    src = build_sam("vit_b", seed=7)
    torch.save(src.state_dict(), tmp_path / "sam_vit_b_01ec64.pth")
    m = ULLSAM.from_config(UllsamConfig(sam="vit_b", mode="ullsam", sam_checkpoint=str(tmp_path / "sam_vit_b_01ec64.pth")))
    sd = m.sam.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in src.state_dict().items())
    assert m.image_size == 1024 and m.vlk.mlp1[0].normalized_shape == (1024,)
    with torch.no_grad():
        vlk = m.vlk(torch.randn(1, 256, 64, 64))
        assert m.vlsa(vlk).shape == (1, 256, 64, 64)


def test_forward_dispatches_on_stage(batch):
    m = make("ullsam").set_stage(1)
    assert set(m(batch)) == {"loss"}
    m.set_stage(3)
    assert set(m(batch)) == {"loss", "bce", "dice", "boundary", "n_instances"}


def test_frozen_features_on_cpu(batch):
    f = make("frozen_vlk"); f.feature_cache_device = "cpu"
    with torch.no_grad(): joint_forward(f, batch)
    assert all(e.device.type == "cpu" for e, _ in f._features.values())


def test_ddp_one_process(batch, tmp_path):
    "The model trains under DistributedDataParallel (gloo, 1 process) through `forward`, in the joint stage."
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path/'store'}", rank=0, world_size=1)
    try:
        m = make("ullsam").set_stage(3).train()
        ddp = DDP(m, find_unused_parameters=True)
        ddp(batch)["loss"].backward()
        assert m.vlsa.s.grad is not None and m.vlk.mlp1[1].weight.grad is not None
    finally: dist.destroy_process_group()


def test_frozen_cache_survives_training_steps(batch):
    "Optimizer steps on what frozen_vlk trains (mlp2, s, b, prompt encoder, decoder) keep the cache valid: no new encoder call."
    f = make("frozen_vlk").set_stage(3).train()
    calls = []
    f.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    opt = torch.optim.AdamW(f.trainable_parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad(); out = f(batch); out["loss"].backward(); opt.step(); losses.append(out["loss"].item())
    assert len(calls) == 1 and len(f._features) == 2
    assert losses[-1] < losses[0]
