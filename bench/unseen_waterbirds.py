#!/usr/bin/env python3
"""Generate an "unseen" Waterbirds-style data set: a hold-out for the defaults.

cfrobust's defaults were tuned on its own synthetic generator.  This script
plays the part of a user's data set that nobody tuned for: it was written
without looking at the built-in generator, so its shapes, textures, colours
and noise are its own.  Running the standard recipe on it checks that the
defaults carry over to data they have never seen.

The task has the Waterbirds structure:

* the label y is decided by the OBJECT's shape: y=0 "landbird" (five-point
  star, plus-shaped cross, crescent), y=1 "waterbird" (heart, arrow, hexagon
  ring).  Colour, texture, pose, size and position are drawn the same way for
  both classes, so only the shape tells them apart;
* the place is decided by the BACKGROUND: 0 "land" (forest, grass, sand with
  pebbles), 1 "water" (wave bands, ripples, choppy water with foam);
* in the training split the place agrees with the label with probability
  --corr per class (the shortcut); val and test hold each (y, place) group in
  exactly a quarter of their images.

--twin writes the "uncorrelated twin": the same objects image for image
(every object is drawn from its own random stream, independent of the place
draw), but training places drawn independently of the label (50/50 per
class).  Val and test are identical to the normal output.

The output uses the released Waterbirds layout, so `cfrobust preprocess
--dataset waterbirds --root OUT` reads it directly:

    OUT/metadata.csv        img_id,img_filename,y,split,place,place_filename
    OUT/001.Landbird/img_000001.jpg ...   (JPEG quality 95, 64x64 RGB)
    OUT/segmentations/001.Landbird/img_000001.png ...  (object 255, rest 0)

Everything is deterministic from --seed: the same arguments give
byte-identical files.  Depends only on numpy and OpenCV.

    python bench/unseen_waterbirds.py --out /tmp/unseen --seed 0
    python bench/unseen_waterbirds.py --out /tmp/unseen-twin --seed 0 --twin
"""

from __future__ import annotations

import argparse
import colorsys
import os
import shutil
import sys
import time

import cv2
import numpy as np

SIZE = 64  # image side in pixels
SUPER = 4  # supersampling of the silhouette, for an anti-aliased edge
SPLIT_NAMES = ("train", "val", "test")  # split codes 0, 1, 2 as in Waterbirds
CLASS_DIRS = ("001.Landbird", "002.Waterbird")
PLACE_NAMES = ("land", "water")

# Stream tags.  Each image draws its object, background and finishing noise
# from separate generators, so changing the place of an image (--twin) leaves
# its object untouched.
OBJECT, BACKGROUND, FINISH = 0, 1, 2
LABELS, PLACES = 0, 1


def image_rng(seed: int, split: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, 1000 + split, index, stream])


def split_rng(seed: int, split: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, 2000 + split, stream])


# --------------------------------------------------------------------------
# Small helpers

GRID_Y, GRID_X = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5  # pixel centres


def hsv(h: float, s: float, v: float) -> np.ndarray:
    """RGB in 0..255 from hue in degrees, saturation and value in 0..1."""
    return np.array(colorsys.hsv_to_rgb((h % 360) / 360, min(s, 1), min(v, 1))) * 255


def jitter(rng: np.random.Generator, colours) -> np.ndarray:
    """A palette's colours, varied so no two images share exact tones."""
    colours = np.asarray(colours, np.float32)
    brightness = rng.uniform(0.8, 1.15)
    tint = rng.uniform(0.9, 1.1, size=3)  # per channel: slight hue drift
    shift = rng.normal(0, 6, size=colours.shape)
    return np.clip(colours * brightness * tint + shift, 0, 255)


