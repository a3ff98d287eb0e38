"""Procedural portraits with exact CelebAMask-HQ label maps, for tests and the demo.

    python tools/synthetic_portraits.py --out DIR --n 200 --size 128 --seed 0

writes DIR/images/NNNNN.png (RGB) and DIR/masks/NNNNN.png (single-channel, ids 0-18), the layout
`prepare_data.py --mask_path DIR/masks DIR/images` consumes. Every pixel's label is the id of the part
painted last there, so the label map is exact by construction.

Each portrait draws, back to front: background, hair (short or long), cloth, neck (sometimes a
necklace), ears, face, fringe, sometimes a hat, brows, eyes (sometimes glasses), nose, lips and
mouth, sometimes earrings -- with random colours, sizes and positions, and a left-right head turn that
slides the features across the face and foreshortens the far side. Portrait i depends only on
(seed, i), so a larger --n extends a smaller one. Sides: "l_" ids are the person's left, which is the
image's right.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.cli import check_output, command  # noqa: E402
from common.imaging import save_image  # noqa: E402

# CelebAMask-HQ ids (regions.CELEBAMASK_CLASSES).
BACKGROUND, SKIN, NOSE, EYE_G, L_EYE, R_EYE, L_BROW, R_BROW, L_EAR, R_EAR = range(10)
MOUTH, U_LIP, L_LIP, HAIR, HAT, EAR_R, NECK_L, NECK, CLOTH = range(10, 19)

SKIN_TONES = np.array([(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 96),
                       (160, 104, 70), (112, 72, 48)], dtype=np.float32)
HAIR_COLOURS = np.array([(24, 20, 18), (60, 40, 28), (105, 70, 40), (170, 130, 80), (220, 190, 120),
                         (150, 60, 30), (160, 160, 165)], dtype=np.float32)
IRIS_COLOURS = np.array([(60, 40, 25), (90, 60, 30), (50, 90, 140), (70, 110, 70)], dtype=np.float32)


class Canvas:
    """An RGB float image and its label map, painted together in normalised coordinates [0, 1]."""

    def __init__(self, size, rng):
        self.rng = rng
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.y, self.x = np.meshgrid(coords, coords, indexing="ij")
        self.image = np.zeros((size, size, 3), dtype=np.float32)
        self.label = np.zeros((size, size), dtype=np.uint8)

    def ellipse(self, cx, cy, rx, ry, angle=0.0):
        """Squared normalised radius of every pixel for an ellipse (<= 1 inside)."""
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = self.x - cx, self.y - cy
        u, v = (c * dx + s * dy) / rx, (-s * dx + c * dy) / ry
        return u * u + v * v

    def paint(self, region, label, colour, shade=None):
        """Set `label` and `colour` (times an optional per-pixel shading) where `region` is true."""
        colour = np.asarray(colour, dtype=np.float32)
        pixels = colour if shade is None else colour * shade[..., None]
        self.image[region] = (pixels[region] if np.ndim(pixels) == 3 else pixels)
        self.label[region] = label

    def jitter(self, colour, amount):
        return np.clip(np.asarray(colour, np.float32) + self.rng.uniform(-amount, amount, 3), 0, 255)


def draw_portrait(rng, size):
    """One portrait: (uint8 RGB image [size, size, 3], uint8 label map [size, size])."""
    c = Canvas(size, rng)
    x, y = c.x, c.y
    u = rng.uniform

    # Head geometry. `turn` rotates the head about the vertical axis (radians, + = towards image right).
    turn = u(-0.6, 0.6)
    cx, cy = 0.5 + u(-0.05, 0.05), 0.44 + u(-0.04, 0.04)
    rx = u(0.16, 0.21)
    ry = rx * u(1.2, 1.4)
    skin = c.jitter(SKIN_TONES[rng.integers(len(SKIN_TONES))], 12)
    hair = c.jitter(HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))], 15)
    light = np.array([u(-1, 1), u(-1, 0.3)], dtype=np.float32)  # light direction in the image plane

    def lit(strength=0.15):
        """Shading from the global light, so that colours vary smoothly across the picture."""
        return 1 + strength * ((x - 0.5) * light[0] + (y - 0.5) * light[1])

    def on_head(angle):
        """Image x of a point on the head's cylinder at `angle` (0 = front), and its foreshortening."""
        a = angle + turn
        return cx + rx * np.sin(a), max(np.cos(a), 0.15)

    # Background: a vertical gradient between two random colours.
    top, bottom = c.jitter(rng.uniform(40, 230, 3), 0), c.jitter(rng.uniform(20, 200, 3), 0)
    c.image[:] = top + (bottom - top) * y[..., None]

    # Hair behind the head: a cap, sometimes extended to the shoulders.
    strands = 1 + 0.07 * np.sin(x * size * u(0.6, 1.2) + 3 * np.sin(y * 9))
    back = c.ellipse(cx, cy - 0.12 * ry, rx * u(1.15, 1.35), ry * u(1.0, 1.15)) <= 1
    if rng.random() < 0.45:
        length = cy + ry * u(0.6, 1.8)
        back |= (np.abs(x - cx) < rx * u(1.1, 1.35)) & (y > cy - 0.2 * ry) & (y < length)
    c.paint(back, HAIR, hair, strands * lit())

    # Cloth: shoulders under a parabola, then the neck (and a V-neck) over it.
    shoulder_y = cy + ry * u(1.2, 1.35)
    cloth = y > shoulder_y + u(0.15, 0.3) * ((x - cx) / 0.35) ** 2 - 0.02
    c.paint(cloth, CLOTH, c.jitter(rng.uniform(20, 235, 3), 0), lit(0.3))
    neck_cx = cx + 0.15 * rx * np.sin(turn)
    neck_w = rx * u(0.45, 0.6)
    neck = (np.abs(x - neck_cx) < neck_w) & (y > cy) & (y < shoulder_y + 0.03)
    if rng.random() < 0.5:  # V-neck
        neck |= cloth & (y < shoulder_y + u(0.06, 0.14) - 1.6 * np.abs(x - neck_cx)) & (y > cy)
    c.paint(neck, NECK, skin * 0.85, lit())
    if rng.random() < 0.15:  # necklace: a thin arc across the neck
        arc = c.ellipse(neck_cx, shoulder_y - 0.03, neck_w * 1.15, 0.07)
        band = (arc > 0.82) & (arc < 1.0) & (y > shoulder_y - 0.03)
        c.paint(band, NECK_L, c.jitter((220, 190, 60), 30))

    # Ears at the sides of the head; the face drawn next hides whatever is behind it.
    ear_ry, ear_rx = ry * u(0.22, 0.28), rx * u(0.16, 0.22)
    ear_y = cy + u(-0.02, 0.04) * ry
    ears = []
    for ear_label, side in ((R_EAR, -1), (L_EAR, 1)):
        ex, scale = on_head(side * 1.45)
        ex = cx + (ex - cx) * 1.08
        ear = c.ellipse(ex, ear_y, ear_rx * (0.9 + scale), ear_ry) <= 1
        c.paint(ear, ear_label, skin * 0.9, lit())
        ears.append((ex, side))

    # Face: an egg narrowing towards the chin, darker towards its rim.
    narrowing = 1 - 0.28 * np.clip((y - cy) / ry, 0, 1) ** 2
    face_r2 = ((x - cx) / (rx * narrowing)) ** 2 + ((y - cy) / ry) ** 2
    face = face_r2 <= 1
    c.paint(face, SKIN, skin, lit() * (1 - 0.22 * np.clip(face_r2, 0, 1) ** 3))

    # Fringe: hair over the forehead above a parabolic hairline (lower at the temples).
    part = cx + u(-0.5, 0.5) * rx
    hairline = cy - ry * u(0.4, 0.65) + ry * u(0.2, 0.5) * ((x - part) / rx) ** 2
    fringe = (c.ellipse(cx, cy - 0.12 * ry, rx * 1.2, ry * 1.05) <= 1) & (y < hairline)
    c.paint(fringe, HAIR, hair, strands * lit())

    if rng.random() < 0.2:  # hat: a crown and a brim
        brim_y = cy - ry * u(0.5, 0.7)
        crown = (c.ellipse(cx, brim_y, rx * 1.15, ry * u(0.6, 0.8)) <= 1) & (y < brim_y)
        brim = (np.abs(y - brim_y) < 0.025) & (np.abs(x - cx) < rx * u(1.3, 1.7))
        c.paint(crown | brim, HAT, c.jitter(rng.uniform(20, 235, 3), 0), lit(0.3))

    # Features on the front of the head, placed by angle so the turn moves and squeezes them.
    eye_v, eye_a = cy - ry * u(0.05, 0.15), u(0.38, 0.5)
    eye_rx, eye_ry = rx * u(0.17, 0.22), ry * u(0.05, 0.07)
    brow_gap, brow_tilt = ry * u(0.12, 0.18), u(-0.15, 0.15)
    iris = IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))]
    glasses = rng.random() < 0.25
    frame = c.jitter(rng.choice([(20, 20, 20), (120, 80, 40), (190, 190, 200)]), 10)
    eye_centres = []
    for eye_label, brow_label, side in ((R_EYE, R_BROW, -1), (L_EYE, L_BROW, 1)):
        ex, scale = on_head(side * eye_a)
        rxe = eye_rx * scale
        brow = c.ellipse(ex, eye_v - brow_gap, rxe * 1.3, ry * 0.035, side * brow_tilt) <= 1
        c.paint(brow, brow_label, hair * 0.8)
        eye = c.ellipse(ex, eye_v, rxe, eye_ry) <= 1
        c.paint(eye, eye_label, (245, 245, 240))
        pupil = eye & (c.ellipse(ex + 0.3 * rxe * np.sin(turn), eye_v, eye_ry * 0.9, eye_ry * 0.9) <= 1)
        c.paint(pupil, eye_label, iris)
        eye_centres.append((ex, rxe))
    if glasses:
        lens = [c.ellipse(ex, eye_v, rxe * 1.45, eye_ry * 2.6) for ex, rxe in eye_centres]
        rims = [(r > 0.72) & (r <= 1) for r in lens]
        (left, lrx), (right, rrx) = eye_centres
        bridge = (np.abs(y - eye_v) < 0.008) & (x > left + lrx * 1.3) & (x < right - rrx * 1.3)
        c.paint(rims[0] | rims[1] | bridge, EYE_G, frame)

    nose_x, nose_scale = on_head(0.0)
    nose_x += 0.35 * rx * np.sin(turn)  # the tip sticks out, so it moves further than the face
    nose_y = cy + ry * u(0.15, 0.25)
    nose = c.ellipse(nose_x, nose_y, rx * u(0.12, 0.17) * (0.6 + 0.4 * nose_scale), ry * u(0.14, 0.2)) <= 1
    c.paint(nose, NOSE, skin * 0.93, lit() * (1 + 0.08 * np.sign(turn) * (x - nose_x) / rx))

    mouth_x, mouth_scale = on_head(0.0)
    mouth_y = cy + ry * u(0.48, 0.56)
    mouth_rx, lip_ry = rx * u(0.3, 0.42) * mouth_scale, ry * u(0.05, 0.08)
    lips = c.jitter((180, 70, 80), 25) * 0.6 + skin * 0.4
    opening = lip_ry * (u(0.3, 0.8) if rng.random() < 0.4 else 0.12)
    upper = (c.ellipse(mouth_x, mouth_y, mouth_rx, lip_ry * 1.1) <= 1) & (y < mouth_y)
    lower = (c.ellipse(mouth_x, mouth_y, mouth_rx * 0.92, lip_ry * 1.4) <= 1) & (y >= mouth_y)
    c.paint(upper, U_LIP, lips * 0.92)
    c.paint(lower, L_LIP, lips)
    inside = c.ellipse(mouth_x, mouth_y, mouth_rx * 0.8, opening) <= 1
    c.paint(inside, MOUTH, (70, 25, 30))

    if rng.random() < 0.3:  # earrings under the ears that show
        for ex, side in ears:
            ring = c.ellipse(ex, ear_y + ear_ry * 1.1, 0.012, 0.012) <= 1
            ring &= ~face
            c.paint(ring, EAR_R, c.jitter((230, 200, 80), 25))

    image = c.image + rng.normal(0, 3, c.image.shape).astype(np.float32)  # a little sensor noise
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), c.label


def make_portraits(out, n=200, size=128, seed=0):
    """Write n portraits to out/images and out/masks (same stems); returns the two folder paths."""
    images_dir, masks_dir = os.path.join(out, "images"), os.path.join(out, "masks")
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(masks_dir, exist_ok=True)
    for i in range(n):
        image, label = draw_portrait(np.random.default_rng([seed, i]), size)
        save_image(os.path.join(images_dir, f"{i:05d}.png"), image)
        save_image(os.path.join(masks_dir, f"{i:05d}.png"), label)  # 2-D uint8: a mode-L label map
    return images_dir, masks_dir


@command
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (gets images/ and masks/)")
    parser.add_argument("--n", type=int, default=200, help="number of portraits")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    if args.n < 1 or args.size < 16 or args.seed < 0:
        print("synthetic_portraits.py: error: need --n >= 1, --size >= 16 and --seed >= 0",
              file=sys.stderr)
        return 2
    check_output(args.out, "--out", "folder")
    images_dir, masks_dir = make_portraits(args.out, args.n, args.size, args.seed)
    print(f"wrote {args.n} portraits of {args.size}px to {images_dir} and {masks_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
