"""Zeus: the phantom and its floors, instruction generation + cache, text encoder, the three fusion variants, training, the CLI function."""
import json
import numpy as np
import pytest
import torch
from ullsam_nb.basics import InputError
from ullsam_nb.vlm_backend import CallableVLM
from ullsam_nb.basics import torch_threads
from ullsam_nb.zeus_world import (PHANTOM_MODALITIES, TISSUES, ZeusCase, zeus_phantom, phantom_cases, phantom_anatomy, target_contrast,
                                    zeus_floors, floor_rows, otsu_rule)
from ullsam_nb.zeus_data import load_nifti_case
from ullsam_nb.zeus import (FUSIONS, ZeusModel, handbook_backend, handbook_instruction, modality_instructions, tiny_text_encoder,
                            train_zeus, count_parameters, zeus_cmd, zeus_compare, zeus_loss)

@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1): yield

@pytest.fixture(scope="module")
def cases(): return phantom_cases(10, seed=5)

@pytest.fixture(scope="module")
def text(cases):
    return tiny_text_encoder().embed(list(modality_instructions(handbook_backend(), cases, cache=False).values()))

def test_phantom_is_deterministic_and_coregistered():
    a, b = zeus_phantom(11), zeus_phantom(11)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.target, b.target)
    assert a.images.shape == (3, 64, 64) and a.images.min() >= 0 and a.images.max() <= 1
    assert not np.array_equal(a.images, zeus_phantom(12).images)
    assert zeus_phantom(11, size=96).target.shape == (96, 96)
    with pytest.raises(InputError, match="unknown phantom modality"): zeus_phantom(1, modalities=("PET",))

def test_target_visibility_per_modality(cases):
    "Bright in T2, dark in T1, barely visible in CT; and every case has a cyst, bright in T2 and dark in T1 like the lesion."
    vis = {m: np.array([target_contrast(c, m) for c in cases]) for m in PHANTOM_MODALITIES}
    assert (vis["T2-like"] > 2).all() and (vis["T1-like"] < -1).all() and np.abs(vis["CT-like"]).mean() < 1.5, vis
    for c in cases:
        cyst = phantom_anatomy(c.params["seed"]) == TISSUES.index("cyst")
        t1, t2, ct = c.images
        assert cyst.any() and abs(t2[cyst].mean() - t2[c.target].mean()) < 0.2 and abs(t1[cyst].mean() - t1[c.target].mean()) < 0.12
        assert ct[c.target].mean() - ct[cyst].mean() > 0.12                     # only CT tells them apart


def test_floors_are_classical_and_well_below_one(cases):
    "27 Otsu rules per the test cases; no single-modality rule comes near the lesion (the old phantom's best rule scored 0.99)."
    fl = zeus_floors(cases)
    assert len(fl) == 27 and set(fl.modality) == set(PHANTOM_MODALITIES) and fl.DSC.is_monotonic_decreasing
    assert fl.DSC.max() < 0.7, fl.head()
    rows = floor_rows(fl)
    assert [r["instructions"].split(":")[0] for r in rows[:3]] == list(dict.fromkeys(fl.modality))
    assert rows[-1]["DSC"] == fl.DSC.max() and rows[-1]["instructions"].startswith("best of 27 rules")
    img = np.zeros((16, 16), np.float32); img[4:9, 4:9] = 1; img[12:14, 12:14] = 1
    assert otsu_rule(img, 2, -1).sum() == 25 and otsu_rule(img, 2, 0).sum() == 256 - 29

def test_instruction_cache(cases, tmp_path, monkeypatch):
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path))
    calls = []
    def fn(image, prompt, n): calls.append(prompt); return handbook_instruction(prompt)
    first = modality_instructions(CallableVLM(fn, name="h"), cases, instance="the tumour")
    again = modality_instructions(CallableVLM(fn, name="h"), cases, instance="the tumour")
    assert first == again and len(calls) == 3
    assert "Imaging modality: CT." in calls[2] and "the tumour" in calls[2]
    assert first["T2-like"].startswith("On T2-weighted MRI the tumour")
    modality_instructions(CallableVLM(fn, name="h"), cases, instance="the organ")             # a new instance is a new prompt
    assert len(calls) == 6

