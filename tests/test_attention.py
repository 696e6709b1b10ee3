"""Attention: box parametrisation, the boxcar mask and the differentiable crop-and-zoom (paper Eqs. 2-6)."""

from __future__ import annotations

import math

import pytest
import torch

from racnn.attention import (
    APN,
    MapAPN,
    box_from_unit,
    box_to_xyxy,
    boxcar_mask,
    compose_boxes,
    crop_zoom,
    crop_zoom_reference,
    make_apn,
    soft_box_gradient,
)

CROPS = [crop_zoom, crop_zoom_reference]
CROP_IDS = ["crop_zoom", "reference"]


def _random_boxes(n: int, gen: torch.Generator, min_side: float = 0.3, max_side: float = 0.9) -> torch.Tensor:
    z = torch.rand(n, 3, generator=gen, dtype=torch.float64)
    return box_from_unit(z, min_side, max_side)


def _smooth_image(b: int, c: int, h: int, w: int, dtype=torch.float64) -> torch.Tensor:
    """Low-frequency, non-symmetric content in [0, 1] (interpolation errors stay small)."""
    y = torch.linspace(0, 1, h, dtype=dtype)[:, None]
    x = torch.linspace(0, 1, w, dtype=dtype)[None, :]
    chans = []
    for i in range(b * c):
        chans.append(0.5 + 0.25 * torch.sin(2.1 * x + 1.3 * y + i) + 0.2 * x * y**2)
    return torch.stack(chans).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("fn", CROPS, ids=CROP_IDS)
@pytest.mark.parametrize("k", [10.0, 0.7])
def test_gradcheck_wrt_box(fn, k):
    gen = torch.Generator().manual_seed(11)  # no sample position within eps of a pixel centre (a kink)
    image = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    box = _random_boxes(2, gen).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: fn(image, b, 5, k), (box,), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fn", CROPS, ids=CROP_IDS)
