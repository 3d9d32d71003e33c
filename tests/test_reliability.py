"""Reliability and security cases (issue 15): each test fails on the code before the fix. Loopback servers only, bounded in time."""
import http.server, json, os, signal, stat, subprocess, sys, threading, time, warnings
from pathlib import Path
import numpy as np
import pytest
from ullsam_nb.cli import main

KEY = "sk-test-RELIABILITY-SECRET-42"
RGB = np.zeros((8, 8, 3), np.uint8)


# ---------------------------------------------------------------- loopback endpoints
class Recorder(http.server.ThreadingHTTPServer):
    "A loopback server: `reply(handler)` answers each request; every request's method, path and headers are kept."
    daemon_threads = True
    def __init__(self, reply):
        self.reply, self.requests = reply, []
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
    @property
    def base(self): return f"http://127.0.0.1:{self.server_address[1]}"

class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def _any(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n: self.rfile.read(n)
        self.server.requests.append(dict(method=self.command, path=self.path, headers=dict(self.headers)))
        try: self.server.reply(self)
        except (BrokenPipeError, ConnectionResetError): pass
    do_GET = do_POST = _any

def send(h, status, body, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h.send_response(status)
    for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}.items(): h.send_header(k, v)
    h.end_headers(); h.wfile.write(data)

def answer(text): return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}

@pytest.fixture
def servers():
    made = []
    def make(reply):
        s = Recorder(reply); made.append(s); return s
    yield make
    for s in made: s.shutdown(); s.server_close()

@pytest.fixture
def images(tmp_path, monkeypatch):
    from ullsam_nb.io import write_image
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path/"cache"))
    monkeypatch.setenv("ULLSAM_QUIET", "1")
    monkeypatch.setenv("REL_KEY", KEY)
    write_image(tmp_path/"imgs"/"a.png", np.full((16, 16), 90, np.uint8))
    return tmp_path/"imgs"

def describe(images, url, *extra, out=None):
    return main(["describe", "--images", str(images), "--backend", "vllm", "--model", "m", "--base-url", url,
                 "--api-key-env", "REL_KEY", "--out", str(out or images.parent/"out.jsonl"), *extra])


# ---------------------------------------------------------------- High: the key never follows a redirect
def test_redirect_is_refused_and_key_never_reaches_the_other_host(servers, images, capsys):
    thief = servers(lambda h: send(h, 200, answer("stolen answer")))
    endpoint = servers(lambda h: send(h, 302, b"", {"Location": f"{thief.base}/v1/chat/completions"}))
    rc = describe(images, endpoint.base + "/v1")
    err = capsys.readouterr().err
    assert rc != 0, "a redirect must not end in success"
    assert thief.requests == [], "the other host was contacted"
    assert [r["method"] for r in endpoint.requests] == ["POST"]
    assert "redirect" in err and "HTTP 302" in err and endpoint.base in err and KEY not in err
    assert err.count("\n") == 1 and err.startswith("ullsam describe: error: ")
    assert not (images.parent/"out.jsonl").exists() or "stolen" not in (images.parent/"out.jsonl").read_text()


def test_redirect_307_on_the_client_too(servers, monkeypatch):
    from ullsam_nb.vlm import OpenAICompatibleVLM, VLMHTTPError
    monkeypatch.setenv("REL_KEY", KEY)
    thief = servers(lambda h: send(h, 200, answer("x")))
    endpoint = servers(lambda h: send(h, 307, b"", {"Location": f"http://user:{KEY}@127.0.0.1:{thief.server_address[1]}/"}))
    vlm = OpenAICompatibleVLM("m", base_url=endpoint.base + "/v1", api_key_env="REL_KEY", sleep=lambda s: None, notify=lambda m: None)
    with pytest.raises(VLMHTTPError, match="redirects") as e: vlm.chat(RGB, "hi")
    assert thief.requests == [] and len(endpoint.requests) == 1 and KEY not in str(e.value)


