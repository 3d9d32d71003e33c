"Full-size (ViT-B) checkpoint layouts: official SAM, micro-sam (nested, `sam.`/`module.sam.` prefixes, decoder_state), ours."
import pytest, torch
from pathlib import Path
from ullsam_nb.sam import (build_sam, load_checkpoint, read_checkpoint, save_model, load_model, CheckpointMismatchError,
                           model_identity)

@pytest.fixture(scope="module")
def vit_b_random():
    "A ViT-B SAM and a full-size random state dict for it (different from the model's own weights)."
    model = build_sam("vit_b", device="cpu")
    g = torch.Generator().manual_seed(123)
    state = {k: torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v.clone()
             for k, v in model.state_dict().items()}
    return model, state

def _same(model, state):
    own = model.state_dict()
    assert set(own) == set(state)
    return all(torch.equal(own[k], state[k]) for k in state)

def test_official_layout(vit_b_random, tmp_path):
    model, state = vit_b_random
    torch.save(state, tmp_path/"sam_vit_b_01ec64.pth")
    extras = load_checkpoint(model, tmp_path/"sam_vit_b_01ec64.pth")
    assert extras["format"] == "sam" and _same(model, state)
    mismatch = build_sam("tiny", device="cpu")
    with pytest.raises(CheckpointMismatchError) as e: load_checkpoint(mismatch, tmp_path/"sam_vit_b_01ec64.pth")
    msg = str(e.value)
    assert "sam_vit_b_01ec64.pth" in msg and "shape conflicts" in msg and "unexpected keys: image_encoder.blocks.10" in msg

@pytest.mark.parametrize("prefix,with_decoder", [("sam.", True), ("", False), ("module.sam.", True)])
def test_micro_sam_layouts(vit_b_random, tmp_path, prefix, with_decoder):
    model, state = vit_b_random
    ckpt = {"model_state": {prefix + k: v for k, v in state.items()}, "epoch": 7}
    if with_decoder: ckpt["decoder_state"] = {"base.0.weight": torch.ones(3, 3), "out_conv.bias": torch.zeros(3)}
    torch.save(ckpt, tmp_path/"vit_b_lm.pt")
    with torch.no_grad():
        for p in model.parameters(): p.zero_()
    extras = load_checkpoint(model, tmp_path/"vit_b_lm.pt")
    assert extras["format"] == "micro_sam" and extras["epoch"] == 7 and _same(model, state)
    if with_decoder: assert torch.equal(extras["decoder_state"]["base.0.weight"], torch.ones(3, 3))

def test_own_layout_and_identity(vit_b_random, tmp_path):
    model, state = vit_b_random
    model.load_state_dict(state)
    path = save_model(model, tmp_path/"run", "epoch_1")
    assert path.name == "epoch_1.safetensors" and (tmp_path/"run"/"epoch_1.json").exists()
    assert not [p for p in (tmp_path/"run").iterdir() if p.name.startswith(".")]   # atomic: no temp files left
    loaded = load_model(tmp_path/"run", device="cpu")
    assert _same(loaded, state)
    assert model_identity(loaded) == model_identity(model) and model_identity(loaded).startswith("vit_b-")
    sd, extras = read_checkpoint(path)
    assert extras["format"] == "ullsam" and len(sd) == len(state)

def test_missing_keys_named(vit_b_random, tmp_path):
    model, state = vit_b_random
    bad = {k: v for k, v in state.items() if not k.startswith("mask_decoder.iou_prediction_head")}
    bad["prompt_encoder.not_a_weight"] = torch.zeros(2)
    torch.save({"model_state": bad}, tmp_path/"broken.pt")
    with pytest.raises(CheckpointMismatchError) as e: load_checkpoint(model, tmp_path/"broken.pt")
    msg = str(e.value)
    assert "broken.pt" in msg and "missing keys: mask_decoder.iou_prediction_head" in msg and "prompt_encoder.not_a_weight" in msg

def test_shipped_weights_resave_bit_identical(tmp_path):
    "The shipped weights, saved again in two fresh processes, are the very file the registry's sha256 names (safetensors orders metadata at random)."
    import json, subprocess, sys
    from ullsam_nb.basics import hash_file
    from ullsam_nb.sam import weights_dir
    code = ("import sys; from pathlib import Path; from ullsam_nb.sam import load_model, save_model; m = load_model(sys.argv[1]); "
            "[save_model(m, Path(sys.argv[2])/str(k), 'sam_small') for k in range(8)]")
    shipped = weights_dir()/"sam_small.safetensors"
    want = json.loads((weights_dir()/"sam_small.json").read_text())["sha256"]
    subprocess.run([sys.executable, "-c", code, str(shipped), str(tmp_path)], check=True, capture_output=True)
    assert {hash_file(tmp_path/str(k)/"sam_small.safetensors") for k in range(8)} == {want}
