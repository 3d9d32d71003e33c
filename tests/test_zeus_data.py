"""Zeus data readers: a Medical Segmentation Decathlon task (multi-modal NIfTI + dataset.json) and CHAOS (CT, MR T1-DUAL / T2-SPIR
DICOM series with PNG ground truth), on tiny files written here in those layouts; bad input gives a one-line InputError."""
import json
import numpy as np
import pytest
from PIL import Image
from ullsam_nb.basics import InputError
from ullsam_nb.zeus_data import msd_cases, read_msd_dataset, chaos_cases, read_dicom_series, pick_slices, CHAOS_MR_LABELS, write_dicom_slice

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")


def write_msd(root, n=2, shape=(12, 10, 6), mods=("FLAIR", "T1w")):
    "A tiny Decathlon task: 4-D images (x, y, z, modality), 3-D labels with classes 1 and 2 on slices 2 and 4."
    (root / "imagesTr").mkdir(parents=True); (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        img = rng.random((*shape, len(mods))).astype(np.float32) * 100
        lab = np.zeros(shape, np.uint8); lab[2:6, 3:7, 2] = 1; lab[4:10, 2:5, 4] = 2; lab[5:7, 5:7, 4] = 1
        for m in range(len(mods)): img[..., m] += 50 * m
        nib.Nifti1Image(img, np.eye(4)).to_filename(str(root / "imagesTr" / f"case_{i:03d}.nii.gz"))
        nib.Nifti1Image(lab, np.eye(4)).to_filename(str(root / "labelsTr" / f"case_{i:03d}.nii.gz"))
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    meta = {"name": "TinyTask", "description": "tiny", "tensorImageSize": "4D", "modality": {str(k): m for k, m in enumerate(mods)},
            "labels": {"0": "background", "1": "edema", "2": "tumour"}, "numTraining": n, "numTest": 0, "training": training, "test": []}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_cases(tmp_path):
    root = write_msd(tmp_path / "Task99_Tiny")
    assert read_msd_dataset(root)["name"] == "TinyTask"
    cs = msd_cases(root)                                       # all foreground, the slice with the most of it
    assert len(cs) == 2 and cs[0].modalities == ("FLAIR", "T1w") and cs[0].images.shape == (2, 12, 10)
    assert cs[0].params["slice"] == 4 and cs[0].target.sum() == 6 * 3 + 2 * 2 and cs[0].params["instance"] == "the edema and tumour"
    assert 0 <= cs[0].images.min() and cs[0].images.max() <= 1
    e = msd_cases(root, label="edema", slices="all")            # by name; every slice with that class
    assert [c.params["slice"] for c in e] == [2, 4, 2, 4] and e[0].target.sum() == 16 and e[1].target.sum() == 4
    t = msd_cases(root, label=2, max_cases=1)
    assert len(t) == 1 and t[0].target.sum() == 6 * 3 and t[0].params["instance"] == "the tumour"
    assert len(msd_cases(root, slices=1)) == 2


def test_msd_bad_input(tmp_path):
    with pytest.raises(InputError, match="no dataset.json"): msd_cases(tmp_path)
    root = write_msd(tmp_path / "T")
    with pytest.raises(InputError, match="no label 'liver'"): msd_cases(root, label="liver")
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text("{broken")
    with pytest.raises(InputError, match=r"dataset.json: not valid JSON"): read_msd_dataset(root)
    (root / "dataset.json").write_text(json.dumps({**meta, "modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"}}))
    with pytest.raises(InputError, match=r"case_000.nii.gz: image has shape .* names 3 modalities"): msd_cases(root)
    (root / "dataset.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "labels"}))
    with pytest.raises(InputError, match="missing key.*labels"): read_msd_dataset(root)
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "labelsTr" / "case_001.nii.gz").write_bytes(b"not nifti")
    with pytest.raises(InputError, match=r"labelsTr/case_001.nii.gz: not a readable NIfTI") as e: msd_cases(root)
    assert "\n" not in str(e.value)
    nib.Nifti1Image(np.zeros((12, 10, 5), np.uint8), np.eye(4)).to_filename(str(root / "labelsTr" / "case_001.nii.gz"))
    with pytest.raises(InputError, match="label shape"): msd_cases(root)
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    with pytest.raises(InputError, match="case_001.nii.gz: file not found"): msd_cases(root)


def write_series(folder, ground, prefix="IMG", rng=None, intercept=0.0):
    "Slices whose intensity is higher inside the organ, files named in reverse of InstanceNumber (the reader sorts by it)."
    rng = rng or np.random.default_rng(1)
    for k, g in enumerate(ground):
        img = (rng.random(g.shape) * 50 + 100 + 400 * (g > 0)).astype(np.uint16)
        write_dicom_slice(folder / f"{prefix}-{len(ground) - k:05d}.dcm", img, instance=k + 1, intercept=intercept)


def write_chaos(root):
    "Train_Sets/CT/1 and Train_Sets/MR/1 (T1DUAL in/out-phase, T2SPIR) with 4 slices of 16x16 each."
    ts = root / "Train_Sets"
    g = np.zeros((4, 16, 16), np.uint8); g[1, 3:9, 3:9] = 63; g[2, 2:12, 2:12] = 63; g[2, 12:15, 12:15] = 250; g[3, 4:6, 4:6] = 126
    ct = np.zeros((4, 16, 16), np.uint8); ct[2, 5:11, 5:11] = 255
    for folder, ground in [(ts / "CT" / "1" / "DICOM_anon", ct), (ts / "MR" / "1" / "T1DUAL" / "DICOM_anon" / "InPhase", g),
                           (ts / "MR" / "1" / "T1DUAL" / "DICOM_anon" / "OutPhase", g), (ts / "MR" / "1" / "T2SPIR" / "DICOM_anon", g[:3])]:
        write_series(folder, ground, intercept=-1024.0 if "CT" in str(folder) else 0.0)
    for gdir, ground in [(ts / "CT" / "1" / "Ground", ct), (ts / "MR" / "1" / "T1DUAL" / "Ground", g), (ts / "MR" / "1" / "T2SPIR" / "Ground", g[:3])]:
        gdir.mkdir(parents=True, exist_ok=True)
        for k, m in enumerate(ground): Image.fromarray(m).save(gdir / f"IMG-{k + 1:05d}.png")
    return root


def test_chaos_cases(tmp_path):
    root = write_chaos(tmp_path / "CHAOS")
    v = read_dicom_series(root / "Train_Sets" / "CT" / "1" / "DICOM_anon")
    assert v.shape == (4, 16, 16) and v.min() < -800                            # the rescale intercept is applied (HU)
    assert v[2, 5:11, 5:11].mean() > v[2].mean() + 100                          # ordered by InstanceNumber, not by name
    t1 = chaos_cases(root)                                                       # MR T1-DUAL, liver, the largest slice
    assert len(t1) == 1 and t1[0].modalities == ("T1 in-phase", "T1 out-of-phase") and t1[0].params["slice"] == 2
    assert t1[0].target.sum() == 100 and t1[0].images.shape == (2, 16, 16) and t1[0].params["instance"] == "the liver"
    assert [c.params["slice"] for c in chaos_cases(tmp_path / "CHAOS" / "Train_Sets", slices="all")] == [1, 2]
    sp = chaos_cases(root, organ="spleen", sequence="T2SPIR")
    assert len(sp) == 1 and sp[0].modalities == ("T2-SPIR",) and sp[0].target.sum() == 9
    assert chaos_cases(root, organ="right kidney", slices="all")[0].params["slice"] == 3
    ct = chaos_cases(root, modality="CT")
    assert len(ct) == 1 and ct[0].modalities == ("CT",) and ct[0].target.sum() == 36
    assert set(CHAOS_MR_LABELS) == {"liver", "right kidney", "left kidney", "spleen"}