# ---------------------------------------------------------------- Medium: a hanging endpoint is bounded, Retry-After capped visibly
def test_hanging_endpoint_is_bounded_by_cli_options(servers, images, capsys):
    hang = threading.Event()
    srv = servers(lambda h: (hang.wait(5), send(h, 200, answer("late"))))
    t0 = time.monotonic()
    rc = describe(images, srv.base + "/v1", "--timeout", "0.4", "--retries", "5", "--deadline", "1.5")
    took = time.monotonic() - t0
    hang.set()
    err = capsys.readouterr().err
    assert rc != 0 and took < 4, took
    assert "timed out" in err and "deadline" in err and "Traceback" not in err
    assert 1 <= len(srv.requests) <= 3        # retries stop at the deadline, not after 6 x timeout


def test_retry_after_is_capped_and_said(servers, monkeypatch):
    from ullsam_nb.vlm import OpenAICompatibleVLM
    replies = iter([(429, {"error": {"message": "slow down"}}, {"Retry-After": "300"}), (200, answer("ok"), {})])
    srv = servers(lambda h: send(h, *next(replies)))
    sleeps, notes = [], []
    vlm = OpenAICompatibleVLM("m", base_url=srv.base + "/v1", api_key_env=None, sleep=sleeps.append, notify=notes.append)
    assert vlm.chat(RGB, "x") == "ok"
    assert sleeps == [60.0]                     # the default cap, not 300 s
    assert len(notes) == 1 and "HTTP 429" in notes[0] and "300" in notes[0] and "capped at 60" in notes[0]


def test_default_budget_per_request_is_bounded():
    from ullsam_nb.vlm import OpenAICompatibleVLM
    v = OpenAICompatibleVLM("m", base_url="http://127.0.0.1:9/v1")
    assert v.deadline and v.deadline <= 300 and v.max_retry_after <= 60


# ---------------------------------------------------------------- Low: keys are never printed
def test_key_given_as_variable_name_is_refused_unprinted(images, capsys):
    rc = main(["describe", "--images", str(images), "--backend", "vllm", "--model", "m", "--base-url", "http://127.0.0.1:9/v1",
               "--api-key-env", KEY, "--out", str(images.parent/"o.jsonl")])
    cap = capsys.readouterr()
    assert rc == 2 and KEY not in cap.err + cap.out and "--api-key-env" in cap.err


def test_key_in_url_userinfo_is_never_printed(servers, images, capsys):
    srv = servers(lambda h: send(h, 500, {"error": {"message": "boom"}}))
    url = f"http://user:{KEY}@127.0.0.1:{srv.server_address[1]}/v1"
    rc = describe(images, url, "--retries", "1", "--timeout", "2")
    cap = capsys.readouterr()
    assert rc != 0 and KEY not in cap.err + cap.out, cap.err


def test_key_in_url_userinfo_not_in_identity_or_cache(tmp_path, monkeypatch):
    from ullsam_nb.vlm import OpenAICompatibleVLM
    v = OpenAICompatibleVLM("m", base_url=f"https://me:{KEY}@api.example.com/v1")
    assert KEY not in v.identity and KEY not in repr(v) and KEY not in v.display_url


# ---------------------------------------------------------------- Low: endpoint failures are one line, never a traceback
@pytest.mark.parametrize("status,body,expect", [
    (500, {"error": {"message": "CUDA out of memory"}}, "HTTP 500"),
    (429, {"error": {"message": "rate limited"}}, "HTTP 429"),
    (401, {"error": {"message": f"Incorrect API key provided: {KEY}"}}, "HTTP 401"),
    (200, b"<html>proxy error</html>", "not JSON"),
    (200, {"id": "x"}, "no choices"),
])
def test_endpoint_failures_are_one_line(servers, images, capsys, status, body, expect):
    srv = servers(lambda h: send(h, status, body))
    rc = describe(images, srv.base + "/v1", "--retries", "1", "--timeout", "2")
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("ullsam describe: error:")]
    assert rc == 1 and len(lines) == 1 and expect in lines[0] and "Traceback" not in err and KEY not in err, err


# ---------------------------------------------------------------- Low: a torn last line of describe's JSONL is repaired on resume
def test_torn_jsonl_line_is_repaired_on_resume(images, servers, capsys):
    srv = servers(lambda h: send(h, 200, answer("Bright nuclei.")))
    write_image = __import__("ullsam_nb.io", fromlist=["write_image"]).write_image
    write_image(images/"b.png", np.full((16, 16), 30, np.uint8))
    out = images.parent/"out.jsonl"
    assert describe(images, srv.base + "/v1", out=out) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(lines[0] + lines[1][:25])                 # killed while writing the second record
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert describe(images, srv.base + "/v1", out=out) == 0
    assert any("torn" in str(x.message) for x in w)
    recs = [json.loads(l) for l in out.read_text().splitlines()]      # every line whole: no torn record left behind
    assert sorted(Path(r["image_path"]).name for r in recs) == ["a.png", "b.png"]


