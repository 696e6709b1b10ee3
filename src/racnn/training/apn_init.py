"""APN initialisation (paper Sec. 3.4, step 2): the box each APN is regressed towards before the
alternating schedule starts, and a probe of the APN's saturation afterwards."""

from __future__ import annotations

import torch

from ..attention import APN
from ..config import Config
from ..localization import aolm_boxes, class_activation, peak_response_boxes, region_response_boxes
from ..model import RACNN


@torch.no_grad()
def apn_init_target(
    model: RACNN, cfg: Config, s: int, fmap: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """The box (B x 3) the APN of scale ``s`` is initialised towards (Sec. 3.4), from that scale's last conv
    map ``fmap`` (B x C x h x w): its channel sum or the activation map of class ``target`` (B), then the
    ``peak`` square, the ``region`` box or the ``aolm`` box that ``apn.init_box`` names for this APN
    (:mod:`racnn.localization`)."""
    a, m, fmap = cfg.apn, cfg.model, fmap.detach().float()
    if a.init_response == "cam":
        fmap = class_activation(fmap, model.heads[s], target)
    kind = a.init_box[min(s, len(a.init_box) - 1)]
    if kind == "region":
        return region_response_boxes(fmap, a.init_threshold, m.box_min_side, m.box_max_side)
    if kind == "aolm":
        return aolm_boxes(fmap, m.box_min_side, m.box_max_side)
    return peak_response_boxes(fmap, a.init_side)


@torch.no_grad()  # a measurement: no graph through three backbones
def apn_saturation(model: RACNN, x: torch.Tensor) -> dict[str, float]:
    """Share of each APN's tanh units past |3| (gradient under 1 % of its peak) on the batch ``x``: near 1
    means the initialisation learning rate was too high and every image gets the same box."""
    pre: dict[int, torch.Tensor] = {}
    hooks = [
        apn.fc1.register_forward_hook(lambda _m, _i, o, s=s: pre.__setitem__(s, o))
        for s, apn in enumerate(model.apns)
        if isinstance(apn, APN)  # (a map APN has no tanh units)
    ]
    if not hooks:
        return {}
    try:
        model(x)  # float32: under autocast a frozen-weight fast path skips fc1's hook
    finally:
        for h in hooks:
            h.remove()
    return {f"apn_saturation_s{s + 1}": float((v.float().abs() > 3).float().mean()) for s, v in pre.items()}
