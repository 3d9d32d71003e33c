"""Zeus's instruction path: vision tower per modality -> trainable 2-layer MLP -> frozen causal LM, built from tiny configs of the
real transformers classes, saved and reloaded from folders, trained on the handbook's text, used as a backend and by `ullsam zeus`."""
import json
import numpy as np
import pytest
import torch
from ullsam_nb.basics import InputError
from ullsam_nb.vlm_text import render_prompt
from ullsam_nb.basics import torch_threads
from ullsam_nb.zeus_world import phantom_cases, PHANTOM_MODALITIES
from ullsam_nb.zeus import case_instructions, modality_instructions, zeus_cmd
from ullsam_nb.zeus_instructions import (ZeusInstructionWriter, ClipLLMBackend, tiny_instruction_writer, handbook_examples,
                                         fit_projector, load_vision_tower, SHARED_TOWER)

T2 = "T2-weighted MRI"


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path / "cache"))
    with torch_threads(1): yield


@pytest.fixture(scope="module")
def cases(): return phantom_cases(3, seed=2)


def _prompt(m=T2): return render_prompt("zeus", modality=m, instance="the lesion")


def test_parts_frozen_shapes_and_greedy(cases):
    w = tiny_instruction_writer(seed=1)
    assert [type(t).__name__ for t in w.towers] == ["CLIPVisionModel"] * 3 and type(w.llm).__name__ == "LlamaForCausalLM"
    img = cases[0].images[1]
    assert w.prefix([img, img], T2).shape == (2, 17, w.llm.config.hidden_size)
    trainable = {n for n, p in w.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)
    assert [type(m).__name__ for m in w.projector] == ["Linear", "GELU", "Linear"]
    a = w.write([img], T2, _prompt(), 16)
    assert a == w.write([img], T2, _prompt(), 16) and isinstance(a[0], str) and a[0]
    with pytest.raises(InputError, match="features must be"): ZeusInstructionWriter({"x": w.towers[0]}, w.llm, w.tokenizer, w.image_processor, "mean")


def test_save_reload_with_the_real_loaders(cases, tmp_path):
    w = tiny_instruction_writer(seed=3, vision="siglip", shared=True)
    folder = w.save_pretrained(tmp_path / "writer")
    assert (folder / "writer.json").exists() and (folder / "llm" / "config.json").exists() and (folder / "towers" / "0" / "config.json").exists()
    assert type(load_vision_tower(folder / "towers" / "0")).__name__ == "SiglipVisionModel"
    w2 = ZeusInstructionWriter.from_pretrained(folder)
    assert w2.modalities == (SHARED_TOWER,) and type(w2.llm).__name__ == "LlamaForCausalLM"
    img = cases[1].images[2]
    assert w2.write([img], "CT", _prompt("CT"), 12) == w.write([img], "CT", _prompt("CT"), 12)
    with pytest.raises(InputError, match="no writer.json"): ZeusInstructionWriter.from_pretrained(tmp_path)


def test_mlp_training_lowers_the_loss_and_leaves_the_llm(cases):
    w = tiny_instruction_writer(seed=0)
    ex = [e for e in handbook_examples(cases) if e[1] == T2]
    assert len(ex) == 3 and ex[0][3].startswith("On T2-weighted MRI the lesion") and "brightest region" in ex[0][3]
    loss = lambda: w.loss([e[0] for e in ex], T2, ex[0][2], [e[3] for e in ex]).item()
    frozen = {k: v.clone() for k, v in [*w.llm.state_dict().items(), *w.towers.state_dict().items()]}
    proj = {k: v.clone() for k, v in w.projector.state_dict().items()}
    before = loss()
    fit_projector(w, ex, steps=6, lr=1e-2)
    assert loss() < before - 0.05
    assert all(torch.equal(v, {**w.llm.state_dict(), **w.towers.state_dict()}[k]) for k, v in frozen.items())
    assert not all(torch.equal(v, w.projector.state_dict()[k]) for k, v in proj.items())


def test_as_a_backend_for_the_zeus_functions(cases):
    b = ClipLLMBackend(tiny_instruction_writer(seed=0))
    per = case_instructions(b, cases, max_new_tokens=8)
    assert len(per) == 3 and all(set(d) == set(PHANTOM_MODALITIES) for d in per)
    assert len({d["T2-like"] for d in per}) > 1                        # each case's own slice goes in
    assert set(modality_instructions(b, cases, max_new_tokens=8)) == set(PHANTOM_MODALITIES)
    ident = b.identity
    fit_projector(b.writer, handbook_examples(cases[:1]), steps=1)
    assert b.identity != ident and b.identity.split(":")[0] == "clip-llm"     # a trained MLP never reads the old cache
    with pytest.raises(InputError, match="names no modality"): b.chat(cases[0].images[0], "Describe the image.", 4)


def test_zeus_cmd_with_the_clip_llm_writer(tmp_path, capsys):
    w = tiny_instruction_writer(seed=4)
    w.save_pretrained(tmp_path / "writer")
    assert zeus_cmd(quick=True, steps=1, out=str(tmp_path / "o"), backend="clip-llm", model=str(tmp_path / "writer"),
                    instructions="per_modality") == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["llm"][0].startswith(f"clip-llm:{tmp_path / 'writer'}#") and len(res["table"]) == 6 + 4      # 6 models, 4 floor rows
    assert set(json.loads((tmp_path / "o" / "instructions.json").read_text())["per_modality"]) == set(PHANTOM_MODALITIES)
    assert "by clip-llm:" in capsys.readouterr().out
