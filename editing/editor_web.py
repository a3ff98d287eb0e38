"""The editor's web layer: a small Starlette app serving one self-contained page (editor_page.html)
and a JSON API over region_editor.RegionEditor.

Everything the page needs is in that one file (no CDN, fonts or analytics), so the editor works on a
machine without internet access and through an SSH port forward. The page sends the complete edit
state with every request, so the server keeps no per-browser state beside the identities it holds
(uploads, inversions), and any number of browsers can share it; the editor's lock serves them in turn.

  GET  /                     the page (static: no client-sent text is ever put into it)
  GET  /api/config           what the page builds its controls from (model label, regions, identities)
  POST /api/render           edit state (JSON) → the four pictures as PNG data URLs, time, cache flag
  POST /api/latents          edit state → a latent file (inference_Full.py --latents)
  POST /api/upload_latents   ?name=FILE, body = the file (application/octet-stream) → the identities it adds
  POST /api/invert           {image, image_name, mask?, mask_name?, steps?, psi?} (base64) → the job
  POST /api/cancel           {id?} → the running inversion, asked to stop after its current step
  GET  /api/job              the current inversion's progress (steps, elapsed seconds, estimate)
  GET  /api/identities       the identities the editor holds

A server on someone's workstation must not be usable by other web pages the user visits, so before
any route runs (RequestGuard):
  - the Host header must name this server: a localhost name, the --host it listens on, or an
    --allow_host name (any other name is a DNS-rebinding page reading or driving the editor) → 403;
  - a POST must come from the page's own origin: an Origin or Sec-Fetch-Site header saying otherwise
    → 403. Clients that send neither (scripts, curl) are served;
and each POST route then takes only its own Content-Type (application/json; the latent upload
application/octet-stream) → 415. Neither is a type a cross-site form may send, so a foreign page
could only send one after a CORS preflight, which this server never grants. Bodies above the limits
(editor.py --max_request_mb / --max_upload_mb) are refused from Content-Length before reading, and
the read itself stops at the limit → 413.

Bad input answers 4xx with {"error": one line}; the page shows it. An unexpected failure answers 500
with a line that names no path (the traceback goes to the server's stderr).
"""
import base64
import binascii
import hashlib
import ipaddress
import json
import math
import os
import re
import socket
import sys
import traceback

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from common.regions import REGION_COLORS, REGION_NAMES
from editing import region_editor

PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "editor_page.html")
DEFAULT_MAX_REQUEST_MB = 32  # a JSON request: an edit state, or a portrait and its label map as base64
DEFAULT_MAX_UPLOAD_MB = 16  # a latent file (one identity at the shipped model's size is ~50 kB)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
MAX_JSON_INT_DIGITS = 30  # longer integers in a request are refused unread (no seed or step count needs more)
SAFE_METHODS = ("GET", "HEAD")


class Refused(Exception):
    """A request refused before its route's work, with its HTTP status and one line."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------------------- responses


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: any text a client sent (a file name with a lone
    surrogate included) is sent back safely, and NaN / Inf are a programming error, not broken JSON."""

    def render(self, content):
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error(message, status=400, close=False):
    """{"error": one line} with `status`; `close` ends the connection (a refused body is not read)."""
    line = str(message).strip().splitlines()[0] if str(message).strip() else "refused"
    headers = {"Connection": "close"} if close else None
    return AsciiJSONResponse({"error": line}, status_code=status, headers=headers)


def data_url(image):
    return "data:image/png;base64," + base64.b64encode(region_editor.png_bytes(image)).decode("ascii")


# ---------------------------------------------------------------------------------- hosts and origins


