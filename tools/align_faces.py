#!/usr/bin/env python
"""Crop and align face photographs the way FFHQ was made, from facial landmarks.

  python tools/align_faces.py IMAGES OUT --landmarks SOURCE [--size 1024]
  python tools/align_faces.py IMAGES OUT --detector dlib [--dlib_model FILE] [--size 1024]

Writes OUT/<stem>.png (RGB, --size square) for every image under IMAGES that has landmarks. SOURCE is
  - ffhq-dataset-v2.json (the FFHQ metadata): each entry's in_the_wild.face_landmarks, matched to the
    images by the stem of its in_the_wild.file_path (IMAGES is then FFHQ's in-the-wild folder);
  - a folder of per-image files <stem>.txt (numbers separated by spaces, commas or new lines) or
    <stem>.npy, each 68×2 (the iBUG 300-W / dlib order) or 5×2 (image-left eye centre, image-right eye
    centre, nose tip, image-left mouth corner, image-right mouth corner; the order of MTCNN, RetinaFace
    and InsightFace) pixel coordinates (x, y) of the pixel centres.
--detector dlib finds the largest face of each image with dlib's frontal face detector and its 68-point
shape predictor (optional: `pip install dlib`, or `dlib-bin` for a prebuilt wheel; the model ships in
Debian/Ubuntu's libdlib-data at /usr/share/dlib/shape_predictor_68_face_landmarks.dat).

The recipe (FFHQ's recreate_aligned_images): the eye centres (mean of each eye's six points) and the
mouth corners give an oriented square (`ffhq_quad`); the photo is shrunk when the square is over four
times the output, cropped to the square plus a border, padded by reflection with a blurred, median-
filled margin where the square leaves the photo, sampled into a 4×size square (bilinear; 4096 for 1024)
and resized to size with LANCZOS. 68 and 5 points give the same square (`five_points`).

Resumable: an existing OUT/<stem>.png is complete (files are written atomically) and skipped. Images
that cannot be read, have no landmarks (or no face found) or unusable landmark files are listed at the
end; the others are aligned.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import scipy.ndimage  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

import prepare_data  # noqa: E402
from common import image_jobs  # noqa: E402
from common.cli import UsageError, command  # noqa: E402
from common.files import atomic_write  # noqa: E402

DEBIAN_DLIB_MODEL = "/usr/share/dlib/shape_predictor_68_face_landmarks.dat"
DLIB_HINT = (f"pip install dlib (or dlib-bin, a prebuilt wheel), and its 68-point model: on Debian/Ubuntu "
             f"`apt install libdlib-data` puts it at {DEBIAN_DLIB_MODEL}, else pass --dlib_model FILE")
TRANSFORM_SCALE = 4  # the square is sampled at 4× the output size, then downsampled (4096 for 1024)


class LandmarkError(ValueError):
    """Landmarks that are missing or unusable for one image: the image is listed and skipped."""


# ------------------------------------------------------------------------------------- the recipe


def five_points(landmarks):
    """68×2 or 5×2 landmarks → 5×2: image-left eye centre, image-right eye centre, nose tip, image-left and
    image-right mouth corners. From 68 points (iBUG 300-W order): the means of points 36-41 and 42-47,
    point 30, points 48 and 54 (the mouth's outer corners)."""
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape == (5, 2):
        return points.copy()
    if points.shape != (68, 2):
        raise LandmarkError(f"landmarks of shape {points.shape}; expected 68×2 or 5×2")
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48], points[54]])


