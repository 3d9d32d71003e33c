"Evaluation protocols (ullsam_nb.evaluate) with a tiny random SAM: corrective clicks, iterative prompting, runner, files."
import json
from types import SimpleNamespace
import numpy as np, pytest, torch
from scipy import ndimage as ndi
from ullsam_nb.evaluate import (corrective_point, protocol_prompts, prompted_segmentation, evaluate_image, evaluate_models,
                                summarize, save_results, PROTOCOLS)
from ullsam_nb.sam import build_sam
from ullsam_nb.synth import synth_sample


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_sam("tiny")


@pytest.fixture(scope="module")
def sample():
    return synth_sample("fluo_cells", 1, size=80)


@pytest.mark.parametrize("seed", range(25))
def test_corrective_point_is_in_the_largest_error(seed):
    rng = np.random.default_rng(seed)
    gt = ndi.binary_opening(rng.random((40, 50)) > 0.45, iterations=2)
    pred = ndi.binary_opening(rng.random((40, 50)) > 0.45, iterations=2)
    c = corrective_point(pred, gt)
    if not (pred ^ gt).any():
        assert c is None; return
    x, y, label = c
    x, y = int(x), int(y)
    missed, false = gt & ~pred, pred & ~gt
    assert (missed if label == 1 else false)[y, x]
    sizes = [np.bincount(ndi.label(m)[0].ravel())[1:].max(initial=0) for m in (missed, false)]
    comp, _ = ndi.label(missed if label == 1 else false)
    assert (comp == comp[y, x]).sum() == max(sizes)


def test_protocol_prompts_share_instances():
    lab = synth_sample("fluo_nuclei", 0, size=96).labels
    ids = {p: protocol_prompts(p, lab, seed=4, n_instances=3)["ids"].tolist() for p in PROTOCOLS[:-1]}
    assert len({tuple(v) for v in ids.values()}) == 1


def test_iterative_steps_and_mask_feedback(tiny, sample):
    for use_mask in (True, False):
        steps = list(prompted_segmentation(tiny, sample.image, sample.labels, "iterative_point", n_iterations=3,
                                           use_mask=use_mask, cache=False))
        n = len(np.unique(sample.labels)) - 1
        assert [s[0] for s in steps] == [0, 1, 2, 3]
        assert steps[-1][3].shape == (n, 4, 2) and steps[-1][4].shape == (n, 4)
        assert all(s[1].shape == (n, *sample.labels.shape) and s[1].dtype == bool for s in steps)
        assert set(np.unique(steps[-1][4][:, 1:])) <= {-1, 0, 1}


def test_dense_prompt_passthrough(tiny, sample):
    dp = torch.zeros(1, 64, 16, 16)
    steps = list(prompted_segmentation(tiny, sample.image, sample.labels, "iterative_box", n_iterations=1,
                                       dense_prompt=dp, cache=False))
    assert len(steps) == 2


def test_deterministic_and_empty(tiny, sample):
    a = evaluate_image(tiny, sample.image, sample.labels, protocols=("point", "ullsam_points"), seed=3, cache=False)
    b = evaluate_image(tiny, sample.image, sample.labels, protocols=("point", "ullsam_points"), seed=3, cache=False)
    assert a == b
    inst, img = evaluate_image(tiny, sample.image, np.zeros_like(sample.labels), protocols=("box", "iterative_point"),
                               n_iterations=1, cache=False)
    assert inst == [] and all(r["mSA"] == 1.0 and r["n_gt"] == 0 for r in img)


def test_runner_on_real_data(tiny, real_data, tmp_path):
    from ullsam_nb.data import shared_real_pairs, load_pairs
    pairs = [p for p in shared_real_pairs("em") if "cem_mitochondria2" in p.name]
    if not pairs: pytest.skip("cem_mitochondria2 not present")
    samples, _ = load_pairs(pairs)
    per_image, per_inst = evaluate_models({"tiny": tiny}, samples, protocols=("box", "ullsam_points", "iterative_box"),
                                          dataset="real", progress_bar=False, n_iterations=1, n_instances=5)
    assert set(per_image["domain"]) == {"em"} and len(per_image) == 4
    assert len(per_inst) == 5 * 4
    out = save_results(per_image, per_inst, tmp_path / "res")
    rec = json.loads((out / "results.json").read_text())
    assert len(rec["per_image"]) == 4 and {"mSA", "mSA_lo", "mSA_hi"} <= set(rec["summary"][0])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    s = summarize(per_image, by=("model", "protocol"))
    assert len(s) == 3 and (s["n_images"] == [1, 1, 2]).all()


def test_split_predictions_and_worst_cases(tiny):
    from types import SimpleNamespace
    from ullsam_nb.evaluate import worst_cases, show_worst_cases
    samples = [SimpleNamespace(image=t.image, labels=t.labels, pair=SimpleNamespace(name=f"s{k}", domain=d))
               for k, (t, d) in enumerate([(synth_sample("fluo_nuclei", 5, size=64), "fluo_nuclei"),
                                           (synth_sample("em_organelles", 5, size=64), "em_organelles")])]
    preds = {}
    per_image, _ = evaluate_models({"a": tiny, "b": tiny}, samples, protocols=("box",), in_domains=["fluo_nuclei"],
                                   predictions=preds, progress_bar=False, cache=False)
    assert list(per_image["split"]) == ["in-domain", "out-of-domain"] * 2
    assert set(preds) == {(m, n, "box", 0) for m in "ab" for n in ("s0", "s1")}
    assert (per_image[per_image.model == "a"]["mSA"].to_numpy() == per_image[per_image.model == "b"]["mSA"].to_numpy()).all()
    w = worst_cases(per_image, "mSA", 1, model="b")
    assert len(w) == 1 and w.iloc[0]["model"] == "b"
    fig = show_worst_cases(per_image, samples, preds, "mSA", k=2, model="a")
    assert len(fig.axes) == 4


def test_evaluate_models_takes_ullsam_models_beside_sam():
    "Zero-shot SAM and uLLSAM models in one table; a uLLSAM model is scored with its own dense prompt and preprocessing."
    from ullsam_nb.model import ULLSAM
    from ullsam_nb.model_config import UllsamConfig
    from ullsam_nb.evaluate import evaluate_models, evaluate_image
    model = ULLSAM.from_config(UllsamConfig(sam="tiny", llm="tiny", mode="ullsam")).eval()
    rng = np.random.default_rng(0)
    labels = np.zeros((64, 80), np.uint16); labels[10:30, 10:30] = 3; labels[35:60, 40:70] = 9
    image = (rng.random((64, 80)) * 50 + (labels > 0) * 150).astype(np.uint8)
    sample = SimpleNamespace(image=image, labels=labels, pair=SimpleNamespace(name="toy", domain="synthetic"))
    per_image, per_inst = evaluate_models({"sam": model.sam, "ullsam": model}, [sample], protocols=("ullsam_points",),
                                          cache=False, progress_bar=False)
    assert sorted(per_image["model"]) == ["sam", "ullsam"]
    _, _, dense = model.prepare_image(image)
    _, direct = evaluate_image(model.sam, image, labels, protocols=("ullsam_points",), dense_prompt=dense,
                               mode=model.config.preprocess, cache=False)
    got = per_image[per_image.model == "ullsam"].iloc[0]
    assert got["instance_dice"] == pytest.approx(direct[0]["instance_dice"])
    assert got["mSA"] == pytest.approx(direct[0]["mSA"])
