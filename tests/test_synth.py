"Integration tests for the synthetic world: byte-identical worlds, the committed sample, captions vs label maps, the CLI."
import json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from ullsam_nb.basics import hash_file
from ullsam_nb.io import read_image, read_labels
from ullsam_nb.basics import read_jsonl
from ullsam_nb import synth
from ullsam_nb.synth import (ALL_DOMAINS, DOMAINS, make_world, make_sample_world, sample_world_dir, synth_sample, synth_cmd,
                             stated_facts, caption_corpus, parse_bbbc005_name, density_word, blur_word)

@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path/"cache")); monkeypatch.setenv("ULLSAM_QUIET", "1")

def tree_hashes(root):
    root = Path(root)
    return {str(p.relative_to(root)): hash_file(p) for p in sorted(root.rglob("*")) if p.is_file()}

def test_same_seed_byte_identical(tmp_path):
    a = make_world(tmp_path/"a", 12, seed=11, domains=ALL_DOMAINS, size=96)
    b = make_world(tmp_path/"b", 12, seed=11, domains=ALL_DOMAINS, size=96)
    ha, hb = tree_hashes(a), tree_hashes(b)
    assert len(ha) == 2*12 + 1 and ha == hb
    c = make_world(tmp_path/"c", 12, seed=12, domains=ALL_DOMAINS, size=96)
    assert tree_hashes(c)["captions.jsonl"] != ha["captions.jsonl"]

def test_world_layout_and_records(tmp_path):
    out = make_world(tmp_path/"w", 6, seed=0, size=80)
    recs = read_jsonl(out/"captions.jsonl")
    assert [r["domain"] for r in recs] == DOMAINS + DOMAINS[:1]
    for r in recs:
        img, lab = read_image(out/r["image_path"]), read_labels(out/"masks"/Path(r["image_path"]).name)
        assert img.shape[:2] == lab.shape == (80, 80) and img.dtype == np.uint8
        assert r["conversation"][0]["content"] == "Describe the image in detail\n<image>"
        assert r["conversation"][1]["content"] and r["params"]["count"] == len(np.unique(lab)) - 1
    assert read_image(out/recs[4]["image_path"]).shape == (80, 80, 3)   # he_nuclei is RGB

def test_committed_sample_regenerates_identically(tmp_path):
    ref = sample_world_dir()
    if ref is None: pytest.skip("no committed sample (not a source checkout)")
    assert sum(p.stat().st_size for p in ref.rglob("*") if p.is_file()) < 2_000_000
    assert tree_hashes(make_sample_world(tmp_path/"s")) == tree_hashes(ref)

@pytest.mark.parametrize("domain", ALL_DOMAINS)
def test_captions_state_true_facts(domain):
    for seed in range(6):
        s = synth_sample(domain, seed)
        n = len(np.unique(s.labels)) - 1
        st = stated_facts(s.caption)
        if st["approximate"]: assert abs(st["count"] - n) <= 5, s.caption
        else: assert st["count"] == n, s.caption
        areas = np.bincount(s.labels.ravel())[1:]; areas = areas[areas > 0]
        assert abs(st["diameter"] - np.mean(2*np.sqrt(areas/np.pi))) <= 0.51, s.caption
        assert density_word(float((s.labels > 0).mean())) in s.caption.lower()
        assert blur_word(s.params["blur"]) in s.caption.lower()

def test_bbbc005_names_carry_count_and_blur(tmp_path):
    out = make_world(tmp_path/"b", 5, seed=2, domains="bbbc005", size=128)
    for r in read_jsonl(out/"captions.jsonl"):
        meta = parse_bbbc005_name(r["name"])
        lab = read_labels(out/"masks"/f"{r['name']}.tif")
        assert meta["count"] == len(np.unique(lab)) - 1 == r["params"]["count"]
        assert meta["blur_level"] == r["params"]["blur_level"] and r["name"].startswith("SIMCEP_")
    s = synth_sample("bbbc005", 0, n_objects=100, blur_level=1)
    assert s.params["count"] == 100 and s.params["blur"] == 0