# ---------------------------------------------------------------- Low: an output path of the wrong kind
def test_describe_out_is_a_folder(images, capsys):
    rc = main(["describe", "--images", str(images), "--backend", "tiny", "--out", str(images)])
    err = capsys.readouterr().err
    assert rc == 2 and "is an existing folder" in err and str(images) in err


# ---------------------------------------------------------------- training: the stopping rule, mid-epoch checkpoints, bad files, full disk
TOY = "task=toy,validate=false,keep_epoch_checkpoints=false"
CLI = [sys.executable, "-c", "import sys; from ullsam_nb.cli import main; sys.exit(main())"]

def train_steps(run):
    from ullsam_nb.train_parts import read_log
    df = read_log(run/"log.csv")
    return list(df[df.kind == "train"].step)

def test_resume_keeps_the_saved_max_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ULLSAM_QUIET", "1")
    run = tmp_path/"run"
    assert main(["train", "--out", str(run), "--preset", "tiny", "--set", TOY + ",synth_n=64", "--max-steps", "3", "--quiet"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0        # the command the tool prints after an interrupt
    assert "at step 3 " in capsys.readouterr().out.splitlines()[-1]
    assert train_steps(run) == [1, 2, 3]
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "5", "--quiet"]) == 0   # a new rule, given explicitly
    assert train_steps(run) == [1, 2, 3, 4, 5]


