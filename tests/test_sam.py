"SAM layer integration: CLI functions on files, the embedding cache across processes' worth of calls, automatic mode."
import numpy as np, pytest, torch
from pathlib import Path
from skimage.draw import disk
from segment_anything.modeling import ImageEncoderViT
from ullsam_nb.io import write_image, write_labels, read_labels
from ullsam_nb.segment import segment_cmd, precompute_cmd
from ullsam_nb.sam import build_sam, model_identity
from ullsam_nb.embeddings import embed_image
from ullsam_nb.segmenter import segment_prompts, automatic_segmentation, masks_to_labels, AMG_PRESETS
from ullsam_nb.basics import InputError

@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path/"cache"))
    monkeypatch.setenv("ULLSAM_QUIET", "1")

@pytest.fixture
def encoder_calls(monkeypatch):
    "Counts real forward passes of segment-anything's image encoder."
    calls = []
    orig = ImageEncoderViT.forward
    def counting(self, x): calls.append(x.shape[0]); return orig(self, x)
    monkeypatch.setattr(ImageEncoderViT, "forward", counting)
    return calls

def _folder(root:Path, n=3, size=(80, 112), suffix=".tif"):
    rng = np.random.default_rng(0)
    (root/"images").mkdir(parents=True); (root/"masks").mkdir()
    for i in range(n):
        lab = np.zeros(size, np.uint16)
        for k in (3, 10, 300):
            rr, cc = disk((rng.integers(12, size[0]-12), rng.integers(12, size[1]-12)), rng.integers(5, 10), shape=size)
            lab[rr, cc] = k
        im = (20 + 200 * (lab > 0) + rng.normal(0, 8, size)).clip(0, 255).astype(np.uint8)
        write_image(root/"images"/f"cell_{i}{suffix}", im); write_labels(root/"masks"/f"cell_{i}.tif", lab)
    return root

def test_segment_box_point_auto(tmp_path):
    root = _folder(tmp_path/"data")
    for prompts in ("box", "point", "auto"):
        out = tmp_path/f"pred_{prompts}"
        assert segment_cmd(root/"images", out, prompts=prompts, gt=root/"masks" if prompts != "auto" else None, points_per_side=4) == 0
        assert sorted(p.name for p in out.iterdir()) == ["cell_0.tif", "cell_1.tif", "cell_2.tif"]   # no temp files
        for f in out.iterdir():
            pred, gt = read_labels(f), read_labels(root/"masks"/f.name)
            assert pred.shape == gt.shape
            if prompts != "auto": assert set(np.unique(pred)) <= set(np.unique(gt))   # ids of the prompting instances

def test_segment_jpg_and_errors(tmp_path):
    root = _folder(tmp_path/"data", n=1, suffix=".jpg")
    assert segment_cmd(root/"images", tmp_path/"out", gt=root/"masks") == 0
    assert [p.name for p in (tmp_path/"out").iterdir()] == ["cell_0.tif"]
    with pytest.raises(InputError, match="needs --gt"): segment_cmd(root/"images", tmp_path/"o2", prompts="point")
    with pytest.raises(InputError, match="no ground-truth mask"): segment_cmd(root/"images", tmp_path/"o3", gt=tmp_path)
    (tmp_path/"empty").mkdir()
    with pytest.raises(InputError, match="no images"): segment_cmd(tmp_path/"empty", tmp_path/"o4", prompts="auto")
    with pytest.raises(InputError, match="unknown SAM model"): segment_cmd(root/"images", tmp_path/"o5", model="vit_z", prompts="auto")

def test_precompute_then_segment_skips_encoder(tmp_path, encoder_calls):
    root = _folder(tmp_path/"data", n=2)
    assert precompute_cmd(root/"images") == 0
    assert sum(encoder_calls) == 2
    files = list((tmp_path/"cache"/"embeddings"/"small").glob("*.safetensors"))
    assert len(files) == 2
    assert precompute_cmd(root/"images") == 0 and sum(encoder_calls) == 2          # already cached
    assert segment_cmd(root/"images", tmp_path/"pred", gt=root/"masks", zoom=False) == 0   # the native scale
    assert segment_cmd(root/"images", tmp_path/"pred_auto", prompts="auto", points_per_side=4) == 0
    assert sum(encoder_calls) == 2                                                # every embedding came from the cache
    assert precompute_cmd(root/"images", mode="ullsam") == 0 and sum(encoder_calls) == 4   # preprocessing is in the key
    assert precompute_cmd(root/"images", diameter=14) == 0 and sum(encoder_calls) == 6     # the images enlarged for 14-px objects
    assert segment_cmd(root/"images", tmp_path/"pred_14", gt=root/"masks", diameter=14) == 0 and sum(encoder_calls) == 6