def ffhq_quad(landmarks):
    """The FFHQ crop square of a face: (corners [4, 2] in the order top-left, bottom-left, bottom-right,
    top-right as seen in the output, side length). Pixel-centre coordinates of the photo.

    Its centre is the eyes' midpoint moved a tenth of the way to the mouth's; its x axis is the eye-to-eye
    direction blended with the perpendicular of the eye-to-mouth direction; its half side is the larger
    of twice the eye distance and 1.8 times the eye-to-mouth distance."""
    eye_left, eye_right, _, mouth_left, mouth_right = five_points(landmarks)
    eye_mid = (eye_left + eye_right) / 2
    eye_to_eye = eye_right - eye_left
    eye_to_mouth = (mouth_left + mouth_right) / 2 - eye_mid
    x_axis = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])  # eye_to_mouth turned: (x, y) → (-y, x)
    norm = np.hypot(*x_axis)
    if not np.isfinite(norm) or norm == 0:
        raise LandmarkError("degenerate landmarks: the eyes and mouth do not span a face")
    x_axis *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8) / norm
    y_axis = np.array([-x_axis[1], x_axis[0]])  # x turned +90° (image y points down)
    centre = eye_mid + eye_to_mouth * 0.1
    quad = np.stack([centre - x_axis - y_axis, centre - x_axis + y_axis, centre + x_axis + y_axis,
                     centre + x_axis - y_axis])
    return quad, float(np.hypot(*x_axis) * 2)


def points_in_output(points, quad, size):
    """Where photo points (pixel-centre coordinates) land in the aligned size×size image (pixel-centre
    coordinates): the quad's top-left corner is the output's top-left edge, its sides the output's sides."""
    points = np.asarray(points, dtype=np.float64)
    origin, right, down = quad[0], quad[3] - quad[0], quad[1] - quad[0]
    offset = points - origin
    u = offset @ right / (right @ right)
    v = offset @ down / (down @ down)
    return np.stack([u, v], -1) * size - 0.5


def align(image, landmarks, size=1024, transform_scale=TRANSFORM_SCALE):
    """The aligned size×size RGB PIL image of a face (FFHQ's recipe; see the module docstring)."""
    quad, qsize = ffhq_quad(landmarks)
    image = image.convert("RGB")
    transform_size = size * transform_scale

    shrink = int(np.floor(qsize / size * 0.5))  # a large face: shrink the photo first (antialiased)
    if shrink > 1:
        image = image.resize((int(np.rint(image.size[0] / shrink)), int(np.rint(image.size[1] / shrink))),
                             Image.LANCZOS)
        quad, qsize = quad / shrink, qsize / shrink

    border = max(int(np.rint(qsize * 0.1)), 3)
    box = (int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
           int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())))
    crop = (max(box[0] - border, 0), max(box[1] - border, 0),
            min(box[2] + border, image.size[0]), min(box[3] + border, image.size[1]))
    if crop[2] <= crop[0] or crop[3] <= crop[1]:
        raise LandmarkError("the landmarks' square lies outside the photo")
    if crop[2] - crop[0] < image.size[0] or crop[3] - crop[1] < image.size[1]:
        image = image.crop(crop)
        quad = quad - crop[:2]

    box = (int(np.floor(quad[:, 0].min())), int(np.floor(quad[:, 1].min())),
           int(np.ceil(quad[:, 0].max())), int(np.ceil(quad[:, 1].max())))
    pad = (max(-box[0] + border, 0), max(-box[1] + border, 0),
           max(box[2] - image.size[0] + border, 0), max(box[3] - image.size[1] + border, 0))
    if max(pad) > border - 4:  # the square leaves the photo: extend it
        image, offset = pad_by_reflection(image, pad, qsize)
        quad = quad + offset

    image = image.transform((transform_size, transform_size), Image.QUAD, tuple((quad + 0.5).flatten()),
                            Image.BILINEAR)
    if size < transform_size:
        image = image.resize((size, size), Image.LANCZOS)
    return image


