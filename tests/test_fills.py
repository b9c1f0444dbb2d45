"""Offline counterfactual fills (numpy) and their batched device twins (torch), on hand-made images.

Images are 6 rows x 8 columns with a distinct value in every pixel, so each expected array
below is written out from the rule: the hole (every pixel a box touches) is replaced, nothing
else changes; `tile` copies the longest object-free band of rows or columns (larger area wins,
rows win ties), the band staying in place: tiled row r = image[start + (r - start) % length].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cfrobust.preprocess.fills import FILLS, fill_mean, fill_tile, longest_run, tiled_background
from cfrobust.shards.schema import MEAN_RGB_UINT8, NORMALIZE_MEAN, NORMALIZE_STD, box_pixel_bounds, boxes_to_mask
from cfrobust.trainer.pixels import box_masks, longest_runs, model_memory_format, normalize, tiled_backgrounds

H, W = 6, 8
MEAN = np.array(MEAN_RGB_UINT8, np.uint8)
STD = torch.tensor(NORMALIZE_STD).view(1, 3, 1, 1)


def make_image(height: int = H, width: int = W) -> np.ndarray:
    """Every pixel distinct: channel 0 = r*W + c, channel 1 = 100 + that, channel 2 = 200 - that."""
    flat = np.arange(height * width).reshape(height, width)
    return np.stack([flat, 100 + flat, 200 - flat], axis=-1).astype(np.uint8)


def check_fill(fill, boxes) -> np.ndarray:
    """Run a fill; the input is untouched, pixels outside the hole are unchanged; return output."""
    image = make_image()
    before = image.copy()
    out = fill(image, boxes)
    assert np.array_equal(image, before), "fill modified its input"
    assert out.shape == image.shape and out.dtype == np.uint8
    return out


# ---------------------------------------------------------------- box rasterisation


def test_box_pixel_bounds_floor_ceil_and_clip():
    assert box_pixel_bounds((1.5, 0.2, 2.1, 1.0), W, H) == (1, 0, 3, 1)
    assert box_pixel_bounds((2, 3, 4, 5), W, H) == (2, 3, 4, 5)
    assert box_pixel_bounds((-0.5, 4.5, 8.7, 7), W, H) == (0, 4, 8, 6)
    assert box_pixel_bounds((-9, -9, -1, -1), W, H) == (0, 0, 0, 0)
    assert box_pixel_bounds((10, 10, 12, 12), W, H) == (8, 6, 8, 6)


def test_boxes_to_mask_by_hand():
    mask = boxes_to_mask([(1.5, 0.2, 2.1, 1.0), (7, 5, 8, 6)], W, H)
    expected = np.zeros((H, W), bool)
    expected[0, 1:3] = True
    expected[5, 7] = True
    assert mask.shape == (H, W) and mask.dtype == bool
    assert np.array_equal(mask, expected)
    assert not boxes_to_mask([], W, H).any()


# ---------------------------------------------------------------- longest_run


@pytest.mark.parametrize(
    "free, expected",
    [
        ([True, True, True], (0, 3)),
        ([True, True, False, True, True], (0, 2)),  # first of equal runs
        ([False, True, True, True, False, True], (1, 3)),
        ([False, False, True], (2, 1)),
        ([True, False, False, True, True], (3, 2)),
        ([False, True, False], (1, 1)),
    ],
)
def test_longest_run(free, expected):
    assert longest_run(np.array(free)) == expected
    start, length = longest_runs(torch.tensor([free]))
    assert (int(start[0]), int(length[0])) == expected


def test_longest_run_of_nothing_free_is_zero_zero():
    assert longest_run(np.array([False, False, False])) == (0, 0)


def test_torch_longest_runs_match_numpy_on_random_rows():
    rng = np.random.default_rng(0)
    free = rng.random((300, 11)) < rng.random((300, 1))  # from mostly blocked to mostly free
    starts, lengths = longest_runs(torch.from_numpy(free))
    for row, start, length in zip(free, starts.tolist(), lengths.tolist()):
        want_start, want_length = longest_run(row)
        assert length == want_length
        if want_length:
            assert start == want_start


# ---------------------------------------------------------------- fill_mean


@pytest.mark.parametrize(
    "boxes, hole",
    [
        ([(0, 0, 3, 2)], (slice(0, 2), slice(0, 3))),  # at the border
        ([(3, 2, 4, 3)], (slice(2, 3), slice(3, 4))),  # one pixel
        ([(1.5, 0.2, 2.1, 1.0)], (slice(0, 1), slice(1, 3))),  # fractional: floor/ceil
        ([(0, 0, 8, 6)], (slice(0, 6), slice(0, 8))),  # whole image
        ([(-3, -2, 11, 9)], (slice(0, 6), slice(0, 8))),  # larger than the image: clipped
    ],
)
def test_fill_mean_single_hole(boxes, hole):
    out = check_fill(fill_mean, boxes)
    expected = make_image()
    expected[hole] = MEAN
    assert np.array_equal(out, expected)


def test_fill_mean_two_boxes():
    out = check_fill(fill_mean, [(0, 0, 2, 2), (5, 4, 8, 6)])
    expected = make_image()
    expected[0:2, 0:2] = MEAN
    expected[4:6, 5:8] = MEAN
    assert np.array_equal(out, expected)


@pytest.mark.parametrize("fill", [fill_mean, fill_tile])
def test_no_boxes_changes_nothing(fill):
    image = make_image()
    out = fill(image, [])
    assert np.array_equal(out, image)
    assert out is not image


def test_fills_registry():
    assert FILLS["mean"] is fill_mean and FILLS["tile"] is fill_tile


# ---------------------------------------------------------------- fill_tile


def test_tile_box_at_border_rows_win_by_area():
    # Hole rows 0-1, cols 0-2. Free rows 2..5 (4 x 8 = 32) beat free cols 3..7 (5 x 6 = 30).
    image = make_image()
    out = check_fill(fill_tile, [(0, 0, 3, 2)])
    expected = image.copy()
    expected[0, 0:3] = image[4, 0:3]  # 2 + (0 - 2) % 4 = 4
    expected[1, 0:3] = image[5, 0:3]  # 2 + (1 - 2) % 4 = 5
    assert np.array_equal(out, expected)


def test_tile_columns_win_by_area():
    # Hole rows 0-2, cols 0-1. Free rows 3..5 (3 x 8 = 24) lose to free cols 2..7 (6 x 6 = 36).
    image = make_image()
    out = check_fill(fill_tile, [(0, 0, 2, 3)])
    expected = image.copy()
    expected[0:3, 0] = image[0:3, 6]  # 2 + (0 - 2) % 6 = 6
    expected[0:3, 1] = image[0:3, 7]  # 2 + (1 - 2) % 6 = 7
    assert np.array_equal(out, expected)


def test_tile_rows_win_ties():
    # Hole rows 0-2, cols 0-3. Free rows 3..5 (3 x 8 = 24) tie free cols 4..7 (4 x 6 = 24).
    image = make_image()
    out = check_fill(fill_tile, [(0, 0, 4, 3)])
    expected = image.copy()
    expected[0:3, 0:4] = image[3:6, 0:4]
    assert np.array_equal(out, expected)


def test_tile_one_pixel_box_tie_goes_to_rows():
    # Hole (r2, c3). Free rows 3..5 (3 x 8 = 24) tie free cols 4..7 (4 x 6 = 24): rows.
    image = make_image()
    out = check_fill(fill_tile, [(3, 2, 4, 3)])
    expected = image.copy()
    expected[2, 3] = image[5, 3]  # 3 + (2 - 3) % 3 = 5
    assert np.array_equal(out, expected)


def test_tile_fractional_box():
    # (1.5, 0.2, 2.1, 1.0) touches row 0, cols 1-2. Free rows 1..5 (40) beat cols 3..7 (30).
    image = make_image()
    out = check_fill(fill_tile, [(1.5, 0.2, 2.1, 1.0)])
    expected = image.copy()
    expected[0, 1:3] = image[5, 1:3]  # 1 + (0 - 1) % 5 = 5
    assert np.array_equal(out, expected)


def test_tile_full_width_box_uses_rows():
    # (-0.5, 4.5, 8.7, 7) is clipped to rows 4-5, all columns: no free column at all.
    image = make_image()
    out = check_fill(fill_tile, [(-0.5, 4.5, 8.7, 7)])
    expected = image.copy()
    expected[4] = image[0]  # 0 + 4 % 4
    expected[5] = image[1]
    assert np.array_equal(out, expected)


def test_tile_two_boxes():
    # Holes rows 0-1 x cols 0-1 and rows 4-5 x cols 5-7. Free rows 2..3 (16) lose to
    # free cols 2..4 (3 x 6 = 18); tiled col c = image[:, 2 + (c - 2) % 3].
    image = make_image()
    out = check_fill(fill_tile, [(0, 0, 2, 2), (5, 4, 8, 6)])
    expected = image.copy()
    expected[0:2, 0] = image[0:2, 3]
    expected[0:2, 1] = image[0:2, 4]
    expected[4:6, 5] = image[4:6, 2]
    expected[4:6, 6] = image[4:6, 3]
    expected[4:6, 7] = image[4:6, 4]
    assert np.array_equal(out, expected)


def test_tiled_background_keeps_the_band_in_place():
    # Hole rows 2-3 x cols 2-3: free rows 0..1 and 4..5 (2 x 8 = 16) lose to cols 4..7 (24).
    image = make_image()
    hole = boxes_to_mask([(2, 2, 4, 4)], W, H)
    tiled = tiled_background(image, hole)
    expected = image[:, [4, 5, 6, 7, 4, 5, 6, 7]]
    assert np.array_equal(tiled, expected)
    assert np.array_equal(tiled[:, 4:8], image[:, 4:8])  # the band itself stays where it was
    out = fill_tile(image, [(2, 2, 4, 4)])
    want = image.copy()
    want[2:4, 2:4] = image[2:4, 6:8]
    assert np.array_equal(out, want)


@pytest.mark.parametrize("boxes", [[(0, 0, 8, 6)], [(-1, -1, 9, 7)], [(0, 0, 8, 3), (0, 3, 8, 6)]])
def test_tile_whole_image_falls_back_to_the_mean_colour(boxes):
    out = check_fill(fill_tile, boxes)
    assert np.array_equal(out, np.broadcast_to(MEAN, (H, W, 3)))


def test_tile_diagonal_boxes_take_the_mean_of_what_is_outside():
    # Boxes touch every row and column but leave two 3x4 blocks outside the hole.
    image = np.full((H, W, 3), 250, np.uint8)  # inside the hole: must not count
    image[0:3, 4:8] = (10, 20, 30)
    image[3:6, 0:4] = (30, 60, 90)
    image[0, 4] = (28, 20, 30)  # channel 0 mean = 20 + 18/24 = 20.75 -> rounds to 21
    boxes = [(0, 0, 4, 3), (4, 3, 8, 6)]
    out = fill_tile(image, boxes)
    expected = image.copy()
    expected[0:3, 0:4] = (21, 40, 60)
    expected[3:6, 4:8] = (21, 40, 60)
    assert np.array_equal(out, expected)


# ---------------------------------------------------------------- torch: normalize


def test_normalize_values():
    images = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    images[1] = 255
    out = normalize(images)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    for ch in range(3):
        assert out[0, ch].allclose(torch.tensor(-NORMALIZE_MEAN[ch] / NORMALIZE_STD[ch]))
        assert out[1, ch].allclose(torch.tensor((1 - NORMALIZE_MEAN[ch]) / NORMALIZE_STD[ch]))


def test_normalize_maps_the_mean_colour_near_zero_within_uint8_rounding():
    image = torch.tensor(MEAN_RGB_UINT8, dtype=torch.uint8).view(1, 3, 1, 1)
    out = normalize(image).view(3)
    bound = torch.tensor([0.5 / 255 / s for s in NORMALIZE_STD])
    assert (out.abs() <= bound).all()


def test_normalize_lays_a_decoded_batch_out_for_the_cpu_model():
    # The loader hands over the pixels as decoded (channels-last in memory); the CPU model runs
    # in the default layout, so normalize transposes while it converts.
    decoded = torch.randint(0, 256, (2, 4, 5, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = decoded.permute(0, 3, 1, 2)
    out = normalize(images)
    assert out.is_contiguous() and torch.equal(out, normalize(images.contiguous()))
    assert model_memory_format(torch.device("cpu")) == torch.contiguous_format
    assert model_memory_format(torch.device("cuda", 0)) == torch.channels_last


# ---------------------------------------------------------------- torch: box_masks


def test_box_masks_equal_numpy_boxes_to_mask():
    rng = np.random.default_rng(1)
    batch, k, height, width = 40, 3, 7, 9
    boxes = rng.uniform(-3, 12, (batch, k, 4)).astype(np.float32)
    boxes[..., 2:] = boxes[..., :2] + rng.uniform(-1, 6, (batch, k, 2))  # some inverted, some outside
    boxes[:5] = np.round(boxes[:5])  # integer coordinates too
    valid = rng.random((batch, k)) < 0.7
    valid[0] = False  # an image with no valid box at all
    masks = box_masks(torch.from_numpy(boxes), torch.from_numpy(valid), height, width)
    assert masks.shape == (batch, 1, height, width) and masks.dtype == torch.bool
    for b in range(batch):
        expected = boxes_to_mask([boxes[b, j] for j in range(k) if valid[b, j]], width, height)
        assert np.array_equal(masks[b, 0].numpy(), expected), f"image {b}"
    assert not masks[0].any()
    assert masks.any()


def test_box_masks_ignore_padding_rows():
    boxes = torch.tensor([[[1.0, 1.0, 3.0, 2.0], [0.0, 0.0, 8.0, 6.0]]])
    valid = torch.tensor([[True, False]])
    masks = box_masks(boxes, valid, H, W)
    expected = np.zeros((H, W), bool)
    expected[1, 1:3] = True
    assert np.array_equal(masks[0, 0].numpy(), expected)


# ---------------------------------------------------------------- torch: tiled_backgrounds


def _path(hole: np.ndarray) -> str:
    height, width = hole.shape
    _, rows = longest_run(~hole.any(axis=1))
    _, cols = longest_run(~hole.any(axis=0))
    if rows == 0 and cols == 0:
        return "outside-mean" if (~hole).any() else "nothing-outside"
    return "rows" if rows * width >= cols * height else "cols"


def _compare_tiled(images: np.ndarray, box_lists: list[list]) -> set[str]:
    batch, height, width, _ = images.shape
    k = max(1, max(len(b) for b in box_lists))
    boxes = torch.zeros(batch, k, 4)
    valid = torch.zeros(batch, k, dtype=torch.bool)
    for i, bl in enumerate(box_lists):
        if bl:
            boxes[i, : len(bl)] = torch.tensor(bl, dtype=torch.float32)
            valid[i, : len(bl)] = True
    holes = box_masks(boxes, valid, height, width)
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    got = tiled_backgrounds(x, holes)
    assert got.shape == x.shape
    paths = set()
    for i in range(batch):
        hole = boxes_to_mask(box_lists[i], width, height)
        assert np.array_equal(holes[i, 0].numpy(), hole)
        want = normalize(torch.from_numpy(np.ascontiguousarray(tiled_background(images[i], hole))).permute(2, 0, 1)[None])
        path = _path(hole)
        paths.add(path)
        if path in ("rows", "cols"):
            assert (got[i] - want[0]).abs().max() < 1e-5, f"image {i} ({path})"
        else:  # numpy rounds the fallback colour to uint8
            tolerance = (1 / 255 / STD[0]) + 1e-5
            assert ((got[i] - want[0]).abs() <= tolerance).all(), f"image {i} ({path})"
            assert (got[i] == got[i][:, :1, :1]).all()  # one colour everywhere
    return paths


@pytest.mark.parametrize("height, width", [(6, 8), (9, 5)])
def test_tiled_backgrounds_match_numpy_on_random_images(height, width):
    rng = np.random.default_rng(height * 100 + width)
    batch = 60
    images = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    box_lists = []
    for _ in range(batch - 4):
        n = int(rng.integers(1, 4))
        bl = []
        for _ in range(n):
            x0, y0 = rng.uniform(-1, width), rng.uniform(-1, height)
            bl.append((x0, y0, x0 + rng.uniform(0.3, width / 2), y0 + rng.uniform(0.3, height / 2)))
        box_lists.append(bl)
    # The special paths, made on purpose: diagonal boxes (no band, pixels outside), the whole
    # image (nothing outside), a full-width strip (rows only) and a full-height strip (cols only).
    box_lists.append([(0, 0, width / 2, height / 2), (width / 2, height / 2, width, height)])
    box_lists.append([(-1, -1, width + 1, height + 1)])
    box_lists.append([(0, 1, width, 2)])
    box_lists.append([(1, 0, 2, height)])
    paths = _compare_tiled(images, box_lists)
    assert paths == {"rows", "cols", "outside-mean", "nothing-outside"}


def test_tiled_backgrounds_hand_made_batch():
    """Same hand-made cases as the numpy tests, all in one batch."""
    images = np.stack([make_image()] * 5)
    box_lists = [
        [(0, 0, 3, 2)],  # rows
        [(0, 0, 2, 3)],  # cols
        [(0, 0, 4, 3)],  # tie -> rows
        [(0, 0, 2, 2), (5, 4, 8, 6)],  # two boxes -> cols
        [(0, 0, 4, 3), (4, 3, 8, 6)],  # diagonal -> outside mean
    ]
    assert _compare_tiled(images, box_lists) == {"rows", "cols", "outside-mean"}
