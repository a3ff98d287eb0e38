"""The editor's server as a client on the network sees it (issue 28): `python editor.py` on a free loopback
port with a random tiny model, driven over raw HTTP. Foreign origins and hosts start no work, client
text never becomes markup, oversized bodies are refused before they are read, every malformed request
gets a one-line 4xx, inversions can be cancelled and give their memory back, and a bounded load of good
and bad requests during an inversion is served.

Memory is read from the server process's /proc/PID/status: RssAnon (its anonymous resident memory: the
heap, tensors and buffers it allocated, without the shared libraries' file-backed code pages, which a
first use maps in once) and VmHWM (peak resident memory, reset through /proc/PID/clear_refs).
"""
import base64
import concurrent.futures
import http.client
import io
import json
import os
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers import TINY_FULL, save_random_generator  # noqa: E402
from tools import editor_browser as eb  # noqa: E402

TINY = TINY_FULL
K = 9
REQUEST_MB = 4  # the server's --max_request_mb here
UPLOAD_MB = 1  # and --max_upload_mb
JSON = {"Content-Type": "application/json"}
FILE = {"Content-Type": "application/octet-stream"}


class Server:
    """The editor under test: its address and process."""

    def __init__(self, url, process, folder):
        self.url, self.process, self.folder = url, process, folder
        self.port = int(url.rsplit(":", 1)[1])
        self.origin = f"http://127.0.0.1:{self.port}"

    def request(self, method, path, body=None, headers=None, timeout=60):
        """(status, parsed JSON or raw bytes, headers) of one request on a fresh connection."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body, headers or {})
            response = connection.getresponse()
            data = response.read()
            kind = response.getheader("Content-Type", "")
            return response.status, (json.loads(data) if kind.startswith("application/json") else data), \
                dict(response.getheaders())
        finally:
            connection.close()

    def post(self, path, value, headers=JSON, **kw):
        body = value if isinstance(value, bytes) else (value if isinstance(value, str) else json.dumps(value)).encode()
        return self.request("POST", path, body, headers, **kw)[:2]

    def get(self, path, **kw):
        return self.request("GET", path, **kw)[:2]

    def memory(self, key="RssAnon"):
        """MiB of `key` in the server's /proc/PID/status."""
        with open(f"/proc/{self.process.pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        raise KeyError(key)

    def reset_peak(self):
        """Reset VmHWM to the current resident size (Linux: write 5 to clear_refs); False if refused."""
        try:
            with open(f"/proc/{self.process.pid}/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    def job(self):
        return self.get("/api/job")[1]

    def wait_job(self, predicate, timeout=60):
        return eb.wait_for(lambda: (lambda job: job if predicate(job) else None)(self.job()), timeout,
                           interval=0.02, what="the inversion")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("editor_web")
    save_random_generator(folder / "tiny.pt", TINY)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with eb.editor_process(["--trained_ckpt", folder / "tiny.pt", *TINY, "--invert_steps", "2", "--max_request_mb",
                            REQUEST_MB, "--max_upload_mb", UPLOAD_MB], env=env) as (url, process):
        yield Server(url, process, folder)


def png_base64(size=24, seed=0):
    image = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def latent_bytes(codes=None, styles=None):
    buffer = io.BytesIO()
    torch.save({"codes": torch.zeros(1, 2 * K, 32) if codes is None else codes,
                "styles_global": torch.zeros(1, 32) if styles is None else styles,
                "style_dim": 32, "n_regions": K, "truncated": True}, buffer)
    return buffer.getvalue()


class PickleHook:
    """Unpickling calls a function (here the harmless os.getpid): what a tensors-only reader must refuse."""

    def __reduce__(self):
        return os.getpid, ()


def assert_one_line_refusal(status, data, expected_status, needle=""):
    assert status == expected_status, (status, data)
    assert isinstance(data, dict) and set(data) == {"error"}, data
    line = data["error"]
    assert line and "\n" not in line and needle in line, line
    for leak in ("Traceback", tempfile.gettempdir() + "/", str(ROOT), "cnerf_editor_"):
        assert leak not in line, line
    return line


def wait_idle(server):
    """Cancel a running inversion (an earlier test's) and wait until none runs."""
    job = server.job()
    if not job["done"]:
        server.post("/api/cancel", {})
        server.wait_job(lambda j: j["done"])


# ------------------------------------------------------------------------------ origins and hosts


def test_cross_origin_form_and_rebinding_host_start_no_work(server):
    """The attacks of issue 28: a foreign page's auto-submitted text/plain form (5000 inversion steps,
    and a render), and a DNS-rebinding page reaching the server under its own name. Nothing starts."""
    wait_idle(server)
    before = server.job()
    # A text/plain form named '{"image":"...","steps":5000,"x":"' with the value '"}' posts this body.
    form = '{"image":"%s","image_name":"face.png","steps":5000,"x":"="}' % png_base64()
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    assert_one_line_refusal(*server.post("/api/invert", form, evil), 403, "cross-origin request refused")
    assert_one_line_refusal(*server.post("/api/render", '{"source":3,"x":"="}', evil), 403, "cross-origin")
    # The same with a JSON type (a foreign page cannot send one without a preflight; still refused), a
    # browser that sends no Origin but says where the request comes from, and a client that says neither.
    as_json = {"Origin": "http://evil.example", "Content-Type": "application/json"}
    assert_one_line_refusal(*server.post("/api/invert", form, as_json), 403, "Origin 'http://evil.example'")
    assert_one_line_refusal(*server.post("/api/invert", form, {"Sec-Fetch-Site": "cross-site", **JSON}), 403,
                            "cross-site request refused")
    assert_one_line_refusal(*server.post("/api/invert", form, {"Content-Type": "text/plain"}), 415,
                            "send Content-Type application/json")
    assert_one_line_refusal(*server.post("/api/invert", form, {}), 415, "application/json")
    assert_one_line_refusal(*server.post("/api/upload_latents?name=a.pt", latent_bytes(),
                                         {"Content-Type": "multipart/form-data; boundary=x"}), 415,
                            "application/octet-stream")
    # DNS rebinding: the page's origin is evil.example:PORT, so its requests are "same-origin" to the
    # browser; the Host header gives it away, on reads as on writes.
    rebound = f"evil.example:{server.port}"
    for method, path in (("GET", "/"), ("GET", "/api/identities"), ("GET", "/api/config"), ("GET", "/api/job")):
        status, data, _ = server.request(method, path, headers={"Host": rebound})
        assert_one_line_refusal(status, data, 403, f"Host '{rebound}': not an address of this editor")
    status, data, _ = server.request("POST", "/api/invert", form, {"Host": rebound, "Origin": f"http://{rebound}",
                                                                   **JSON})
    assert_one_line_refusal(status, data, 403, "--allow_host evil.example")
    assert_one_line_refusal(*server.request("GET", "/", headers={"Host": ""})[:2], 403, "not an address")
    # No work started: the job is the one from before, and the user's own inversion starts at once.
    after = server.job()
    assert after["id"] == before["id"] and after["done"]
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", "localhost:8000"):  # 8000: a forward
        status, _, _ = server.request("GET", "/api/identities", headers={"Host": host})
        assert status == 200, host
    status, job = server.post("/api/invert", {"image": png_base64(), "image_name": "face.png", "steps": 3},
                              {"Origin": server.origin, "Sec-Fetch-Site": "same-origin", **JSON})
    assert status == 200 and not job["done"] and job["steps"] == 3, job
    server.wait_job(lambda j: j["done"])


def test_host_policy_names():
    """Which Host names pass: localhost names always, --host, --allow_host; on all interfaces also IP
    literals (which no rebinding page can use), never another name."""
    from starlette.datastructures import Headers

    from editing.editor_web import HostPolicy, Refused

    def passes(policy, host, method="GET", **extra):
        try:
            policy.refusal(method, Headers({"host": host, **extra}))
            return True
        except Refused as refused:
            assert refused.status == 403 and "\n" not in str(refused)
            return False

    local = HostPolicy("127.0.0.1")
    assert all(passes(local, h) for h in ("localhost:7860", "127.0.0.1:7860", "[::1]:7860", "LOCALHOST", "localhost"))
    assert not any(passes(local, h) for h in ("evil.example:7860", "192.168.1.5:7860", "localhost.evil.example",
                                              "localhost:7860@evil", "", "[::1"))
    named = HostPolicy("workstation.lan", allow_hosts=["editor.internal"])
    assert passes(named, "workstation.lan:7860") and passes(named, "editor.internal")
    assert not passes(named, "10.0.0.2:7860")
    everywhere = HostPolicy("0.0.0.0")
    assert passes(everywhere, "10.0.0.2:7860") and passes(everywhere, "[fe80::1]:7860")
    assert not passes(everywhere, "evil.example:7860")
    # Writes: the Origin must be the page's own.
    assert passes(local, "localhost:8000", "POST", origin="http://localhost:8000")
    assert not passes(local, "localhost:8000", "POST", origin="http://localhost:7860")
    assert not passes(local, "localhost:8000", "POST", origin="null")
    assert passes(local, "localhost:8000", "POST", **{"sec-fetch-site": "same-origin"})
    assert not passes(local, "localhost:8000", "POST", **{"sec-fetch-site": "same-site"})


# ------------------------------------------------------------------------------ no client markup


def test_hostile_names_reach_the_page_only_as_data(server):
    hostile = ["<!--<script>", "<img src=x onerror=\"document.title='x'\">.pt", "\u2028\"'&<>.pt"]
    for name in hostile:
        status, data = server.post(f"/api/upload_latents?name={urllib_quote(name)}", latent_bytes(), FILE)
        assert status == 200, data
    status, page, headers = server.request("GET", "/")
    assert status == 200
    # The page is the file as shipped, byte for byte: no client text is ever put into it.
    assert page == (ROOT / "editing" / "editor_page.html").read_bytes()
    policy = headers["content-security-policy"]
    assert "script-src 'sha256-" in policy and "unsafe-inline" not in policy.split("script-src")[1].split(";")[0]
    labels = [ident["label"] for ident in server.get("/api/config")[1]["identities"]]
    assert all(name in labels for name in hostile)
    raw = server.request("GET", "/api/identities")[1]
    assert raw["identities"][-1]["label"] == hostile[-1]


def urllib_quote(text):
    from urllib.parse import quote

    return quote(text, safe="")


# ---------------------------------------------------------------------------------------- sizes


def stream_body(port, path, total, content_type="application/json", declare_length=True, chunk=1 << 20,
                timeout=30):
    """POST `total` bytes of b"[" in `chunk`-sized pieces (never held whole), with Content-Length or
    chunked; stops sending once the server answers. Returns (status, parsed JSON, bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Type: {content_type}"]
    head.append(f"Content-Length: {total}" if declare_length else "Transfer-Encoding: chunked")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    piece = b"[" * chunk
    frame = piece if declare_length else b"%x\r\n%s\r\n" % (chunk, piece)
    sent, pending, deadline = 0, memoryview(b""), time.monotonic() + timeout
    try:
        while sent < total and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1)
            if readable:
                break  # the answer came: stop sending
            if writable:
                if not pending:
                    pending = memoryview(frame)
                n = sock.send(pending)
                pending = pending[n:]
                if not pending:
                    sent += chunk
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed after answering; the answer is read below
    response = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            response += data
            if b"\r\n\r\n" in response:
                head_part, _, body = response.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head_part.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(body) >= length[0]:
                    break
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    head_part, _, body = response.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ")[1]) if head_part else None
    return status, (json.loads(body) if body else None), sent


def test_bodies_over_the_limit_are_refused_before_they_are_read(server):
    """200 MB bodies (declared, chunked, and a latent upload) are refused with one line while the server's
    peak resident memory (VmHWM, reset before) grows by far less than 200 MB."""
    wait_idle(server)
    server.get("/api/identities")
    if not server.reset_peak():
        pytest.skip("cannot reset the server's peak memory here (/proc/PID/clear_refs not writable)")
    start = server.memory("VmRSS")
    total = 200 << 20
    status, data, sent = stream_body(server.port, "/api/render", total)
    assert_one_line_refusal(status, data, 413, f"request body of 200 MiB refused: at most {REQUEST_MB}.0 MiB "
                                               f"(editor.py --max_request_mb)")
    assert sent < total // 2  # the answer came from the declared length, long before the end
    status, data, sent = stream_body(server.port, "/api/render", total, declare_length=False)
    assert_one_line_refusal(status, data, 413, f"request body over {REQUEST_MB}.0 MiB refused")
    assert sent < total // 2
    status, data, _ = stream_body(server.port, "/api/upload_latents?name=big.pt", total, "application/octet-stream")
    assert_one_line_refusal(status, data, 413, "(editor.py --max_upload_mb)")
    status, data, _ = stream_body(server.port, "/api/upload_latents?name=big.pt", total, "application/octet-stream",
                                  declare_length=False)
    assert_one_line_refusal(status, data, 413, f"over {UPLOAD_MB}.0 MiB")
    growth = server.memory("VmHWM") - start
    assert growth < 4 * REQUEST_MB + 16, f"peak resident memory grew by {growth:.0f} MiB"
    # Just under the limit is read (and refused for what it is, not for its size).
    status, data = server.post("/api/render", b" " * ((REQUEST_MB << 20) - 10) + b"{}")
    assert status == 200, data


# ---------------------------------------------------------------------------------- bad requests


def test_every_malformed_request_gets_a_one_line_4xx(server, tmp_path):
    """The seven 500s of issue 28 among them: deep nesting, a 10,000-digit seed, Infinity in semantics,
    infinite steps, latent names '..', with a NUL byte and of 300 characters. No path, no traceback."""
    wait_idle(server)
    nan = latent_bytes(codes=torch.full((1, 2 * K, 32), float("nan")))
    inf = latent_bytes(styles=torch.full((1, 32), float("inf")))
    pickled = io.BytesIO()
    torch.save({"codes": torch.zeros(1, 2 * K, 32), "styles_global": torch.zeros(1, 32), "hook": PickleHook()},
               pickled)
    image = png_base64()
    cases = [
        ("/api/render", "[" * 200000, 400, "nested too deeply"),
        ("/api/render", '{"source": %s}' % ("7" * 10000), 400, "an integer of 10000 digits"),
        ("/api/render", '{"source": "%s"}' % ("7" * 10000), 400, "source: seed '777"),
        ("/api/render", '{"source": "٣"}', 400, "source: seed"),  # a non-ASCII digit
        ("/api/render", '{"semantics": [1, Infinity]}', 400, "Infinity is not a JSON number"),
        ("/api/render", '{"semantics": [1, 2.5]}', 400, "semantics: expected a whole number, got 2.5"),
        ("/api/render", '{"semantics": [1, 1e999]}', 400, "overflows a float"),
        ("/api/render", '{"azim": NaN}', 400, "NaN is not a JSON number"),
        ("/api/render", '{"texture": [0, 0, 0, 0, 0, 0, 0, 0, 1e400]}', 400, "overflows"),
        ("/api/render", '{"shape": "abc"}', 400, "shape: expected a list of 9"),
        ("/api/render", '{"source": "nobody"}', 400, "unknown identity 'nobody'"),
        ("/api/render", "[1, 2]", 400, "must be a JSON object"),
        ("/api/render", b"\xff\xfe{}", 400, "not UTF-8"),
        ("/api/render", "{'source': 1}", 400, "not valid JSON"),
        ("/api/invert", {"image": image, "steps": "Infinity"}, 400, "inversion steps: expected a whole number"),
        ("/api/invert", '{"image": "%s", "steps": 1e999}' % image, 400, "overflows a float"),
        ("/api/invert", {"image": image, "steps": 0}, 400, "inversion steps: 0 is not in 1..5000"),
        ("/api/invert", {"image": image, "steps": 5001}, 400, "5001 is not in 1..5000"),
        ("/api/invert", {"image": image, "steps": 2.5}, 400, "expected a whole number, got 2.5"),
        ("/api/invert", {"image": image, "steps": True}, 400, "expected a whole number, got True"),
        ("/api/invert", {"image": image, "steps": 2, "psi": "high"}, 400, "truncation: expected a number"),
        ("/api/invert", {"image": image, "image_name": "a/../b.png"}, 400, "not a plain file name"),
        ("/api/invert", {"image": image, "image_name": "\ud800.png"}, 400, "not valid Unicode"),
        ("/api/invert", {"image": image, "image_name": 5}, 400, "portrait: expected a file name"),
        ("/api/invert", {"image": "%%%"}, 400, "not valid base64"),
        ("/api/invert", {"image": image, "mask": 7}, 400, "no label map given"),
        ("/api/invert", {}, 400, "no portrait given"),
        ("/api/cancel", {}, 400, "no inversion is running"),
        ("/api/latents", {"psi": 2}, 400, "truncation: 2 is not in"),
    ]
    for path, body, status, needle in cases:
        assert_one_line_refusal(*server.post(path, body), status, needle)
    uploads = [
        ("..", b"x", "'..' is not a plain file name"),
        ("a%00b.pt", b"x", "holds control characters"),
        ("n" * 300 + ".pt", b"x", "the name is 303 characters long (at most 255)"),
        ("..%2F..%2Fetc.pt", b"x", "not a plain file name"),
        ("nan.pt", nan, "nan.pt: codes holds non-finite values (NaN or Inf)"),
        ("inf.pt", inf, "inf.pt: styles_global holds non-finite values"),
        ("pickle.pt", pickled.getvalue(), "pickle.pt: not a readable tensors-only latent file"),
        ("junk.pt", b"junk", "junk.pt: "),
    ]
    for name, body, needle in uploads:
        assert_one_line_refusal(*server.post(f"/api/upload_latents?name={name}", body, FILE), 400, needle)
    assert_one_line_refusal(*server.get("/api/nothing"), 404, "/api/nothing: no such page")
    assert_one_line_refusal(*server.get("/api/render"), 405, "GET is not allowed")
    assert_one_line_refusal(*server.request("DELETE", "/api/job")[:2], 405, "DELETE is not allowed")
    # Still serving, and none of it left an inversion running or an identity behind.
    assert server.job()["done"]
    assert all(not ident["label"].endswith(("nan.pt", "inf.pt", "pickle.pt", "junk.pt"))
               for ident in server.get("/api/identities")[1]["identities"])
    status, data = server.post("/api/render", {"source": 3, "reference": 7})
    assert status == 200 and data["images"]["image"].startswith("data:image/png;base64,")


# ------------------------------------------------------------------------------------- inversion


def test_inversion_reports_progress_and_can_be_cancelled(server):
    wait_idle(server)
    status, job = server.post("/api/invert", {"image": png_base64(), "image_name": "face.png", "steps": 5000})
    assert status == 200 and job["steps"] == 5000 and job["remaining"] is None
    running = server.wait_job(lambda j: j["step"] >= 2)
    assert not running["done"] and running["elapsed"] > 0 and running["remaining"] > 0 and running["loss"] > 0
    # The estimate is the time per step so far times the steps left.
    per_step = running["elapsed"] / running["step"]
    assert running["remaining"] == pytest.approx(per_step * (5000 - running["step"]), rel=0.2)
    assert_one_line_refusal(*server.post("/api/invert", {"image": png_base64(), "steps": 2}), 400,
                            "already running (step")
    assert_one_line_refusal(*server.post("/api/cancel", {"id": "job0"}), 400, "is not the running one")
    status, cancelling = server.post("/api/cancel", {"id": job["id"]})
    assert status == 200 and cancelling["id"] == job["id"]
    done = server.wait_job(lambda j: j["done"], timeout=30)
    assert done["cancelled"] and done["error"] is None and done["identity"] is None and done["step"] < 5000
    assert done["remaining"] is None and done["seconds_per_step"] > 0
    # The next one runs to its end and becomes an identity.
    status, job = server.post("/api/invert", {"image": png_base64(seed=1), "image_name": "next.png", "steps": 2})
    assert status == 200
    finished = server.wait_job(lambda j: j["done"])
    assert not finished["cancelled"] and finished["identity"] and finished["step"] == 2
    assert any(ident["id"] == finished["identity"] for ident in server.get("/api/identities")[1]["identities"])


def test_memory_returns_after_an_inversion(server):
    """RssAnon after an inversion ends is within 10 % of its level before it. The inversion's autograd
    buffers are freed into a malloc arena that configure_allocator() tells glibc never to trim; the
    editor gives them back at the end (without that, measured here: +40 % after a 6-step inversion),
    before the job reports done (the other way round, a fresh clone's run measured +15 %)."""
    wait_idle(server)
    image = png_base64(seed=2)
    server.post("/api/render", {"source": 5, "reference": 6})
    before = server.memory()
    server.reset_peak()
    status, job = server.post("/api/invert", {"image": image, "image_name": "m.png", "steps": 6})
    assert status == 200
    server.wait_job(lambda j: j["done"] and j["id"] == job["id"])
    after = server.memory()
    peak = server.memory("VmHWM")
    assert after <= 1.10 * before, f"RssAnon {before:.0f} MiB before the inversion, {after:.0f} MiB after"
    print(f"RssAnon {before:.0f} MiB before, {after:.0f} MiB after; VmHWM during {peak:.0f} MiB")


# ------------------------------------------------------------------------------------- load test


def bad_requests(server):
    """(method, path, body, headers, expected status) of bad requests of every kind."""
    image = png_base64(seed=3)
    return [
        ("POST", "/api/render", '{"texture": [2, 0, 0, 0, 0, 0, 0, 0, 0]}', JSON, 400),
        ("POST", "/api/render", '{"source": -1}', JSON, 400),
        ("POST", "/api/render", "{not json", JSON, 400),
        ("POST", "/api/render", "[" * 50000, JSON, 400),
        ("POST", "/api/render", '{"semantics": [Infinity]}', JSON, 400),
        ("POST", "/api/render", '{"source": 1}', {"Content-Type": "text/plain"}, 415),
        ("POST", "/api/render", '{"source": 1}', {"Origin": "http://evil.example", **JSON}, 403),
        ("GET", "/api/identities", None, {"Host": "rebound.example"}, 403),
        ("POST", "/api/invert", json.dumps({"image": image, "steps": 2}), JSON, 400),  # one is running
        ("POST", "/api/invert", json.dumps({"image": image, "steps": 0}), JSON, 400),
        ("POST", "/api/upload_latents?name=..", b"x", FILE, 400),
        ("POST", "/api/upload_latents?name=n.pt", latent_bytes(codes=torch.full((1, 2 * K, 32), float("nan"))),
         FILE, 400),
        ("STREAM", "/api/render", (REQUEST_MB << 20) + 1, JSON, 413),
        ("GET", "/api/nothing", None, {}, 404),
        ("GET", "/api/render", None, {}, 405),
    ]


def test_bounded_load_of_good_and_bad_requests_during_an_inversion(server):
    """200 requests (half of them bad) from 8 clients on 127.0.0.1 while an inversion runs: every one is
    answered, the good ones as when asked alone, the bad ones with their one-line 4xx; then the server
    still renders and the inversion is cancelled. Bounded: a fixed request count, 60 s per request."""
    wait_idle(server)
    states = [{"source": s, "reference": s + 1, "texture": [0.0] * 7 + [t, 0.0]} for s in (1, 2) for t in (0.0, 1.0)]
    expected = {}
    for i, state in enumerate(states):
        status, data = server.post("/api/render", state)
        assert status == 200
        expected[i] = data["images"]
    identities = server.get("/api/identities")[1]
    status, job = server.post("/api/invert", {"image": png_base64(seed=4), "image_name": "load.png", "steps": 5000})
    assert status == 200
    server.wait_job(lambda j: j["step"] >= 1)

    good = [("render", i) for i in range(len(states))] + [("identities", None), ("job", None), ("config", None),
                                                          ("page", None)]
    bad = bad_requests(server)
    plan = [("good", good[n % len(good)]) if n % 2 == 0 else ("bad", bad[n % len(bad)]) for n in range(200)]

    def run(item):
        kind, what = item
        if kind == "bad":
            method, path, body, headers, want = what
            if method == "STREAM":  # a body over the limit: sent in pieces, answered before its end
                status, data, _ = stream_body(server.port, path, body)
            else:
                status, data, _ = server.request(method, path, body, headers)
            assert_one_line_refusal(status, data, want)
            return kind
        name, index = what
        if name == "render":
            status, data = server.post("/api/render", states[index])
            assert status == 200 and data["images"] == expected[index], (status, str(data)[:200])
        elif name == "identities":
            status, data = server.get("/api/identities")
            assert status == 200 and data == identities
        elif name == "job":
            status, data = server.get("/api/job")
            assert status == 200 and data["id"] == job["id"] and not data["done"]
        elif name == "config":
            status, data = server.get("/api/config")
            assert status == 200 and len(data["regions"]) == K
        else:
            status, page, _ = server.request("GET", "/")
            assert status == 200 and page.startswith(b"<!DOCTYPE html>")
        return kind

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        kinds = list(pool.map(run, plan))
    took = time.monotonic() - start
    assert kinds.count("good") == 100 and kinds.count("bad") == 100
    running = server.job()
    assert running["id"] == job["id"] and not running["done"] and running["step"] >= 2  # it kept going
    server.post("/api/cancel", {"id": job["id"]})
    assert server.wait_job(lambda j: j["done"], timeout=30)["cancelled"]
    status, data = server.post("/api/render", {"source": 9, "reference": 8})
    assert status == 200 and data["images"]["image"].startswith("data:image/png;base64,")
    print(f"200 requests from 8 clients during an inversion in {took:.1f} s")
