"""Headless tests of the widgets: every callback is driven directly (slider values, toggles, clicks, fake DOM/ipympl events)."""
from pathlib import Path
from types import SimpleNamespace
import numpy as np
import pytest
import torch
from ullsam_nb.basics import InputError
from ullsam_nb.data import folder_pairs, load_pair
from ullsam_nb.io import write_labels
from ullsam_nb.sam import build_sam
from ullsam_nb.segmenter import segment_prompts
from ullsam_nb.embeddings import embed_image
from ullsam_nb.synth import sample_world_dir, synth_sample
from ullsam_nb.widgets import (DatasetViewer, PromptSession, model_predictor, png_array, figure_png, image_panel_png,
                               screen_to_image, prediction_from_folder)

@pytest.fixture(scope="module")
def pairs():
    d = sample_world_dir()
    if d is None: pytest.skip("the committed sample world is not present (wheel install)")
    return folder_pairs(d)

@pytest.fixture(scope="module")
def tiny_sam(): return build_sam("tiny")

@pytest.fixture(scope="module")
def ullsam_model():
    from ullsam_nb.model import ULLSAM
    from ullsam_nb.model_config import UllsamConfig
    return ULLSAM.from_config(UllsamConfig(mode="ullsam"))

def test_viewer_from_folder_and_state(pairs):
    v = DatasetViewer(sample_world_dir())
    assert len(v) == len(pairs) and v.slider.max == len(pairs) - 1
    first = v.image.value
    v.slider.value = 3
    assert v.image.value != first and pairs[3].name in v.info.value
    assert png_array(v.image.value).shape[1] == png_array(first).shape[1]      # one panel either way

def test_viewer_predictions_lazy_cached_and_folder(pairs, tmp_path):
    calls = []
    def fake(sample):
        calls.append(sample.pair.name)
        return (sample.labels > 0).astype(np.uint8)
    lab = load_pair(pairs[2]).labels
    write_labels(tmp_path/f"{pairs[2].name}.png", lab.astype(np.uint16))      # other suffix than the image's .tif
    v = DatasetViewer(pairs[:4], predictions={"fake": fake, "folder": tmp_path, "dict": {pairs[1].name: lab}})
    assert calls == []                                                          # nothing computed while toggles are off
    one = png_array(v.image.value)
    v.model_toggles["fake"].value = True
    v.model_toggles["folder"].value = True
    three = png_array(v.image.value)
    assert three.shape[1] > 2.5 * one.shape[1]
    assert calls == [pairs[0].name]
    v.show_gt.value = False; v.show_gt.value = True
    assert calls == [pairs[0].name]                                             # remembered
    assert v.prediction("folder", 0) is None
    v.slider.value = 2
    np.testing.assert_array_equal(v.prediction("folder", 2), lab)
    assert v.shown_models() == ["fake", "folder"]
    v.model_toggles["fake"].value = False
    assert v.shown_models() == ["folder"]
    assert v.prediction("dict", 2) is None
    np.testing.assert_array_equal(v.prediction("dict", 1), lab)

def test_viewer_prompts_follow_protocol(pairs):
    samples = [load_pair(p) for p in pairs[:2]]
    v = DatasetViewer(samples, n_instances=3, seed=1)
    off = v.image.value
    v.show_prompts.value = True
    pts = v.image.value
    assert pts != off
    p = v.prompts(0)
    assert p["points"].shape == (3, 4, 2) and (p["point_labels"][:, 0] == 1).all()
    v.prompt_kind.value = "box"
    assert v.image.value not in (off, pts) and v.prompts(0)["boxes"].shape == (3, 4)

def test_viewer_bad_input(pairs):
    with pytest.raises(InputError, match="not a folder, a dict or a callable"): DatasetViewer(pairs, predictions={"x": "/no/such"})
    with pytest.raises(InputError, match="no images"): DatasetViewer([])

def test_model_predictor_matches_protocol(pairs, tiny_sam):
    s = load_pair(pairs[12])
    pred = model_predictor(tiny_sam, protocol="box", n_instances=3)(s)
    assert pred.shape == s.labels.shape and set(np.unique(pred)) <= set(np.unique(s.labels))
    with pytest.raises(InputError, match="one-shot"): model_predictor(tiny_sam, protocol="iterative_point")

