"""`ullsam demo`: the quick run writes the report, metrics (every model × split × protocol) and figures; the paper
preset plans the real configuration without running; a rerun reuses finished stages."""
import json, time
from pathlib import Path
import pytest
from ullsam_nb.basics import InputError
from ullsam_nb.demo import demo_cmd, demo_plan, DEMO_MODELS, DEMO_PROTOCOLS, IN_DOMAINS, OOD_DOMAINS
from ullsam_nb.data import shared_real_pairs


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.MonkeyPatch.context() as mp:          # module scope: set the cache root here (conftest's fixture is per test)
        mp.setenv("ULLSAM_CACHE_DIR", str(tmp_path_factory.mktemp("demo_cache")))
        mp.setenv("MPLBACKEND", "Agg")
        t0 = time.perf_counter()
        rc = demo_cmd(str(out), quick=True, quiet=True)
        return out, rc, time.perf_counter() - t0


def test_quick_demo_outputs(quick_run):
    out, rc, wall = quick_run
    assert rc == 0
    report = (out / "report.md").read_text()
    for text in ("## Results: mSA", "## How the run was configured", "## What the numbers mean", "cannot reproduce"):
        assert text in report
    m = json.loads((out / "metrics.json").read_text())
    splits = {"in-domain", "out-of-domain"} | {f"real/{d}" for d in {p.domain for p in shared_real_pairs()}}
    have = {(r["model"], r["split"], r["protocol"]) for r in m["summary"]}
    want = {(mo, s, p) for mo in DEMO_MODELS for s in splits for p in DEMO_PROTOCOLS}
    assert want <= have, sorted(want - have)[:5]
    for r in m["summary"]:
        assert 0.0 <= r["mSA"] <= 1.0 and r["n_images"] >= 1
    assert [s["key"] for s in m["stages"]] == ["stage1", "stage2", *DEMO_MODELS]      # stage 0 is the shipped SAM: nothing to train
    floors = {r["model"] for r in m["summary"] if r["model"].startswith("floor:")}
    assert floors == {"floor:box", "floor:otsu_box", "floor:watershed_click"}          # the floors stand beside the models
    assert all(s["trained_steps"] >= 1 for s in m["stages"])
    assert m["wall_s"]["total_s"] > 0
    ways = {r["round"]: r for r in m["mask_prompts"] if r["split"] == "in-domain"}
    assert sorted(ways) == [0, 1, 2, 3] and ways[0]["replace"] == ways[0]["vlk_plus_mask"]     # no mask before the first correction
    assert ways[0]["floor:watershed_click"] is not None and "## Iterative correction" in report
    assert m["figures"] == ["overlays.png", "training_curves.png", "metric_bars_mSA.png", "metric_bars_instance_dice.png"]
    for fig in m["figures"]:
        p = out / fig
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    from PIL import Image
    assert Image.open(out / "overlays.png").size[0] < 240 * 6.5      # truth + pretrained + 4 models: floors draw no overlay panels
    for s in m["stages"]:
        assert (out / "stages" / s["key"] / "model.safetensors").exists()


def test_quick_demo_resumes(quick_run, capsys):
    "A rerun with the same settings reuses every finished stage (only evaluation and the report run again)."
    out, _, _ = quick_run
    before = {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*/model.safetensors")}
    assert demo_cmd(str(out), quick=True, quiet=True) == 0
    assert before == {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*/model.safetensors")}
    m = json.loads((out / "metrics.json").read_text())
    assert all(s["skipped"] for s in m["stages"])
    assert "mSA (mean over images)" in capsys.readouterr().out


def test_report_says_when_real_data_is_absent(tmp_path, monkeypatch):
    "Without real data the report says so and how to point at it (instead of listing a folder that is not there)."
    from ullsam_nb.demo import _real_line
    import pandas as pd
    plan = demo_plan(tmp_path, quick=True)
    line = _real_line(plan, pd.DataFrame(dict(split=["in-domain"])))
    assert "none found" in line and "--real DIR" in line and "ULLSAM_SHARED_DATA" in line
    line = _real_line(plan, pd.DataFrame(dict(split=["real/em"])))
    assert "CC0" in line and "em" in line
    with pytest.raises(InputError, match="real-data folder not found"):
        from ullsam_nb.demo import demo_eval_sets
        demo_eval_sets(demo_plan(tmp_path, quick=True, real=str(tmp_path / "nowhere")))


def test_paper_plan_without_running(tmp_path, capsys):
    plan = demo_plan(tmp_path, preset="paper", sam_checkpoint="ckpt/vit_b_em.pt", llm="OpenGVLab/InternVL2_5-2B", device="cuda")
    st = {s["key"]: s for s in plan["stages"]}
    assert "stage0" not in st                                   # the checkpoint is the pretrained SAM
    assert list(st) == ["stage1", "stage2", *DEMO_MODELS]
    for s in st.values():
        c = s["config"]
        assert (c.model.sam, c.model.sam_checkpoint, c.model.llm, c.precision, c.device) == ("vit_b", "ckpt/vit_b_em.pt", "OpenGVLab/InternVL2_5-2B", "bf16", "cuda")
        assert c.data == str(tmp_path / "world" / "train") and c.val_data == ""
        assert s["steps"] is None                               # the preset's epochs
    assert (st["stage1"]["config"].stage, st["stage2"]["config"].stage) == (1, 2)
    assert st["stage2"]["init_from"] == "stage1" and st["stage1"]["init_from"] is None
    assert st["ullsam"]["config"].epochs == 24 and st["ullsam"]["config"].accumulation == 8
    assert st["ullsam_sbr"]["config"].sbr_loss and not st["ullsam"]["config"].sbr_loss
    assert st["frozen_vlk"]["config"].model.mode == "frozen_vlk" and st["baseline"]["init_from"] is None
    assert tuple(plan["world"]["in_domains"]) == IN_DOMAINS and tuple(plan["world"]["ood_domains"]) == OOD_DOMAINS
    assert demo_cmd(str(tmp_path / "o"), preset="paper", sam_checkpoint="x.pt", llm="y", plan_only=True) == 0
    assert "stage1" in capsys.readouterr().out and not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="sam-checkpoint"):
        demo_cmd(str(tmp_path / "o"), preset="paper")


def test_tiny_plan_chains_stages(tmp_path):
    st = {s["key"]: s for s in demo_plan(tmp_path, quick=True)["stages"]}
    assert "stage0" not in st and st["stage1"]["init_from"] is None      # every stage starts from the shipped small SAM
    assert all(st[k]["config"].prompts == "mixed" for k in DEMO_MODELS)   # stage 3 keeps boxes and clicks in training
    assert st["baseline"]["init_from"] is None
    assert all(st[k]["init_from"] == "stage2" for k in ("ullsam", "ullsam_sbr", "frozen_vlk"))
    assert all(st[k]["config"].model.sam == "small" and st[k]["config"].model.llm == "tiny" for k in st)
    assert all(st[k]["config"].lr == 1e-4 for k in DEMO_MODELS)           # fine-tuning a pretrained SAM gently