def split_host(value):
    """(name, port or None) of a Host header value ("localhost:7860", "[::1]:7860", "example"); name
    lower-case, IPv6 without brackets. None for a value that is not host[:port]."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^\[\]:/@\s]+)(?::([0-9]{1,5}))?", value or "")
    if not match:
        return None
    return match.group(1).strip("[]").lower(), match.group(2)


class HostPolicy:
    """The Host names this server answers to.

    Always the localhost names (an SSH forward arrives as localhost on any local port) and the --host
    it listens on; plus --allow_host names. Listening on all interfaces (0.0.0.0 / ::), it also takes
    this machine's host names and any IP address literal: a DNS-rebinding page always arrives under a
    name its author controls, never under an address literal. The port is not checked (a forward may
    use another local port); the name is what tells the user's address from a rebinding one.
    """

    def __init__(self, host="127.0.0.1", allow_hosts=()):
        host = (host or "").strip("[]").lower()
        self.wildcard = host in WILDCARD_HOSTS
        names = set(LOCAL_HOSTS) | {name.strip("[]").lower() for name in allow_hosts if name}
        if not self.wildcard:
            names.add(host)
        else:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.names = frozenset(names)

    def accepts(self, name):
        if name in self.names:
            return True
        if self.wildcard:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def describe(self):
        names = sorted(self.names)
        return ", ".join(names) + (" and any IP address" if self.wildcard else "")

    def refusal(self, method, headers):
        """None for an acceptable request, else Refused (403) with its one line."""
        host = headers.get("host")
        parts = split_host(host)
        if parts is None:
            raise Refused(403, f"Host {region_editor.shown(host)}: not an address of this editor "
                               f"(it answers to {self.describe()})")
        if not self.accepts(parts[0]):
            raise Refused(403, f"Host {region_editor.shown(host)}: not an address of this editor (it answers to "
                               f"{self.describe()}; start editor.py with --allow_host {parts[0]} to add it)")
        if method in SAFE_METHODS:
            return
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"http://{host}".lower():
            raise Refused(403, f"cross-origin request refused (Origin {region_editor.shown(origin)}; the page "
                               f"is served at http://{host})")
        site = headers.get("sec-fetch-site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            raise Refused(403, f"cross-site request refused (Sec-Fetch-Site {region_editor.shown(site)})")


class RequestGuard:
    """ASGI middleware: the HostPolicy's checks, before any route (and before any body is read)."""

    def __init__(self, app, policy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            try:
                self.policy.refusal(scope.get("method", "GET"), Headers(scope=scope))
            except Refused as refused:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                await error(refused, refused.status, close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------- bodies


def megabytes(n):
    return f"{n / 2 ** 20:.1f} MiB" if n < 10 * 2 ** 20 else f"{n / 2 ** 20:.0f} MiB"


async def read_body(request, limit, flag):
    """The body, refused (413) when it is larger than `limit`: from Content-Length before reading, and by
    stopping the read at the limit when the length is not declared (chunked) or understated."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise Refused(413, f"request body of {megabytes(int(declared))} refused: at most {megabytes(limit)} "
                           f"(editor.py {flag})")
    body = bytearray()
    try:
        async for chunk in request.stream():
            if len(body) + len(chunk) > limit:
                raise Refused(413, f"request body over {megabytes(limit)} refused (editor.py {flag})")
            body += chunk
    except ClientDisconnect:
        raise Refused(400, "the client went away before sending the whole request") from None
    return bytes(body)


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} overflows a float")
    return value


def _bounded_int(text):
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def parse_json(body, what="the request"):
    """A JSON object from a body; EditError (one line) for anything else: invalid UTF-8 or JSON, NaN /
    Infinity / overflowing numbers, integers of more than MAX_JSON_INT_DIGITS digits, deep nesting."""
    try:
        value = json.loads(body.decode("utf-8") if body else "{}", parse_constant=_refuse_constant,
                           parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:
        raise region_editor.EditError(f"{what} is not valid JSON (nested too deeply)") from None
    except UnicodeDecodeError:
        raise region_editor.EditError(f"{what} is not valid JSON (not UTF-8)") from None
    except ValueError as bad:
        raise region_editor.EditError(f"{what} is not valid JSON ({str(bad)[:80]})") from None
    if not isinstance(value, dict):
        raise region_editor.EditError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def decode_upload(text, what):
    if not isinstance(text, str) or not text:
        raise region_editor.EditError(f"no {what} given: choose a file first")
    try:
        return base64.b64decode(text.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise region_editor.EditError(f"the {what} upload is not valid base64") from None


def media_type(request):
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


# ------------------------------------------------------------------------------------------ the app


def page_config(editor):
    """What the page needs to build its controls (sent as JSON data: labels are never markup)."""
    opt = editor.opt
    return {
        "label": editor.label,
        "regions": [{"name": name, "color": "#%02x%02x%02x" % tuple(int(c) for c in color)}
                    for name, color in zip(REGION_NAMES[:editor.n_regions], REGION_COLORS)],
        "size": editor.size,
        "psi": float(opt.inference.truncation_ratio),
        "azim_limit": editor.camera_limits[0],
        "elev_limit": editor.camera_limits[1],
        "invert_steps": editor.invert_steps,
        "max_invert_steps": region_editor.MAX_INVERT_STEPS,
        "identities": editor.identity_list(),
    }


def page_headers(page):
    """Headers of the page: a Content-Security-Policy that lets exactly its own inline script run (by
    hash), its pictures be data/blob URLs and its requests go to this server only."""
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.S)
    hashes = " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(s.encode("utf-8")).digest()).decode("ascii")
                      for s in scripts)
    policy = (f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src data: blob:; "
              "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer"}


def create_app(editor, host="127.0.0.1", allow_hosts=(), max_request_bytes=DEFAULT_MAX_REQUEST_MB << 20,
               max_upload_bytes=DEFAULT_MAX_UPLOAD_MB << 20):
    page = open(PAGE_PATH, encoding="utf-8").read()
    headers = page_headers(page)

    def api(handler, body=None):
        """The route around `handler(request, payload)`: the body's Content-Type and size checked and read
        (body "json": a JSON object; "file": bytes), then errors turned into one-line answers — bad input
        (UsageError) 400, a refusal its own status, anything unexpected 500 (traceback on stderr only)."""
        async def endpoint(request):
            try:
                payload = None
                if body == "json":
                    if media_type(request) != "application/json":
                        raise Refused(415, f"{request.url.path}: send Content-Type application/json "
                                           f"(got {region_editor.shown(media_type(request) or None)})")
                    payload = parse_json(await read_body(request, max_request_bytes, "--max_request_mb"))
                elif body == "file":
                    if media_type(request) != "application/octet-stream":
                        raise Refused(415, f"{request.url.path}: send the file as Content-Type "
                                           f"application/octet-stream (got "
                                           f"{region_editor.shown(media_type(request) or None)})")
                    payload = await read_body(request, max_upload_bytes, "--max_upload_mb")
                return await handler(request, payload)
            except Refused as refused:
                return error(refused, refused.status, close=refused.status in (413, 415))
            except region_editor.EditError as bad:
                return error(bad)
            except Exception:  # noqa: BLE001 - the page must get an answer; the details stay on the server
                traceback.print_exc(file=sys.stderr)
                return error("internal error (the editor's log has the details)", status=500)
        return endpoint

    async def index(request, _):
        return HTMLResponse(page, headers=headers)

    async def config(request, _):
        return AsciiJSONResponse(page_config(editor))

    async def render(request, data):
        state = editor.parse(data)
        result = await run_in_threadpool(editor.render, state)
        images = await run_in_threadpool(lambda: {k: data_url(v) for k, v in result["images"].items()})
        return AsciiJSONResponse({"images": images, "seconds": result["seconds"], "cached": result["cached"]})

    async def latents(request, data):
        state = editor.parse(data)
        file = await run_in_threadpool(editor.latents_file, state)
        return Response(file, media_type="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="editor_latents.pt"'})

    async def upload_latents(request, file):
        ids = await run_in_threadpool(editor.add_latent_file, file, request.query_params.get("name"))
        return AsciiJSONResponse({"ids": ids, "identities": editor.identity_list()})

    async def invert(request, data):
        image = decode_upload(data.get("image"), "portrait")
        mask = decode_upload(data["mask"], "label map") if data.get("mask") is not None else None
        psi = region_editor.parse_state({"psi": data.get("psi", editor.opt.inference.truncation_ratio)},
                                        editor.n_regions, editor.camera_limits).psi
        job = await run_in_threadpool(editor.start_inversion, image, data.get("image_name"), mask,
                                      data.get("mask_name"), data.get("steps"), psi)
        return AsciiJSONResponse(editor.job_view(job))

    async def cancel(request, data):
        return AsciiJSONResponse(editor.job_view(editor.cancel_inversion(data.get("id"))))

    async def job(request, _):
        return AsciiJSONResponse(editor.job_view())

    async def identities(request, _):
        return AsciiJSONResponse({"identities": editor.identity_list()})

    async def favicon(request):
        return Response(status_code=204)

    async def http_error(request, exc):  # unknown path, wrong method: one line too
        reason = {404: "no such page", 405: f"{request.method} is not allowed here"}.get(exc.status_code,
                                                                                         str(exc.detail))
        return error(f"{request.url.path}: {reason}", exc.status_code)

    routes = [
        Route("/", api(index)),
        Route("/api/config", api(config)),
        Route("/api/render", api(render, "json"), methods=["POST"]),
        Route("/api/latents", api(latents, "json"), methods=["POST"]),
        Route("/api/upload_latents", api(upload_latents, "file"), methods=["POST"]),
        Route("/api/invert", api(invert, "json"), methods=["POST"]),
        Route("/api/cancel", api(cancel, "json"), methods=["POST"]),
        Route("/api/job", api(job)),
        Route("/api/identities", api(identities)),
        Route("/favicon.ico", favicon),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.add_middleware(RequestGuard, policy=HostPolicy(host, allow_hosts))
    return app