def test_panel_geometry():
    img = np.zeros((16, 24), np.uint8)
    assert png_array(image_panel_png(img, scale=4)).shape[:2] == (64, 96)
    # a point drawn at image (10, 5) lands on the screen pixels that map back to (10, 5)
    a = png_array(image_panel_png(img, points=[[10, 5]], point_labels=[1], scale=4)).astype(int)
    ys, xs = np.nonzero(a[..., 1] > 100)                         # the green star
    x, y = screen_to_image(xs.mean(), ys.mean(), scale=4)
    assert abs(x - 10) < 0.6 and abs(y - 5) < 0.6

def _count_calls(module):
    n = [0]
    h = module.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    return n, h

def test_session_plain_sam_clicks(tiny_sam):
    s = synth_sample("fluo_nuclei", 0, size=96)
    enc, h1 = _count_calls(tiny_sam.image_encoder)
    sess = PromptSession(tiny_sam, s.image, scale=2)
    assert enc[0] <= 1 and sess.frontend == "fallback"
    assert (sess.vlk.value, sess.vlk.disabled) == (False, True)
    dec, h2 = _count_calls(tiny_sam.mask_decoder)
    blank = sess.image.value
    sess.on_click(40, 30)
    sess.on_click(10, 12, positive=False)
    assert dec[0] == 2 and enc[0] <= 1                            # one decoder call per click, the encoder never again
    np.testing.assert_array_equal(sess.points, [[40, 30], [10, 12]]); np.testing.assert_array_equal(sess.point_labels, [1, 0])
    want, score = segment_prompts(tiny_sam, s.image, points=[[[40, 30], [10, 12]]], point_labels=[[1, 0]])
    np.testing.assert_array_equal(sess.mask, want[0].numpy()); assert abs(sess.score - float(score[0])) < 1e-5
    assert sess.image.value != blank and "1 positive, 1 negative" in sess.status.value
    sess.undo(); sess.undo(); sess.undo()                         # undo past empty is harmless
    assert sess.mask is None and sess.image.value == blank
    h1.remove(); h2.remove()

def test_session_frontend_handlers(tiny_sam):
    s = synth_sample("fluo_nuclei", 1, size=64)
    sess = PromptSession(tiny_sam, s.image, scale=2)
    sess._on_dom_event({"type": "click", "dataX": 41, "dataY": 21, "button": 0})
    sess._on_dom_event({"type": "contextmenu", "dataX": 9, "dataY": 9, "button": 2})
    sess._on_dom_event({"type": "mousemove"})                     # no coordinates: ignored
    sess._on_mpl_click(SimpleNamespace(xdata=5.0, ydata=6.0, button=3))
    sess._on_mpl_click(SimpleNamespace(xdata=None, ydata=None, button=1))
    sess.mode.value = 0
    sess.x_box.value, sess.y_box.value = 30, 31
    sess.add_button.click()
    np.testing.assert_allclose(sess.points, [[20.25, 10.25], [4.25, 4.25], [5, 6], [30, 31]])
    np.testing.assert_array_equal(sess.point_labels, [1, 0, 0, 0])
    sess.clear_button.click()
    assert len(sess.points) == 0 and sess.mask is None
    with pytest.raises(InputError, match="outside"): sess.on_click(64, 3)
    with pytest.raises(InputError, match="unknown frontend"): PromptSession(tiny_sam, s.image, frontend="qt")

def test_session_vlk_toggle(ullsam_model, pairs):
    pair = [p for p in pairs if p.domain == "fluo_nuclei"][0]
    s = load_pair(pair)
    sess = PromptSession(ullsam_model, pair.image_path)                 # an image file works too
    assert sess.vlk.value and not sess.vlk.disabled and sess.dense is not None
    sess.on_click(60, 70); sess.on_click(90, 75)
    on, png_on = sess.mask.copy(), sess.image.value
    sess.vlk.value = False
    off = sess.mask.copy()
    assert not np.array_equal(on, off) and sess.image.value != png_on and "VLK off" in sess.status.value
    emb, info, _ = ullsam_model.prepare_image(s.image)             # off = the same model with SAM's no_mask_embed
    want, _ = segment_prompts(ullsam_model.sam, s.image, points=sess.points[None], point_labels=sess.point_labels[None],
                              embedding=(emb, info), dense_prompt=None)
    np.testing.assert_array_equal(off, want[0].numpy())
    sess.vlk.value = True
    np.testing.assert_array_equal(sess.mask, on)
    assert png_array(figure_png(sess.compare_figure())).shape[:2] == (300, 600)
    assert sess.n_decoder_calls == 6                              # 2 clicks, 2 toggles, 2 for the comparison
