"""Attention: the APN box proposal and the differentiable crop-and-zoom (paper Sec. 3.2, Eqs. 2-6).

Coordinates. A box is ``(cx, cy, half)``: centre and half side of a square, all *normalised* to the image it
refers to (0 = left/top edge, 1 = right/bottom edge, so the box side is ``2 * half`` of the image side). The
boxcar mask's steepness ``k`` (paper: 10) applies to coordinates in *pixels of the image being cropped*: with
k = 10 the mask goes from 0.12 to 0.88 within 0.4 px of an edge, i.e. it is the near-hard crop of the paper.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def box_from_unit(z: torch.Tensor, min_side: float, max_side: float) -> torch.Tensor:
    """Map APN outputs ``z`` in (0, 1)^3 to a box that respects the side bounds and lies inside the image.

    ``half = (min_side + (max_side - min_side) z_l) / 2`` and ``c = half + (1 - 2 half) z_c``: a smooth
    re-parametrisation instead of clamping, so the gradient never dies at a bound.  B x 3 -> B x 3.
    """
    half = 0.5 * (min_side + (max_side - min_side) * z[:, 2])
    cx = half + (1.0 - 2.0 * half) * z[:, 0]
    cy = half + (1.0 - 2.0 * half) * z[:, 1]
    return torch.stack([cx, cy, half], dim=1)


def box_to_xyxy(box: torch.Tensor) -> torch.Tensor:
    """``(cx, cy, half)`` -> ``(x0, y0, x1, y1)``; ... x 3 -> ... x 4."""
    cx, cy, h = box.unbind(-1)
    return torch.stack([cx - h, cy - h, cx + h, cy + h], dim=-1)


def compose_boxes(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """A box ``inner`` given relative to the crop ``outer`` -> the same box relative to the outer image."""
    x0 = outer[:, 0] - outer[:, 2]
    y0 = outer[:, 1] - outer[:, 2]
    side = 2.0 * outer[:, 2]
    return torch.stack([x0 + side * inner[:, 0], y0 + side * inner[:, 1], side * inner[:, 2]], dim=1)


def box_candidates(
    box: torch.Tensor, *, shift: float, zoom: float, min_side: float, max_side: float
) -> torch.Tensor:
    """The boxes one step around each box: itself (index 0), its centre moved by ``shift`` times its side left,
    right, up and down (1-4), and its side times ``zoom`` and divided by it (5, 6), each kept inside the
    image and within ``[min_side, max_side]`` as the APN's boxes are. B x 3 -> B x 7 x 3.

    A step of the APN's search update (``apn.update=search``): the finer scale judges these boxes, and the
    APN moves towards the one it ranks best."""
    cx, cy, half = box.unbind(1)
    step = shift * 2 * half
    zero = torch.zeros_like(cx)
    dx = torch.stack([zero, -step, step, zero, zero, zero, zero], 1)  # B x 7
    dy = torch.stack([zero, zero, zero, -step, step, zero, zero], 1)
    gain = box.new_tensor([1.0, 1.0, 1.0, 1.0, 1.0, zoom, 1.0 / zoom])  # 7
    h = (half[:, None] * gain).clamp(min_side / 2, max_side / 2)  # B x 7
    x = torch.minimum(torch.maximum(cx[:, None] + dx, h), 1 - h)
    y = torch.minimum(torch.maximum(cy[:, None] + dy, h), 1 - h)
    out = torch.stack([x, y, h], 2)
    out[:, 0] = box  # the box itself, unchanged even where it lies a rounding error past a bound
    return out


def _pool_weights(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """``n_out x n_in``, of ``like``'s dtype and device: row ``i`` averages the cells ``floor(i n_in / n_out)`` to
    ``ceil((i + 1) n_in / n_out)`` (exclusive), the windows of ``nn.AdaptiveAvgPool1d``. Made on ``device``
    from index comparisons: no host data to copy on each forward, and an export folds it into a constant."""
    i = torch.arange(n_out, device=like.device)
    start, end = (i * n_in) // n_out, ((i + 1) * n_in + n_out - 1) // n_out  # n_out each
    cells = torch.arange(n_in, device=like.device)
    inside = (cells >= start[:, None]) & (cells < end[:, None])  # n_out x n_in
    return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)


def adaptive_pool(feats: torch.Tensor, grid: int) -> torch.Tensor:
    """``nn.AdaptiveAvgPool2d(grid)`` as one matrix product: B x C x h x w -> B x C x (grid * grid), row-major
    cells. The same values (under autocast, rounded to its precision like the FC that reads them); an
    exported graph runs it as one ``MatMul``, where the pooling op becomes about 14 ``Where`` and 5 ``Split``
    nodes per APN (1 ms of onnxruntime time, docs/performance.md)."""
    h, w = feats.shape[-2:]
    weights = torch.kron(_pool_weights(h, grid, feats), _pool_weights(w, grid, feats))  # grid^2 x h*w
    return feats.flatten(2) @ weights.T  # (B x C x h*w) @ (h*w x grid^2)


class APN(nn.Module):
    """Attention proposal network: two FC layers on a scale's last conv features (released model: FC 1024, tanh,
    FC 3, sigmoid). The features are average-pooled to ``grid x grid`` first so one APN fits any input size."""

    def __init__(
        self,
        in_channels: int,
        *,
        grid: int = 7,
        hidden: int = 1024,
        min_side: float = 0.25,
        max_side: float = 1.0,
    ):
        super().__init__()
        self.grid, self.min_side, self.max_side = grid, min_side, max_side
        self.fc1 = nn.Linear(in_channels * grid * grid, hidden)
        self.fc2 = nn.Linear(hidden, 3)
        self._fc1_cast: tuple[tuple[object, ...], torch.Tensor, torch.Tensor] | None = None

    def _hidden(self, z: torch.Tensor) -> torch.Tensor:
        """``fc1``, the APN's bulk (``C * grid^2 x hidden``: 64M weights on MobileNetV2). Autocast re-casts
        the weight on every call, which on CPU costs more than the matmul; while the weight is frozen
        (inference, classification phase) its low-precision copy is kept instead, keyed on the weight's
        version, device and the autocast dtype. Same result as autocast's own cast."""
        w, b, dev = self.fc1.weight, self.fc1.bias, z.device.type
        if (
            not torch.is_autocast_enabled(dev)
            or (w.requires_grad and torch.is_grad_enabled())
            or torch.compiler.is_compiling()
        ):
            self._fc1_cast = None
            return self.fc1(z)
        dtype = torch.get_autocast_dtype(dev)
        key = (dtype, w.device, w.data_ptr(), w._version, b.data_ptr(), b._version)
        if self._fc1_cast is None or self._fc1_cast[0] != key:
            self._fc1_cast = None  # free the stale copy first
            with torch.inference_mode(False), torch.no_grad():
                self._fc1_cast = (key, w.to(dtype), b.to(dtype))
        return F.linear(z.to(dtype), self._fc1_cast[1], self._fc1_cast[2])

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """B x C x h x w -> B x 3 box ``(cx, cy, half)`` normalised to the scale's input."""
        if feats.shape[-2:] != (self.grid, self.grid):  # already grid x grid: the pool is the identity
            feats = adaptive_pool(feats, self.grid)
        z = feats.flatten(1)  # B x C*g*g
        z = torch.sigmoid(self.fc2(torch.tanh(self._hidden(z))))  # B x 3 in (0, 1)
        return box_from_unit(z, self.min_side, self.max_side)