def test_sigkill_before_the_first_epoch_end_loses_little(tmp_path):
    run, env = tmp_path/"run", dict(os.environ, ULLSAM_QUIET="1")
    p = subprocess.Popen(CLI + ["train", "--out", str(run), "--preset", "tiny", "--quiet",
                                "--set", TOY + ",synth_n=400000,batch_size=1,checkpoint_every=20"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last, t0 = run/"checkpoints"/"last.pt", time.monotonic()
    try:
        while not last.exists() and time.monotonic() - t0 < 90 and p.poll() is None: time.sleep(0.05)
        assert last.exists(), "no checkpoint before the first epoch ended"
    finally:
        p.kill(); p.wait(30)                                     # SIGKILL: no handler runs
    import torch
    st = torch.load(last, weights_only=True)
    assert st["epoch"] == 0 and st["opt_step"] >= 20 and st["opt_step"] % 20 == 0
    k = st["opt_step"]
    r = subprocess.run(CLI + ["train", "--out", str(run), "--resume", "--max-steps", str(k + 3), "--quiet"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert train_steps(run)[-4:] == [k, k + 1, k + 2, k + 3]      # continued from the mid-epoch checkpoint


def _hostile_pickle(path):
    import pickle
    class Boom:
        def __reduce__(self): return (os.system, (f"touch {path.parent/'pwned'}",))
    path.write_bytes(pickle.dumps({"model": Boom()}))

@pytest.mark.parametrize("damage", ["garbage", "hostile", "truncated"])
def test_damaged_checkpoint_on_resume_is_one_line(tmp_path, capsys, monkeypatch, damage):
    monkeypatch.setenv("ULLSAM_QUIET", "1")
    run = tmp_path/"run"
    assert main(["train", "--out", str(run), "--preset", "tiny", "--set", TOY + ",synth_n=64", "--max-steps", "2", "--quiet"]) == 0
    last = run/"checkpoints"/"last.pt"
    if damage == "garbage": last.write_bytes(os.urandom(3000))
    elif damage == "hostile": _hostile_pickle(last)
    else: last.write_bytes(last.read_bytes()[:700])
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{last}: " in err and "Traceback" not in err, err
    assert not (run/"pwned").exists()


def test_random_bytes_as_init_weights_is_one_line(tmp_path, capsys):
    init = tmp_path/"init"; init.mkdir()
    (init/"config.json").write_text("{}"); (init/"model.safetensors").write_bytes(os.urandom(4096))
    rc = main(["train", "--out", str(tmp_path/"run"), "--preset", "tiny", "--data", str(tmp_path/"nowhere"),
               "--set", f"init={init}", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.safetensors: not a readable safetensors file" in err and err.count("\n") == 1, err


def test_train_out_is_an_existing_file(tmp_path, capsys):
    (tmp_path/"out").write_text("x")
    assert main(["train", "--out", str(tmp_path/"out"), "--preset", "tiny", "--set", TOY]) == 2
    assert "out: --out (the run's folder) is an existing file" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE")
def test_disk_full_while_checkpointing_is_one_line_naming_the_file(tmp_path):
    import resource
    def limit():                                                  # the disk "fills" at 12 KB per file: writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (12 << 10, 12 << 10))
    run = tmp_path/"run"
    r = subprocess.run(CLI + ["train", "--out", str(run), "--preset", "tiny", "--quiet", "--set", TOY + ",synth_n=64",
                              "--max-steps", "2"], env=dict(os.environ, ULLSAM_QUIET="1"), capture_output=True, text=True,
                       timeout=120, preexec_fn=limit)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[-1].startswith("ullsam train: error: ") and "could not write" in lines[-1] and str(run) in lines[-1], lines[-1]
    assert not [p for p in run.rglob("*") if p.name.startswith(".") and p.suffix == ".tmp"]   # no temp file left behind


# ---------------------------------------------------------------- segment: sizes, big ids in PNG, mixed folders, --out
def _disc_world(root, size=(64, 64), ids=(1, 2), image_name="a.png", mask_name="a.tif", mask_size=None):
    from ullsam_nb.io import write_image, write_labels
    yy, xx = np.mgrid[:size[0], :size[1]]
    lab = np.zeros(size, np.uint32)
    for k, (cy, cx) in zip(ids, [(18, 18), (44, 44)]): lab[(yy - cy)**2 + (xx - cx)**2 < 81] = k
    write_image(root/"images"/image_name, (40 + 180 * (lab > 0)).astype(np.uint8))
    m = lab if mask_size is None else np.zeros(mask_size, np.uint32) + lab[:mask_size[0], :mask_size[1]]
    write_labels(root/"masks"/mask_name, m)
    return root

@pytest.fixture
def quiet_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path/"cache")); monkeypatch.setenv("ULLSAM_QUIET", "1")

def test_segment_refuses_a_gt_of_another_size(tmp_path, capsys, quiet_cache):
    w = _disc_world(tmp_path, size=(64, 64), mask_size=(32, 32))
    rc = main(["segment", "--images", str(w/"images"), "--out", str(tmp_path/"pred"), "--gt", str(w/"masks")])
    err = capsys.readouterr().err
    assert rc == 2 and "a.png: mask" in err and "is 32x32 but the image is 64x64" in err, err
    assert not (tmp_path/"pred"/"a.png").exists()

def test_segment_png_with_ids_above_65535_falls_back_to_tif(tmp_path, capsys, quiet_cache):
    w = _disc_world(tmp_path, ids=(70_000, 70_001))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(["segment", "--images", str(w/"images"), "--out", str(tmp_path/"pred"), "--gt", str(w/"masks")])
    assert rc == 0, capsys.readouterr().err
    from ullsam_nb.io import read_labels
    assert sorted(p.name for p in (tmp_path/"pred").iterdir()) == ["a.tif"]
    assert set(np.unique(read_labels(tmp_path/"pred"/"a.tif"))) <= {0, 70_000, 70_001}
    assert any("does not fit PNG" in str(x.message) and "a.tif" in str(x.message) for x in caught)
    assert main(["evaluate", "--pred", str(tmp_path/"pred"), "--gt", str(w/"masks")]) == 0   # evaluate still pairs them

def test_segment_refuses_a_mixed_folder(tmp_path, capsys, quiet_cache):
    import shutil
    from ullsam_nb.basics import shared_data_dir
    src = shared_data_dir("dsb2018")
    mixed = tmp_path/"dsb"
    if src is not None: shutil.copytree(src, mixed, ignore=shutil.ignore_patterns("*.md"))
    else:
        w = _disc_world(tmp_path/"w"); mixed.mkdir()
        shutil.copy(w/"images"/"a.png", mixed/"nuclei_img.png"); shutil.copy(w/"masks"/"a.tif", mixed/"nuclei_mask.tif")
    for extra in ([], ["--gt", str(mixed)]):
        rc = main(["segment", "--images", str(mixed), "--out", str(tmp_path/"pred"), "--prompts", "auto", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and "mixes images and label maps" in err and "mask" in err, err
    assert not (tmp_path/"pred").exists() or not list((tmp_path/"pred").iterdir())

def test_segment_out_is_an_existing_file(tmp_path, capsys, quiet_cache):
    w = _disc_world(tmp_path)
    (tmp_path/"pred").write_text("x")
    rc = main(["segment", "--images", str(w/"images"), "--out", str(tmp_path/"pred"), "--gt", str(w/"masks")])
    assert rc == 2 and "pred: --out (the label-map folder) is an existing file" in capsys.readouterr().err


# ---------------------------------------------------------------- bad manifest rows are found before training starts
def test_bad_manifest_rows_stop_train_before_it_starts(tmp_path, capsys, quiet_cache):
    w = _disc_world(tmp_path/"ds", image_name="a.tif")
    rows = [{"image_path": "images/a.tif", "conversation": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "discs"}]},
            {"image_path": "images/gone.tif"}]
    (w/"train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path/"run"
    rc = main(["train", "--out", str(run), "--preset", "tiny", "--data", str(w/"train.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "train.jsonl: 1 bad row(s) in the manifest: record 2: image" in err and "gone.tif" in err, err
    assert not (run/"log.csv").exists() and not (run/"checkpoints").exists()


# ---------------------------------------------------------------- NaN/inf pixels, 3-D stacks, RGBA: said, and never a NaN embedding
def test_nan_image_is_warned_and_never_cached_as_nan(tmp_path, quiet_cache):
    import tifffile
    from safetensors.torch import load_file
    (tmp_path/"imgs").mkdir()
    img = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64); img[:8] = np.nan; img[8, :4] = np.inf
    tifffile.imwrite(tmp_path/"imgs"/"nan.tif", img)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["precompute", "--images", str(tmp_path/"imgs")]) == 0
    assert any("nan.tif: 516 NaN/infinite pixel(s)" in str(x.message) for x in caught)
    files = list((tmp_path/"cache"/"embeddings").rglob("*.safetensors"))
    assert files and all(np.isfinite(load_file(f)["embedding"].numpy()).all() for f in files)

def test_zstack_and_rgba_are_said(tmp_path, quiet_cache):
    import tifffile
    from ullsam_nb.io import write_image
    (tmp_path/"imgs").mkdir()
    tifffile.imwrite(tmp_path/"imgs"/"z.tif", np.random.default_rng(0).integers(0, 4000, (6, 48, 48), dtype=np.uint16),
                     photometric="minisblack", metadata={"axes": "ZYX"})
    rgba = np.random.default_rng(1).integers(0, 255, (48, 48, 4), dtype=np.uint8)
    write_image(tmp_path/"imgs"/"rgba.png", rgba)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["precompute", "--images", str(tmp_path/"imgs")]) == 0
    msgs = " | ".join(str(x.message) for x in caught)
    assert "z.tif: 3-D stack (6 z-planes" in msgs and "6-channel image: the model sees the per-pixel max" in msgs, msgs
    assert "4-channel image" in msgs and "alpha is folded in" in msgs, msgs


# ---------------------------------------------------------------- outputs respect the umask
def test_outputs_respect_the_umask(tmp_path, quiet_cache):
    w = _disc_world(tmp_path/"ds", image_name="a.tif")
    old = os.umask(0o022)
    try: assert main(["segment", "--images", str(w/"images"), "--out", str(tmp_path/"pred"), "--gt", str(w/"masks")]) == 0
    finally: os.umask(old)
    assert stat.S_IMODE((tmp_path/"pred"/"a.tif").stat().st_mode) == 0o644


# ---------------------------------------------------------------- --help: a default once, none on required options
@pytest.mark.parametrize("command", ["segment", "train", "describe", "download", "bench-vlm", "evaluate", "synth"])
def test_help_shows_each_default_once(command, capsys):
    with pytest.raises(SystemExit): main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "SPEC §" not in text
    import re
    for opt_help in re.split(r"\s--", text):
        assert opt_help.count("(default:") <= 1, opt_help