def test_text_encoder_deterministic():
    a, b = tiny_text_encoder(), tiny_text_encoder()
    texts = ["On CT bone is very bright.", "On T2-weighted MRI the lesion is bright."]
    assert torch.equal(a.embed(texts), b.embed(texts)) and a.embed(texts).shape == (2, a.dim)
    assert not a.embed(texts).requires_grad

@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("use", [True, False])
def test_fusion_variant_shapes_gradients_step(fusion, use, cases, text):
    model = ZeusModel(3, fusion, text.shape[-1], use_instructions=use)
    x = torch.from_numpy(np.stack([c.images for c in cases[:2]]))
    y = torch.from_numpy(np.stack([c.target for c in cases[:2]])[:, None].astype(np.float32))
    t = text.expand(2, -1, -1) if use else None
    logits = model(x, t)
    assert logits.shape == (2, 1, 64, 64)
    zeus_loss(logits, y).backward()
    enc_grads = [p.grad for e in model.encoders for p in e.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in enc_grads)
    assert (model.project.weight.grad.abs().sum() > 0) if use else model.project is None
    if fusion == "late": assert model.late_logits.grad is not None
    if fusion == "hybrid": assert len(model.encoders) == 3 and model.fuse.weight.grad is not None
    r = train_zeus(fusion, use, cases[:4], cases[4:6], text, steps=1, batch_size=2)        # one step of the shared loop
    assert r["steps"] == 1 and 0 <= r["DSC"] <= 1 and 0 <= r["mIoU"] <= 1

def test_parameter_counts_order():
    n = {f: count_parameters(ZeusModel(3, f)) for f in FUSIONS}
    assert n["late"] < n["early"] < n["hybrid"]
    assert count_parameters(ZeusModel(3, "late")) - count_parameters(ZeusModel(3, "late", use_instructions=False)) == 32 * 32 + 32

def test_instructions_change_the_prediction(text):
    m = ZeusModel(3, "early").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert not torch.allclose(m(x, text[None]), m(x, text[None] + 1))
        assert torch.allclose(m(x, text[None]), m(x, text[None].flip(1)), atol=1e-5)   # sparse tokens carry no position: order-free
    with pytest.raises(InputError, match="pass text embeddings"): m(x, None)
    with pytest.raises(InputError, match="built for 3 modalities"): m(torch.rand(1, 2, 64, 64), text[None])

def test_training_beats_the_floor(text):
    "A short run of early fusion beats the best classical rule on the same test cases, in the same comparison table."
    more = phantom_cases(80, seed=9)
    tab, _ = zeus_compare(more[:64], more[64:], text, fusions=("early",), instructions=(True,), steps=150, batch_size=8, lr=3e-3)
    model, floor = tab[tab.fusion == "early"].DSC.iloc[0], tab[tab.fusion == "floor"].DSC.max()
    assert len(tab) == 1 + 4 and model > floor + 0.1, tab

def test_case_checks_and_nifti_optional(tmp_path):
    with pytest.raises(InputError, match="one modality name each"): ZeusCase(np.zeros((2, 4, 4), np.float32), ("a",), np.zeros((4, 4), bool))
    try: import nibabel as nib
    except ImportError:
        with pytest.raises(InputError, match="pip install nibabel"): load_nifti_case({"T1": tmp_path/"t1.nii.gz"}, tmp_path/"l.nii.gz")
        return
    vol = np.random.default_rng(0).random((8, 8, 5)).astype(np.float32); lab = np.zeros((8, 8, 5), np.uint8); lab[2:5, 2:5, 3] = 1
    for n, v in [("t1", vol), ("t2", vol * 2), ("l", lab)]: nib.save(nib.Nifti1Image(v, np.eye(4)), str(tmp_path/f"{n}.nii.gz"))
    c = load_nifti_case({"T1": tmp_path/"t1.nii.gz", "T2": tmp_path/"t2.nii.gz"}, tmp_path/"l.nii.gz")
    assert c.images.shape == (2, 8, 8) and c.target.sum() == 9 and c.params["slice"] == 3

