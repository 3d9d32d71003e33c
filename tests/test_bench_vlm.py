"""Integration tests of the VLM benchmark harness: every task with fake backends, resuming, the CLI function, a tiny local VLM."""
import json
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from ullsam_nb.basics import InputError
from ullsam_nb.io import read_image
from ullsam_nb.basics import read_jsonl, read_jsonl_tolerant
from ullsam_nb.synth import make_world, make_sample_world, sample_world_dir
from ullsam_nb.vlm_backend import CallableVLM, image_content_hash, save_tiny_vlm
from ullsam_nb.vlm import register_backend, VLM_BACKENDS
from ullsam_nb.bench_vlm import (bench_classification, bench_counting, bench_segmentation, bench_vqa, bench_vlm_cmd, write_bench,
                                 classification_items, counting_items, load_vqa, make_synth_vqa, score_vqa, shipped_vqa_path,
                                 ask_items, PacedVLM, NO_ANSWER)

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    "A small synthetic world: 2 images of each of 3 domains plus 4 BBBC005-style counting images."
    d = tmp_path_factory.mktemp("world")
    make_world(d, 6, seed=3, domains="fluo_nuclei,em_organelles,bbbc005")
    make_world(d/"cnt", 4, seed=4, domains="bbbc005")
    return d

def _truth(world):
    return {image_content_hash(read_image(world/r["image_path"])): r for r in read_jsonl(world/"captions.jsonl")}

def test_classification_confusion(world, tmp_path):
    truth = _truth(world)
    def fn(im, p, n):
        d = truth[image_content_hash(im)]["domain"]
        return "No idea." if d == "bbbc005" else f"The category is {d}."
    res = bench_classification(world, CallableVLM(fn, name="half"), tmp_path, quiet=True)
    row = res.table.iloc[0]
    assert (row["n"], row["answered"], row["accuracy"]) == (6, 4, pytest.approx(4 / 6))
    assert res.summary["confusion_labels"] == ["bbbc005", "em_organelles", "fluo_nuclei", NO_ANSWER]
    assert np.array_equal(np.array(res.summary["confusion"]).diagonal()[1:3], [2, 2])
    assert row["macro_f1"] == pytest.approx(np.mean([0, 1, 1]))
    paths = write_bench(res, tmp_path)
    assert json.loads(Path(paths["results"]).read_text())["table"][0]["answered"] == 4
    assert (tmp_path/"confusion.png").stat().st_size > 0

def test_class_folders(tmp_path, world):
    for c in ("pillars", "tips"):
        (tmp_path/c).mkdir()
        (tmp_path/c/"a.tif").write_bytes((world/"images"/sorted((world/"images").iterdir())[0].name).read_bytes())
    items = classification_items(tmp_path)
    assert [it["label"] for it in items] == ["pillars", "tips"]
    with pytest.raises(InputError, match="no classification images"): classification_items(tmp_path/"pillars")

def test_counting_vlm_and_sam(world, tmp_path):
    items = counting_items(world/"cnt")
    assert len(items) == 4 and all(it["mask_path"] for it in items)
    true = {image_content_hash(read_image(it["image_path"])): it["count"] for it in items}
    vlm = CallableVLM(lambda im, p, n: f"I count {true[image_content_hash(im)] - 1} cells.", name="minus-one")
    res = bench_counting(world/"cnt", vlm, tmp_path, sam="tiny", sam_points_per_side=4, quiet=True)
    t = res.table.set_index("model")
    assert t.loc["minus-one", "mae"] == 1.0 and t.loc["minus-one", "bias"] == -1.0
    assert t.loc["SAM-auto (tiny)", "answered"] == 4
    write_bench(res, tmp_path)
    assert {"count_scatter.png", "error_by_blur.png", "table.md"} <= {p.name for p in tmp_path.iterdir()}
    with pytest.raises(InputError, match="needs a VLM backend, a SAM model"): bench_counting(world/"cnt")

def test_segmentation_presets(world, tmp_path):
    res = bench_segmentation(world/"cnt", tmp_path, points_per_side=4, limit=1, quiet=True)
    assert list(res.table["model"]) == ["default", "tuned"] and len(res.items) == 2
    again = bench_segmentation(world/"cnt", tmp_path, sam="tiny", points_per_side=4, limit=1, quiet=True)
    pd.testing.assert_frame_equal(res.items, again.items)
    assert len(read_jsonl_tolerant(tmp_path/"answers.jsonl")) == 2

