"""The editor's web layer: a small Starlette app serving one self-contained page (editor_page.html)
and a JSON API over region_editor.RegionEditor.

Everything the page needs is in that one file (no CDN, fonts or analytics), so the editor works on a
machine without internet access and through an SSH port forward. The page sends the complete edit
state with every request, so the server keeps no per-browser state beside the identities it holds
(uploads, inversions), and any number of browsers can share it; the editor's lock serves them in turn.

  GET  /                     the page
  POST /api/render           edit state (JSON) → the four pictures as PNG data URLs, time, cache flag
  POST /api/latents          edit state → a latent file (inference_Full.py --latents)
  POST /api/upload_latents   ?name=FILE, body = the file → the identities it adds
  POST /api/invert           {image, image_name, mask?, mask_name?, steps, psi} (base64) → the job
  GET  /api/job              the current inversion's progress
  GET  /api/identities       the identities the editor holds
Bad input answers 400 with {"error": one line}; the page shows it.
"""
import base64
import binascii
import json
import os
import sys
import traceback

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from common.regions import REGION_COLORS, REGION_NAMES
from editing import region_editor

PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "editor_page.html")
MAX_UPLOAD_BYTES = 32 << 20


def page_config(editor):
    """What the page needs to build its controls."""
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
        "identities": editor.identity_list(),
    }


def data_url(image):
    return "data:image/png;base64," + base64.b64encode(region_editor.png_bytes(image)).decode("ascii")


def error(message, status=400):
    return JSONResponse({"error": str(message)}, status_code=status)


async def read_json(request):
    body = await request.body()
    if len(body) > MAX_UPLOAD_BYTES:
        raise region_editor.EditError(f"request of {len(body) >> 20} MiB refused "
                                      f"(at most {MAX_UPLOAD_BYTES >> 20} MiB)")
    try:
        return json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise region_editor.EditError("the request is not valid JSON") from None


def decode_upload(text, what):
    if not isinstance(text, str) or not text:
        raise region_editor.EditError(f"no {what} given: choose a file first")
    try:
        return base64.b64decode(text.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise region_editor.EditError(f"the {what} upload is not valid base64") from None


def guarded(handler):
    """Bad input → 400 with its one line; anything unexpected → 500 with one line (and the traceback
    on the server's stderr); the server keeps serving either way."""
    async def endpoint(request):
        try:
            return await handler(request)
        except region_editor.EditError as bad:
            return error(bad)
        except Exception as failure:  # noqa: BLE001 - the page must get an answer
            traceback.print_exc(file=sys.stderr)
            first = str(failure).strip().splitlines()[0] if str(failure).strip() else type(failure).__name__
            return error(f"internal error: {first}", status=500)
    return endpoint


def create_app(editor):
    page = open(PAGE_PATH, encoding="utf-8").read()

    async def index(request):
        config = json.dumps(page_config(editor)).replace("</", "<\\/")
        return HTMLResponse(page.replace("/*CONFIG*/null", config), headers={"Cache-Control": "no-store"})

    async def render(request):
        state = editor.parse(await read_json(request))
        result = await run_in_threadpool(editor.render, state)
        images = await run_in_threadpool(lambda: {k: data_url(v) for k, v in result["images"].items()})
        return JSONResponse({"images": images, "seconds": result["seconds"], "cached": result["cached"]})

    async def latents(request):
        state = editor.parse(await read_json(request))
        data = await run_in_threadpool(editor.latents_file, state)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": 'attachment; filename="editor_latents.pt"'})

    async def upload_latents(request):
        body = await request.body()
        if len(body) > MAX_UPLOAD_BYTES:
            raise region_editor.EditError(f"latent file of {len(body) >> 20} MiB refused")
        name = request.query_params.get("name", "latents.pt")
        ids = await run_in_threadpool(editor.add_latent_file, body, name)
        return JSONResponse({"ids": ids, "identities": editor.identity_list()})

    async def invert(request):
        data = await read_json(request)
        image = decode_upload(data.get("image"), "portrait")
        mask = decode_upload(data["mask"], "label map") if data.get("mask") else None
        try:
            steps = int(data.get("steps") or editor.invert_steps)
        except (TypeError, ValueError):
            raise region_editor.EditError(
                f"inversion steps: expected a whole number, got {data.get('steps')!r}") from None
        psi = region_editor.parse_state({"psi": data.get("psi", editor.opt.inference.truncation_ratio)},
                                        editor.n_regions, editor.camera_limits).psi
        job = await run_in_threadpool(editor.start_inversion, image, data.get("image_name"), mask,
                                      data.get("mask_name"), steps, psi)
        return JSONResponse(job_view(job))

    async def job(request):
        return JSONResponse(job_view(editor.job) if editor.job else {"done": True, "id": None})

    async def favicon(request):
        return Response(status_code=204)

    async def identities(request):
        return JSONResponse({"identities": editor.identity_list()})

    routes = [
        Route("/", guarded(index)),
        Route("/api/render", guarded(render), methods=["POST"]),
        Route("/api/latents", guarded(latents), methods=["POST"]),
        Route("/api/upload_latents", guarded(upload_latents), methods=["POST"]),
        Route("/api/invert", guarded(invert), methods=["POST"]),
        Route("/api/job", guarded(job)),
        Route("/api/identities", guarded(identities)),
        Route("/favicon.ico", favicon),
    ]
    return Starlette(routes=routes)


def job_view(job):
    return {key: job.get(key) for key in ("id", "step", "steps", "loss", "done", "error", "identity", "label",
                                          "camera", "psnr")}