def _small_nuclei():
    "Two BBBC005-style synthetic images (validation seeds): `(image, labels)` of nuclei about 12 px across."
    from ullsam_nb.synth import synth_sample
    for seed in (11, 12):
        s = synth_sample("bbbc005", 1_000_000_000 + seed, size=256)
        yield s.image, s.labels.astype(np.int64)

def test_boxes_of_small_objects_zoom_and_the_cli_agrees_with_the_benchmark(tmp_path):
    "BBBC005-style nuclei (12 px): the boxes say the objects are small, the image is enlarged 2x, and the masks are better for it; `segment` and `evaluate_image` give the same label map."
    from ullsam_nb.evaluate import evaluate_image
    from ullsam_nb.segment import segment_image
    from ullsam_nb.segmenter import object_zoom
    from ullsam_nb.prompts import boxes_from_labels
    m = build_sam()
    gain = []
    for image, labels in _small_nuclei():
        assert object_zoom(m, boxes_from_labels(labels)) == 2.0
        preds = {}
        _, zoomed = evaluate_image(m, image, labels, protocols=("box",), predictions=preds)
        _, native = evaluate_image(m, image, labels, protocols=("box",), zoom=1)
        gain.append(zoomed[0]["mSA"] - native[0]["mSA"])
        np.testing.assert_array_equal(segment_image(m, image, "box", gt_labels=labels), preds[("box", 0)])
    assert np.mean(gain) > 0.03, gain

def test_clicks_size_themselves_and_the_automatic_mode_zooms_when_told_the_size(tmp_path):
    "Clicks alone on 12-px nuclei: their first masks at the native scale say the objects are small, the image is enlarged, and the masks are better for it (the CLI's label map is the benchmark's); the automatic mode keeps the native scale unless given `diameter`, which lifts it."
    from ullsam_nb.evaluate import evaluate_image
    from ullsam_nb.segment import segment_image
    from ullsam_nb.metrics import instance_metrics
    m = build_sam()
    gain = []
    for image, labels in _small_nuclei():
        native = segment_image(m, image, "point", gt_labels=labels, zoom=False)
        sized = segment_image(m, image, "point", gt_labels=labels)                  # the default: the first answer sizes the objects
        preds = {}
        evaluate_image(m, image, labels, protocols=("point",), predictions=preds, cache=False)
        np.testing.assert_array_equal(sized, preds[("point", 0)])
        auto = segment_image(m, image, "auto", zoom=False)
        np.testing.assert_array_equal(segment_image(m, image, "auto"), auto)       # the default
        told = segment_image(m, image, "auto", diameter=12)
        gain.append([instance_metrics(labels, sized)["mSA"] - instance_metrics(labels, native)["mSA"],
                     instance_metrics(labels, told)["mSA"] - instance_metrics(labels, auto)["mSA"]])
    assert (np.mean(gain, 0) > 0.03).all(), gain

def test_a_narrow_image_is_mirrored_into_the_margin(monkeypatch):
    "An image narrower than the model's input: the shipped SAM reads it mirrored into the margin (`embeddings.input_padding`); with segment-anything's zero margin its foreground map lights up beside the image (the H&E background reads as nuclei)."
    import ullsam_nb.embeddings as embeddings, ullsam_nb.segmenter as segmenter
    from ullsam_nb.segmenter import instance_maps
    from ullsam_nb.synth import synth_sample
    m = build_sam()
    s = synth_sample("he_nuclei", 1_000_000_011, size=256)
    image, background = s.image[:, :160], s.labels[:, :160] == 0
    fg = {}
    for pad in ("zero", "mirror"):
        monkeypatch.setattr(embeddings, "input_padding", lambda model, pad=pad: pad)
        monkeypatch.setattr(segmenter, "input_padding", lambda model, pad=pad: pad)
        fg[pad] = instance_maps(m, image, cache=False)[0][background].mean()
    monkeypatch.undo()
    assert embeddings.input_padding(m) == "mirror" and embeddings.input_padding(build_sam("tiny", device="cpu")) == "zero"
    assert fg["mirror"] < 0.1 and fg["zero"] > 3 * fg["mirror"], fg