def pad_by_reflection(image, pad, qsize):
    """Pad (left, top, right, bottom; each at least 0.3 qsize) by reflection, the margin blurred and faded
    towards the image's median colour with the distance from the photo. Returns (image, (left, top))."""
    left, top, right, bottom = np.maximum(pad, int(np.rint(qsize * 0.3)))
    pixels = np.pad(np.float32(image), ((top, bottom), (left, right), (0, 0)), "reflect")
    height, width, _ = pixels.shape
    ys, xs = np.ogrid[:height, :width]
    margin = np.maximum(1.0 - np.minimum(np.float32(xs) / left, np.float32(width - 1 - xs) / right),
                        1.0 - np.minimum(np.float32(ys) / top, np.float32(height - 1 - ys) / bottom))[..., None]
    blur = qsize * 0.02
    pixels += (scipy.ndimage.gaussian_filter(pixels, [blur, blur, 0]) - pixels) * np.clip(margin * 3.0 + 1.0, 0.0, 1.0)
    pixels += (np.median(pixels, axis=(0, 1)) - pixels) * np.clip(margin, 0.0, 1.0)
    return Image.fromarray(np.uint8(np.clip(np.rint(pixels), 0, 255)), "RGB"), np.array([left, top])


# ---------------------------------------------------------------------------------- landmark sources


def read_points_file(path):
    """A 68×2 or 5×2 array from <stem>.txt or <stem>.npy; LandmarkError saying what is wrong."""
    try:
        if path.lower().endswith(".npy"):
            values = np.load(path, allow_pickle=False)
        else:
            with open(path, encoding="utf-8") as handle:
                values = np.array(handle.read().replace(",", " ").split(), dtype=np.float64)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise LandmarkError(f"unreadable landmark file {path} ({error})".replace("\n", " ")) from None
    values = np.asarray(values, dtype=np.float64)
    if values.size not in (136, 10):
        raise LandmarkError(f"landmark file {path} holds {values.size} numbers; expected 68×2 or 5×2")
    if not np.isfinite(values).all():
        raise LandmarkError(f"landmark file {path} holds non-finite numbers")
    return values.reshape(-1, 2)


class FolderLandmarks:
    """Landmarks from per-image files <stem>.txt / <stem>.npy in a folder."""

    def __init__(self, folder):
        self.files = {}
        for relpath in prepare_data.list_files(folder, (".txt", ".npy")):
            stem = os.path.splitext(os.path.basename(relpath))[0]
            if stem in self.files:
                raise UsageError(f"--landmarks {folder}: two landmark files for {stem}: {self.files[stem]} and "
                                 f"{os.path.join(folder, relpath)}")
            self.files[stem] = os.path.join(folder, relpath)
        if not self.files:
            raise UsageError(f"--landmarks {folder}: no landmark files (<stem>.txt or <stem>.npy)")

    def __call__(self, stem, image):
        if stem not in self.files:
            raise LandmarkError(f"no landmark file {stem}.txt or {stem}.npy")
        return read_points_file(self.files[stem])


class FFHQLandmarks:
    """Landmarks of ffhq-dataset-v2.json: entry['in_the_wild']['face_landmarks'] by the stem of
    entry['in_the_wild']['file_path']."""

    def __init__(self, path):
        try:
            with open(path, encoding="utf-8") as handle:
                entries = json.load(handle)
        except (OSError, ValueError) as error:
            raise UsageError(f"--landmarks {path}: not readable JSON ({error})".replace("\n", " ")) from None
        if not isinstance(entries, dict) or not entries:
            raise UsageError(f"--landmarks {path}: not ffhq-dataset-v2.json's layout (expected an object of entries)")
        self.points = {}
        for key, entry in entries.items():
            wild = entry.get("in_the_wild") if isinstance(entry, dict) else None
            if not isinstance(wild, dict) or "file_path" not in wild or "face_landmarks" not in wild:
                raise UsageError(f"--landmarks {path}: entry {key!r} has no in_the_wild.file_path and "
                                 f"in_the_wild.face_landmarks (not ffhq-dataset-v2.json's layout)")
            self.points[os.path.splitext(os.path.basename(str(wild["file_path"])))[0]] = wild["face_landmarks"]

    def __call__(self, stem, image):
        if stem not in self.points:
            raise LandmarkError("no entry in the landmarks JSON")
        try:
            points = np.asarray(self.points[stem], dtype=np.float64)
        except (TypeError, ValueError):
            raise LandmarkError("its landmarks in the JSON are not numbers") from None
        if points.shape not in ((68, 2), (5, 2)) or not np.isfinite(points).all():
            raise LandmarkError(f"its landmarks in the JSON have shape {points.shape}; expected 68×2")
        return points