@pytest.mark.parametrize("k", [10.0, 0.7])
def test_gradcheck_wrt_image(fn, k):
    gen = torch.Generator().manual_seed(2)
    image = torch.rand(2, 3, 8, 8, generator=gen, dtype=torch.float64).requires_grad_(True)
    box = _random_boxes(2, gen)
    assert torch.autograd.gradcheck(lambda im: fn(im, box, 5, k), (image,), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------- fast path == reference

_BORDER_BOXES = torch.tensor(
    [
        [0.3, 0.5, 0.3],  # touches the left edge
        [0.71, 0.4, 0.29],  # touches the right edge
        [0.5, 0.22, 0.22],  # touches the top edge
        [0.45, 0.73, 0.27],  # touches the bottom edge
        [0.5, 0.5, 0.5],  # the whole image
        [0.2, 0.8, 0.2],  # bottom-left corner
    ],
    dtype=torch.float64,
)


@pytest.mark.parametrize(
    ("shape", "out"),
    [
        ((6, 3, 8, 11), 3),  # output much smaller than the box in pixels
        ((6, 3, 8, 11), 17),  # larger
        ((6, 2, 13, 7), 5),
        ((6, 2, 13, 7), 24),
        ((6, 1, 16, 16), 9),
    ],
)
@pytest.mark.parametrize("k", [10.0, 1.5])
def test_crop_zoom_matches_reference(shape, out, k):
    gen = torch.Generator().manual_seed(sum(shape) * 31 + out)
    image = torch.rand(*shape, generator=gen, dtype=torch.float64)
    random_boxes = _random_boxes(shape[0], gen, 0.1, 1.0)
    for boxes in (random_boxes, _BORDER_BOXES):
        box_a = boxes.clone().requires_grad_(True)
        box_b = boxes.clone().requires_grad_(True)
        a = crop_zoom(image, box_a, out, k)
        b = crop_zoom_reference(image, box_b, out, k)
        assert a.shape == b.shape == (shape[0], shape[1], out, out)
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
        upstream = torch.randn(a.shape, generator=gen, dtype=torch.float64)
        (ga,) = torch.autograd.grad((a * upstream).sum(), box_a)
        (gb,) = torch.autograd.grad((b * upstream).sum(), box_b)
        assert ga.abs().sum() > 0
        torch.testing.assert_close(ga, gb, atol=1e-10, rtol=0)


def test_crop_zoom_image_gradient_matches_reference():
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(4, 3, 9, 12, generator=gen, dtype=torch.float64)
    boxes = _random_boxes(4, gen)
    grads = []
    for fn in CROPS:
        im = image.clone().requires_grad_(True)
        y = fn(im, boxes, 7, 10.0)
        upstream = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
        grads.append(torch.autograd.grad((y * upstream).sum(), im)[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=0)


# ----------------------------------------------------------------------------------------- semantics


def test_full_image_box_reproduces_the_image():
    gen = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, 12, 12, generator=gen, dtype=torch.float64)
    full = torch.tensor([[0.5, 0.5, 0.5]] * 2, dtype=torch.float64)
    # k = 10: the interior (>= 1.5 px from the edge) is exact, the edge pixels are damped by the soft mask
    crop = crop_zoom(image, full, 12, 10.0)
    torch.testing.assert_close(crop[..., 2:-2, 2:-2], image[..., 2:-2, 2:-2], atol=1e-9, rtol=0)
    assert (crop[..., 0, :] <= image[..., 0, :] + 1e-12).all()
    # a near-hard mask reproduces everything
    torch.testing.assert_close(crop_zoom(image, full, 12, 200.0), image, atol=1e-12, rtol=0)


def test_pixel_aligned_box_copies_the_window():
    """A box whose side is ``out`` pixels and whose edges lie on pixel edges is a plain slice: rows are y."""
    gen = torch.Generator().manual_seed(5)
    image = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    # x in [4, 12) px, y in [2, 10) px  ->  cx = 8/16, cy = 6/16, half = 4/16
    box = torch.tensor([[0.5, 0.375, 0.25]] * 2, dtype=torch.float64)
    crop = crop_zoom(image, box, 8, 200.0)
    torch.testing.assert_close(crop, image[:, :, 2:10, 4:12], atol=1e-12, rtol=0)
    # and it is not the transposed window
    assert not torch.allclose(crop, image[:, :, 4:12, 2:10], atol=1e-3)


def test_bright_rectangle_lands_where_expected_non_square_image():
    """Image 20 x 30 (H x W); bright rows 2..5, columns 20..27; box: x in [0.6, 1], y in [0, 0.4]."""
    image = torch.zeros(1, 1, 20, 30, dtype=torch.float64)
    image[..., 2:6, 20:28] = 1.0
    box = torch.tensor([[0.8, 0.2, 0.2]], dtype=torch.float64)  # x: px 18..30, y: px 0..8
    out = 24
    crop = crop_zoom(image, box, out, 10.0)[0, 0]
    bright = (crop > 0.5).nonzero()
    rows, cols = bright[:, 0], bright[:, 1]
    # box x [18, 30) px -> 24 output columns (2 per px): bright px 20..27 -> cols 4..19
    # box y [0, 8) px -> 24 output rows (3 per px): bright px 2..5 -> rows 6..17
    assert abs(int(cols.min()) - 4) <= 1 and abs(int(cols.max()) - 19) <= 1
    assert abs(int(rows.min()) - 6) <= 1 and abs(int(rows.max()) - 17) <= 1
    assert crop[12, 12] > 0.9 and crop[1, 12] < 0.1 and crop[21, 12] < 0.1 and crop[12, 1] < 0.1


def _blob(h: int, w: int, cy: float, cx: float, sigma: float = 2.5) -> torch.Tensor:
    y = torch.arange(h, dtype=torch.float64)[:, None] + 0.5
    x = torch.arange(w, dtype=torch.float64)[None, :] + 0.5
    return torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))[None, None]


@pytest.mark.parametrize("fn", CROPS, ids=CROP_IDS)
@pytest.mark.parametrize(
    ("where", "blob_yx", "axis", "sign"),
    [
        ("right", (16, 25), 0, -1),
        ("left", (16, 7), 0, +1),
        ("below", (25, 16), 1, -1),
        ("above", (7, 16), 1, +1),
    ],
)
def test_loss_gradient_moves_box_towards_content(fn, where, blob_yx, axis, sign):
    """loss = -mean(crop): gradient descent moves the box centre towards a bright blob, on the right axis."""
    image = _blob(32, 32, *blob_yx)
    box = torch.tensor([[0.5, 0.5, 0.25]], dtype=torch.float64, requires_grad=True)  # px 8..24
    loss = -fn(image, box, 13, 10.0).mean()  # 13: samples off the pixel centres (kinks)
    (g,) = torch.autograd.grad(loss, box)
    assert g[0, axis] * sign > 1e-4, (where, g)
    assert abs(g[0, 1 - axis]) < 0.05 * abs(g[0, axis]), (where, g)


