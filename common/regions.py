"""The semantic region table: the one place that maps names, indices, CelebAMask-HQ ids and colours.

The channel order is the order of the training masks, and therefore of the published
checkpoint's mask channels and local generators (SPEC §1).
"""
import numpy as np

from common.cli import UsageError

# The 19 CelebAMask-HQ label ids, by id.
CELEBAMASK_CLASSES = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear",
    "r_ear", "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)

# The 19 classes of zllrunning's BiSeNet face parser (face-parsing.PyTorch, `79999_iter.pth`), by its
# output index: the same CelebAMask-HQ parts, numbered in the order its training script painted them.
BISENET_CLASSES = (
    "background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear",
    "ear_r", "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat",
)

# BiSeNet output index -> CelebAMask-HQ id (the one table between the two orders; read a BiSeNet map
# without it and nose becomes mouth, hair becomes neck). Written out, and checked against the names
# by the tests.
BISENET_TO_CELEBAMASK = np.array([0, 1, 6, 7, 4, 5, 3, 8, 9, 15, 2, 10, 11, 12, 17, 16, 18, 13, 14], dtype=np.int64)

# (region name, CelebAMask-HQ ids merged into it, display colour RGB), by region index.
REGIONS = (
    ("background", (0,), (0, 0, 0)),
    ("face", (1,), (239, 234, 90)),
    ("eye", (3, 4, 5), (44, 105, 154)),
    ("mouth", (10, 11, 12), (4, 139, 168)),
    ("brow", (6, 7), (13, 179, 158)),
    ("nose", (2,), (131, 227, 119)),
    ("ear", (8, 9, 15), (185, 231, 105)),
    ("hair", (13, 14), (107, 137, 198)),
    ("neck+cloth", (16, 17, 18), (241, 196, 83)),
)

NUM_REGIONS = len(REGIONS)
REGION_NAMES = tuple(name for name, _, _ in REGIONS)
REGION_COLORS = np.array([color for _, _, color in REGIONS], dtype=np.uint8)  # [9, 3]
# Aliases accepted on command lines besides the table's names.
_ALIASES = {"eyes": "eye", "lips": "mouth", "brows": "brow", "eyebrow": "brow", "ears": "ear",
            "neck": "neck+cloth", "cloth": "neck+cloth", "skin": "face", "bg": "background"}

# Lookup table: CelebAMask-HQ id -> region index.
CELEBA_TO_REGION = np.zeros(len(CELEBAMASK_CLASSES), dtype=np.int64)
for _index, (_, _ids, _) in enumerate(REGIONS):
    CELEBA_TO_REGION[list(_ids)] = _index


# Region -> the CelebAMask-HQ id that stands for it in a label map written from a 9-region parser
# (tools/parse_faces.py with the project's U-Net): (id on the image's left, id on the image's right).
# A 9-region parser cannot tell the classes of one region apart; left and right of the paired parts
# are told by the side of the face's centre column (a person's left is the image's right). Training
# reads regions, dilating some classes first (dataset.DILATION_KERNELS): each region's id here is its
# main part, so it gets that part's dilation (glasses, earrings and lips inside a region get it too).
REGION_TO_CELEBAMASK = (
    (0, 0),    # background
    (1, 1),    # face: skin
    (5, 4),    # eye: r_eye | l_eye
    (10, 10),  # mouth: mouth
    (7, 6),    # brow: r_brow | l_brow
    (2, 2),    # nose
    (9, 8),    # ear: r_ear | l_ear
    (13, 13),  # hair
    (17, 17),  # neck+cloth: neck
)


def valid_region_help():
    return ", ".join(f"{i}={name}" for i, name in enumerate(REGION_NAMES))


def parse_regions(spec):
    """Parse '2,3' or 'eye,mouth' (or a list of either) into a sorted list of region indices.

    An empty spec gives []. Unknown names or indices raise UsageError (a ValueError) listing the valid ones.
    """
    if spec is None:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    indices = []
    for item in items:
        token = str(item).strip().lower()
        if not token:
            continue
        if token.lstrip("-").isdigit():
            index = int(token)
            if not 0 <= index < NUM_REGIONS:
                raise UsageError(f"unknown region index {token!r}; valid regions: {valid_region_help()}")
        else:
            name = _ALIASES.get(token, token)
            if name not in REGION_NAMES:
                raise UsageError(f"unknown region {token!r}; valid regions: {valid_region_help()}")
            index = REGION_NAMES.index(name)
        if index not in indices:
            indices.append(index)
    return sorted(indices)


def label19_to_regions(label):
    """Map a CelebAMask-HQ label map (ids 0-18, any shape, numpy or torch) to region indices 0-8.

    This is the hard assignment (no dilation): useful for colouring label maps and for checks.
    """
    if hasattr(label, "detach"):  # torch tensor: index a tensor copy of the table on its device
        import torch

        table = torch.as_tensor(CELEBA_TO_REGION, device=label.device)
        return table[label.long()]
    return CELEBA_TO_REGION[np.asarray(label).astype(np.int64)]


def color_segmap(seg):
    """Colour a segmentation map by region (SPEC §1): each pixel gets the colour of its argmax channel.

    `seg` holds per-region scores, [K, H, W] or [B, K, H, W] (torch tensor or numpy array, K = 9).
    Returns a numpy uint8 RGB image [H, W, 3], or [B, H, W, 3] for a batch, ready for PIL/imageio.
    """
    if hasattr(seg, "detach"):
        seg = seg.detach().float().cpu().numpy()
    seg = np.asarray(seg)
    if seg.ndim not in (3, 4) or seg.shape[-3] != NUM_REGIONS:
        raise ValueError(f"color_segmap expects [{NUM_REGIONS},H,W] or [B,{NUM_REGIONS},H,W] scores, "
                         f"got shape {tuple(seg.shape)}")
    return REGION_COLORS[seg.argmax(axis=-3)]
