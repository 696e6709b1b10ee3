"""Boxes from a scale's last conv activations: where the object or its most telling part is, without labels
for boxes. The APN initialisation regresses towards them (paper Sec. 3.4) and the object prior
(``loss.prior_weight``) keeps the scale-1 box near them. Boxes are ``(cx, cy, half)`` squares,
normalised to the scale's input (:mod:`racnn.attention`).

- ``peak``: a square of fixed side on the strongest response (the paper's initialisation);
- ``region``: the square of the bounding box of the cells above a share of the response's range (CAM's
  localisation rule, Zhou et al. 2016);
- ``aolm``: the square of the bounding box of the largest connected region of cells above the map's mean
  (MMAL-Net's attention object location module, Zhang et al. 2021).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# the kinds of box (apn.init_box): peak_response_boxes, region_response_boxes, aolm_boxes
INIT_BOXES = ("peak", "region", "aolm")


def class_activation(fmap: torch.Tensor, head: nn.Linear, target: torch.Tensor) -> torch.Tensor:
    """Class activation map (Zhou et al. 2016) of the true class: B x C x h x w -> B x 1 x h x w."""
    w = head.weight[target].to(fmap.dtype)  # B x C
    return torch.einsum("bchw,bc->bhw", fmap, w)[:, None]


def _smoothed_response(fmap: torch.Tensor) -> torch.Tensor:
    """Channel sum of the last conv layer smoothed by a 3x3 binomial kernel (a single peak stays the
    maximum; borders renormalised). B x C x h x w -> B x 1 x h x w."""
    k1 = torch.tensor([1.0, 2.0, 1.0], device=fmap.device)
    kernel = (k1[:, None] * k1[None, :])[None, None]  # 1 x 1 x 3 x 3
    resp = torch.nn.functional.conv2d(fmap.float().sum(1, keepdim=True), kernel, padding=1)
    norm = torch.nn.functional.conv2d(torch.ones_like(resp[:1]), kernel, padding=1)  # border correction
    return resp / norm


def _square_inside(cx: torch.Tensor, cy: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """(cx, cy, half side) of a square of ``side`` moved inside the unit image. B, B, B -> B x 3."""
    half = side / 2
    return torch.stack([cx.clamp(half, 1 - half), cy.clamp(half, 1 - half), half], 1)


def peak_response_boxes(fmap: torch.Tensor, side: float) -> torch.Tensor:
    """APN initialisation target (Sec. 3.4 step 2): a square of ``side`` centred on the strongest response of
    the last conv layer, moved inside the image. B x C x h x w -> B x 3."""
    _, _, h, w = fmap.shape
    idx = _smoothed_response(fmap).flatten(1).argmax(1)  # B
    cy = ((idx // w).float() + 0.5) / h
    cx = ((idx % w).float() + 0.5) / w
    return _square_inside(cx, cy, torch.full_like(cx, side))


def region_response_boxes(
    fmap: torch.Tensor, threshold: float, min_side: float, max_side: float
) -> torch.Tensor:
    """APN initialisation target sized to the response: the bounding box of the cells whose response
    (smoothed as for :func:`peak_response_boxes`, so an isolated peak counts with its ring of neighbours) is
    at least ``threshold`` of the way from the image's minimum to its maximum (the CAM localisation rule of
    Zhou et al. 2016), turned into the square of the same centre and area (side sqrt(w h)), side clamped to
    the APN's range [min_side, max_side], moved inside the image. Where the paper's fixed-side square keeps
    every box the same size, this one follows the object's extent. B x C x h x w -> B x 3."""
    _, _, h, w = fmap.shape
    resp = _smoothed_response(fmap)[:, 0]  # B x h x w
    lo = resp.amin((1, 2), keepdim=True)
    hi = resp.amax((1, 2), keepdim=True)
    hot = resp >= lo + threshold * (hi - lo)  # B x h x w; the maximum is always in
    rows, cols = hot.any(2), hot.any(1)  # B x h, B x w
    ar_h = torch.arange(h, device=fmap.device)
    ar_w = torch.arange(w, device=fmap.device)
    # first and last hot row / column (a flat response makes every cell hot: the whole image)
    y0 = torch.where(rows, ar_h, h).amin(1).float() / h
    y1 = (torch.where(rows, ar_h, -1).amax(1).float() + 1) / h
    x0 = torch.where(cols, ar_w, w).amin(1).float() / w
    x1 = (torch.where(cols, ar_w, -1).amax(1).float() + 1) / w
    side = ((x1 - x0) * (y1 - y0)).sqrt().clamp(min_side, max_side)
    return _square_inside((x0 + x1) / 2, (y0 + y1) / 2, side)


def aolm_boxes(fmap: torch.Tensor, min_side: float, max_side: float) -> torch.Tensor:
    """MMAL-Net's object box: the channel sum ``A`` of the last conv layer, the cells with ``A`` above its
    mean, the largest 8-connected region of them, its bounding box, made the square of the same centre and
    area (side ``sqrt(w h)``, clamped to ``[min_side, max_side]``) and moved inside the image. Unlike
    :func:`region_response_boxes` a second blob (a branch, another bird) does not stretch the box.
    B x C x h x w -> B x 3."""
    from scipy import ndimage  # here: importing racnn (to predict or serve) does not import scipy

    _, _, h, w = fmap.shape
    resp = fmap.detach().float().sum(1)  # B x h x w
    hot = (resp > resp.mean((1, 2), keepdim=True)).cpu().numpy()
    eight = np.ones((3, 3), dtype=bool)
    rows = []
    for m in hot:  # B small grids (7 x 7 for a 224 px input)
        labels, n = ndimage.label(m, structure=eight)
        if n == 0:  # a flat map: the whole image
            rows.append((0.0, 0.0, 1.0, 1.0))
            continue
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
        ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))  # ties: the first region in scan order
        rows.append((xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h))
    x0, y0, x1, y1 = torch.tensor(rows, dtype=torch.float32, device=fmap.device).unbind(1)
    side = ((x1 - x0) * (y1 - y0)).sqrt().clamp(min_side, max_side)
    return _square_inside((x0 + x1) / 2, (y0 + y1) / 2, side)