def test_domains_look_different():
    stats = {d: synth_sample(d, 3) for d in DOMAINS}
    bg = {d: float(np.asarray(s.image, float)[s.labels == 0].mean())/255 for d, s in stats.items()}
    assert bg["fluo_nuclei"] < 0.2 and bg["fluo_cells"] < 0.2                 # fluorescence: dark background
    assert 0.3 < bg["phase_contrast"] < 0.8 and 0.35 < bg["em_organelles"] < 0.85  # gray backgrounds
    he = stats["he_nuclei"].image.astype(float)
    assert he.ndim == 3 and he[..., 0][stats["he_nuclei"].labels == 0].mean() > he[..., 1][stats["he_nuclei"].labels == 0].mean()  # pink
    ph = stats["phase_contrast"]
    assert ph.image[ph.labels > 0].mean() < ph.image[ph.labels == 0].mean()   # dark cell bodies

def test_controls_take_effect():
    few = synth_sample("fluo_nuclei", 1, n_objects=5, touching=0)
    assert few.params["count"] == 5
    sharp, blurred = synth_sample("fluo_nuclei", 1, blur=0.0, noise=0.0), synth_sample("fluo_nuclei", 1, blur=4.0, noise=0.0)
    from scipy import ndimage as ndi
    hf = lambda im: np.abs(ndi.laplace(im.astype(float))).mean()           # high-frequency energy
    assert hf(blurred.image) < 0.5*hf(sharp.image)
    quiet, noisy = synth_sample("em_organelles", 1, noise=0.0), synth_sample("em_organelles", 1, noise=0.15)
    assert hf(noisy.image) > hf(quiet.image)
    touch = synth_sample("he_nuclei", 1, touching=1.0, n_objects=150)
    apart = synth_sample("he_nuclei", 1, touching=0.0, n_objects=150)
    assert touch.params["touching_fraction"] > apart.params["touching_fraction"] == 0.0

def test_caption_corpus_fast_and_varied():
    corpus = caption_corpus(2000, seed=0)
    assert len(corpus) == 2000 and len(set(corpus)) > 1900 and corpus == caption_corpus(2000, seed=0)
    assert {w for c in corpus for w in ("H&E", "phase-contrast", "mitochondria", "BBBC005") if w in c} == {"H&E", "phase-contrast", "mitochondria", "BBBC005"}

def test_bad_input(tmp_path):
    from ullsam_nb.basics import InputError
    with pytest.raises(InputError, match="unknown synthetic domain"): make_world(tmp_path/"x", 2, domains="fluo_nuclei,confocal")
    with pytest.raises(InputError, match="n must be"): make_world(tmp_path/"x", 0)
    with pytest.raises(InputError, match="unknown synth control"): synth_sample("fluo_cells", 0, colour=3)
    with pytest.raises(InputError, match="seed"): synth_sample("fluo_cells", -1)

def test_synth_cmd_python_and_cli(tmp_path, capsys):
    assert synth_cmd(str(tmp_path/"p"), n=3, seed=5, domains="fluo_cells,he_nuclei", size=64) == 0
    assert "wrote 3 images" in capsys.readouterr().out
    exe = shutil.which("ullsam")
    cmd = [exe] if exe else [sys.executable, "-m", "ullsam_nb.cli"]
    r = subprocess.run(cmd + ["synth", "--out", str(tmp_path/"c"), "--n", "3", "--seed", "5", "--domains", "fluo_cells,he_nuclei", "--size", "64"],
                       capture_output=True, text=True, env={**os.environ, "ULLSAM_QUIET": "1"})
    if r.returncode != 0 and "synth" in r.stderr and "invalid choice" in r.stderr: pytest.skip("synth not wired into the CLI yet")
    assert r.returncode == 0, r.stderr
    assert tree_hashes(tmp_path/"c") == tree_hashes(tmp_path/"p")

def test_extreme_controls_stay_bounded():
    from ullsam_nb.basics import InputError
    s = synth_sample("fluo_cells", 0, size=(520, 696), radius=1.0)        # default count is capped (4000)
    assert 1000 < s.params["count"] <= 4000 and s.labels.shape == (520, 696)
    big = synth_sample("em_organelles", 0, size=64, radius=100)               # one object filling the image
    assert big.params["count"] == 1 and stated_facts(big.caption)["count"] == 1
    assert synth_sample("bbbc005", 0, size=16).labels.shape == (16, 16)
    with pytest.raises(InputError, match="n_objects"): synth_sample("fluo_nuclei", 0, n_objects=70000)
    with pytest.raises(InputError, match="radius"): synth_sample("fluo_nuclei", 0, radius=0.5)
