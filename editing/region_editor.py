"""The interactive region editor's logic: what editor.py serves in a browser (editing/editor_web.py is the page).

An edit is a complete, self-describing state (EditState): a source and a reference identity (seeds,
or latent files / inversions held by the editor), per region a shape and a texture blend factor
t ∈ [0, 1] from source (t = 0, the source's code bit for bit) to reference (t = 1, the reference's
code bit for bit), optional resampled codes per region and attribute (a seed of a fresh code that
replaces the source's), the camera (azimuth, elevation), the truncation ψ and the regions whose
features reach the decoder (--semantics). The codes are those of edit_semantics.py (by-hand
truncated identities, code 2k = region k's shape, 2k+1 its texture); the result keeps the source's
global style, as edit_semantics.py does, and is rendered exactly as inference_Full.py renders a
latent file, so "download latents" gives a file that `inference_Full.py --latents` renders the same.

Renders are cached (least recently used): views by (codes, global style, camera, ψ, semantics);
shapes by (shape codes, camera, ψ), since a texture edit leaves the geometry alone. One lock
serialises every use of the model, so several browsers are served in turn; an inversion takes the
lock step by step, so edits stay responsive while it runs, can be cancelled between two steps, reports
its elapsed time and an estimate of the time left, and gives its memory back to the system when it ends.
"""
import collections
import dataclasses
import hashlib
import io
import itertools
import math
import os
import re
import tempfile
import threading
import time

import numpy as np
import torch

from common import devices, imaging, perf_utils
from common.cli import UsageError
from common.regions import NUM_REGIONS, REGION_NAMES, color_segmap
from editing import manipulation
from evaluation import metrics
from options import check_ranges
from rendering import loading as gen
from rendering.inference import render_surface, render_views
from rendering.latents import LatentFileError, latents_from_file, load_latents, mean_latent, save_latents
from rendering.meshes import MeshError, shade_surface

# A portrait upload whose long side exceeds this × its short side is refused (the model's images are
# square); a few per cent are cropped away silently, as invert.py does.
MAX_ASPECT = 1.02
MAX_IDENTITIES = 64  # uploaded / inverted identities kept (oldest dropped first)
MAX_LATENT_ENTRIES = 16  # entries of one uploaded latent file offered as identities
MAX_SEED = 2 ** 31 - 1
MAX_INVERT_STEPS = 5000
MAX_NAME_CHARS = 255  # a file name's length limit on common file systems
SEED_TEXT = re.compile(r"-?[0-9]{1,19}")  # ASCII digits only; longer can only be out of range


class EditError(UsageError):
    """Bad editor input (one line, shown in the page)."""


class InversionCancelled(Exception):
    """Raised between two steps of an inversion whose cancellation was asked for."""