def test_vqa_scoring_and_transcripts(world, tmp_path):
    q = make_synth_vqa(world, tmp_path/"q.jsonl")
    items = load_vqa(q)
    assert len(items) == 30 and Path(items[0]["image_path"]).exists()
    res = bench_vqa(q, CallableVLM(lambda im, p, n: "no", name="always-no"), tmp_path, quiet=True)
    t = res.table.set_index("answer_type")
    n_no = sum(it["answer"] == "no" for it in items if it["answer_type"] == "yes_no")
    assert t.loc["yes_no", "normalised"] == pytest.approx(n_no / 12)
    assert t.loc["number", "normalised"] == 0.0
    assert "- reply: no" in (tmp_path/"transcripts.md").read_text()
    assert score_vqa("There are 10 cells", dict(answer_type="number", answer=11, tolerance=0.0))["lenient"]   # within 1

def test_shipped_vqa_matches_generator(tmp_path):
    shipped = shipped_vqa_path()
    if shipped is None: pytest.skip("not a source checkout")
    world = sample_world_dir() or make_sample_world(tmp_path/"synth_sample")
    regen = make_synth_vqa(world, tmp_path/"x"/"v.jsonl", relative_to=world.parent)
    assert read_jsonl(regen) == read_jsonl(shipped)
    assert all((shipped.parent/r["image"]).exists() for r in read_jsonl(shipped)) or sample_world_dir() is None

def test_resume_does_not_ask_twice(world, tmp_path, monkeypatch):
    calls = []
    def fn(im, p, n): calls.append(p); return "fluo_nuclei"
    bench_classification(world, CallableVLM(fn, name="c1"), tmp_path, quiet=True, cache=False, limit=3)
    assert len(calls) == 3
    res = bench_classification(world, CallableVLM(fn, name="c1"), tmp_path, quiet=True, cache=False)   # 3 done, 3 new
    assert len(calls) == 6 and len(res.items) == 6
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path/"c2"))
    bench_classification(world, CallableVLM(fn, name="c1"), tmp_path/"fresh", quiet=True, limit=2)
    bench_classification(world, CallableVLM(fn, name="c1"), tmp_path/"fresh2", quiet=True, limit=2)   # new folder: the text cache answers
    assert len(calls) == 8

def test_skip_errors_leave_holes_a_rerun_fills(world, tmp_path):
    from ullsam_nb.vlm import VLMHTTPError
    state = {"fail": True}
    def fn(im, p, n):
        if state["fail"]: raise VLMHTTPError("HTTP 429", 429)
        return "em_organelles"
    vlm = CallableVLM(fn, name="flaky")
    with pytest.warns(UserWarning, match="429"):
        res = bench_classification(world, vlm, tmp_path, quiet=True, on_error="skip", limit=2)
    assert len(res.items) == 0
    state["fail"] = False
    assert len(bench_classification(world, vlm, tmp_path, quiet=True, limit=2).items) == 2

def test_min_interval_paces_requests(world):
    now, slept = [0.0], []
    def sleep(s): slept.append(s); now[0] += s
    paced = PacedVLM(CallableVLM(lambda im, p, n: "x", name="p"), 1.0, sleep=sleep, clock=lambda: now[0])
    img = np.zeros((4, 4), np.uint8)
    for k in range(3): paced.ask(img, f"q{k}", cache=False)
    assert slept == [1.0, 1.0]

def test_cli_tiny_local_vlm(world, tmp_path, capsys):
    llava = save_tiny_vlm("llava", tmp_path/"llava")
    for task in ("classification", "counting", "vqa"):
        assert bench_vlm_cmd(task, str(world), "transformers", str(tmp_path/task), model=str(llava), max_new_tokens=4, limit=3) == 0
        assert (tmp_path/task/"results.json").exists() and (tmp_path/task/"table.csv").exists()
    assert "| llava |" in capsys.readouterr().out
    assert bench_vlm_cmd("segmentation", str(world/"cnt"), "none", str(tmp_path/"seg"), points_per_side=4, limit=1) == 0
    with pytest.raises(InputError, match="unknown VLM backend"): bench_vlm_cmd("vqa", str(world), "nope", str(tmp_path/"x"))