def ramp(t: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Map a field in 0..1 to colours along evenly spaced palette stops."""
    stops = np.linspace(0, 1, len(colours))
    return np.stack([np.interp(t, stops, colours[:, c]) for c in range(3)], axis=-1)


def value_noise(rng: np.random.Generator, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth noise with the given number of cells per side, random phase.

    A random lattice is upsampled bicubically and cropped at a random offset,
    so lattice points do not always fall on the same pixels.
    """
    grid = rng.random((cells_y + 2, cells_x + 2), dtype=np.float32)
    big_h = int(np.ceil(SIZE * (cells_y + 2) / cells_y))
    big_w = int(np.ceil(SIZE * (cells_x + 2) / cells_x))
    big = cv2.resize(grid, (big_w, big_h), interpolation=cv2.INTER_CUBIC)
    oy = rng.integers(0, big_h - SIZE + 1)
    ox = rng.integers(0, big_w - SIZE + 1)
    return big[oy:oy + SIZE, ox:ox + SIZE]


def fbm(rng, cells: float, octaves: int, stretch_y: float = 1.0, stretch_x: float = 1.0):
    """Multi-scale noise normalised to 0..1; stretch makes it anisotropic."""
    total = np.zeros((SIZE, SIZE), np.float32)
    amp = 1.0
    for octave in range(octaves):
        c = cells * 2 ** octave
        total += amp * value_noise(rng, max(1, round(c * stretch_y)), max(1, round(c * stretch_x)))
        amp *= 0.5
    return (total - total.min()) / (np.ptp(total) + 1e-6)


def to_canvas(img: np.ndarray) -> np.ndarray:
    """uint8 copy to draw anti-aliased strokes on with OpenCV."""
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def fixed(points) -> np.ndarray:
    """Points in pixel units to OpenCV's 4-bit fixed point (shift=4).

    OpenCV puts pixel centres on integers; our pixel centres are at +0.5.
    """
    return np.round((np.asarray(points, np.float64) - 0.5) * 16).astype(np.int32)


def colour_tuple(c) -> tuple:
    return tuple(float(v) for v in c)


# --------------------------------------------------------------------------
# Land backgrounds


def forest(rng):
    """Blotchy canopy greens and browns with a few dark tree trunks."""
    pal = jitter(rng, [(20, 45, 18), (45, 85, 30), (90, 110, 45), (95, 70, 40)])
    img = ramp(fbm(rng, 3, 4), pal)
    img *= (0.8 + 0.4 * value_noise(rng, 20, 20))[..., None]  # leaf-scale speckle
    canvas = to_canvas(img)
    trunk = jitter(rng, [(55, 38, 25)])[0]
    for _ in range(rng.integers(3, 7)):
        x = rng.uniform(0, SIZE)
        lean = rng.uniform(-4, 4)
        top = rng.uniform(-5, 30)
        width = int(rng.integers(2, 4))
        pts = fixed([(x, top), (x + lean, SIZE + 2)])
        cv2.line(canvas, tuple(pts[0]), tuple(pts[1]), colour_tuple(trunk), width, cv2.LINE_AA, 4)
    # Bark: vertical streak noise darkens the trunks and the undergrowth alike.
    return canvas * (0.85 + 0.3 * value_noise(rng, 3, 24))[..., None]


def grass(rng):
    """Green meadow: vertical blade texture and short light/dark strokes."""
    pal = jitter(rng, [(55, 90, 25), (95, 135, 40), (150, 170, 70)])
    img = ramp(fbm(rng, 4, 3), pal)
    img *= (0.75 + 0.5 * value_noise(rng, 6, 40))[..., None]
    canvas = to_canvas(img)
    for tone in (rng.uniform(1.15, 1.4), rng.uniform(0.55, 0.75)):
        n = int(rng.integers(60, 120))
        base = rng.uniform(0, SIZE, size=(n, 2))
        length = rng.uniform(3, 7, size=n)
        angle = rng.normal(0, 0.35, size=n)  # mostly upright blades
        tip = base + np.stack([np.sin(angle), -np.cos(angle)], 1) * length[:, None]
        blades = [fixed([b, t]) for b, t in zip(base, tip)]
        colour = np.clip(pal[1] * tone, 0, 255)
        cv2.polylines(canvas, blades, False, colour_tuple(colour), 1, cv2.LINE_AA, 4)
    return canvas.astype(np.float32)


def sand(rng):
    """Sandy ground: fine speckle over dunes of tan, with scattered pebbles."""
    pal = jitter(rng, [(145, 120, 85), (190, 165, 120), (220, 200, 155)])
    img = ramp(fbm(rng, 2, 4), pal)
    grain = cv2.GaussianBlur(rng.normal(0, 1, (SIZE, SIZE)).astype(np.float32), (0, 0), 0.6)
    img += 18 * grain[..., None]
    canvas = to_canvas(img)
    for _ in range(rng.integers(4, 12)):
        cx, cy = rng.uniform(0, SIZE, size=2)
        ax, ay = rng.uniform(1.5, 5), rng.uniform(1.2, 3.5)
        ang = rng.uniform(0, 180)
        grey = rng.uniform(70, 150)
        stone = np.clip(np.array([grey, grey * 0.95, grey * 0.88]) * rng.uniform(0.9, 1.1, 3), 0, 255)
        centre = tuple(fixed([(cx, cy)])[0])
        cv2.ellipse(canvas, centre, (int(ax * 16), int(ay * 16)), ang, 0, 360,
                    colour_tuple(stone), -1, cv2.LINE_AA, 4)
        # Light from the upper left: a small highlight makes it read as a stone.
        hl = tuple(fixed([(cx - ax * 0.3, cy - ay * 0.3)])[0])
        cv2.ellipse(canvas, hl, (int(ax * 6), int(ay * 6)), ang, 0, 360,
                    colour_tuple(np.clip(stone * 1.35, 0, 255)), -1, cv2.LINE_AA, 4)
    return canvas.astype(np.float32)


# --------------------------------------------------------------------------
# Water backgrounds


def waves(rng):
    """Horizontal wave bands, warped by noise, with bright crests."""
    wavelength = rng.uniform(5, 11)
    tilt = rng.uniform(-0.15, 0.15)
    warp = fbm(rng, 2, 3, stretch_x=1.5) - 0.5
    phase = 2 * np.pi * ((GRID_Y + tilt * GRID_X) / wavelength + 1.2 * warp) + rng.uniform(0, 2 * np.pi)
    crest = (0.5 + 0.5 * np.sin(phase)) ** rng.uniform(1.5, 3)  # sharp crests, wide troughs
    pal = jitter(rng, [(10, 35, 85), (30, 85, 150), (125, 180, 215)])
    return ramp(0.7 * crest + 0.3 * fbm(rng, 2, 3), pal)


def ripples(rng):
    """Concentric ripples from a few drops, on teal water."""
    field = np.zeros((SIZE, SIZE), np.float32)
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(-16, SIZE + 16, size=2)
        r = np.hypot(GRID_X - cx, GRID_Y - cy)
        wavelength = rng.uniform(4, 9)
        field += np.sin(2 * np.pi * r / wavelength + rng.uniform(0, 2 * np.pi)) / (1 + r / 40)
    field = (field - field.min()) / (np.ptp(field) + 1e-6)
    pal = jitter(rng, [(8, 55, 65), (25, 115, 125), (140, 210, 205)])
    return ramp(0.75 * field + 0.25 * fbm(rng, 2, 3), pal)


def chop(rng):
    """Choppy open water: horizontally stretched noise and foam highlights."""
    body = fbm(rng, 3, 4, stretch_y=3.0, stretch_x=0.7)
    pal = jitter(rng, [(15, 30, 60), (40, 70, 115), (95, 135, 175)])
    img = ramp(body, pal)
    spray = value_noise(rng, 24, 8) * body  # foam only on the high swell
    threshold = rng.uniform(0.45, 0.6)
    foam = np.clip((spray - threshold) / 0.12, 0, 1)[..., None]
    white = jitter(rng, [(230, 240, 245)])[0]
    return img * (1 - foam) + white * foam


BACKGROUNDS = ((forest, grass, sand), (waves, ripples, chop))  # indexed by place


# --------------------------------------------------------------------------
# Object shapes.  Each returns [(points, filled)] in arbitrary units; filled
# False cuts a hole.  Parameters vary a little so no two objects are equal.


def polar(r, a) -> np.ndarray:
    return np.stack([np.cos(a) * r, np.sin(a) * r], axis=1)


def star(rng):
    k = np.arange(10)
    r = np.where(k % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
    return [(polar(r, np.pi / 2 + k * np.pi / 5), True)]


def cross(rng):
    w = rng.uniform(0.26, 0.4)  # half the arm width
    pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
           (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    return [(np.array(pts, float), True)]


def crescent(rng):
    a = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    offset, inner = rng.uniform(0.35, 0.55), rng.uniform(0.8, 0.9)
    return [(polar(1.0, a), True), (polar(inner, a) + [offset, 0], False)]


def heart(rng):
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    x *= rng.uniform(0.9, 1.1)  # plumper or slimmer
    return [(np.stack([x, y], 1), True)]


def arrow(rng):
    shaft, head, neck = rng.uniform(0.16, 0.26), rng.uniform(0.5, 0.7), rng.uniform(0.05, 0.35)
    pts = [(-1, -shaft), (neck, -shaft), (neck, -head), (1, 0),
           (neck, head), (neck, shaft), (-1, shaft)]
    return [(np.array(pts, float), True)]


def hex_ring(rng):
    a = np.arange(6) * np.pi / 3
    return [(polar(1.0, a), True), (polar(rng.uniform(0.5, 0.65), a), False)]


SHAPES = ((star, cross, crescent), (heart, arrow, hex_ring))  # indexed by y


def pose(parts, rng):
    """Rotate, scale and move a shape; its box is 25-50% of the side, inside."""
    angle = rng.uniform(0, 2 * np.pi)
    aspect = rng.uniform(0.85, 1.15)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    parts = [((pts * [aspect, 1]) @ rot.T, filled) for pts, filled in parts]
    outline = np.concatenate([pts for pts, filled in parts if filled])
    lo, hi = outline.min(0), outline.max(0)
    scale = rng.uniform(0.25, 0.5) * SIZE / (hi - lo).max()
    w, h = (hi - lo) * scale
    corner = np.array([rng.uniform(1, SIZE - 1 - w), rng.uniform(1, SIZE - 1 - h)])
    return [((pts - lo) * scale + corner, filled) for pts, filled in parts]


def coverage(parts) -> np.ndarray:
    """Fraction of each pixel the shape covers, from a supersampled fill."""
    hi = np.zeros((SIZE * SUPER, SIZE * SUPER), np.uint8)
    for pts, filled in parts:
        # Pixel (j) spans [j, j+1); hi-res centre k sits at (k + 0.5) / SUPER.
        fine = np.round((pts * SUPER - 0.5) * 16).astype(np.int32)
        cv2.fillPoly(hi, [fine], 255 if filled else 0, cv2.LINE_8, 4)
    return cv2.resize(hi, (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def paint(rng, parts) -> np.ndarray:
    """The object's colour field: random hue, and a gradient, stripes or mottling."""
    h, s, v = rng.uniform(0, 360), rng.uniform(0.35, 1.0), rng.uniform(0.4, 1.0)
    first = hsv(h, s, v)
    second = hsv(h + rng.uniform(-40, 40), s * rng.uniform(0.6, 1.0), v * rng.uniform(0.45, 0.8))
    outline = np.concatenate([pts for pts, filled in parts if filled])
    centre, extent = outline.mean(0), np.ptp(outline, 0).max()
    angle = rng.uniform(0, 2 * np.pi)
    along = ((GRID_X - centre[0]) * np.cos(angle) + (GRID_Y - centre[1]) * np.sin(angle)) / extent
    kind = rng.integers(3)
    if kind == 0:
        t = np.clip(along + 0.5, 0, 1)
    elif kind == 1:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(2, 4) * along + rng.uniform(0, 2 * np.pi))
    else:
        t = fbm(rng, 6, 2)
    return ramp(t, np.stack([first, second]))


# --------------------------------------------------------------------------
# One image


def render(seed: int, split: int, index: int, y: int, place: int):
    """Image (uint8 RGB), mask (bool) and background kind of one sample."""
    obj = image_rng(seed, split, index, OBJECT)
    parts = pose(SHAPES[y][obj.integers(3)](obj), obj)
    alpha = coverage(parts)
    colour = paint(obj, parts)

    bg = image_rng(seed, split, index, BACKGROUND)
    make = BACKGROUNDS[place][bg.integers(3)]
    img = make(bg).astype(np.float32)
    img = img * (1 - alpha[..., None]) + colour * alpha[..., None]

    # Camera finish: sometimes a little soft, always a little noisy.
    fin = image_rng(seed, split, index, FINISH)
    blur, sigma, noise = fin.random() < 0.3, fin.uniform(0.5, 1.0), fin.uniform(4, 8)
    if blur:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += fin.normal(0, noise, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), alpha >= 0.5, make.__name__


# --------------------------------------------------------------------------
# Splits and output


def assign_groups(seed: int, split: int, n: int, agree: float):
    """Labels (half each, shuffled) and places; a share `agree` of each class
    sits on its own place.  Labels never depend on `agree`, so a twin keeps
    every image's label, hence its object."""
    ys = split_rng(seed, split, LABELS).permutation(np.repeat([0, 1], [n // 2, n - n // 2]))
    places = 1 - ys
    pick = split_rng(seed, split, PLACES)
    for y in (0, 1):
        members = pick.permutation(np.flatnonzero(ys == y))
        places[members[:round(agree * len(members))]] = y
    return ys, places


def prepare_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        sys.exit(f"error: {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            sys.exit(f"error: {out} exists and is not empty (pass --overwrite to replace it)")
        # Remove only what this script writes, never a whole folder it did not make.
        for name in ("metadata.csv", *CLASS_DIRS, "segmentations"):
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    for folder in CLASS_DIRS:
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        os.makedirs(os.path.join(out, "segmentations", folder), exist_ok=True)


def write(path: str, image: np.ndarray, params=()) -> None:
    if not cv2.imwrite(path, image, list(params)):
        sys.exit(f"error: could not write {path}")


def generate(out: str, seed: int, sizes, corr: float, twin: bool) -> dict:
    """Write every split; return {split: {(y, place): count}}."""
    rows, counts, img_id = [], {}, 0
    for split, n in enumerate(sizes):
        agree = 0.5 if (twin or split > 0) else corr
        ys, places = assign_groups(seed, split, n, agree)
        counts[SPLIT_NAMES[split]] = {(y, p): int(((ys == y) & (places == p)).sum())
                                      for y in (0, 1) for p in (0, 1)}
        for index in range(n):
            y, place = int(ys[index]), int(places[index])
            img, mask, kind = render(seed, split, index, y, place)
            img_id += 1
            name = f"{CLASS_DIRS[y]}/img_{img_id:06d}"
            write(os.path.join(out, name + ".jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                  (cv2.IMWRITE_JPEG_QUALITY, 95))
            seg = np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)
            write(os.path.join(out, "segmentations", name + ".png"), seg)
            place_file = f"/{kind[0]}/{PLACE_NAMES[place]}_{kind}/img_{img_id:06d}.jpg"
            rows.append(f"{img_id},{name}.jpg,{y},{split},{place},{place_file}")
    with open(os.path.join(out, "metadata.csv"), "w", newline="") as f:
        f.write("img_id,img_filename,y,split,place,place_filename\n")
        f.write("\n".join(rows) + "\n")
    return counts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder to write (Waterbirds layout)")
    p.add_argument("--seed", type=int, required=True, help="non-negative seed")
    p.add_argument("--twin", action="store_true",
                   help="uncorrelated twin: same objects, training places 50/50 per class")
    p.add_argument("--corr", type=float, default=0.95,
                   help="share of each training class on its own place (ignored with --twin)")
    p.add_argument("--sizes", default="2400,400,800", help="train,val,test image counts")
    p.add_argument("--overwrite", action="store_true",
                   help="replace this script's earlier output in --out")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error("--sizes must be three integers, e.g. 2400,400,800")
    if len(args.sizes) != 3 or min(args.sizes) < 0:
        p.error("--sizes must be three non-negative integers, e.g. 2400,400,800")
    if args.sizes[1] % 4 or args.sizes[2] % 4:
        p.error("val and test sizes must be multiples of 4 (four equal groups)")
    if args.seed < 0:
        p.error("--seed must be non-negative")
    if not 0 <= args.corr <= 1:
        p.error("--corr must lie in [0, 1]")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cv2.setNumThreads(1)  # 64 px images: threads cost more than they save
    start = time.perf_counter()
    prepare_out(args.out, args.overwrite)
    counts = generate(args.out, args.seed, args.sizes, args.corr, args.twin)
    train = counts["train"]
    groups = ", ".join(f"y{y}/{PLACE_NAMES[p]} {train[(y, p)]}" for y in (0, 1) for p in (0, 1))
    print(f"wrote {sum(args.sizes)} images to {args.out} (seed {args.seed}, "
          f"{'twin' if args.twin else f'corr {args.corr:g}'}): "
          f"train {args.sizes[0]} [{groups}], val {args.sizes[1]}, test {args.sizes[2]} "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