def test_chaos_bad_input(tmp_path):
    root = write_chaos(tmp_path / "CHAOS")
    with pytest.raises(InputError, match="liver only"): chaos_cases(root, modality="CT", organ="spleen")
    with pytest.raises(InputError, match="unknown CHAOS organ"): chaos_cases(root, organ="heart")
    with pytest.raises(InputError, match="no MR folder"): chaos_cases(tmp_path)
    (root / "Train_Sets" / "MR" / "1" / "T1DUAL" / "Ground" / "IMG-00004.png").unlink()
    with pytest.raises(InputError, match=r"InPhase: 4 slices of \(16, 16\) px but 3 masks"): chaos_cases(root)
    bad = root / "Train_Sets" / "CT" / "1" / "DICOM_anon" / "IMG-00001.dcm"
    bad.write_bytes(b"junk")
    with pytest.raises(InputError, match="IMG-00001.dcm: not a readable DICOM") as e: chaos_cases(root, modality="CT")
    assert "\n" not in str(e.value)


def test_pick_slices():
    m = np.zeros((6, 4, 4), bool); m[1, :2] = True; m[3] = True; m[4, 0, 0] = True
    assert pick_slices(m) == [3] and pick_slices(m, "all") == [1, 3, 4] and pick_slices(m, "all", min_pixels=2) == [1, 3]
    assert pick_slices(m, 2) == [1, 4] and pick_slices(np.zeros((3, 2, 2), bool)) == []
    with pytest.raises(InputError, match="slices must be"): pick_slices(m, "some")


def test_zeus_cmd_on_msd_and_chaos(tmp_path, capsys):
    "`ullsam zeus --preset msd|chaos --data PATH`: the readers' slices, resized to 64 px, split by volume, beside the floors."
    from ullsam_nb.basics import torch_threads
    from ullsam_nb.zeus import zeus_cmd
    from ullsam_nb.zeus_data import load_zeus_cases, split_cases, resize_case
    root = write_msd(tmp_path / "Task99_Tiny", n=4)
    tr, te, info = load_zeus_cases("msd", dict(size=64, test_fraction=0.25), root, label="tumour")
    assert (len(tr), len(te)) == (3, 1) and tr[0].images.shape == (2, 64, 64) and info["instance"] == "the tumour"
    assert te[0].params["source"].endswith("case_003.nii.gz") and resize_case(te[0], 64) is te[0]
    assert len(split_cases(msd_cases(root, slices="all"))[1]) == 2                      # a whole volume (2 slices) held out
    with torch_threads(1):
        assert zeus_cmd(preset="msd", data=str(root), label="tumour", steps=1, out=str(tmp_path / "o"), instructions="both") == 0
        res = json.loads((tmp_path / "o" / "results.json").read_text())
        assert res["data"] == "msd:Task99_Tiny" and res["instance"] == "the tumour" and len(res["table"]) == 9 + 3      # 2 modalities: 2 + 1 floors
        written = json.loads((tmp_path / "o" / "instructions.json").read_text())
        assert set(written["per_modality"]) == {"FLAIR", "T1w"} and "the tumour" in written["per_modality"]["FLAIR"]
        assert "FLAIR MRI" in written["per_modality"]["FLAIR"] and len(written["per_case"]) == 4          # the readable modality name
        croot = write_chaos(tmp_path / "CHAOS")
        assert zeus_cmd(preset="chaos", data=str(croot), slices="all", sequence="T1DUAL", steps=1, instructions="per_modality") == 0
        assert zeus_cmd(preset="chaos", data=str(croot), slices="all", sequence="T2SPIR", steps=1, instructions="per_case", out=str(tmp_path / "t2")) == 0
    t2 = json.loads((tmp_path / "t2" / "results.json").read_text())
    assert t2["instance"] == "the liver" and {r["instructions"] for r in t2["table"] if r["fusion"] != "floor"} == {"per_case", "none"}
    assert len(t2["table"]) == 6 + 2                                                    # one modality: its best rule, the best of 9
    out = capsys.readouterr().out
    assert "zeus chaos:CHAOS" in out and "target the liver" in out and "| floor |" in out
    with pytest.raises(InputError, match="needs --data"): zeus_cmd(preset="chaos")
    with pytest.raises(InputError, match="no dataset.json"): zeus_cmd(preset="msd", data=str(tmp_path))
