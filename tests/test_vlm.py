"""Integration tests for ullsam_nb.vlm: OpenAI-compatible client against a loopback server, tiny transformers VLMs
of every supported architecture through the real classes, the text cache, resumable folder runs and describe_cmd."""
import base64, io, json, os, threading, time, http.server, importlib.util
from pathlib import Path
import numpy as np
import pytest
from PIL import Image

from ullsam_nb.io import write_image
from ullsam_nb.basics import InputError
from ullsam_nb.vlm_text import render_prompt, load_prompt_templates, parse_count, parse_label, parse_yes_no, is_refusal
from ullsam_nb.basics import read_jsonl_tolerant
from ullsam_nb.vlm_backend import TransformersVLM, save_tiny_vlm, TINY_VLM_ARCHS, CallableVLM, TextCache, image_content_hash
from ullsam_nb.vlm import OpenAICompatibleVLM, VLMHTTPError, VLMConnectionError, get_backend, describe_folder, describe_cmd

KEY = "sk-live-DO-NOT-LEAK-42"
RGB = (np.random.default_rng(1).random((30, 40, 3)) * 255).astype(np.uint8)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path/"cache"))
    monkeypatch.setenv("ULLSAM_QUIET", "1")
    monkeypatch.setenv("TEST_VLM_KEY", KEY)


class Server(http.server.ThreadingHTTPServer):
    "Loopback chat-completions server answering from a script of (status, headers, body[, delay_s])."
    daemon_threads = True
    def __init__(self, script):
        self.script, self.requests = list(script), []
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()
    @property
    def base_url(self): return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
        step = self.server.script.pop(0) if self.server.script else (500, {}, {"error": {"message": "script ended"}})
        status, headers, reply, delay = (tuple(step) + (0,))[:4]
        time.sleep(delay)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        try:
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", **headers}.items(): self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers(); self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError): pass


def ok(text): return (200, {}, {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})


@pytest.fixture
def server():
    servers = []
    def make(script):
        s = Server(script); servers.append(s); return s
    yield make
    for s in servers: s.shutdown(); s.server_close()


def client(srv, **kw):
    sleeps = []
    kw = {"api_key_env": "TEST_VLM_KEY", "sleep": sleeps.append, "timeout": 5, **kw}
    return OpenAICompatibleVLM("test-vl", base_url=srv.base_url, **kw), sleeps


