"""Garments drawn with numpy, for the demo dataset: a category, a cut, a colour and a pattern.

Every shape is a boolean mask computed on a coordinate grid in *garment units*: u runs left to
right and v top to bottom, both about -1..1 across the garment, so one drawing works at any image
size. Symmetric parts (sleeves, legs, lapels) are drawn once on |u|. Nothing here touches global
state; all randomness comes from the `rng` passed in, so a drawing is a pure function of its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# category -> cuts ("" when the category has none). The order is the vocabulary order.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "t-shirt": ("short sleeve", "long sleeve", "sleeveless"),
    "shirt": ("short sleeve", "long sleeve"),
    "sweater": ("crew neck", "v-neck"),
    "hoodie": (),
    "dress": ("sleeveless", "short sleeve", "long sleeve"),
    "skirt": ("mini", "midi"),
    "trousers": ("wide leg", "slim"),
    "shorts": (),
    "jacket": (),
    "coat": (),
    "bag": (),
    "sunglasses": (),
}
PATTERNS = ("solid", "striped", "checked", "dotted")
SOLID_ONLY = ("sunglasses",)  # categories drawn only in a solid colour

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 32),
    "white": (242, 242, 236),
    "navy": (28, 38, 96),
    "red": (204, 32, 38),
    "green": (40, 132, 62),
    "beige": (214, 192, 152),
    "grey": (128, 128, 132),
    "pink": (240, 148, 182),
    "yellow": (236, 204, 40),
    "blue": (52, 104, 204),
    "brown": (112, 70, 40),
}

_DETAIL_SHADE = 0.62  # waistbands, pockets, lapels, lenses: the fabric, darker
_EDGE_SHADE = 0.55    # a dark outline, so a white garment still shows on a light background


@dataclass(frozen=True)
class Garment:
    """What a product or KB image depicts; `cut` is "" for categories without cuts."""

    category: str
    cut: str
    colour: str
    pattern: str


# ---- shape primitives on garment coordinates (all return boolean masks) ----

def _rect(u, v, u0, u1, v0, v1):
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


def _trap(u, v, v0, v1, w0, w1):
    """|u| <= half-width going linearly from w0 at v0 to w1 at v1."""
    t = (v - v0) / (v1 - v0)
    return (t >= 0) & (t <= 1) & (np.abs(u) <= w0 + (w1 - w0) * t)


def _seg(u, v, a, b, r):
    """A rotated rectangle of half-width r around the segment a->b (sleeves, lapels, straps)."""
    du, dv = b[0] - a[0], b[1] - a[1]
    pu, pv = u - a[0], v - a[1]
    t = (pu * du + pv * dv) / (du * du + dv * dv)
    return (t >= 0) & (t <= 1) & (np.abs(pu * dv - pv * du) <= r * np.hypot(du, dv))


def _ellipse(u, v, cu, cv, ru, rv):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _dots(u, v, us, vs, r):
    out = np.zeros(u.shape, bool)
    for cu in us:
        for cv in vs:
            out |= _ellipse(u, v, cu, cv, r, r)
    return out


def _shapes(g: Garment, u: np.ndarray, v: np.ndarray):
    """(body, holes, detail, accent) masks of a garment; `a` is |u| for symmetric parts."""
    a = np.abs(u)
    no = np.zeros(u.shape, bool)
    body, holes, detail, accent = no, no, no, no
    cat, cut = g.category, g.cut
    if cat in ("t-shirt", "shirt"):
        if cut == "sleeveless":
            body = _rect(a, v, 0, 0.36, -0.45, 0.8) | _rect(a, v, 0.13, 0.27, -0.68, -0.45)
        else:
            body = _rect(a, v, 0, 0.42, -0.62, 0.8)
        if cut == "short sleeve":
            body |= _seg(a, v, (0.36, -0.52), (0.74, -0.16), 0.15)
        elif cut == "long sleeve":
            body |= _seg(a, v, (0.36, -0.52), (0.62, 0.64), 0.12)
        if cat == "shirt":  # pointed collar, button placket and buttons
            holes = _ellipse(u, v, 0, -0.64, 0.12, 0.07)
            detail = _seg(a, v, (0.02, -0.63), (0.2, -0.46), 0.06)
            accent = _dots(u, v, [0.0], [-0.4, -0.15, 0.1, 0.35, 0.6], 0.045)
            detail |= _rect(a, v, 0, 0.025, -0.6, 0.8) & ~accent
        else:
            holes = _ellipse(u, v, 0, -0.64, 0.17, 0.11)
    elif cat in ("sweater", "hoodie"):
        body = _rect(a, v, 0, 0.46, -0.6, 0.75) | _seg(a, v, (0.4, -0.5), (0.66, 0.66), 0.13)
        detail = (_rect(a, v, 0, 0.46, 0.64, 0.75)  # ribbed hem and cuffs
                  | (_seg(a, v, (0.4, -0.5), (0.66, 0.66), 0.13) & (v > 0.52)))
        if cat == "hoodie":  # hood, hood opening, kangaroo pocket, drawstrings
            body |= _ellipse(u, v, 0, -0.72, 0.3, 0.24)
            detail |= _ellipse(u, v, 0, -0.68, 0.17, 0.14) | _trap(u, v, 0.22, 0.58, 0.2, 0.3)
            accent = _rect(a, v, 0.07, 0.1, -0.55, -0.28)
        elif cut == "v-neck":
            holes = _trap(u, v, -0.62, -0.22, 0.2, 0.0)
        else:
            holes = _ellipse(u, v, 0, -0.62, 0.18, 0.11)
    elif cat == "dress":
        top = -0.45 if cut == "sleeveless" else -0.6
        body = _rect(a, v, 0, 0.28, top, -0.1) | _trap(u, v, -0.1, 0.92, 0.28, 0.68)
        if cut == "sleeveless":
            body |= _rect(a, v, 0.1, 0.2, -0.68, -0.45)
        elif cut == "short sleeve":
            body |= _seg(a, v, (0.24, -0.55), (0.5, -0.3), 0.11)
        else:
            body |= _seg(a, v, (0.24, -0.55), (0.44, 0.38), 0.08)
        holes = _ellipse(u, v, 0, -0.6, 0.14, 0.1)
        detail = _rect(a, v, 0, 0.3, -0.15, -0.06)  # waist seam
    elif cat == "skirt":
        hem = 0.2 if cut == "mini" else 0.9
        body = _rect(a, v, 0, 0.36, -0.56, -0.45) | _trap(u, v, -0.45, hem, 0.36, 0.62)
        detail = _rect(a, v, 0, 0.36, -0.56, -0.45)  # waistband
    elif cat in ("trousers", "shorts"):
        top, hip, hem = (-0.85, -0.35, 0.95) if cat == "trousers" else (-0.6, -0.1, 0.35)
        body = _rect(a, v, 0, 0.4, top, hip)
        t = np.clip((v - hip) / (hem - hip), 0, 1)
        outer = 0.4 + {"wide leg": 0.12, "slim": -0.2, "": 0.08}[cut] * t
        inner = 0.02 + (0.08 if cut == "slim" else 0.04) * t
        body |= (v >= hip) & (v <= hem) & (a >= inner) & (a <= outer)
        detail = _rect(a, v, 0, 0.4, top, top + 0.1)  # waistband
    elif cat in ("jacket", "coat"):
        if cat == "jacket":  # hip length, zip front
            body = _rect(a, v, 0, 0.44, -0.6, 0.45)
            detail = _rect(a, v, 0, 0.44, 0.37, 0.45)
            accent = _rect(a, v, 0, 0.02, -0.55, 0.45)
        else:  # knee length, flared, double-breasted buttons
            body = _trap(u, v, -0.62, 0.95, 0.42, 0.54)
            accent = _dots(u, v, [-0.13, 0.13], [-0.05, 0.22, 0.49], 0.045)
        body |= _seg(a, v, (0.38, -0.52), (0.63, 0.55), 0.13)
        holes = _trap(u, v, -0.62, -0.35, 0.13, 0.0)
        detail |= _seg(a, v, (0.05, -0.62), (0.22, -0.25), 0.06)  # lapels
    elif cat == "bag":
        body = _rect(a, v, 0, 0.55, -0.15, 0.7)
        body |= _ellipse(u, v, 0, -0.15, 0.34, 0.4) & ~_ellipse(u, v, 0, -0.15, 0.25, 0.31) & (v < -0.15)
        detail = _rect(a, v, 0, 0.55, -0.15, 0.12)  # flap
        accent = _ellipse(u, v, 0, 0.12, 0.07, 0.06)  # clasp
    elif cat == "sunglasses":
        frame = _ellipse(a, v, 0.42, 0, 0.38, 0.3)
        detail = _ellipse(a, v, 0.42, 0, 0.3, 0.22)  # tinted lenses
        body = frame | _rect(a, v, 0, 0.1, -0.1, -0.02) | _rect(a, v, 0.78, 0.98, -0.1, -0.03)
    else:
        raise ValueError(f"unknown garment category {cat!r}")
    return body & ~holes, detail, accent


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (size, size) float32; read-only, shared."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _pattern_mask(pattern: str, px: np.ndarray, py: np.ndarray, period: float) -> np.ndarray | None:
    """Where the contrast colour goes, in pixels relative to the garment centre (moves with it)."""
    if pattern == "solid":
        return None
    if pattern == "striped":
        return np.mod(py, period) < period / 2
    if pattern == "checked":
        check = period * 0.6  # smaller than a stripe period, so checks read as gingham
        return (np.floor(px / check) + np.floor(py / check)) % 2 == 0
    if pattern == "dotted":
        r = max(0.3 * period, 1.0)
        return (np.mod(px, period) - period / 2) ** 2 + (np.mod(py, period) - period / 2) ** 2 < r * r
    raise ValueError(f"unknown pattern {pattern!r}")


def contrast_colour(colour: str) -> np.ndarray:
    """Light on dark fabrics, dark on light ones: the colour of stripes, checks, dots, buttons."""
    rgb = np.asarray(COLOURS[colour], np.float32)
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return np.asarray((246, 246, 240) if luma < 150 else (30, 30, 40), np.float32)


def draw_garment(g: Garment, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One view of `g`: uint8 (size, size, 3) pixels and the garment's (size, size) mask.

    Each call draws a new view: a small shift and scale, another background shade and a slight
    colour jitter, so the views of one product differ as photos of one garment do.
    """
    yy, xx = _grid(size)
    cx, cy = size * (0.5 + rng.uniform(-0.06, 0.06, 2))
    half = np.float32(size * 0.45 * rng.uniform(0.85, 1.0))  # garment units -> pixels
    bg_shade = rng.uniform(185, 245)
    bg_tint = rng.uniform(-8, 8, 3)
    gradient = rng.uniform(-12, 12)
    jitter = rng.uniform(-8, 8, 3).astype(np.float32)
    noise = rng.standard_normal((size, size, 3), dtype=np.float32) * np.float32(2.5)

    px, py = xx - np.float32(cx), yy - np.float32(cy)
    body, detail, accent = _shapes(g, px / half, py / half)

    # background: a plain shade, a slight tint and a soft vertical gradient  (H, W, 3)
    ramp = (yy / np.float32(size) - np.float32(0.5)) * np.float32(gradient)
    img = (np.float32(bg_shade) + bg_tint.astype(np.float32))[None, None, :] + ramp[:, :, None]

    fabric = np.empty((size, size, 3), np.float32)
    fabric[:] = np.asarray(COLOURS[g.colour], np.float32) + jitter
    contrast = contrast_colour(g.colour)
    pattern = _pattern_mask(g.pattern, px, py, max(4.0, float(half) * 0.28))
    if pattern is not None:
        fabric[pattern] = contrast + jitter
    fabric[detail] *= np.float32(_DETAIL_SHADE)
    fabric[accent] = contrast
    # gentle top-lit shading, so the garment reads as cloth rather than a flat sticker
    fabric *= (np.float32(1.04) - np.float32(0.08) * (py / half).clip(-1, 1))[:, :, None]

    mask = body | detail | accent
    img = np.where(mask[:, :, None], fabric, img)
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    img[mask & ~inner] *= np.float32(_EDGE_SHADE)
    img += noise
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask
