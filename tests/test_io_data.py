"""Integration tests for ullsam_nb.io and ullsam_nb.data: lossless label ids on every path, bad input named or skipped,
SAM geometry inverses, splits, the torch Dataset/collate, the Hugging Face round trip, and the real fixtures."""
import json, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
import tifffile
from ullsam_nb.basics import InputError, shared_data_dir
from ullsam_nb.io import (read_image, write_image, read_labels, write_labels, as_label_map, to_rgb, image_to_unit,
                          preprocess_for_sam, masks_to_original, masks_to_input, points_to_input, boxes_to_input,
                          read_pair, ullsam_record, mask_path_for, encode_labels, decode_labels)
from ullsam_nb.basics import read_jsonl, write_jsonl
from ullsam_nb.data import (folder_pairs, pairs_from_files, load_pairs, InstanceDataset, collate_instances, to_hf_dataset,
                            hf_example_arrays, hf_to_folder, split_of, select_split, write_manifest, manifest_pairs,
                            instance_ids, shared_real_pairs, shared_dsb2018_pairs)


def label_map(dtype, top, shape=(48, 64)):
    "Three rectangles with ids 1, top//2 and top."
    lab = np.zeros(shape, dtype)
    lab[2:10, 2:20], lab[15:30, 10:40], lab[35:46, 30:60] = 1, top // 2, top
    return lab


# --- label ids survive every path ------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix,dtype,top", [(".tif", np.uint16, 300), (".png", np.uint16, 300), (".tif", np.uint16, 65535),
                                              (".png", np.uint16, 65535), (".tif", np.uint32, 70_000), (".tif", np.uint32, 2**32 - 1),
                                              (".tiff", np.uint8, 255), (".png", np.uint8, 200)])
def test_label_ids_survive_files(tmp_path, suffix, dtype, top):
    lab = label_map(dtype, top)
    back = read_labels(write_labels(tmp_path/f"m{suffix}", lab))
    assert back.dtype == lab.dtype and np.array_equal(back, lab)
    assert np.array_equal(decode_labels(encode_labels(lab, suffix), suffix), lab)


def test_png_refuses_ids_above_uint16_and_jpeg_refuses_labels(tmp_path):
    with pytest.raises(InputError, match="use .tif"): write_labels(tmp_path/"m.png", label_map(np.uint32, 70_000))
    with pytest.raises(InputError, match="lossy"): write_labels(tmp_path/"m.jpg", label_map(np.uint16, 300))
    assert not (tmp_path/"m.png").exists() and not (tmp_path/"m.jpg").exists()


def test_label_maps_keep_their_dtype_in_memory_and_are_compact_in_files(tmp_path):
    "Validation never narrows (uint8 ids wrap around in arithmetic); writing a file does, exactly."
    small = label_map(np.int32, 200)                               # ids that would fit uint8
    assert as_label_map(small).dtype == np.int32
    assert (as_label_map(small).astype(np.int64) + 100).max() == 300 and (as_label_map(small) + 100).max() == 300
    assert as_label_map(label_map(np.int32, 300)).dtype == np.int32
    assert as_label_map(label_map(np.int64, 70_000)).dtype == np.int64
    assert as_label_map(label_map(np.uint16, 300)).dtype == np.uint16
    for dtype, top, stored in [(np.int32, 200, np.uint8), (np.int32, 300, np.uint16), (np.int64, 70_000, np.uint32)]:
        lab = label_map(dtype, top)
        back = read_labels(write_labels(tmp_path/f"m{top}.tif", lab))
        assert back.dtype == stored and np.array_equal(back, lab)
        assert decode_labels(encode_labels(lab, ".png" if top < 2**16 else ".tif")).dtype == stored
    with pytest.raises(InputError, match="exceeds uint32"): as_label_map(label_map(np.int64, 2**33))


def test_palette_png_labels_are_indices(tmp_path):
    from PIL import Image
    lab = label_map(np.uint8, 200)
    im = Image.fromarray(lab, "L").convert("P")
    im.putpalette([v for i in range(256) for v in ((i * 7) % 256, (i * 13) % 256, (i * 29) % 256)])
    im.save(tmp_path/"pal.png")
    assert np.array_equal(read_labels(tmp_path/"pal.png"), lab)


def test_relabel_sequential(tmp_path):
    lab = label_map(np.uint32, 70_000)
    seq = read_labels(write_labels(tmp_path/"m.tif", lab), relabel=True)
    assert sorted(np.unique(seq)) == [0, 1, 2, 3] and np.array_equal(seq > 0, lab > 0)


def test_hf_round_trip_keeps_ids_above_255_and_65535(tmp_path):
    import datasets
    root = tmp_path/"ds"
    labs = [label_map(np.uint16, 300), label_map(np.uint32, 70_000), label_map(np.uint32, 4_000_000_000)]
    for i, lab in enumerate(labs):
        write_image(root/"images"/f"a{i}.png", (lab > 0).astype(np.uint16) * 4000 + 17)
        write_labels(root/"masks"/f"a{i}.tif", lab)
    hf = to_hf_dataset(folder_pairs(root))
    hf.save_to_disk(str(tmp_path/"hf"))
    hf2 = datasets.load_from_disk(str(tmp_path/"hf"))
    for lab, row in zip(labs, hf2):
        img, back = hf_example_arrays(row)
        assert np.array_equal(back, lab) and img.dtype == np.uint16
    out = hf_to_folder(hf2, tmp_path/"out")
    assert [int(read_labels(p.mask_path).max()) for p in out] == [300, 70_000, 4_000_000_000]
    assert (tmp_path/"out/images/a1.png").read_bytes() == (root/"images/a1.png").read_bytes()


def test_hf_rows_with_decoded_pil_images(tmp_path):
    import datasets
    lab = label_map(np.uint16, 1000)
    write_labels(tmp_path/"m.png", lab); write_image(tmp_path/"i.png", (lab > 0).astype(np.uint8) * 200)
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path/"i.png")], "mask": [str(tmp_path/"m.png")]},
                                    features=datasets.Features({"image": datasets.Image(), "mask": datasets.Image()}))
    img, back = hf_example_arrays(ds[0])
    assert np.array_equal(back, lab) and img.shape == lab.shape


# --- images, channels, normalisation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype", [((31, 45), np.uint8), ((31, 45), np.uint16), ((31, 45), np.float32), ((31, 45, 3), np.uint8),
                                         ((31, 45, 3), np.uint16), ((31, 45, 2), np.uint16), ((31, 45, 7), np.float32), ((31, 45), np.int16)])
def test_tiff_round_trip_and_determinism(tmp_path, shape, dtype):
    rng = np.random.default_rng(1)
    a = (rng.random(shape) * 1000).astype(dtype)
    write_image(tmp_path/"a.tif", a); b1 = (tmp_path/"a.tif").read_bytes()
    write_image(tmp_path/"a.tif", a)
    assert (tmp_path/"a.tif").read_bytes() == b1
    back = read_image(tmp_path/"a.tif")
    assert back.dtype == a.dtype and np.array_equal(back, a)


def test_multipage_tiff_written_by_others_reads_channels_last(tmp_path):
    stack = np.stack([np.full((20, 30), v, np.uint16) for v in (1, 2, 3, 4, 5)])
    tifffile.imwrite(tmp_path/"s.tif", stack)                                         # with tifffile's shaped metadata
    img = read_image(tmp_path/"s.tif")
    assert img.shape == (20, 30, 5) and img[0, 0].tolist() == [1, 2, 3, 4, 5]
    assert to_rgb(img).shape == (20, 30, 3) and (to_rgb(img) == 5).all()
    assert (to_rgb(img, projection="mean") == 3).all()
    assert to_rgb(img, channels=[4, 0, 2])[0, 0].tolist() == [5, 1, 3]


def test_image_to_unit_rules():
    u8 = np.array([[0, 255]], np.uint8)
    assert np.allclose(image_to_unit(u8)[..., 0], [[0, 1]])
    rgba = np.dstack([np.full((4, 4, 3), 51, np.uint8), np.full((4, 4), 255, np.uint8)])
    assert np.allclose(image_to_unit(rgba), 0.2)
    u16 = np.linspace(100, 5000, 400).reshape(20, 20).astype(np.uint16)
    u = image_to_unit(u16)
    assert u.shape == (20, 20, 3) and u.min() == 0 and u.max() == 1


# --- bad input: one test each ------------------------------------------------------------------------------------------
@pytest.fixture
def pair_dir(tmp_path):
    root = tmp_path/"pairs"
    write_image(root/"images/ok.tif", np.ones((40, 50), np.uint16))
    write_labels(root/"masks/ok.tif", label_map(np.uint16, 300, (40, 50)))
    return root


def _expect(root, name, problem, mask_writer=None, image_writer=None):
    if image_writer: image_writer(root/"images"/name)
    if mask_writer: mask_writer(root/"masks"/name)
    with pytest.raises(InputError) as e: read_pair(root/"images"/name)
    assert problem in str(e.value) and name in str(e.value)
    with pytest.warns(UserWarning, match=problem): assert read_pair(root/"images"/name, on_error="skip") is None
    good, skipped = load_pairs(folder_pairs(root), on_error="skip")
    assert [s.pair.name for s in good] == ["ok"] and len(skipped) == 1


def test_mismatched_sizes(pair_dir):
    _expect(pair_dir, "big.tif", "but the image is 40x50", lambda p: write_labels(p, label_map(np.uint16, 3, (41, 50))),
            lambda p: write_image(p, np.ones((40, 50), np.uint16)))


def test_float_mask(pair_dir):
    _expect(pair_dir, "f.tif", "float label map", lambda p: write_image(p, label_map(np.float32, 3, (40, 50))),
            lambda p: write_image(p, np.ones((40, 50), np.uint16)))


def test_negative_mask(pair_dir):
    _expect(pair_dir, "n.tif", "negative ids", lambda p: write_image(p, -label_map(np.int16, 3, (40, 50))),
            lambda p: write_image(p, np.ones((40, 50), np.uint16)))


def test_unreadable_image(pair_dir):
    def garbage(p): p.parent.mkdir(parents=True, exist_ok=True); p.write_bytes(b"this is not a png at all" * 10)
    _expect(pair_dir, "g.png", "unreadable or truncated", lambda p: write_labels(p, label_map(np.uint16, 3, (40, 50))), garbage)


def test_truncated_tiff(pair_dir):
    def cut(p):
        write_image(p, np.random.default_rng(0).integers(0, 60000, (40, 50), dtype=np.uint16))
        p.write_bytes(p.read_bytes()[:-300])
    _expect(pair_dir, "t.tif", "truncated", lambda p: write_labels(p, label_map(np.uint16, 3, (40, 50))), cut)


def test_image_without_mask(pair_dir):
    _expect(pair_dir, "alone.tif", "image has no mask", None, lambda p: write_image(p, np.ones((40, 50), np.uint16)))


def test_empty_mask(pair_dir):
    _expect(pair_dir, "e.tif", "empty mask", lambda p: write_labels(p, np.zeros((40, 50), np.uint16)),
            lambda p: write_image(p, np.ones((40, 50), np.uint16)))
    assert read_pair(pair_dir/"images/e.tif", allow_empty=True)[1].max() == 0


def test_zero_size_image(pair_dir):
    def zero(p):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore"); tifffile.imwrite(p, np.zeros((0, 50), np.uint16))
    _expect(pair_dir, "z.tif", "zero-size image", lambda p: write_labels(p, label_map(np.uint16, 3, (40, 50))), zero)
    with pytest.raises(InputError, match="zero-size"): write_image(pair_dir/"zz.tif", np.zeros((5, 0)))


def test_empty_file_and_missing_file(tmp_path):
    (tmp_path/"e.tif").write_bytes(b"")
    with pytest.raises(InputError, match="e.tif: empty file"): read_image(tmp_path/"e.tif")
    with pytest.raises(InputError, match="file not found"): read_labels(tmp_path/"none.tif")


def test_jsonl_errors_name_file_and_line(tmp_path):
    write_jsonl(tmp_path/"a.jsonl", [ullsam_record("images/a.tif", "x"), ullsam_record("images/b.tif")])
    (tmp_path/"a.jsonl").write_text((tmp_path/"a.jsonl").read_text() + "[1, 2]\n")
    with pytest.raises(InputError, match=r"a.jsonl: line 3: expected a JSON object"): read_jsonl(tmp_path/"a.jsonl")


# --- SAM geometry -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("H,W", [(101, 203), (203, 101), (77, 77), (1, 9), (257, 255)])
@pytest.mark.parametrize("mode", ["sam", "ullsam"])
def test_masks_round_trip_through_the_model_frame(H, W, mode):
    yy, xx = np.mgrid[:H, :W]
    gt = np.stack([((yy - H / 2) / (H / 3 + 1)) ** 2 + ((xx - W / 2) / (W / 3 + 1)) ** 2 < 1, (xx < W // 2)])
    _, info = preprocess_for_sam(np.zeros((H, W), np.uint8), size=128, mode=mode)
    frame = masks_to_input(gt, info)
    assert frame.shape == (2, 128, 128)
    if mode == "sam": assert frame[:, info.input_size[0]:, :].sum() == 0 and frame[:, :, info.input_size[1]:].sum() == 0
    back = masks_to_original(frame > 0.5, info).numpy()
    assert back.shape == gt.shape
    assert (back != gt).mean() < 0.05
    logits = masks_to_original(torch.where(frame[None] > 0.5, 5.0, -5.0), info)       # (1,N,S,S) logits -> (N,H,W) float
    assert logits.dtype == torch.float32 and ((logits > 0).numpy() == back).all()


def test_coordinates_follow_segment_anything():
    from segment_anything.utils.transforms import ResizeLongestSide
    _, info = preprocess_for_sam(np.zeros((300, 451, 3), np.uint8), size=1024)
    pts = torch.tensor([[[0.0, 0.0], [450.0, 299.0]]])
    assert torch.allclose(points_to_input(pts, info), ResizeLongestSide(1024).apply_coords_torch(pts, (300, 451)))
    boxes = np.array([[10, 20, 100, 200]], np.float32)
    assert np.allclose(boxes_to_input(boxes, info), ResizeLongestSide(1024).apply_boxes(boxes, (300, 451)))


def test_preprocess_for_sam_matches_sam_preprocess():
    from segment_anything.modeling import Sam
    from segment_anything.utils.transforms import ResizeLongestSide
    img = np.random.default_rng(0).integers(0, 255, (90, 130, 3), dtype=np.uint8)
    x, info = preprocess_for_sam(img, size=64)
    resized = torch.from_numpy(ResizeLongestSide(64).apply_image(img)).permute(2, 0, 1).float()[None]
    ref = Sam.preprocess(type("S", (), {"pixel_mean": torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1),
                                        "pixel_std": torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1),
                                        "image_encoder": type("E", (), {"img_size": 64})()})(), resized)
    assert torch.allclose(x, ref[0], atol=1e-5)


# --- datasets -----------------------------------------------------------------------------------------------------------
def test_splits_are_stable_and_seeded(tmp_path):
    root = tmp_path/"d"
    for i in range(30):
        write_image(root/f"images/x{i}.tif", np.ones((8, 8), np.uint8)); write_labels(root/f"masks/x{i}.tif", label_map(np.uint8, 2, (8, 8)))
    pairs = folder_pairs(root)
    train = {p.name for p in select_split(pairs, "train", seed=7)}
    write_image(root/"images/new.tif", np.ones((8, 8), np.uint8)); write_labels(root/"masks/new.tif", label_map(np.uint8, 2, (8, 8)))
    assert {p.name for p in select_split(folder_pairs(root), "train", seed=7)} - {"new"} == train
    pairs[0].meta["split"] = "test"
    assert pairs[0] in select_split(pairs, "test", seed=7)


def test_manifest_with_explicit_pairs(tmp_path):
    write_image(tmp_path/"a/img.tif", np.ones((8, 8), np.uint8)); write_labels(tmp_path/"b/lab.tif", label_map(np.uint16, 300, (8, 8)))
    pairs = pairs_from_files([tmp_path/"a/img.tif"], [tmp_path/"b/lab.tif"], domain="em")
    write_manifest(pairs, tmp_path/"m.jsonl")
    back = manifest_pairs(tmp_path/"m.jsonl")
    assert back[0].mask_path.resolve() == (tmp_path/"b/lab.tif").resolve() and back[0].domain == "em"
    rec = read_jsonl(tmp_path/"m.jsonl")[0]
    assert rec["conversation"][0]["content"] == "Describe the image in detail\n<image>" and rec["mask_path"] == "b/lab.tif"


def test_dataloader_with_variable_instance_counts(tmp_path):
    root = tmp_path/"v"
    for i, n in enumerate([1, 3, 6]):
        lab = np.zeros((32, 48), np.uint16)
        for k in range(n): lab[2 + 5 * k: 5 + 5 * k, 3: 3 + 4 * (k + 1)] = 1000 + k
        write_image(root/f"images/{i}.tif", np.ones((32, 48), np.uint8) * 9); write_labels(root/f"masks/{i}.tif", lab)
    seen = []
    ds = InstanceDataset(folder_pairs(root), max_instances=4, seed=0, sam_size=64,
                         prompt_sampler=lambda labels, ids, rng: rng.integers(0, 10, len(ids)))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_instances, num_workers=0)
    b = next(iter(loader))
    assert b["n_instances"].tolist() == [1, 3, 4] and b["instance_batch_index"].tolist() == [0, 1, 1, 1, 2, 2, 2, 2]
    assert [m.shape[0] for m in b["masks"]] == [1, 3, 4] and b["input_image"].shape == (3, 3, 64, 64)
    assert [len(p) for p in b["prompts"]] == [1, 3, 4]
    for m, ids, lab in zip(b["masks"], b["ids"], b["labels"]):
        for mask, i in zip(m, ids): assert torch.equal(mask, lab == i)
    again = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_instances)))
    assert all(torch.equal(x, y) for x, y in zip(b["ids"], again["ids"]))


def test_dataset_skips_bad_pairs_with_count(tmp_path):
    root = tmp_path/"s"
    write_image(root/"images/a.tif", np.ones((8, 8), np.uint8)); write_labels(root/"masks/a.tif", label_map(np.uint8, 2, (8, 8)))
    write_image(root/"images/b.tif", np.ones((8, 8), np.uint8))
    with pytest.raises(InputError, match="b.tif: image has no mask"): InstanceDataset(folder_pairs(root))[1]
    with pytest.warns(UserWarning, match="skipped 1 of 2"): ds = InstanceDataset(folder_pairs(root), on_error="skip")
    assert len(ds) == 1 and len(ds.skipped) == 1


# --- the real fixtures --------------------------------------------------------------------------------------------------
def test_dsb2018_fixture_keeps_125_instances(real_data, tmp_path):
    (pair,) = shared_dsb2018_pairs()
    (s,), _ = load_pairs([pair])
    assert len(instance_ids(s.labels)) == 125 and s.labels.max() == 183
    import datasets
    hf = to_hf_dataset([pair]); hf.save_to_disk(str(tmp_path/"hf"))
    _, lab = hf_example_arrays(datasets.load_from_disk(str(tmp_path/"hf"))[0])
    assert np.array_equal(lab, s.labels)


README_COUNTS = {"em": [580, 12], "fluorescence": [110, 71, 300], "histology": [33], "phase_contrast": [66, 73]}

@pytest.mark.parametrize("domain", sorted(README_COUNTS))
def test_real_domains_keep_their_instance_counts(real_data, domain):
    pairs = shared_real_pairs(domain)
    samples, skipped = load_pairs(pairs)
    counts = {s.pair.name: len(instance_ids(s.labels)) for s in samples}
    assert sorted(counts.values()) == sorted(README_COUNTS[domain]) and not skipped
    assert all(p.domain == domain for p in pairs)
    item = InstanceDataset(pairs, max_instances=4, sam_size=256)[0]
    assert item["masks"].shape[0] == 4 and item["input_image"].shape == (3, 256, 256)
