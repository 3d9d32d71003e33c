"""The paper's configuration end to end on the CPU: `ullsam train --stages 1,2,3` chains the stages (each from the previous
one's model), the `paper` preset chains them and records its world size, `--llm` takes an InternVL checkpoint."""
import json, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from ullsam_nb.basics import InputError
from ullsam_nb.cli import main
from ullsam_nb.synth import make_world
from ullsam_nb.stages import load_config, stage_configs, check_world_size, PRESETS

SMALL = "max_train_images=2,max_val_images=1,batch_size=2,validate=false"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("w") / "world", n=6, seed=3, size=96)


def _part(sd, prefix):
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stages_chain_each_from_the_previous(tmp_path, world, monkeypatch):
    monkeypatch.setenv("ULLSAM_QUIET", "1")
    out = tmp_path / "OUT"
    assert main(["train", "--preset", "tiny", "--stages", "1,2,3", "--out", str(out), "--data", str(world), "--max-steps", "1",
                 "--quiet", "--set", SMALL]) == 0
    sd = {s: load_file(str(out / f"stage{s}" / "model.safetensors")) for s in (1, 2, 3)}
    for s in (1, 2, 3): assert (out / f"stage{s}" / "stage_done.json").exists()
    assert load_config(out / "stage2.yaml").init == str(out / "stage1") and load_config(out / "stage3.yaml").init == str(out / "stage2")
    assert [load_config(out / f"stage{s}.yaml").stage for s in (1, 2, 3)] == [1, 2, 3]
    enc, llm, mlp1 = "sam.image_encoder.", "vlk.llm.", "vlk.mlp1."
    assert _same(_part(sd[1], enc), _part(sd[2], enc))            # stages 1-2 freeze the encoder
    assert not _same(_part(sd[1], mlp1), _part(sd[2], mlp1))      # stage 2 trains mlp1 further, from stage 1's
    assert not _same(_part(sd[1], llm), _part(sd[2], llm))        # stage 2 trains the LLM
    assert _same(_part(sd[2], llm), _part(sd[3], llm))            # stage 3 starts from it and keeps it frozen
    assert not _same(_part(sd[2], mlp1), _part(sd[3], mlp1))      # and trains mlp1 through it
    # the last stage is a uLLSAM model that segments
    from ullsam_nb.model import ULLSAM
    from ullsam_nb.io import read_image, read_labels
    from ullsam_nb.prompts import ullsam_prompts
    img, lab = read_image(next((world / "images").iterdir())), read_labels(next((world / "masks").iterdir()))
    ps = ullsam_prompts(lab, seed=0)
    masks, scores = ULLSAM.load(out / "stage3").segment(img, points=ps.points, point_labels=ps.point_labels)
    assert masks.shape == (len(ps), *lab.shape)
    # `ullsam segment --checkpoint OUT/stage3` segments a folder with it (box prompts from the ground truth)
    seg = tmp_path / "seg"
    assert main(["segment", "--images", str(world / "images"), "--gt", str(world / "masks"), "--checkpoint", str(out / "stage3"),
                 "--out", str(seg), "--prompts", "box"]) == 0
    assert sorted(p.stem for p in seg.iterdir()) == sorted(p.stem for p in (world / "images").iterdir())
    pred = read_labels(next(seg.iterdir()))
    assert pred.shape == lab.shape and pred.max() > 0
    # rerunning is refused; --resume skips the finished stages
    with pytest.raises(InputError, match="already trained"): _call_train(out, world)
    mtimes = {s: (out / f"stage{s}" / "model.safetensors").stat().st_mtime_ns for s in (1, 2, 3)}
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert {s: (out / f"stage{s}" / "model.safetensors").stat().st_mtime_ns for s in (1, 2, 3)} == mtimes


def _call_train(out, world):
    from ullsam_nb.stages import train_cmd
    return train_cmd(str(out), preset="tiny", stages="1,2,3", data=str(world), quiet=True, set=SMALL)


def test_resume_finishes_an_interrupted_chain(tmp_path, world, monkeypatch):
    "A chain stopped in stage 2 (stage 1 done, stage 2 not) resumes: stage 1 is not retrained, stages 2 and 3 run."
    monkeypatch.setenv("ULLSAM_QUIET", "1")
    from ullsam_nb.stages import train_cmd
    out = tmp_path / "OUT"
    assert train_cmd(str(out), preset="tiny", stages="1", data=str(world), max_steps=1, quiet=True, set=SMALL) == 0
    cfg = json.loads((out / "train_config.json").read_text()); cfg["stages"] = "1,2,3"          # as if stopped after stage 1
    (out / "train_config.json").write_text(json.dumps(cfg))
    t1 = (out / "stage1" / "model.safetensors").stat().st_mtime_ns
    assert train_cmd(str(out), resume=True, max_steps=1, quiet=True) == 0
    assert (out / "stage1" / "model.safetensors").stat().st_mtime_ns == t1
    assert (out / "stage3" / "stage_done.json").exists()


def test_explicit_stage_runs_alone(tmp_path, world, monkeypatch):
    from ullsam_nb.stages import train_cmd
    out = tmp_path / "one"
    assert train_cmd(str(out), preset="tiny", stage=1, data=str(world), max_steps=1, quiet=True, set=SMALL) == 0
    assert (out / "model.safetensors").exists() and not (out / "stage1").exists()


def test_paper_preset_chains_three_stages_with_its_world_size():
    cfg = load_config(preset="paper")
    assert cfg.stages == "1,2,3" and cfg.world_size == 4 and (cfg.batch_size, cfg.accumulation) == (1, 8)
    plan = stage_configs(cfg)
    assert [s for s, _ in plan] == [1, 2, 3]
    assert plan[1][1].lr_llm == 1e-5 and plan[2][1].epochs == 24 and plan[2][1].lr == 1e-3
    assert cfg.model.llm == "OpenGVLab/InternVL2_5-2B"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert check_world_size(cfg, 1) == 8
        assert check_world_size(cfg, 4) == 32
    assert len(w) == 1 and "= 32" in str(w[0].message) and "accumulation=32" in str(w[0].message)
    assert "world_size" not in PRESETS["tiny"]


def test_llm_option_takes_an_internvl_checkpoint(tmp_path, world, monkeypatch):
    "`ullsam train --llm FOLDER` with InternVL2.5's layout: the model's LLM is the checkpoint's language model."
    monkeypatch.setenv("ULLSAM_QUIET", "1")
    from ullsam_nb.tiny_llm import save_tiny_internvl
    ivl = save_tiny_internvl(tmp_path / "InternVL2_5-2B")
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--stage", "3", "--llm", str(ivl), "--out", str(out), "--data", str(world),
                 "--max-steps", "1", "--quiet", "--set", SMALL + ",trust_remote_code=true"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["llm"] == str(ivl)
    sd = load_file(str(out / "model.safetensors"))
    assert sd["vlk.llm.model.embed_tokens.weight"].shape[1] == 64     # the tiny InternLM2's hidden size