def test_cache_key_follows_weights(tmp_path, encoder_calls):
    img = np.random.default_rng(1).integers(0, 255, (64, 90), dtype=np.uint8)
    m = build_sam("tiny", device="cpu")
    e1, _ = embed_image(m, img); embed_image(m, img)
    assert sum(encoder_calls) == 1
    with torch.no_grad(): m.image_encoder.neck[0].weight.mul_(2)
    e2, _ = embed_image(m, img)
    assert sum(encoder_calls) == 2 and not torch.allclose(e1, e2)
    embed_image(m, img.copy()); assert sum(encoder_calls) == 2                     # content, not object identity
    embed_image(m, img[:, ::-1].copy()); assert sum(encoder_calls) == 3

def test_ullsam_mode_prompting_and_dense_prompt():
    m = build_sam("tiny", device="cpu")
    img = np.random.default_rng(2).integers(0, 255, (120, 60, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 30, 40], [10, 60, 55, 110]], np.float32)
    masks, scores = segment_prompts(m, img, boxes=boxes, mode="ullsam", cache=False)
    assert masks.shape == (2, 120, 60) and scores.shape == (2,)
    vlk = torch.randn(1, 64, 16, 16)
    masks2, _ = segment_prompts(m, img, boxes=boxes, mode="ullsam", cache=False, dense_prompt=vlk)
    per_instance = torch.randn(2, 64, 16, 16)
    masks3, _ = segment_prompts(m, img, boxes=boxes, mode="ullsam", cache=False, dense_prompt=per_instance)
    assert masks2.shape == masks3.shape == (2, 120, 60)
    lab = masks_to_labels(masks, scores)
    assert lab.shape == (120, 60) and lab.dtype == np.uint32

def test_automatic_presets_and_crops():
    m = build_sam("tiny", device="cpu")
    img = np.random.default_rng(3).integers(0, 255, (96, 96), dtype=np.uint8)
    assert set(AMG_PRESETS) == {"default", "tuned"}
    lab = automatic_segmentation(m, img, preset="tuned", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    assert lab.shape == (96, 96)
    lab2, recs = automatic_segmentation(m, img, points_per_side=2, crop_n_layers=1, pred_iou_thresh=0.0,
                                        stability_score_thresh=0.0, return_records=True)
    assert lab2.shape == (96, 96) and all(r["segmentation"].shape == (96, 96) for r in recs)

def test_real_dsb2018_box_prompts(tmp_path):
    "Box prompts from real DSB-2018 ground truth (skipped when the shared data folder is absent)."
    from ullsam_nb.basics import shared_data_dir
    src = shared_data_dir("dsb2018")
    if src is None: pytest.skip("shared data not available")
    (tmp_path/"images").mkdir(); (tmp_path/"masks").mkdir()
    (tmp_path/"images"/"n.tif").write_bytes((src/"nuclei_512_img.tif").read_bytes())
    (tmp_path/"masks"/"n.tif").write_bytes((src/"nuclei_512_mask.tif").read_bytes())
    assert segment_cmd(tmp_path/"images", tmp_path/"pred", gt=tmp_path/"masks") == 0
    pred, gt = read_labels(tmp_path/"pred"/"n.tif"), read_labels(tmp_path/"masks"/"n.tif")
    assert pred.shape == gt.shape and set(np.unique(pred)) <= set(np.unique(gt))


def test_cached_embeddings_do_not_depend_on_batch_size(tmp_path, monkeypatch):
    "Batched matmuls round differently: the cache stores embeddings computed one image per encoder call, whatever --batch-size."
    from ullsam_nb.embeddings import embedding_cache_path, load_cached_embedding
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (64, 80), dtype=np.uint8) for _ in range(3)]
    m = build_sam("tiny", device="cpu", pretrained=False)
    saved = {}
    for bs in (1, 3):
        monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path / f"bs{bs}"))
        from ullsam_nb.embeddings import embed_images
        embed_images(m, imgs, batch_size=bs)
        saved[bs] = [load_cached_embedding(embedding_cache_path(m, im))[0] for im in imgs]
    for a, b in zip(saved[1], saved[3]): assert torch.equal(a, b)