def shown(value, limit=60):
    """repr of a client-sent value for a message, cut to `limit` characters (a message stays one short line
    whatever was sent)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def file_label(name, what, default):
    """The name of an uploaded file as the label it becomes (`default` when none is given).

    Only a plain file name is accepted: no "/", not "." or "..", no control characters, at most
    MAX_NAME_CHARS characters and valid Unicode. It is never used as a path, only shown (as text).
    """
    if name is None or name == "":
        return default
    if not isinstance(name, str):
        raise EditError(f"{what}: expected a file name, got {shown(name)}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise EditError(f"{what}: the name {shown(name)} is not valid Unicode") from None
    if len(name) > MAX_NAME_CHARS:
        raise EditError(f"{what}: the name is {len(name)} characters long (at most {MAX_NAME_CHARS})")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise EditError(f"{what}: the name {shown(name)} holds control characters")
    if name.strip() in (".", "..") or "/" in name or not name.strip():
        raise EditError(f"{what}: {shown(name)} is not a plain file name")
    return name


# --------------------------------------------------------------------------------------- the state


@dataclasses.dataclass(frozen=True)
class EditState:
    source: object  # int seed or str identity id
    reference: object
    shape: tuple  # K blend factors in [0, 1]
    texture: tuple
    resample_shape: tuple  # K seeds of fresh shape codes, or None
    resample_texture: tuple
    azim: float = 0.0
    elev: float = 0.0
    psi: float = 0.7
    semantics: tuple = None  # region indices whose features reach the decoder; None = all

    def describe(self):
        """One line naming what differs from the source (for latent files' notes)."""
        parts = [f"source {self.source}", f"reference {self.reference}", f"psi {self.psi:g}"]
        for k, name in enumerate(REGION_NAMES[:len(self.shape)]):
            for attribute, t, seed in (("shape", self.shape[k], self.resample_shape[k]),
                                       ("texture", self.texture[k], self.resample_texture[k])):
                if seed is not None:
                    parts.append(f"{name} {attribute} resampled (seed {seed}) t={t:g}")
                elif t:
                    parts.append(f"{name} {attribute} t={t:g}")
        if self.semantics is not None:
            parts.append("semantics " + ",".join(REGION_NAMES[k] for k in self.semantics))
        return "editor: " + ", ".join(parts)


def _identity_spec(value, what):
    if isinstance(value, bool):
        raise EditError(f"{what}: expected a seed or an identity id, got {shown(value)}")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        if not SEED_TEXT.fullmatch(value.strip()):  # non-ASCII digits, or too many to be a seed
            raise EditError(f"{what}: seed {shown(value)} out of range 0..{MAX_SEED}")
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value <= MAX_SEED:
            raise EditError(f"{what}: seed {shown(value)} out of range 0..{MAX_SEED}")
        return value
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise EditError(f"{what}: expected a seed or an identity id, got {shown(value)}")


def _number(value, what, low, high):
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        raise EditError(f"{what}: expected a number, got {shown(value)}") from None
    if not math.isfinite(x) or not low <= x <= high:
        raise EditError(f"{what}: {shown(value)} is not in [{low:g}, {high:g}]")
    return x


def whole_number(value, what, low, high):
    """An integer in [low, high] from a JSON number (3 or 3.0; not 2.5, "3", true, NaN or Inf)."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise EditError(f"{what}: expected a whole number, got {shown(value)}")
    if not low <= value <= high:
        raise EditError(f"{what}: {shown(value)} is not in {low}..{high}")
    return value


def _per_region(values, what, n_regions, convert, default):
    if values is None:
        return (default,) * n_regions
    if not isinstance(values, (list, tuple)) or len(values) != n_regions:
        raise EditError(f"{what}: expected a list of {n_regions} values (one per region)")
    return tuple(convert(v, f"{what}[{REGION_NAMES[k] if k < len(REGION_NAMES) else k}]")
                 for k, v in enumerate(values))


def _optional_seed(value, what):
    """None (keep the source's code) or the seed of a fresh code."""
    if value is None or value == "":
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())):
        raise EditError(f"{what}: expected a seed, got {shown(value)}")
    return _identity_spec(value, what)


def parse_state(data, n_regions=NUM_REGIONS, camera_limits=(math.pi / 2, math.pi / 4)):
    """EditState from the page's JSON object; raises EditError (one line) for anything malformed."""
    if not isinstance(data, dict):
        raise EditError("the edit state must be a JSON object")
    blend = lambda v, what: _number(v, what, 0.0, 1.0)  # noqa: E731
    semantics = data.get("semantics")
    if semantics is not None:
        if not isinstance(semantics, (list, tuple)):
            raise EditError("semantics: expected a list of region indices")
        if len(semantics) > n_regions:
            raise EditError(f"semantics: {len(semantics)} entries given, there are {n_regions} regions")
        chosen = sorted({whole_number(k, "semantics", 0, n_regions - 1) for k in semantics})
        if not chosen:
            raise EditError("semantics: choose at least one region whose features reach the decoder")
        semantics = None if len(chosen) == n_regions else tuple(chosen)
    return EditState(
        source=_identity_spec(data.get("source", 0), "source"),
        reference=_identity_spec(data.get("reference", 1), "reference"),
        shape=_per_region(data.get("shape"), "shape", n_regions, blend, 0.0),
        texture=_per_region(data.get("texture"), "texture", n_regions, blend, 0.0),
        resample_shape=_per_region(data.get("resample_shape"), "resample_shape", n_regions, _optional_seed, None),
        resample_texture=_per_region(data.get("resample_texture"), "resample_texture", n_regions, _optional_seed,
                                     None),
        azim=_number(data.get("azim", 0.0), "azimuth", -camera_limits[0], camera_limits[0]),
        elev=_number(data.get("elev", 0.0), "elevation", -camera_limits[1], camera_limits[1]),
        psi=_number(data.get("psi", 0.7), "truncation", 0.01, 1.0),
        semantics=semantics,
    )


# ------------------------------------------------------------------------------------ code blending