def test_boxcar_mask_inside_and_outside():
    # H x W = 16 x 24; box x in [0.125, 0.375] -> px 3..9, y in [0.375, 0.625] -> px 6..10
    box = torch.tensor([[0.25, 0.5, 0.125]], dtype=torch.float64)
    m = boxcar_mask(box, 16, 24, 10.0)
    assert m.shape == (1, 1, 16, 24)
    inside = torch.zeros(16, 24, dtype=torch.bool)
    inside[6:10, 3:9] = True
    assert (m[0, 0][inside] > 0.98).all()
    assert (m[0, 0][~inside] < 0.01).all()
    assert math.isclose(float(m.sum()), 4 * 6, rel_tol=0.03)
    assert ((m >= 0) & (m <= 1)).all()


def test_compose_boxes_chained_crop_equals_direct_crop():
    image = _smooth_image(1, 2, 64, 64)
    outer = torch.tensor([[0.45, 0.55, 0.3]], dtype=torch.float64)
    inner = torch.tensor([[0.4, 0.6, 0.25]], dtype=torch.float64)
    chained = crop_zoom(crop_zoom(image, outer, 64, 10.0), inner, 16, 10.0)
    direct = crop_zoom(image, compose_boxes(outer, inner), 16, 10.0)
    # the inner crop stays away from the outer crop's soft edge; the rest is bilinear resampling error
    torch.testing.assert_close(chained[..., 1:-1, 1:-1], direct[..., 1:-1, 1:-1], atol=0.02, rtol=0)


# -------------------------------------------------------------------------------------------- boxes


def _check_boxes(box: torch.Tensor, min_side: float, max_side: float) -> None:
    xyxy = box_to_xyxy(box)
    tol = 1e-12
    assert (xyxy >= -tol).all() and (xyxy <= 1 + tol).all(), xyxy
    side = 2 * box[:, 2]
    assert (side >= min_side - tol).all() and (side <= max_side + tol).all(), side


@pytest.mark.parametrize(("min_side", "max_side"), [(0.25, 1.0), (0.3, 0.6), (0.5, 0.5)])
def test_box_from_unit_stays_inside_and_respects_side_bounds(min_side, max_side):
    gen = torch.Generator().manual_seed(6)
    extremes = torch.tensor([0.0, 1e-9, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-9, 1.0], dtype=torch.float64)
    grid = torch.cartesian_prod(extremes, extremes, extremes)
    z = torch.cat([grid, torch.rand(200, 3, generator=gen, dtype=torch.float64)])
    box = box_from_unit(z, min_side, max_side)
    assert box.shape == z.shape
    _check_boxes(box, min_side, max_side)
    # the extremes reach the bounds: side min at z_l=0, side max at z_l=1, box on the left edge at z_x=0
    torch.testing.assert_close(
        box_from_unit(torch.tensor([[0.0, 1.0, 0.0]]), min_side, max_side),
        torch.tensor([[min_side / 2, 1 - min_side / 2, min_side / 2]]),
    )
    torch.testing.assert_close(
        box_from_unit(torch.tensor([[1.0, 0.0, 1.0]]), min_side, max_side),
        torch.tensor([[1 - max_side / 2, max_side / 2, max_side / 2]]),
    )


@pytest.mark.parametrize("zval", [1e-4, 0.5, 1 - 1e-4])
def test_box_from_unit_gradient_does_not_die_at_the_bounds(zval):
    z = torch.full((1, 3), zval, dtype=torch.float64, requires_grad=True)
    jac = torch.autograd.functional.jacobian(lambda t: box_from_unit(t, 0.25, 0.9), z)[0, :, 0, :]  # 3 x 3
    assert jac[0, 0] > 0.05 and jac[1, 1] > 0.05 and jac[2, 2] > 0.05, jac
    # cx depends on x only (and the side), never on y
    assert jac[0, 1] == 0 and jac[1, 0] == 0


