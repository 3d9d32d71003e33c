"""The real-dataset path end to end on a loopback HTTP server: download -> verify -> extract -> convert -> load, for every
registry converter (with tiny archives in each source's layout), plus corrupted, incomplete, refused and offline downloads."""
import io, json, os, socket, tarfile, threading, functools, http.server, zipfile, warnings
from dataclasses import replace
from pathlib import Path
import numpy as np
import pytest
import imagecodecs
from ullsam_nb.basics import InputError, cache_dir, hash_file
from ullsam_nb.io import encode_image, encode_labels, read_labels
from ullsam_nb.datasets_registry import (DATASET_REGISTRY, RemoteFile, DownloadError, download_file, extract_archive, fetch_dataset,
                                         download_cmd, LOCK_NAME)
from ullsam_nb.data import load_pairs, folder_pairs
from ullsam_nb.io import instance_ids
from ullsam_nb.synth import parse_bbbc005_name


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        if self.path.startswith("/short/"):                       # promises more bytes than it sends
            self.send_response(200); self.send_header("Content-Length", "1000"); self.end_headers()
            self.wfile.write(b"x" * 10); return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    www = tmp_path/"www"; www.mkdir()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(www)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown(); srv.server_close()


def zip_bytes(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items(): z.writestr(name, data)
    return buf.getvalue()


def png(a): return imagecodecs.png_encode(np.ascontiguousarray(a))


def two_blobs(shape=(30, 40), touching=False):
    "A label map with two rectangles (touching when asked)."
    lab = np.zeros(shape, np.uint16)
    lab[5:15, 5:15] = 1
    if touching: lab[5:15, 15:25] = 2
    else: lab[18:26, 20:35] = 2
    return lab


def fetch_local(name, www, base, files, **published):
    "Serve `files` {filename: bytes} and fetch registry entry `name` from the loopback server instead of its host."
    src = DATASET_REGISTRY[name]
    remote = []
    for f in src.files:
        (www/f.filename).write_bytes(files[f.filename])
        remote.append(RemoteFile(f"{base}/{f.filename}", f.filename, published.get(f.filename), f.extract))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = fetch_dataset(replace(src, files=tuple(remote)))
    samples, skipped = load_pairs(pairs)
    assert not skipped
    return pairs, samples


# --- every converter, end to end --------------------------------------------------------------------------------------
def test_dsb2018(server):
    www, base = server
    img = np.dstack([np.full((30, 40, 3), 10, np.uint8), np.full((30, 40), 255, np.uint8)]); img[5:15, 5:15, 0] = 200   # colour
    lab = two_blobs()
    files = {"s1/images/s1.png": png(img), "s1/masks/a.png": png((lab == 1).astype(np.uint8) * 255),
             "s1/masks/b.png": png((lab == 2).astype(np.uint8) * 255)}
    pairs, samples = fetch_local("dsb2018", www, base, {"stage1_train.zip": zip_bytes(files)})
    assert len(samples) == 1 and samples[0].image.shape == (30, 40, 3) and samples[0].pair.domain == "histology"
    assert np.array_equal(samples[0].labels > 0, lab > 0) and len(instance_ids(samples[0].labels)) == 2


def test_bbbc039_colour_codes_separate_touching_nuclei(server):
    www, base = server
    lab = two_blobs(touching=True)
    mask = np.zeros((30, 40, 4), np.uint8); mask[..., 0] = lab; mask[..., 3] = 255
    files = {"bbbc039_images.zip": zip_bytes({"images/IXMtest_A02_s1_w1.tif": encode_image(lab.astype(np.uint16) * 900 + 5)}),
             "bbbc039_masks.zip": zip_bytes({"masks/IXMtest_A02_s1_w1.png": png(mask)}),
             "bbbc039_metadata.zip": zip_bytes({"metadata/training.txt": "IXMtest_A02_s1_w1.png\n", "metadata/test.txt": ""})}
    pairs, samples = fetch_local("bbbc039", www, base, files)
    assert len(instance_ids(samples[0].labels)) == 2 and pairs[0].meta["split"] == "train"
    assert samples[0].image.dtype == np.uint16


def test_bbbc005_counts_from_file_names(server):
    www, base = server
    name = "SIMCEPImages_A01_C2_F1_s01_w1.TIF"
    lab = two_blobs()
    files = {"BBBC005_v1_images.zip": zip_bytes({f"BBBC005_v1_images/{name}": encode_image((lab > 0).astype(np.uint8) * 180),
                                                  "BBBC005_v1_images/SIMCEPImages_A01_C2_F16_s01_w1.TIF": encode_image(np.zeros((30, 40), np.uint8))}),
             "BBBC005_v1_ground_truth.zip": zip_bytes({f"BBBC005_v1_ground_truth/{name}": encode_image((lab > 0).astype(np.uint8) * 255)})}
    pairs, samples = fetch_local("bbbc005", www, base, files)
    assert len(pairs) == 1 and pairs[0].meta == {"count": 2, "blur_level": 1, "stain": "w1"}
    assert len(instance_ids(samples[0].labels)) == 2
    assert parse_bbbc005_name("SIMCEPImages_A05_C18_F16_s01_w2.TIF") == {"count": 18, "blur_level": 16, "stain": "w2"}
    with pytest.raises(InputError, match="not a BBBC005 file name"): parse_bbbc005_name("cells.tif")


def test_livecell_coco_polygons(server):
    www, base = server
    data = encode_image(np.full((30, 40), 120, np.uint8))
    coco = {"images": [{"id": 7, "file_name": "A172_Phase_A7_1_00d00h00m_1.tif", "height": 30, "width": 40}],
            "annotations": [{"id": 1, "image_id": 7, "area": 100, "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]},
                            {"id": 2, "image_id": 7, "area": 30, "segmentation": [[20, 18, 34, 18, 34, 25, 20, 25]]}]}
    empty = json.dumps({"images": [], "annotations": []}).encode()
    files = {"livecell_images.zip": zip_bytes({"images/livecell_train_val_images/A172_Phase_A7_1_00d00h00m_1.tif": data}),
             "livecell_coco_train.json": json.dumps(coco).encode(), "livecell_coco_val.json": empty, "livecell_coco_test.json": empty}
    pairs, samples = fetch_local("livecell", www, base, files)
    assert len(pairs) == 1 and pairs[0].meta["split"] == "train" and pairs[0].domain == "phase_contrast"
    assert len(instance_ids(samples[0].labels)) == 2


def test_neurips_cellseg_label_ids_kept(server):
    www, base = server
    lab = two_blobs().astype(np.uint16); lab[lab == 1] = 300; lab[lab == 2] = 1000
    files = {"Training-labeled/images/cell_00001.png": png(np.dstack([(lab > 0).astype(np.uint8) * 200] * 3)),
             "Training-labeled/labels/cell_00001_label.tiff": encode_labels(lab)}
    archive = zip_bytes(files)
    import hashlib
    pairs, samples = fetch_local("neurips_cellseg", www, base, {"Training-labeled.zip": archive},
                                 **{"Training-labeled.zip": hashlib.sha256(archive).hexdigest()})
    assert np.array_equal(samples[0].labels, lab) and samples[0].image.ndim == 2     # grey RGB collapsed


def test_lucchi_slices(server):
    www, base = server
    lab = two_blobs()
    white = np.zeros((30, 40, 4), np.uint8); white[lab > 0] = 255
    files = {"Lucchi++/Train_In/mask0000.png": png(np.full((30, 40), 90, np.uint8)), "Lucchi++/Train_Out/0.png": png(white),
             "Lucchi++/Test_In/mask0000.png": png(np.full((30, 40), 90, np.uint8)), "Lucchi++/Test_Out/0.png": png(white),
             "Lucchi++/Test_In/mask0001.png": png(np.full((30, 40), 90, np.uint8)), "Lucchi++/Test_Out/1.png": png(white)}
    pairs, samples = fetch_local("lucchi", www, base, {"lucchi_pp.zip": zip_bytes(files)})
    assert [p.name for p in pairs] == ["train_000", "test_000", "test_001"]
    assert all(len(instance_ids(s.labels)) == 2 for s in samples)
    assert folder_pairs(cache_dir("datasets", "lucchi"))[0].meta["split"] in ("train", "test")


# --- download integrity ------------------------------------------------------------------------------------------------
def test_published_hash_mismatch_deletes_temp_and_names_everything(server):
    www, base = server
    (www/"a.zip").write_bytes(b"payload")
    wrong = "0" * 64
    with pytest.raises(DownloadError) as e: download_file(f"{base}/a.zip", sha256=wrong)
    msg = str(e.value)
    assert f"{base}/a.zip" in msg and wrong in msg and hash_file(www/"a.zip") in msg
    assert not list(cache_dir("downloads").iterdir())                    # no half file, no target


def test_trust_on_first_use_then_verify(server):
    www, base = server
    (www/"b.bin").write_bytes(b"version 1")
    with pytest.warns(UserWarning, match="trusting this first download"): p = download_file(f"{base}/b.bin")
    lock = json.loads((cache_dir("downloads")/LOCK_NAME).read_text())
    assert lock[f"{base}/b.bin"]["sha256"] == hash_file(p)
    assert download_file(f"{base}/b.bin") == p                            # cached and verified, no warning needed
    p.write_bytes(b"tampered")                                              # a corrupted cached copy is replaced
    with pytest.warns(UserWarning, match="does not match"): download_file(f"{base}/b.bin")
    assert p.read_bytes() == b"version 1"
    (www/"b.bin").write_bytes(b"version 2"); p.unlink()                     # upstream changed: refused
    with pytest.raises(DownloadError, match="sha256 mismatch"): download_file(f"{base}/b.bin")
    assert not p.exists()


def test_incomplete_download_is_never_used(server):
    www, base = server
    with pytest.raises(DownloadError, match="incomplete download"): download_file(f"{base}/short/c.zip")
    assert not list(cache_dir("downloads").glob("*c.zip*"))


def test_http_404(server):
    www, base = server
    with pytest.raises(DownloadError, match="HTTP 404"): download_file(f"{base}/missing.zip")


def test_connection_refused():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()   # a port nobody listens on
    with pytest.raises(DownloadError) as e: download_file(f"http://127.0.0.1:{port}/x.zip")
    assert "Are you offline?" in str(e.value) and f"127.0.0.1:{port}/x.zip" in str(e.value)


def test_offline_switch(monkeypatch):
    monkeypatch.setenv("ULLSAM_OFFLINE", "1")
    with pytest.raises(DownloadError, match="ULLSAM_OFFLINE is set"): download_file("http://example.invalid/x.zip")


# --- archives ----------------------------------------------------------------------------------------------------------
def test_archive_member_escaping_is_refused(tmp_path):
    (tmp_path/"evil.zip").write_bytes(zip_bytes({"../evil.txt": b"x"}))
    with pytest.raises(InputError, match="escapes"): extract_archive(tmp_path/"evil.zip", tmp_path/"out")
    assert not (tmp_path/"out").exists() and not (tmp_path/"evil.txt").exists()


def test_broken_archive(tmp_path):
    (tmp_path/"b.zip").write_bytes(zip_bytes({"a.txt": b"x" * 1000})[:50])
    with pytest.raises(InputError, match="broken archive"): extract_archive(tmp_path/"b.zip", tmp_path/"out")
    assert not (tmp_path/"out").exists()


# --- CLI function ------------------------------------------------------------------------------------------------------
def test_download_cmd(server, capsys, monkeypatch, tmp_path):
    www, base = server
    files = {"s/images/s.png": png(np.full((20, 20), 9, np.uint8)), "s/masks/m.png": png(two_blobs((20, 20)).astype(np.uint8) * 100)}
    (www/"stage1_train.zip").write_bytes(zip_bytes(files))
    local = replace(DATASET_REGISTRY["dsb2018"], files=(RemoteFile(f"{base}/stage1_train.zip", "stage1_train.zip"),))
    monkeypatch.setitem(DATASET_REGISTRY, "dsb2018", local)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert download_cmd("dsb2018", out=str(tmp_path/"out")) == 0
    assert "dsb2018: 1 image/mask pairs" in capsys.readouterr().out
    assert (tmp_path/"out/manifest.jsonl").exists()
    assert download_cmd("list") == 0 and "livecell" in capsys.readouterr().out
    with pytest.raises(InputError, match="unknown dataset"): download_cmd("nope")


def test_tar_gz_extraction_and_unsafe_members(tmp_path):
    def make(path, members):
        with tarfile.open(path, "w:gz") as t:
            for name, data in members.items():
                info = tarfile.TarInfo(name); info.size = len(data); t.addfile(info, io.BytesIO(data))
    make(tmp_path/"ok.tar.gz", {"d/a.txt": b"hello"})
    out = extract_archive(tmp_path/"ok.tar.gz", tmp_path/"ok")
    assert (out/"d/a.txt").read_bytes() == b"hello"
    make(tmp_path/"bad.tgz", {"../../bad.txt": b"x"})
    with pytest.raises(InputError, match="escapes"): extract_archive(tmp_path/"bad.tgz", tmp_path/"bad")
    assert not (tmp_path/"bad").exists()