class MapAPN(nn.Module):
    """An APN that reads its box off the scale's map by a rule with ``C + 4`` parameters
    (``model.apn_kind=map``; the FC APN has ``C * grid^2 * hidden``).

    Why: the boxes the ranking loss prefers are mostly the image's own, and what an FC on pooled features
    learns from them does not carry over to the next image (docs/results.md, ``benchmarks/box_transfer.py``).
    This rule is the same at every cell, so what it learns (which channels mark where to look, how sharply,
    how wide a box) applies to every image. At ``gain = 1`` its response is the channel mean, whose peak and
    above-mean region are what the initialisation boxes (``peak``, ``aolm``) are read from.

    * response ``a = sum_c gain_c f_c / C`` (B x h x w), standardised over each image's cells;
    * centre: the soft-argmax ``sum softmax(beta a) * cell centre``;
    * side: ``min + (max - min) sigmoid(s0 + s1 (10 spread - 2))``, ``spread`` the root mean square distance
      of the cells from their centre under ``softmax(gamma a)``: a box that follows the response's extent;
    * the square moved inside the image, as the initialisation boxes are.

    Its parameters are of order 1, where the FC APN's are many and small: it needs rates about a thousand
    times the FC APN's (``apn.init_lr`` 0.02, ``apn.lr`` 0.002 in docs/results.md), at whose defaults
    (1e-5) it would hardly move.
    """

    def __init__(self, in_channels: int, *, min_side: float = 0.25, max_side: float = 1.0):
        super().__init__()
        self.min_side, self.max_side = min_side, max_side
        self.gain = nn.Parameter(torch.ones(in_channels))  # C, relative to the channel mean
        self.log_beta = nn.Parameter(torch.tensor(math.log(3.0)))  # soft-argmax sharpness
        self.log_gamma = nn.Parameter(torch.tensor(math.log(3.0)))  # the extent's sharpness
        self.side = nn.Parameter(torch.tensor([0.0, 1.0]))  # s0, s1

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """B x C x h x w -> B x 3 box ``(cx, cy, half)`` normalised to the scale's input.

        Products and sums, no matmul: autocast leaves them in float32 (a bf16 variance of cell positions
        would be rounding noise) and the int8 export quantizes no part of the rule (it quantizes MatMuls)."""
        f = feats.to(self.gain.dtype)
        h, w = f.shape[-2:]
        a = (f * (self.gain / f.shape[1])[:, None, None]).sum(1).flatten(1)  # B x hw, the gained channel mean
        if a.shape[1] > 1:  # standardised over the cells (one cell: nothing to choose, the box is centred)
            a = (a - a.mean(1, keepdim=True)) / (a.std(1, keepdim=True) + 1e-6)
        cells = torch.arange(h * w, device=f.device)  # hw, row-major as a's: x varies fastest
        ys, xs = ((cells // w).to(f.dtype) + 0.5) / h, ((cells % w).to(f.dtype) + 0.5) / w  # cell centres
        p = torch.softmax(self.log_beta.exp() * a, dim=1)  # B x hw, where to look
        cx, cy = (p * xs).sum(1), (p * ys).sum(1)  # B each
        q = torch.softmax(self.log_gamma.exp() * a, dim=1)  # B x hw, how far the response reaches
        mx, my = (q * xs).sum(1, keepdim=True), (q * ys).sum(1, keepdim=True)  # B x 1 each
        var = (q * ((xs - mx).square() + (ys - my).square())).sum(1)  # B
        spread = (var + 1e-8).sqrt()  # (a finite gradient where the response is one cell)
        # spread: 0 for one cell, 0.165 for a 3 x 3 block of 7 x 7, 0.40 for all of them
        z = torch.sigmoid(self.side[0] + self.side[1] * (10.0 * spread - 2.0))
        half = 0.5 * (self.min_side + (self.max_side - self.min_side) * z)
        # moved inside the image as the initialisation boxes are (a centre held at an edge has no gradient)
        cx = torch.minimum(torch.maximum(cx, half), 1 - half)
        cy = torch.minimum(torch.maximum(cy, half), 1 - half)
        return torch.stack([cx, cy, half], dim=1)


APN_KINDS = ("fc", "map")


def make_apn(
    kind: str, in_channels: int, *, grid: int, hidden: int, min_side: float, max_side: float
) -> nn.Module:
    """The APN ``model.apn_kind`` names: ``fc`` (the paper's, :class:`APN`) or ``map`` (:class:`MapAPN`, which
    reads neither ``grid`` nor ``hidden``)."""
    if kind == "map":
        return MapAPN(in_channels, min_side=min_side, max_side=max_side)
    if kind == "fc":
        return APN(in_channels, grid=grid, hidden=hidden, min_side=min_side, max_side=max_side)
    raise ValueError(f"unknown APN kind {kind!r} (known: {', '.join(APN_KINDS)})")


def _logistic(x: torch.Tensor, k: float) -> torch.Tensor:
    return torch.sigmoid(k * x)  # h(x) = 1 / (1 + exp(-k x)), Eq. 5


def boxcar_1d(pos: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, k: float) -> torch.Tensor:
    """One factor of Eq. 4, ``h(x - t_tl) - h(x - t_br)``, all in pixels; pos ... x n, lo/hi ... x 1."""
    return _logistic(pos - lo, k) - _logistic(pos - hi, k)


def _edges_px(box: torch.Tensor, h: int, w: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The box's edges in pixels of an ``h x w`` image: ``((x0, x1), (y0, y1))``, B x 1 each."""
    x0, x1 = (box[:, 0] - box[:, 2])[:, None] * w, (box[:, 0] + box[:, 2])[:, None] * w
    y0, y1 = (box[:, 1] - box[:, 2])[:, None] * h, (box[:, 1] + box[:, 2])[:, None] * h
    return (x0, x1), (y0, y1)


def _sample_positions(box: torch.Tensor, out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised centres of the ``out`` output pixels along x and y inside each box: B x out each."""
    u = (torch.arange(out, device=box.device, dtype=box.dtype) + 0.5) / out  # out
    x0 = (box[:, 0] - box[:, 2])[:, None]
    y0 = (box[:, 1] - box[:, 2])[:, None]
    side = 2.0 * box[:, 2:3]
    return x0 + side * u, y0 + side * u


def _axis_taps(
    pos: torch.Tensor, size: int, lo: torch.Tensor, hi: torch.Tensor, k: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps along one axis, each weight multiplied by the boxcar at its pixel centre.

    ``pos``: B x out normalised sample positions; ``lo``/``hi``: B x 1 box edges in pixels.
    Returns the two neighbour indices (B x out, long) and their weights (B x out). Border padding and
    ``align_corners=False`` as in ``F.grid_sample``.
    """
    # B x out, continuous pixel index; a NaN box (diverged training) must not become a garbage index
    ix = torch.nan_to_num(pos * size - 0.5).clamp(0, size - 1)
    i0 = ix.detach().floor().clamp(0, size - 1)
    i1 = (i0 + 1).clamp(max=size - 1)
    frac = ix - i0  # differentiable in pos
    w0 = (1 - frac) * boxcar_1d(i0 + 0.5, lo, hi, k)
    w1 = frac * boxcar_1d(i1 + 0.5, lo, hi, k)
    return i0.long(), i1.long(), w0, w1


def box_taps(
    box: torch.Tensor, h: int, w: int, out: int, k: float
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The crop of ``box`` from an ``h x w`` image as separable masked taps: rows ``(r0, r1, wr0, wr1)`` and
    columns ``(c0, c1, wc0, wc1)``, B x out each (:func:`_axis_taps`), so that
    ``crop[b, :, y, x] = sum_ij wr_i[b, y] wc_j[b, x] image[b, :, r_i[b, y], c_j[b, x]]`` (Eqs. 3-6)."""
    xs, ys = _sample_positions(box, out)  # B x out each, normalised
    (x0, x1), (y0, y1) = _edges_px(box, h, w)
    return _axis_taps(ys, h, y0, y1, k), _axis_taps(xs, w, x0, x1, k)


def _folded_axis(
    pos: torch.Tensor, size: int, lo: torch.Tensor, hi: torch.Tensor, k: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The masked taps of :func:`_axis_taps` as one plain bilinear sample and a gain, per output position.

    ``w0 a + w1 b == alpha * ((1 - f) a + f b)`` with ``alpha = w0 + w1`` and ``f = w1 / alpha``, so the
    masked two-tap sum is an ordinary linear interpolation at ``i0 + f`` times ``alpha``. Returns the
    ``grid_sample`` coordinate of that position (``align_corners=False``) and ``alpha``, B x out each.
    """
    i0, _, w0, w1 = _axis_taps(pos, size, lo, hi, k)
    alpha = w0 + w1  # > 0: at least one tap lies inside the soft box
    frac = w1 / alpha.clamp_min(torch.finfo(alpha.dtype).tiny)  # in [0, 1]; 0 when both weights vanish
    # a NaN box gives a NaN gain (the loss shows it) but never a NaN grid: grid_sample must not see one
    return torch.nan_to_num((2 * (i0.to(frac.dtype) + frac) + 1) / size - 1), alpha


def crop_zoom(image: torch.Tensor, box: torch.Tensor, out: int, k: float = 10.0) -> torch.Tensor:
    """Attend and zoom (Eqs. 3-6), batched: B x C x H x W image, B x 3 box -> B x C x out x out.

    Exactly :func:`crop_zoom_reference` (mask the full image with the boxcar ``M``, then zoom the box
    bilinearly) without materialising ``X * M``, in one ``grid_sample`` call over the batch: ``M`` is
    separable, and along each axis the two mask-weighted taps of an output pixel equal one unmasked linear
    interpolation at a shifted position times a gain (:func:`_folded_axis`). So the crop is a bilinear
    sample of the *raw* image on a B x out x out grid, times the outer product of the two gains; no
    full-resolution tensor is made. Gradients reach ``box`` through the grid and the gains, and ``image``
    through ``grid_sample``, as with the reference. Box arithmetic runs in at least float32 (a bf16 box
    under autocast would place samples a pixel off at 448); a bf16/fp16 image is sampled in float32 and the
    result cast back. The output keeps the image's memory format (channels_last in, channels_last out).
    """
    b, _, h, w = image.shape
    box = box.to(torch.promote_types(box.dtype, torch.float32))
    xs, ys = _sample_positions(box, out)  # B x out each, normalised
    (x0, x1), (y0, y1) = _edges_px(box, h, w)
    gy, ay = _folded_axis(ys, h, y0, y1, k)  # B x out
    gx, ax = _folded_axis(xs, w, x0, x1, k)  # B x out
    dtype = torch.promote_types(image.dtype, torch.float32)
    grid = torch.stack([gx[:, None, :].expand(b, out, out), gy[:, :, None].expand(b, out, out)], dim=-1)
    sampled = F.grid_sample(
        image.to(dtype), grid.to(dtype), mode="bilinear", padding_mode="border", align_corners=False
    )  # B x C x out x out
    gain = (ay[:, :, None] * ax[:, None, :]).to(dtype)[:, None]  # B x 1 x out x out
    crop = sampled * gain if torch.is_grad_enabled() else sampled.mul_(gain)
    if image.is_contiguous(memory_format=torch.channels_last) and not image.is_contiguous():
        crop = crop.contiguous(memory_format=torch.channels_last)
    return crop.to(image.dtype)


@functools.cache
def _compiled_crop_zoom() -> Callable[..., torch.Tensor]:  # built on first use: importing dynamo is not free
    return torch.compile(crop_zoom)


def crop_zoom_compiled(image: torch.Tensor, box: torch.Tensor, out: int, k: float = 10.0) -> torch.Tensor:
    """:func:`crop_zoom` through ``torch.compile`` (``runtime.compile_crop``, used on CUDA): same values and
    gradients.

    Eager, the crop is about 140 small kernels forward and 180 backward (box arithmetic on B x out tensors
    around one ``grid_sample``); on a GPU that is bound by kernel launches, not by the 2.4 M output pixels
    of a 16 x 448 -> 224 crop. Compiled, the elementwise work fuses into a few kernels. On a CPU it is
    slower than eager (docs/performance.md). The batch axis is compiled as dynamic from the first call, and
    the box is promoted to float32 first, so a last partial batch, evaluation batches and autocast do not
    each compile a new graph. Each image side and gradient mode compiles once (seconds).
    """
    compiled = _compiled_crop_zoom()  # (imports torch._dynamo)
    box = box.to(torch.promote_types(box.dtype, torch.float32))  # as crop_zoom does; one graph for all dtypes
    if image.shape[0] > 1:  # size-1 axes are specialised by dynamo; marking one would be an error
        torch._dynamo.maybe_mark_dynamic(image, 0)
        torch._dynamo.maybe_mark_dynamic(box, 0)
    return compiled(image, box, out, k)


def soft_box_gradient(
    crop: Callable[..., torch.Tensor],
    image: torch.Tensor,
    box: torch.Tensor,
    out: int,
    k: float,
    k_grad: float | None,
) -> torch.Tensor:
    """``crop(image, box, out, k)`` whose *box* gradient is that of the same crop with a softer mask
    ``k_grad`` (``model.mask_k_backward``; ``None``: plain autograd). The values and the image's gradient
    stay those of ``k``.

    Why: with k = 10 the mask falls from 0.88 to 0.12 within 0.4 px, so the box gradient's edge term comes
    from the one or two pixels an edge crosses (through the mask's slope and through the bilinear taps that
    straddle it) and swings with sub-pixel shifts of the box: in a probe the size gradient's spread over
    shifts of a twentieth of a pixel was 0.37 of its mean where the loss's own slope varied by 0.02. A soft
    mask spreads the edge term over the pixels near each edge, so the box moves by what the loss does there
    (the paper's Eqs. 9-10), as the released code's soft backward (k = 0.05) did."""
    if k_grad is None or k_grad == k or not (box.requires_grad and torch.is_grad_enabled()):
        return crop(image, box, out, k)
    hard = crop(image, box.detach(), out, k)  # values; the image's gradient
    soft = crop(image.detach(), box, out, k_grad)  # the box's gradient
    return hard + (soft - soft.detach())


def crop_zoom_gather(image: torch.Tensor, box: torch.Tensor, out: int, k: float = 10.0) -> torch.Tensor:
    """The previous batched formulation of :func:`crop_zoom`: the masked taps as two ``gather`` passes (rows,
    then columns). Same values and gradients, 2-4 times slower in PyTorch on a CPU; the ONNX export traces it
    (:func:`racnn.crop_cpp.crop_function`), as onnxruntime runs its gathers faster than ``GridSample``.

    Each bilinear tap's weight is multiplied by the 1-D mask at that tap's pixel (``M`` is separable).
    """
    b, c, h, w = image.shape
    (r0, r1, wr0, wr1), (c0, c1, wc0, wc1) = box_taps(box, h, w, out, k)  # B x out each
    wr0, wr1, wc0, wc1 = (t.to(image.dtype) for t in (wr0, wr1, wc0, wc1))
    # rows: B x C x out x W
    rows = (
        image.gather(2, r0[:, None, :, None].expand(b, c, out, w)) * wr0[:, None, :, None]
        + image.gather(2, r1[:, None, :, None].expand(b, c, out, w)) * wr1[:, None, :, None]
    )
    # columns: B x C x out x out
    return (
        rows.gather(3, c0[:, None, None, :].expand(b, c, out, out)) * wc0[:, None, None, :]
        + rows.gather(3, c1[:, None, None, :].expand(b, c, out, out)) * wc1[:, None, None, :]
    )


def boxcar_mask(box: torch.Tensor, height: int, width: int, k: float = 10.0) -> torch.Tensor:
    """The full-resolution attention mask ``M`` of Eq. 4 at pixel centres: B x 3 -> B x 1 x H x W."""
    px = torch.arange(width, device=box.device, dtype=box.dtype) + 0.5  # W
    py = torch.arange(height, device=box.device, dtype=box.dtype) + 0.5  # H
    (x0, x1), (y0, y1) = _edges_px(box, height, width)
    mx = boxcar_1d(px[None], x0, x1, k)  # B x W
    my = boxcar_1d(py[None], y0, y1, k)  # B x H
    return (my[:, :, None] * mx[:, None, :])[:, None]


def crop_zoom_reference(image: torch.Tensor, box: torch.Tensor, out: int, k: float = 10.0) -> torch.Tensor:
    """The paper's formulation taken literally: ``X_att = X * M`` on the full image (Eq. 3), then each sample's
    box is cut out and bilinearly zoomed (Eq. 6) one at a time. Slow; the ground truth for tests and benchmarks."""
    _, _, h, w = image.shape
    attended = image * boxcar_mask(box, h, w, k).to(image.dtype)  # B x C x H x W
    crops = []
    for i in range(image.shape[0]):  # per-sample on purpose: this is the straightforward reference
        xs, ys = _sample_positions(box[i : i + 1], out)
        grid = torch.stack(
            [(2 * xs - 1)[:, None, :].expand(1, out, out), (2 * ys - 1)[:, :, None].expand(1, out, out)],
            dim=-1,
        )
        crops.append(
            F.grid_sample(
                attended[i : i + 1],
                grid.to(image.dtype),
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            )
        )
    return torch.cat(crops)