def test_compose_boxes_identity_and_hand_cases():
    gen = torch.Generator().manual_seed(7)
    inner = _random_boxes(5, gen)
    identity = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64).expand(5, 3)
    torch.testing.assert_close(compose_boxes(identity, inner), inner)
    # a full inner box gives the outer one
    outer = _random_boxes(5, gen)
    torch.testing.assert_close(compose_boxes(outer, identity), outer)
    # outer covers x in [0.1, 0.5], y in [0.4, 0.8]; inner (0.5, 0.25, 0.1) of that crop
    outer = torch.tensor([[0.3, 0.6, 0.2]], dtype=torch.float64)
    inner = torch.tensor([[0.5, 0.25, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(
        compose_boxes(outer, inner), torch.tensor([[0.3, 0.5, 0.04]], dtype=torch.float64)
    )
    outer = torch.tensor([[0.5, 0.5, 0.25]], dtype=torch.float64)
    inner = torch.tensor([[0.25, 0.75, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(
        compose_boxes(outer, inner), torch.tensor([[0.375, 0.625, 0.125]], dtype=torch.float64)
    )


def test_apn_output_is_inside_the_bounds():
    torch.manual_seed(0)
    apn = APN(8, grid=2, hidden=16, min_side=0.3, max_side=0.8)
    feats = torch.randn(32, 8, 5, 3)
    for scale in (1.0, 100.0):  # 100: saturated sigmoids
        box = apn(feats * scale)
        assert box.shape == (32, 3)
        _check_boxes(box.double(), 0.3, 0.8)
    # differentiable w.r.t. its parameters and the features
    feats.requires_grad_(True)
    apn(feats).sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in apn.parameters())


def _hot_cells(cells: list[tuple[int, int]], *, c: int = 6, h: int = 7, w: int = 7) -> torch.Tensor:
    """1 x c x h x w features, 1 on the given (row, col) cells of every channel, 0 elsewhere."""
    f = torch.zeros(1, c, h, w, dtype=torch.float64)
    for r, col in cells:
        f[..., r, col] = 1.0
    return f


@torch.no_grad()  # values only
def test_map_apn_reads_the_box_off_the_map():
    """MapAPN: the centre is the soft-argmax of the channel response, the side grows with its spread, and the
    same rule holds at every cell (translation equivariant)."""
    apn = MapAPN(6, min_side=0.25, max_side=1.0).double()
    with torch.no_grad():
        apn.log_beta.fill_(math.log(40.0))  # near a hard argmax
    box = apn(_hot_cells([(2, 4)]))
    half = float(box[0, 2])
    assert half < 2.5 / 7  # (so the centre needs no move inside the image)
    torch.testing.assert_close(
        box[0, :2], torch.tensor([4.5 / 7, 2.5 / 7], dtype=torch.float64), atol=1e-9, rtol=0
    )
    # one cell down and left: the centre moves by one cell, the side stays
    moved = apn(_hot_cells([(3, 3)]))
    torch.testing.assert_close(
        moved[0, :2] - box[0, :2], torch.tensor([-1 / 7, 1 / 7], dtype=torch.float64), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(moved[0, 2], box[0, 2], atol=1e-5, rtol=0)  # (softmax leaks e^-20 per cell)
    # a 3 x 3 object is framed by a larger box than one cell, centred on it (s1 = 1 > 0 at first)
    blob = apn(_hot_cells([(r, c) for r in (2, 3, 4) for c in (2, 3, 4)]))
    assert float(blob[0, 2]) > half
    torch.testing.assert_close(blob[0, :2], torch.tensor([0.5, 0.5], dtype=torch.float64), atol=1e-9, rtol=0)
    # the channel gains choose what it looks at: channel 0 hot at one cell, the others at another
    f = torch.zeros(1, 6, 7, 7, dtype=torch.float64)
    f[0, 0, 1, 1], f[0, 1:, 5, 5] = 10.0, 1.0
    with torch.no_grad():
        apn.gain.copy_(torch.tensor([0.0, 1, 1, 1, 1, 1]))
    box = apn(f)
    torch.testing.assert_close(
        box[0, :2], torch.tensor([5.5 / 7, 5.5 / 7], dtype=torch.float64).clamp(max=1 - float(box[0, 2]))
    )


@torch.no_grad()
def test_map_apn_reads_rows_and_columns_of_a_non_square_map_and_sizes_the_box_by_the_spread():
    apn = MapAPN(6, min_side=0.25, max_side=1.0).double()
    with torch.no_grad():
        apn.log_beta.fill_(math.log(40.0))
        apn.log_gamma.fill_(math.log(40.0))
    # 5 rows x 3 columns, hot at row 1, column 2: x = 2.5 / 3, y = 1.5 / 5 (before the move inside)
    box = apn(_hot_cells([(1, 2)], h=5, w=3))
    half = float(box[0, 2])
    want = torch.tensor([2.5 / 3, 1.5 / 5], dtype=torch.float64)
    torch.testing.assert_close(box[0, :2], torch.minimum(torch.clamp(want, min=half), 1 - torch.tensor(half)))
    assert float(box[0, 0]) > float(box[0, 1])  # right of centre and above it, not the transpose
    # a 3 x 3 block of 7 x 7: spread sqrt(2 * (2/3) / 49) = 0.1650; side = 0.25 + 0.75 sigmoid(s0 + s1 (10 spread - 2))
    blob = apn(_hot_cells([(r, c) for r in (2, 3, 4) for c in (2, 3, 4)]))
    spread = math.sqrt(2 * (2 / 3) / 49)
    want_side = 0.25 + 0.75 / (1 + math.exp(-(0.0 + 1.0 * (10 * spread - 2))))
    assert abs(2 * float(blob[0, 2]) - want_side) < 1e-6
    # a 1 x 1 map: nothing to choose, the centred box of a spread of 0
    one = apn(torch.rand(2, 6, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(one[:, :2], torch.full((2, 2), 0.5, dtype=torch.float64))
    assert torch.isfinite(one).all()


def test_map_apn_stays_float32_under_autocast():
    """Its rule is products and sums, which autocast leaves in float32: the box equals the float32 box
    computed from the same (bf16-rounded) features."""
    torch.manual_seed(0)
    apn = MapAPN(8)
    feats = torch.randn(4, 8, 7, 7).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        box = apn(feats)
    assert box.dtype == torch.float32
    torch.testing.assert_close(box, apn(feats.float()), atol=1e-6, rtol=0)


def test_map_apn_boxes_are_inside_and_differentiable():
    torch.manual_seed(0)
    apn = make_apn("map", 8, grid=2, hidden=16, min_side=0.3, max_side=0.8)
    feats = torch.randn(32, 8, 5, 3)
    apn64 = make_apn("map", 8, grid=2, hidden=16, min_side=0.3, max_side=0.8).double()
    with torch.no_grad():
        apn64.side.copy_(torch.tensor([4.0, 0.0]))  # sides near the upper bound: centres pushed inside
    _check_boxes(apn64(feats.double()), 0.3, 0.8)
    _check_boxes(apn64(torch.ones(2, 8, 5, 3).double()), 0.3, 0.8)  # a flat map: no NaN, a box inside
    feats.requires_grad_(True)
    apn(feats).sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in apn.parameters())
    assert sum(p.numel() for p in apn.parameters()) == 8 + 4
    assert isinstance(make_apn("fc", 8, grid=2, hidden=16, min_side=0.3, max_side=0.8), APN)
    with pytest.raises(ValueError, match="unknown APN kind 'conv'"):
        make_apn("conv", 8, grid=2, hidden=16, min_side=0.3, max_side=0.8)


# --------------------------------------------------------------------------------- batching and dtypes


def test_crop_zoom_batch_equals_per_sample():
    gen = torch.Generator().manual_seed(8)
    image = torch.rand(6, 3, 10, 14, generator=gen, dtype=torch.float64)
    boxes = _random_boxes(6, gen, 0.2, 1.0)
    batched = crop_zoom(image, boxes, 7, 10.0)
    single = torch.cat([crop_zoom(image[i : i + 1], boxes[i : i + 1], 7, 10.0) for i in range(6)])
    # a batch of 6 and 6 batches of 1 may run other CPU kernels: float64 rounding, far below 1e-12
    torch.testing.assert_close(batched, single, atol=1e-12, rtol=0)
    # each sample uses its own box: reversing the boxes changes the result
    assert not torch.allclose(crop_zoom(image, boxes.flip(0), 7, 10.0), batched)


def test_crop_zoom_dtypes():
    image64 = _smooth_image(2, 3, 16, 16)
    box64 = torch.tensor([[0.45, 0.55, 0.3], [0.6, 0.4, 0.25]], dtype=torch.float64)
    ref = crop_zoom(image64, box64, 12, 10.0)
    for dtype, atol in [(torch.float32, 1e-5), (torch.bfloat16, 0.1)]:
        y = crop_zoom(image64.to(dtype), box64.to(dtype), 12, 10.0)
        assert y.dtype == dtype
        assert torch.isfinite(y.float()).all()
        err = (y.double() - ref).abs()
        assert err.max() <= atol, (dtype, err.max())
        if dtype is torch.bfloat16:
            assert err.mean() < 0.02
    # bf16 image with a float32 box (autocast-like): output keeps the image dtype
    y = crop_zoom(image64.to(torch.bfloat16), box64.float(), 12, 10.0)
    assert y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() < 0.05


def test_nan_box_gives_nan_crop_not_a_crash() -> None:
    """A diverged APN (NaN box) must give NaN values the loss check reports, never out-of-range indices."""
    from racnn.attention import crop_zoom_gather

    img = torch.rand(2, 3, 16, 16)
    for fn in (crop_zoom, crop_zoom_gather):
        box = torch.tensor([[float("nan"), 0.5, 0.3], [0.5, 0.5, 0.3]], requires_grad=True)
        out = fn(img, box, 8)
        out.sum().backward()
        assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
        assert torch.isfinite(box.grad[1]).all()


# ------------------------------------------------------------------------------- soft box gradient


def _bumpy_image(h: int = 224) -> torch.Tensor:
    """Smooth random content (bicubic upsampling of 28 x 28 noise): structure at an 8-pixel scale."""
    gen = torch.Generator().manual_seed(0)
    small = torch.randn(1, 3, 28, 28, generator=gen, dtype=torch.float64)
    return torch.nn.functional.interpolate(small, size=(h, h), mode="bicubic", align_corners=False)


def _box_gradients(k_grad: float | None, shifts: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """The box gradient of a fixed linear read-out of the crop at ``shifts`` sub-pixel positions of the box
    (centre and size moved by up to one pixel), and the loss's slope over +-0.5 px there (central
    differences): n x 3 each."""
    image = _bumpy_image()
    h = image.shape[-1]
    gen = torch.Generator().manual_seed(1)
    readout = torch.nn.functional.interpolate(
        torch.randn(1, 3, 14, 14, generator=gen, dtype=torch.float64), size=(112, 112), mode="bicubic"
    )

    def loss(box: torch.Tensor, kg: float | None = None) -> torch.Tensor:
        return (soft_box_gradient(crop_zoom, image, box, 112, 10.0, kg) * readout).sum()

    grads, slopes = [], []
    for i in range(shifts):
        d = i * 0.05 / h
        box0 = torch.tensor([[0.5 + d, 0.47 + 0.7 * d, 0.3 + 0.3 * d]], dtype=torch.float64)
        box = box0.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(loss(box, k_grad), box)[0][0])
        step = torch.eye(3, dtype=torch.float64) * 0.5 / h
        slopes.append(torch.stack([(loss(box0 + e) - loss(box0 - e)) * h for e in step]))
    return torch.stack(grads), torch.stack(slopes)


def test_soft_box_gradient_keeps_the_values_and_the_image_gradient() -> None:
    image = _bumpy_image(64).requires_grad_(True)
    box = torch.tensor([[0.45, 0.55, 0.3]], dtype=torch.float64, requires_grad=True)
    hard = crop_zoom(image, box, 48, 10.0)
    soft = soft_box_gradient(crop_zoom, image, box, 48, 10.0, 1.0)
    torch.testing.assert_close(soft, hard, rtol=0, atol=1e-12)
    w = torch.randn(hard.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g_hard = torch.autograd.grad((hard * w).sum(), (image, box))
    g_soft = torch.autograd.grad((soft * w).sum(), (image, box))
    torch.testing.assert_close(g_soft[0], g_hard[0], rtol=0, atol=1e-12)  # the image's: unchanged
    # the box's: that of the crop with the soft mask
    g_ref = torch.autograd.grad((crop_zoom(image.detach(), box, 48, 1.0) * w).sum(), box)[0]
    torch.testing.assert_close(g_soft[1], g_ref, rtol=1e-10, atol=1e-10)
    # None (the default), or a box without gradient: the plain crop, one call
    assert soft_box_gradient(crop_zoom, image, box, 48, 10.0, None).grad_fn.name() == hard.grad_fn.name()


def test_soft_box_gradient_is_stable_under_sub_pixel_shifts() -> None:
    """With k = 10 the size gradient swings with sub-pixel shifts of the box (the edge term lives on the
    pixel an edge crosses), while the loss's own slope barely moves; a soft backward mask follows the slope."""
    hard, slope = _box_gradients(None)
    soft, _ = _box_gradients(1.0)
    spread = lambda g: g.std(0) / g.mean(0).abs()  # noqa: E731  per coordinate, over the shifts
    error = lambda g: (g - slope).norm(dim=0) / slope.norm(dim=0)  # noqa: E731
    assert spread(slope)[2] < 0.1  # the size slope is nearly constant over one pixel
    assert spread(hard)[2] > 0.25 and error(hard)[2] > 0.25  # k = 10: aliasing
    assert spread(soft)[2] < 0.1 and error(soft)[2] < 0.1  # soft: within 10% of the slope
    assert (error(soft) < 0.6 * error(hard)).all()  # and closer to it for the centre too