# ---------------------------------------------------------------- OpenAI-compatible endpoint
def test_normal_answer_and_request_shape(server):
    srv = server([ok("  Bright round nuclei.  ")])
    vlm, sleeps = client(srv)
    assert vlm.chat(RGB, "Describe the image in detail", max_new_tokens=11) == "Bright round nuclei."
    assert sleeps == []
    (req,) = srv.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    assert req["headers"]["Content-Type"] == "application/json"
    body = req["body"]
    assert body["model"] == "test-vl" and body["max_tokens"] == 11 and body["temperature"] == 0.0
    (msg,) = body["messages"]
    assert msg["role"] == "user"
    text, img = msg["content"]
    assert text == {"type": "text", "text": "Describe the image in detail"}
    assert img["type"] == "image_url"
    url = img["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    png = base64.b64decode(url.split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), RGB)


def test_system_message_and_max_completion_tokens(server):
    srv = server([ok("x")])
    vlm, _ = client(srv, system="You are a microscopist.", max_tokens_field="max_completion_tokens")
    vlm.chat(RGB, "hi", max_new_tokens=5)
    body = srv.requests[0]["body"]
    assert body["messages"][0] == {"role": "system", "content": "You are a microscopist."}
    assert body["max_completion_tokens"] == 5 and "max_tokens" not in body


def test_no_key_no_auth_header(server, monkeypatch):
    monkeypatch.delenv("TEST_VLM_KEY")
    srv = server([ok("fine")])
    vlm, _ = client(srv)
    assert vlm.chat(RGB, "hi") == "fine"
    assert "Authorization" not in srv.requests[0]["headers"]


def test_429_then_success_honours_retry_after(server):
    srv = server([(429, {"Retry-After": "3"}, {"error": {"message": "slow down"}}),
                  (503, {}, {"error": {"message": "loading"}}), ok("Answer: 23.")])
    vlm, sleeps = client(srv, backoff=0.5)
    assert vlm.chat(RGB, "count") == "Answer: 23."
    assert sleeps == [3.0, 1.0]            # Retry-After beats the 0.5 s backoff; then 0.5 * 2**1
    assert len(srv.requests) == 3


def test_retry_after_is_capped(server):
    srv = server([(429, {"Retry-After": "100000"}, {}), ok("ok")])
    vlm, sleeps = client(srv, max_retry_after=7)
    assert vlm.chat(RGB, "x") == "ok" and sleeps == [7]


def test_500_repeated_gives_clear_error(server):
    srv = server([(500, {}, {"error": {"message": "CUDA out of memory"}})] * 4)
    vlm, sleeps = client(srv, max_retries=3, backoff=1.0, max_backoff=3.0)
    with pytest.raises(VLMHTTPError) as e:
        vlm.chat(RGB, "x")
    assert e.value.status == 500
    msg = str(e.value)
    assert "HTTP 500" in msg and "CUDA out of memory" in msg and "after 4 attempts" in msg and srv.base_url in msg
    assert sleeps == [1.0, 2.0, 3.0]       # exponential, capped at max_backoff
    assert len(srv.requests) == 4


def test_401_clear_error_without_key(server):
    srv = server([(401, {}, {"error": {"message": f"Incorrect API key provided: {KEY}", "code": "invalid_api_key"}})])
    vlm, sleeps = client(srv)
    with pytest.raises(VLMHTTPError) as e:
        vlm.chat(RGB, "x")
    msg = str(e.value)
    assert e.value.status == 401 and "HTTP 401" in msg and "$TEST_VLM_KEY" in msg and "Incorrect API key" in msg
    assert KEY not in msg and KEY not in e.value.server_text and KEY not in repr(e.value)
    assert sleeps == [] and len(srv.requests) == 1     # 4xx other than 429 is not retried


def test_400_includes_status_and_server_text(server):
    srv = server([(400, {}, {"error": {"message": "image_url is not supported by this model"}})])
    vlm, _ = client(srv)
    with pytest.raises(VLMHTTPError, match=r"HTTP 400 Bad Request: image_url is not supported by this model"):
        vlm.chat(RGB, "x")


def test_non_json_error_body(server):
    srv = server([(404, {"Content-Type": "text/plain"}, b"404 page not found")])
    vlm, _ = client(srv)
    with pytest.raises(VLMHTTPError, match="HTTP 404 Not Found: 404 page not found"):
        vlm.chat(RGB, "x")


def test_timeout_is_retried_then_clear_error(server):
    srv = server([ok("too late", )[:3] + (1.5,)] * 2)
    vlm, sleeps = client(srv, timeout=0.3, max_retries=1)
    t0 = time.time()
    with pytest.raises(VLMConnectionError, match=r"timed out after 2 attempts \(timeout 0.3s\)"):
        vlm.chat(RGB, "x")
    assert time.time() - t0 < 3 and sleeps == [1.0] and len(srv.requests) == 2


def test_timeout_then_success(server):
    srv = server([ok("late")[:3] + (1.0,), ok("on time")])
    vlm, sleeps = client(srv, timeout=0.3)
    assert vlm.chat(RGB, "x") == "on time" and len(sleeps) == 1


def test_connection_refused():
    import socket
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()   # a port nobody listens on
    sleeps = []
    vlm = OpenAICompatibleVLM("m", base_url=f"http://127.0.0.1:{port}/v1", api_key_env="TEST_VLM_KEY", max_retries=2, sleep=sleeps.append)
    with pytest.raises(VLMConnectionError, match="could not connect after 3 attempts"):
        vlm.chat(RGB, "x")
    assert sleeps == [1.0, 2.0]


def test_malformed_reply(server):
    srv = server([(200, {}, {"choices": []}), (200, {}, b"<html>proxy error</html>")])
    vlm, _ = client(srv)
    with pytest.raises(VLMHTTPError, match=r"no choices\[0\]\.message\.content"):
        vlm.chat(RGB, "x")
    with pytest.raises(VLMHTTPError, match="not JSON"):
        vlm.chat(RGB, "x")


def test_content_as_list_of_parts(server):
    srv = server([(200, {}, {"choices": [{"message": {"content": [{"type": "text", "text": "Answer: "}, {"type": "text", "text": "7"}]}}]})])
    vlm, _ = client(srv)
    assert vlm.count(RGB, cache=False).value == 7


def test_key_never_in_repr_or_state(server):
    srv = server([])
    vlm, _ = client(srv)
    import pickle
    assert KEY not in repr(vlm) and KEY not in str(vars(vlm))
    vlm._sleep = None   # the test's recorder is not picklable-relevant
    assert KEY.encode() not in pickle.dumps({k: v for k, v in vars(vlm).items() if k != "_sleep"})
    assert KEY not in vlm.identity


def test_endpoint_text_cache_reused(server):
    srv = server([ok("There are twenty-three cells."), ok("Answer: 5")])
    vlm, _ = client(srv)
    assert vlm.count(RGB).value == 23
    vlm2, _ = client(srv)                 # a new session, same endpoint and model: served from disk
    assert vlm2.count(RGB).value == 23 and len(srv.requests) == 1
    assert vlm2.count(RGB, objects="nuclei").value == 5 and len(srv.requests) == 2   # another prompt: another request


# ---------------------------------------------------------------- local transformers VLMs (tiny, random, offline)
@pytest.mark.parametrize("arch", TINY_VLM_ARCHS)
def test_tiny_transformers_vlm(arch, tmp_path):
    if arch == "smolvlm" and importlib.util.find_spec("num2words") is None:
        pytest.skip("SmolVLMProcessor needs the num2words package (SmolVLM v1 = idefics3 is covered)")
    path = save_tiny_vlm(arch, tmp_path/arch)
    assert (path/"config.json").exists() and (path/"processor_config.json").exists() or (path/"preprocessor_config.json").exists()
    vlm = get_backend("transformers", str(path), device="cpu")
    assert isinstance(vlm, TransformersVLM)
    grey16 = (np.arange(24*36, dtype=np.uint16).reshape(24, 36) * 50)
    reply = vlm.chat(grey16, render_prompt("classify", labels=["a", "b"]), max_new_tokens=3)
    assert isinstance(reply, str) and len(reply.split()) <= 3
    # deterministic (greedy) and cached under the model identity
    a = vlm.describe(RGB, max_new_tokens=3)
    assert a == vlm.chat(RGB, "Describe the image in detail", max_new_tokens=3)
    assert len(TextCache(vlm.identity)) == 1


def test_describe_cmd_local_tiny_model(tmp_path, capsys):
    imgs = _folder(tmp_path/"imgs", 2)
    path = save_tiny_vlm("qwen2_5_vl", tmp_path/"qwen")
    assert describe_cmd(str(imgs), "qwen2.5-vl", str(tmp_path/"c.jsonl"), model=str(path), max_new_tokens=2, device="cpu") == 0
    recs = read_jsonl_tolerant(tmp_path/"c.jsonl")
    assert len(recs) == 2 and all(r["model"].startswith("transformers:") and r["prompt_name"] == "describe" for r in recs)
    assert recs[0]["conversation"][0]["content"] == "Describe the image in detail\n<image>"


def test_transformers_identity_changes_with_weights(tmp_path):
    p = save_tiny_vlm("llava", tmp_path/"m", seed=0)
    id0 = TransformersVLM(p, device="cpu").identity
    time.sleep(0.01)
    save_tiny_vlm("llava", tmp_path/"m", seed=1)
    assert TransformersVLM(p, device="cpu").identity != id0


def test_tiny_arch_name_checked(tmp_path):
    with pytest.raises(InputError, match="unknown tiny VLM architecture"):
        save_tiny_vlm("gemma3", tmp_path)


# ---------------------------------------------------------------- uLLSAM's own MLLM
def test_tiny_ullsam_backend():
    vlm = get_backend("tiny", device="cpu")
    reply = vlm.chat(RGB, "Describe the image in detail", max_new_tokens=3)
    assert isinstance(reply, str)
    assert vlm.identity.startswith("ullsam-mllm:")
    with pytest.raises(InputError, match="MLLM object"):
        get_backend("tiny", model="/some/path")


# ---------------------------------------------------------------- folders, resume, CLI
def _folder(root, n=5):
    for i in range(n): write_image(root/f"im{i:02d}.png", np.full((12, 12), 20*i + 5, np.uint8))
    return root


def test_describe_folder_resumes_without_paying_twice(tmp_path):
    imgs, calls = _folder(tmp_path/"imgs"), []
    def fn(img, prompt, n):
        calls.append(img.getpixel((0, 0))[0])
        if len(calls) == 3: raise KeyboardInterrupt   # the user presses Ctrl-C at the third image
        return f"Answer: {len(calls)}"
    vlm = CallableVLM(fn, "fn-v1")
    out = tmp_path/"out.jsonl"
    with pytest.raises(KeyboardInterrupt):
        describe_folder(imgs, vlm, "count", out)
    assert len(read_jsonl_tolerant(out)) == 2
    s = describe_folder(imgs, vlm, "count", out)
    assert (s["n_images"], s["n_skipped"], s["n_new"]) == (5, 2, 3)
    assert len(calls) == 6                             # 2 + the interrupted one + 3 new: nothing paid twice
    recs = read_jsonl_tolerant(out)
    assert [Path(r["image_path"]).name for r in recs] == [f"im{i:02d}.png" for i in range(5)]
    assert all(r["model"] == "fn-v1" and r["prompt_name"] == "count" for r in recs)
    assert [r["answer"] for r in recs] == [1, 2, 4, 5, 6]


def test_describe_folder_cut_line_and_skip_errors(tmp_path):
    imgs = _folder(tmp_path/"imgs", 3)
    out = tmp_path/"out.jsonl"
    out.write_text(json.dumps({"image_path": str(imgs/"im00.png"), "text": "old"}) + "\n" + '{"image_path": "' + str(imgs/"im01.png"))
    def fn(img, prompt, n):
        if img.getpixel((0, 0))[0] == 45: raise VLMConnectionError("down")
        return "Round nuclei."
    with pytest.warns(UserWarning):
        s = describe_folder(imgs, CallableVLM(fn, "f"), "describe", out, on_error="skip")
    assert s["n_skipped"] == 1 and s["failed"] == [str(imgs/"im02.png")] and s["n_new"] == 1
    recs = [json.loads(l) for l in out.read_text().splitlines()]      # the torn line was cut off on resume: every line whole
    assert [Path(r["image_path"]).name for r in recs] == ["im00.png", "im01.png"]
    assert recs[1]["conversation"] == [{"role": "user", "content": "Describe the image in detail\n<image>"},
                                       {"role": "assistant", "content": "Round nuclei."}]


def test_describe_cmd_against_endpoint(tmp_path, server, capsys):
    imgs = _folder(tmp_path/"ds"/"images", 2)
    srv = server([ok("There are about twenty-three cells."), ok("~40")])
    out = tmp_path/"counts.jsonl"
    rc = describe_cmd(str(tmp_path/"ds"), "openai", str(out), model="test-vl", prompt="count", objects="nuclei",
                      base_url=srv.base_url, api_key_env="TEST_VLM_KEY", max_new_tokens=16)
    assert rc == 0
    assert "2 new, 0 already done" in capsys.readouterr().out
    assert [r["answer"] for r in read_jsonl_tolerant(out)] == [23, 40]
    assert "nuclei" in srv.requests[0]["body"]["messages"][0]["content"][0]["text"]
    assert srv.requests[0]["body"]["max_tokens"] == 16
    assert describe_cmd(str(imgs), "openai", str(out), model="test-vl", prompt="count", objects="nuclei", base_url=srv.base_url) == 0
    assert len(srv.requests) == 2                      # the rerun skipped both images


def test_describe_folder_parallel_workers(tmp_path, server):
    imgs = _folder(tmp_path/"imgs", 6)
    srv = server([ok(f"Answer: {i}")[:3] + (0.3,) for i in range(6)])
    active, peak, lock = [0], [0], threading.Lock()
    real = Handler.do_POST
    def counting(self):
        with lock: active[0] += 1; peak[0] = max(peak[0], active[0])
        try: real(self)
        finally:
            with lock: active[0] -= 1
    Handler.do_POST = counting
    try:
        vlm, _ = client(srv)
        s = describe_folder(imgs, vlm, "count", tmp_path/"o.jsonl", workers=3)
    finally: Handler.do_POST = real
    recs = read_jsonl_tolerant(tmp_path/"o.jsonl")
    assert s["n_new"] == 6 and sorted(r["answer"] for r in recs) == list(range(6))
    assert sorted(Path(r["image_path"]).name for r in recs) == [f"im{i:02d}.png" for i in range(6)]
    assert peak[0] >= 2                                 # requests really overlapped
    with pytest.warns(UserWarning, match="one request at a time"):
        describe_folder(imgs, CallableVLM(lambda *a: "x", "f"), "describe", tmp_path/"d.jsonl", workers=4)


def test_describe_cmd_slots_and_prompt_file(tmp_path, server):
    _folder(tmp_path/"imgs", 1)
    (tmp_path/"p.json").write_text(json.dumps({"organ": {"text": "Segment {instance} in this {modality} scan.", "answer": "text"}}))
    srv = server([ok("The liver is large.")])
    rc = describe_cmd(str(tmp_path/"imgs"), "vllm", str(tmp_path/"o.jsonl"), model="m", prompt="organ", prompts=str(tmp_path/"p.json"),
                      slots='{"modality": "CT", "instance": "the liver"}', base_url=srv.base_url)
    assert rc == 0 and srv.requests[0]["body"]["messages"][0]["content"][0]["text"] == "Segment the liver in this CT scan."
    with pytest.raises(InputError, match="needs slot"):
        describe_cmd(str(tmp_path/"imgs"), "vllm", str(tmp_path/"o2.jsonl"), model="m", prompt="zeus", base_url=srv.base_url)
    with pytest.raises(InputError, match="unknown prompt template"):
        describe_cmd(str(tmp_path/"imgs"), "vllm", str(tmp_path/"o2.jsonl"), model="m", prompt="nope")
    with pytest.raises(InputError, match="--device does not apply"):
        describe_cmd(str(tmp_path/"imgs"), "vllm", str(tmp_path/"o2.jsonl"), model="m", device="cuda")
    with pytest.raises(InputError, match="--base-url does not apply"):
        describe_cmd(str(tmp_path/"imgs"), "transformers", str(tmp_path/"o2.jsonl"), model="m", base_url="http://x")
    with pytest.raises(InputError, match="image folder not found"):
        describe_cmd(str(tmp_path/"missing"), "vllm", str(tmp_path/"o2.jsonl"), model="m", base_url=srv.base_url)


# ---------------------------------------------------------------- parsers on messy replies
@pytest.mark.parametrize("text,want", [
    ("There are about twenty-three cells", 23), ("Answer: 23.", 23), ("~40", 40), ("between 10 and 12", 11),
    ("**Count:** 1,024", 1024), ("The 1024x1024 image at 63x shows thirty one nuclei.", 31),
    ("I estimate roughly 150-160 cells.", 155), ("No cells are visible.", 0), ("zero", 0),
    ("Final answer: 8", 8), ("I see 3 clusters containing a total of 41 cells.", 41),
    ("I'm sorry, I can't count objects in images.", None), ("The cells look healthy.", None), ("", None), (None, None),
    ("I cannot count precisely; however, there appear to be around 60 cells.", 60), ("a dozen", 12),
])
def test_parse_count(text, want):
    assert parse_count(text) == want


@pytest.mark.parametrize("text,want", [
    ("Fibres", "fibres"), ("**MEMS**", "MEMS/pillars"), ("The image shows a tip.", "tips"),
    ("Category:  Films / coated surfaces", "films/coated surfaces"), ("This is NOT biological; I'd say particles.", "particles"),
    ("Sorry, I'm unable to classify this image.", None), ("Something else entirely.", None),
    ("Nanowires or possibly fibres.", "nanowires"),
])
def test_parse_label(text, want):
    labels = ["particles", "nanowires", "fibres", "films/coated surfaces", "MEMS/pillars", "tips", "biological"]
    assert parse_label(text, labels) == want


def test_parse_yes_no_and_refusal():
    assert parse_yes_no("YES!") is True and parse_yes_no("Nope.") is False and parse_yes_no("unclear") is None
    assert is_refusal("As an AI language model, I cannot view images.") and not is_refusal("Yes")


def test_image_hash_same_for_path_and_array(tmp_path):
    write_image(tmp_path/"a.png", RGB)
    assert image_content_hash(tmp_path/"a.png") == image_content_hash(RGB)


def test_prompt_file_yaml_errors(tmp_path):
    (tmp_path/"bad.yaml").write_text("x: {text: 'n={n', answer: count}\n")
    with pytest.raises(InputError, match="template 'x'"):
        load_prompt_templates(tmp_path/"bad.yaml")
    (tmp_path/"kind.yaml").write_text("x: {text: 'hi', answer: number}\n")
    with pytest.raises(InputError, match="answer kind must be one of"):
        load_prompt_templates(tmp_path/"kind.yaml")