class DlibLandmarks:
    """68 landmarks of the largest face dlib's frontal face detector finds (upsampling the photo once)."""

    def __init__(self, model_path):
        try:
            import dlib
        except ImportError:
            raise UsageError(f"--detector dlib needs the dlib package, which is not installed: {DLIB_HINT}") from None
        if not os.path.isfile(model_path):
            raise UsageError(f"--dlib_model {model_path}: not found; {DLIB_HINT}")
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(model_path)
        self.model_path = model_path

    def __call__(self, stem, image):
        pixels = np.asarray(image.convert("RGB"))
        faces = list(self.detector(pixels, 1))
        if not faces:
            raise LandmarkError("dlib found no face")
        face = max(faces, key=lambda box: box.width() * box.height())
        shape = self.predictor(pixels, face)
        if shape.num_parts != 68:
            raise UsageError(f"--dlib_model {self.model_path} gives {shape.num_parts} points; give the 68-point "
                             f"model ({DEBIAN_DLIB_MODEL} on Debian/Ubuntu)")
        return np.array([[shape.part(i).x, shape.part(i).y] for i in range(68)], dtype=np.float64)


def landmark_source(args):
    if bool(args.landmarks) == bool(args.detector):
        raise UsageError("give exactly one of --landmarks SOURCE (ffhq-dataset-v2.json or a folder of <stem>.txt/"
                         ".npy files) and --detector dlib")
    if args.detector:
        return DlibLandmarks(args.dlib_model)
    if os.path.isdir(args.landmarks):
        return FolderLandmarks(args.landmarks)
    if os.path.isfile(args.landmarks):
        return FFHQLandmarks(args.landmarks)
    raise UsageError(f"--landmarks {args.landmarks}: no such file or folder")


# --------------------------------------------------------------------------------------------- run


def align_one(source, images_dir, relpath, out_path, size):
    """Align one image into out_path; returns None or the reason it was skipped."""
    path = os.path.join(images_dir, relpath)
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except Exception as error:  # any decoding failure of any format: the image is listed, not fatal
        return f"{path} (unreadable: {type(error).__name__}: {error})".replace("\n", " ")
    try:
        aligned = align(image, source(os.path.splitext(os.path.basename(relpath))[0], image), size)
    except LandmarkError as error:
        return f"{path} ({error})"
    atomic_write(out_path, lambda tmp: aligned.save(tmp, format="PNG"))
    return None


@command
def main(argv=None):
    p = image_jobs.ArgumentParser(prog="align_faces.py", description=__doc__.split("\n\n")[0])
    p.add_argument("images", metavar="IMAGES", help="folder of face photographs")
    p.add_argument("out", metavar="OUT", help="folder for the aligned images (OUT/<stem>.png)")
    p.add_argument("--landmarks", default="", metavar="SOURCE",
                   help="ffhq-dataset-v2.json, or a folder of <stem>.txt / <stem>.npy files (68×2 or 5×2)")
    p.add_argument("--detector", default="", choices=["", "dlib"], help="find landmarks with dlib instead")
    p.add_argument("--dlib_model", default=DEBIAN_DLIB_MODEL, help="dlib's 68-point shape predictor file")
    p.add_argument("--size", type=int, default=1024, help="side of the aligned images")
    args = p.parse_args(argv)
    if args.size < 16:
        raise UsageError(f"--size {args.size}: must be at least 16")
    outputs = image_jobs.input_images(args.images, args.out)
    source = landmark_source(args)
    todo, done = image_jobs.pending(outputs)
    os.makedirs(args.out, exist_ok=True)
    problems = []
    for relpath in tqdm(todo, desc="aligning", unit="img", disable=None):
        problem = align_one(source, args.images, relpath, outputs[relpath], args.size)
        if problem:
            problems.append(problem)
    image_jobs.finish("align_faces.py", args.out, len(todo) - len(problems), done, problems)


if __name__ == "__main__":
    main()
