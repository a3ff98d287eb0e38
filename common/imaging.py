"""Pictures as arrays, PNG files and videos: one place for every script and both training stages.

Renders are float tensors [..., 3, H, W] in [-1, 1]; pictures are uint8 numpy arrays [H, W, 3]. Files are
written through common.files.atomic_write, so an interrupted run never leaves half an image behind.
"""
import numpy as np
import torch
from PIL import Image

from common.files import atomic_write
from common.regions import color_segmap


def to_uint8(rgb):
    """[..., 3, H, W] in [-1, 1] → uint8 [..., H, W, 3] numpy."""
    x = ((rgb.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def row_image(images):
    """Views side by side: images [V,3,H,W] in [-1,1] (tensor) or uint8 [V,H,W,3] → uint8 [H, V·W, 3]."""
    if torch.is_tensor(images):
        images = to_uint8(images)
    return image_grid([list(np.asarray(images))])


def seg_row_image(segs):
    """Coloured segmentations side by side: segs [V,K,H,W] → uint8 [H, V·W, 3]."""
    return row_image(color_segmap(segs))


def resize_nearest(picture, size):
    """A uint8 [H,W,3] picture at size × size, nearest neighbour (small renders stay crisp)."""
    if picture.shape[0] == size and picture.shape[1] == size:
        return picture
    return np.asarray(Image.fromarray(picture).resize((size, size), Image.NEAREST))


def image_grid(rows, pad=0):
    """rows: lists of uint8 [H,W,3] pictures → one uint8 picture, rows stacked, `pad` white pixels between
    tiles. Tiles may differ in size (each row is as tall as the tallest tile)."""
    height = max(t.shape[0] for row in rows for t in row)
    width = max(sum(t.shape[1] for t in row) + pad * (len(row) - 1) for row in rows)
    canvas = np.full((len(rows) * height + pad * (len(rows) - 1), width, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        x, y = 0, r * (height + pad)
        for tile in row:
            canvas[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
            x += tile.shape[1] + pad
    return canvas


def save_image(path, image):
    """Write a uint8 [H,W,3] PNG atomically."""
    atomic_write(path, lambda tmp: Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG"))


def save_figure(path, figure, dpi=100):
    """Write a matplotlib figure as a PNG atomically (plots: loss curves, checkpoint tracks)."""
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"))


def save_row(path, images):
    """Save views side by side: float images [V,3,H,W] in [-1,1] or uint8 [V,H,W,3]."""
    save_image(path, row_image(images))


def save_seg_row(path, segs):
    """Save coloured segmentations [V,K,H,W] side by side."""
    save_image(path, seg_row_image(segs))


def save_video(path, frames, fps=8):
    """Write an iterable of uint8 [H,W,3] frames as an H.264 mp4 (yuv420p, which every player reads;
    odd sides are padded to even ones), atomically."""
    import imageio.v2 as imageio

    def write(tmp):
        with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8,
                                pixelformat="yuv420p", macro_block_size=2, ffmpeg_log_level="error") as writer:
            for frame in frames:
                writer.append_data(frame)

    atomic_write(path, write)
