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