def test_zeus_cmd_writes_results(tmp_path, capsys):
    assert zeus_cmd(quick=True, steps=2, out=str(tmp_path)) == 0
    res = json.loads((tmp_path/"results.json").read_text())
    models = [r for r in res["table"] if r["fusion"] != "floor"]
    assert len(models) == 9 and {r["fusion"] for r in models} == set(FUSIONS)            # fusion x {per_case, per_modality, none}
    assert {r["instructions"] for r in models} == {"per_case", "per_modality", "none"}
    floors = [r for r in res["table"] if r["fusion"] == "floor"]
    assert len(floors) == 4 and floors[-1]["instructions"].startswith("best of 27 rules") and res["floor_DSC"] == floors[-1]["DSC"] < 0.7
    written = json.loads((tmp_path/"instructions.json").read_text())
    per_case = written["per_case"]                                                 # one instruction per case and modality
    assert len(per_case) == 80 and all(set(d) == set(PHANTOM_MODALITIES) for d in per_case.values())
    assert len({d["T2-like"] for d in per_case.values()}) > 3 and res["instructions"] == "both"
    assert set(written["per_modality"]) == set(PHANTOM_MODALITIES)
    out = capsys.readouterr().out
    assert (tmp_path/"predictions.png").stat().st_size > 0 and "| fusion |" in out and "| floor |" in out and "floor (best classical rule" in out
    with pytest.raises(InputError, match="unknown Zeus preset"): zeus_cmd(preset="brats")
    with pytest.raises(InputError, match="needs --data"): zeus_cmd(preset="msd")


def test_case_instructions_come_from_each_case(cases):
    "Per case: the instruction about a case's T2 slice says where its lesion is; the dataset-level way says the same for all."
    from scipy import ndimage as ndi
    from ullsam_nb.zeus import case_instructions, _VERTICAL, _HORIZONTAL, _bin
    per = case_instructions(handbook_backend(per_case=True), cases, cache=False)
    assert len(per) == len(cases) and len({d["T2-like"] for d in per}) > 3
    hits = sum(f"lies {_VERTICAL[_bin(cy / 64 - 0.5)]} and {_HORIZONTAL[_bin(cx / 64 - 0.5)]} the image centre" in d["T2-like"]
               for c, d in zip(cases, per) for cy, cx in [ndi.center_of_mass(c.target)])
    assert hits >= 5, hits                  # one of the two bright T2 regions is the lesion, the other a cyst
    flat = modality_instructions(handbook_backend(), cases, cache=False)
    assert "image centre" not in flat["T2-like"] and "image centre" in per[0]["T2-like"]


def test_zeus_cmd_per_modality_and_a_chosen_text_encoder(tmp_path):
    "--instructions per_modality restores the dataset-level instructions; --text-encoder loads any Hugging Face encoder folder."
    from transformers import BertConfig, BertModel
    enc = tiny_text_encoder(hidden_size=16)
    folder = tmp_path / "my_bert"
    BertModel(BertConfig(vocab_size=len(enc.tokenizer), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32), add_pooling_layer=False).save_pretrained(folder)
    enc.tokenizer.save_pretrained(folder)
    assert zeus_cmd(quick=True, steps=1, out=str(tmp_path / "o"), instructions="per_modality", text_encoder=str(folder)) == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["text_encoder"] == str(folder) and res["instructions"] == "per_modality"
    assert {r["instructions"] for r in res["table"] if r["fusion"] != "floor"} == {"per_modality", "none"}
    assert set(json.loads((tmp_path / "o" / "instructions.json").read_text())["per_modality"]) == set(PHANTOM_MODALITIES)
    with pytest.raises(InputError, match="per_case, per_modality or both"): zeus_cmd(quick=True, instructions="sometimes")