def slot_factors(shape, texture, like):
    """Per-slot blend factors [2K] (slot 2k = region k's shape, 2k+1 its texture) on `like`'s device."""
    factors = torch.stack([torch.as_tensor(shape, dtype=torch.float64),
                           torch.as_tensor(texture, dtype=torch.float64)], 1).reshape(-1)
    return factors.to(device=like.device, dtype=like.dtype)


def blend_codes(source, reference, shape, texture):
    """Codes [N,2K,D] whose region k's shape code moves from source to reference by shape[k] and its
    texture code by texture[k]. t = 0 keeps the source's code and t = 1 takes the reference's, bit for
    bit (not a lerp result, which could differ in the last bit), like manipulation.interpolate_codes."""
    manipulation._check_pair(source, reference)
    reference = reference.to(source.dtype).expand_as(source)
    t = slot_factors(shape, texture, source)
    if t.shape[0] != source.shape[1]:
        raise EditError(f"{t.shape[0] // 2} regions given, the codes have {source.shape[1] // 2}")
    t = t.view(1, -1, 1)
    blended = torch.lerp(source, reference, t.expand_as(source))
    return torch.where(t == 0, source, torch.where(t == 1, reference, blended))


def tensor_key(*tensors):
    """A short digest of tensors' values (cache keys)."""
    digest = hashlib.sha1()
    for t in tensors:
        array = t.detach().cpu().contiguous().numpy()
        digest.update(str((array.dtype, array.shape)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class LRUCache:
    """A small least-recently-used map that counts its hits and misses."""

    def __init__(self, capacity):
        self.capacity = max(0, int(capacity))
        self.items = collections.OrderedDict()
        self.hits = self.misses = 0

    def get(self, key):
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        return None

    def put(self, key, value):
        if self.capacity == 0:
            return value
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return value

    def __len__(self):
        return len(self.items)


# ----------------------------------------------------------------------------------------- images


def png_bytes(image):
    """uint8 [H,W,3] → PNG file bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def blank_image(size, value=255):
    return np.full((size, size, 3), value, dtype=np.uint8)


# -------------------------------------------------------------------------------------- the editor


@dataclasses.dataclass
class Identity:
    codes: torch.Tensor  # [1,2K,D], by-hand truncated (as latent files hold them)
    styles_global: torch.Tensor  # [1,D]
    label: str
    camera: tuple = None  # (azimuth, elevation) fitted by an inversion


class RegionEditor:
    """The model, its truncation means, the identities and the caches, behind one lock."""

    def __init__(self, generator, surface_generator, opt, device, cache_size=64, invert_steps=200, label=""):
        self.generator = generator
        self.surface_generator = surface_generator
        self.opt = opt
        self.device = device
        self.label = label
        self.size = int(generator.size)
        self.n_regions = int(generator.n_render)
        self.invert_steps = int(invert_steps)
        self.camera_limits = (2 * float(opt.camera.azim), 2 * float(opt.camera.elev))
        self.lock = threading.Lock()
        self.mean = mean_latent(generator, opt.inference.truncation_mean)  # fixed seed, as the scripts
        self.identities = collections.OrderedDict()
        self._identities_lock = threading.Lock()  # uploads and inversions add while pages list them
        self._ids = itertools.count(1)
        self.seed_codes = LRUCache(4 * cache_size)
        self.views = LRUCache(cache_size)
        self.shapes = LRUCache(cache_size)
        self.job = None  # the current / last inversion (a dict the page polls)
        self._job_lock = threading.Lock()
        self.seconds_per_step = None  # of the last inversion that did a step (the page's estimate before one)

    def parse(self, data):
        """EditState of the page's JSON for this model (EditError, one line)."""
        return parse_state(data, self.n_regions, self.camera_limits)

    # ----- identities

    def _add_identity(self, identity):
        with self._identities_lock:
            key = f"id{next(self._ids)}"
            self.identities[key] = identity
            while len(self.identities) > MAX_IDENTITIES:
                self.identities.popitem(last=False)
            return key

    def identity_list(self):
        with self._identities_lock:
            return [{"id": key, "label": ident.label, "camera": ident.camera}
                    for key, ident in self.identities.items()]

    def identity_codes(self, spec, psi):
        """(codes [1,2K,D], styles_global [1,D]) of a seed (at ψ, cached) or a held identity."""
        if isinstance(spec, int):
            cached = self.seed_codes.get((spec, psi))
            if cached is None:
                cached = self.seed_codes.put((spec, psi), manipulation.latents_from_seeds(self.generator, [spec],
                                                                                          self.mean, psi))
            return cached
        ident = self.identities.get(spec)
        if ident is None:
            raise EditError(f"unknown identity {spec!r} (the editor holds {len(self.identities)}; "
                            f"it may have been dropped or the editor restarted): choose another")
        return ident.codes, ident.styles_global

    def add_latent_file(self, data, name):
        """Register every entry (up to MAX_LATENT_ENTRIES) of an uploaded latent file; returns their ids."""
        name = file_label(name, "latent file", "latents.pt")
        # The client's name is only a label: the bytes go to a fixed name in a private folder, and the
        # messages name the upload, never that folder.
        with tempfile.TemporaryDirectory(prefix="cnerf_editor_") as folder:
            path = os.path.join(folder, "upload.pt")
            with open(path, "wb") as handle:
                handle.write(data)
            try:
                loaded = load_latents(path, style_dim=self.generator.style_dim, n_regions=self.n_regions)
            except LatentFileError as error:
                raise EditError(str(error).replace(path, name)) from None
        like = dict(device=self.mean[0].device, dtype=self.mean[0].dtype)
        count = loaded["codes"].shape[0]
        camera = loaded.get("camera")
        added = []
        for i in range(min(count, MAX_LATENT_ENTRIES)):
            entry = dict(loaded, codes=loaded["codes"][i:i + 1].to(**like),
                         styles_global=loaded["styles_global"][i:i + 1].to(**like))
            # Files saved untruncated get the by-hand truncation at the default ψ once, here.
            codes, styles = latents_from_file(entry, self.mean, self.opt.inference.truncation_ratio)
            fitted = tuple(float(v) for v in camera[i].tolist()) if torch.is_tensor(camera) and \
                camera.shape[0] == count else None
            label = name if count == 1 else f"{name}@{i}"
            added.append(self._add_identity(Identity(codes, styles, label, fitted)))
        return added

    # ----- codes

    def edited_codes(self, state):
        """(edited codes, the source's global style, the unedited source codes) of a state."""
        source, source_global = self.identity_codes(state.source, state.psi)
        reference, _ = self.identity_codes(state.reference, state.psi)
        start = source
        for k in range(self.n_regions):
            for attribute, seed in (("shape", state.resample_shape[k]), ("texture", state.resample_texture[k])):
                if seed is not None:
                    start = manipulation.resample_codes(self.generator, start, [k], attribute, 1, self.mean, state.psi,
                                                        seed=seed)
        return blend_codes(start, reference, state.shape, state.texture), source_global, source

    def _location(self, state):
        return torch.tensor([[state.azim, state.elev]], device=self.mean[0].device, dtype=self.mean[0].dtype)

    def _view_job(self, codes, styles_global, state):
        """(cache key, function rendering (rgb [3,H,W] on the CPU, seg colours uint8)) of codes from the
        state's camera."""
        semantics = list(state.semantics) if state.semantics is not None else None
        key = (tensor_key(codes, styles_global), state.azim, state.elev, state.psi, state.semantics)

        def view():
            rgb, seg = render_views(self.generator, codes, styles_global, self._location(state), self.opt,
                                    self.mean, semantics=semantics, psi=state.psi)
            return rgb[0].float().cpu(), color_segmap(seg[0])
        return key, view

    def _shape_job(self, codes, state):
        """(cache key, function rendering the shaded depth mesh (uint8, output size)) of codes' geometry
        from the state's camera. The key holds the shape codes alone: the SDF never sees a texture code."""
        key = (tensor_key(codes[:, 0::2]), state.azim, state.elev, state.psi)

        def shape():
            surface = render_surface(self.generator, self.surface_generator, codes, self._location(state),
                                     self.opt, self.mean, psi=state.psi)
            try:
                return shade_surface(surface, self.size)
            except MeshError:
                return blank_image(self.size)
        return key, shape

    def render(self, state):
        """Every picture of a state: dict(images={image, seg, shape, delta} uint8, seconds, cached).

        What is not cached (the edited view, the source's view for |Δ|, the shape) is computed at
        once, one single-threaded worker per core, each exactly as it would be alone.
        """
        with self.lock:
            start = time.perf_counter()
            codes, styles_global, source = self.edited_codes(state)
            wanted = [(self.views, *self._view_job(codes, styles_global, state)),
                      (self.views, *self._view_job(source, styles_global, state)),
                      (self.shapes, *self._shape_job(codes, state))]
            values = {}
            for cache, key, _ in wanted:
                if (id(cache), key) not in values:
                    values[(id(cache), key)] = cache.get(key)
            # Each missing picture once (an unedited state's view is also its source's view).
            todo = [(cache, key, job) for cache, key, job in wanted if values[(id(cache), key)] is None]
            todo = list({(id(cache), key): (cache, key, job) for cache, key, job in todo}.values())
            computed = self._compute([job for _, _, job in todo])
            for (cache, key, _), value in zip(todo, computed):
                values[(id(cache), key)] = cache.put(key, value)
            (rgb, seg), (source_rgb, _), shape = [values[(id(cache), key)] for cache, key, _ in wanted]
            return {"images": {"image": imaging.to_uint8(rgb), "seg": seg, "shape": shape,
                               "delta": manipulation.delta_image(rgb, source_rgb)},
                    "seconds": time.perf_counter() - start, "cached": not todo}

    def _compute(self, jobs):
        """[job() for job in jobs], each on one intra-op thread: several at once on their own workers
        (perf_utils.map_in_threads), a single one alone. One thread per picture keeps an edit fast on a
        CPU shared with other work, where a team of threads waits at every kernel for a descheduled
        member (measured here under load: one view 0.35 CPU-s on one thread, 0.77 on two)."""
        if torch.device(self.device).type != "cpu" or len(jobs) != 1:
            return perf_utils.map_in_threads(lambda job: job(), jobs, self.device)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # process-wide, but every use of the model holds self.lock
        try:
            return [jobs[0]()]
        finally:
            torch.set_num_threads(threads)

    def latents_file(self, state):
        """The bytes of a latent file of the state's edited codes (inference_Full.py --latents FILE with
        --truncation_ratio ψ renders the same image)."""
        with self.lock:
            codes, styles_global, _ = self.edited_codes(state)
        with tempfile.TemporaryDirectory(prefix="cnerf_editor_") as folder:
            path = os.path.join(folder, "latents.pt")
            save_latents(path, codes, styles_global, truncated=True,
                         camera=torch.tensor([[state.azim, state.elev]]), note=state.describe())
            with open(path, "rb") as handle:
                return handle.read()

    # ----- inversion

    def start_inversion(self, image, image_name, mask=None, mask_name=None, steps=None, psi=None):
        """Check the upload, then invert it in a background thread; returns the job (polled by the page).

        Bad input raises EditError at once (steps must be 1..MAX_INVERT_STEPS: never replaced); only one
        inversion runs at a time, and cancel_inversion stops it after its current step.
        """
        steps = self.invert_steps if steps is None else whole_number(steps, "inversion steps", 1, MAX_INVERT_STEPS)
        psi = self.opt.inference.truncation_ratio if psi is None else float(psi)
        image_name = file_label(image_name, "portrait", "upload")
        mask_name = file_label(mask_name, "label map", "mask.png")
        try:
            target = manipulation.load_image(bytes(image), self.size, name=image_name, max_aspect=MAX_ASPECT)
            regions = manipulation.load_mask(bytes(mask), self.size, name=mask_name) if mask else None
        except ValueError as error:
            raise EditError(str(error)) from None
        with self._job_lock:  # two requests at once must not both find no inversion running
            running = self.job
            if running is not None and not running["done"]:
                raise EditError(f"an inversion is already running (step {running['step']}/{running['steps']}); "
                                f"wait for it to finish or cancel it")
            job = {"id": f"job{next(self._ids)}", "step": 0, "steps": steps, "loss": None, "done": False,
                   "error": None, "identity": None, "label": f"inverted {image_name}", "cancelled": False,
                   "cancel": threading.Event(), "started": time.monotonic(), "finished": None}
            self.job = job
        thread = threading.Thread(target=self._invert, args=(job, target, regions, steps, psi), daemon=True)
        thread.start()
        return job

    def cancel_inversion(self, job_id=None):
        """Ask the running inversion (the one named `job_id`, when given) to stop after its current step;
        returns the job. EditError when none runs."""
        job = self.job
        if job is None or job["done"]:
            raise EditError("no inversion is running")
        if job_id is not None and job_id != job["id"]:
            raise EditError(f"inversion {shown(job_id)} is not the running one ({job['id']})")
        job["cancel"].set()
        return job

    def job_view(self, job=None):
        """The JSON the page polls: progress, elapsed seconds, an estimate of the seconds left (from the
        steps done so far; None before the first), the result or the error."""
        job = self.job if job is None else job
        if job is None:
            return {"id": None, "done": True, "seconds_per_step": self.seconds_per_step}
        view = {key: job.get(key) for key in ("id", "step", "steps", "done", "error", "cancelled", "identity",
                                              "label", "camera")}
        for key in ("loss", "psnr"):  # a diverged loss or a perfect fit's PSNR is no JSON number
            view[key] = job.get(key) if job.get(key) is not None and math.isfinite(job[key]) else None
        elapsed = (job["finished"] or time.monotonic()) - job["started"]
        view["elapsed"] = elapsed
        view["cancelling"] = job["cancel"].is_set() and not job["done"]
        view["remaining"] = (elapsed / job["step"] * (job["steps"] - job["step"])
                             if job["step"] and not job["done"] else None)
        view["seconds_per_step"] = self.seconds_per_step
        return view

    def _invert(self, job, target, regions, steps, psi):
        dtype = self.mean[0].dtype
        device = self.mean[0].device
        target = target.to(device=device, dtype=dtype)
        target_seg = None
        if regions is not None:
            target_seg = manipulation.one_hot_regions(regions, self.n_regions).to(device=device, dtype=dtype)

        def step_done(step, total, loss):
            job["step"], job["loss"] = step, loss
            if job["cancel"].is_set():
                raise InversionCancelled
            # Let waiting edits render between two steps (the lock is not fair: yield a moment).
            self.lock.release()
            time.sleep(0.01)
            self.lock.acquire()

        try:
            with self.lock:
                # One intra-op thread, as for renders: on a shared CPU, measured at the shipped model's
                # configuration, 4.4 s per step instead of 15.6 s with two.
                threads = torch.get_num_threads()
                if torch.device(self.device).type == "cpu":
                    torch.set_num_threads(1)
                try:
                    result = manipulation.invert(self.generator, target, self.mean, psi, self.opt.camera,
                                                 target_seg=target_seg, steps=steps, progress=False,
                                                 callback=step_done)
                finally:
                    torch.set_num_threads(threads)
            camera = tuple(float(v) for v in result["camera"][0].tolist())
            job["identity"] = self._add_identity(Identity(result["codes"], result["styles_global"], job["label"],
                                                          camera))
            job["camera"] = camera
            job["psnr"] = metrics.psnr(result["rgb"], target)
            del result
        except InversionCancelled:
            job["cancelled"] = True
        except Exception as error:  # shown in the page; the server keeps serving
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            job["error"] = f"inversion failed: {first[:200]}"
        finally:
            job["finished"] = time.monotonic()
            if job["step"]:
                self.seconds_per_step = (job["finished"] - job["started"]) / job["step"]
            # The steps' autograd buffers went back to the heap, which configure_allocator() tells glibc
            # never to trim (kept for reuse): with the shipped model the editor's anonymous memory stayed
            # at 1.4-1.6 GB after 2-step inversions instead of its 0.4 GB. Give the free pages back —
            # before the job says it is done, so whoever waits for it sees the memory returned.
            perf_utils.release_free_memory()
            job["done"] = True


def load_editor(opt, inference_samples, surface_resolution, surface_samples, cache_size=64, invert_steps=200):
    """Load --trained_ckpt strictly (CheckpointError / UsageError, one line) and build the editor."""
    check_ranges({"--inference_samples": (inference_samples, ">= 2"), "--surface_samples": (surface_samples, ">= 2"),
                  "--surface_resolution": (surface_resolution, ">= 2")})
    device = devices.select_device(opt.experiment.device)
    # The first optimizer a process builds makes torch.optim import torch._dynamo (sympy, triton with it):
    # measured here, 80 MB of resident modules and 2.4 s. Done now, so that it is part of the editor's
    # resident size from the start: an inversion then ends at the level it started from, the first too.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    generator, surface_generator = gen.load_models(opt, device, surface=True, n_samples=inference_samples,
                                                   surface_resolution=surface_resolution,
                                                   surface_samples=surface_samples)
    return RegionEditor(generator, surface_generator, opt, device, cache_size=cache_size, invert_steps=invert_steps,
                        label=f"{opt.training.trained_ckpt} ({generator.size}px, {inference_samples} samples per ray, "
                              f"{device})")
