"""RA-CNN: N scales of (backbone, head, APN) wired by crop-and-zoom, plus fusion heads (paper Fig. 2).

The model only computes; losses live in :mod:`racnn.losses` and the training schedule in :mod:`racnn.training`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import compose_boxes, make_apn, soft_box_gradient
from .backbones import Backbone, Preprocessing, build_backbone
from .config import MAX_SCALES, Config, ModelConfig, validate_model
from .crop_cpp import crop_function
from .data.transforms import ImageTransform, eval_transform
from .fusion import FUSIONS, fuse


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers keep their running statistics (momentum 0, batch count restored) inside."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [
        (m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns
    ]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(bns, saved, strict=True):
            m.momentum = momentum
            if count is not None:
                m.num_batches_tracked.copy_(count)


def _recompute_contexts(
    module: nn.Module,
) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return contextlib.nullcontext(), _frozen_bn_stats(module)


def scale_keys(num_scales: int) -> list[str]:
    """The per-scale output names, ``s1 .. sN``."""
    if not 1 <= num_scales <= MAX_SCALES:
        raise ValueError(f"num_scales must be in 1..{MAX_SCALES}, got {num_scales}")
    return [f"s{i + 1}" for i in range(num_scales)]


def scale_sizes(cfg: ModelConfig) -> list[int]:
    """Input side of every scale: ``input_size``, then ``zoom_size`` (default ``input_size``) for the zoomed
    scales (paper Sec. 4.2: 448 px at scale 1, attended regions zoomed to 224 px)."""
    zoom = cfg.zoom_size or cfg.input_size
    return [cfg.input_size] + [zoom] * (cfg.num_scales - 1)


def fusion_keys(num_scales: int) -> list[str]:
    """The fused output names: ``s12`` (scales 1 and 2), ``s123``, ... up to all ``num_scales`` scales."""
    digits = "".join(k[1:] for k in scale_keys(num_scales))
    return [f"s{digits[:n]}" for n in range(2, num_scales + 1)]


@dataclass
class RACNNFeatures:
    pooled: list[torch.Tensor]  # per scale, B x C (global average pool of the last conv layer)
    boxes: list[torch.Tensor]  # per scale but the last, B x 3 (cx, cy, half) relative to that scale's input
    crops: list[torch.Tensor]  # inputs of scales 2..N, B x 3 x S x S
    maps: list[torch.Tensor] = field(default_factory=list)  # last conv maps (only when return_maps=True)
    # per scale 2..N, B x 3: the region that scale sees, relative to the model's input image (boxes[0], then
    # boxes[1] composed into it, ...)
    views: list[torch.Tensor] = field(default_factory=list)


@dataclass
class RACNNOutput:
    logits: dict[str, torch.Tensor]  # "s1".."sN", then "s12", "s123" by model.fusion: B x K
    boxes: list[torch.Tensor]
    crops: list[torch.Tensor]
    maps: list[torch.Tensor] = field(default_factory=list)
    views: list[torch.Tensor] = field(default_factory=list)  # as RACNNFeatures.views
    # the paper's concat fusion heads, "s12", "s123": B x K (trained by the fusion cross-entropy whatever
    # model.fusion is; the same tensors as logits' fused keys when model.fusion is "concat")
    concat: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def trained_logits(self) -> dict[str, torch.Tensor]:
        """What the classification loss trains: the per-scale logits and the concat fusion heads."""
        return self.logits | self.concat


class RACNN(nn.Module):
    """RA-CNN. ``forward_features`` runs the scales (trunks, APNs, crops), ``forward_head`` the classifiers
    and the fusion; ``forward`` both. Besides its weights a model carries what using it needs: ``classes``
    (names, when known), ``image_size`` and :meth:`transforms` (the preprocessing of an image), and the
    runtime switches ``compile_crop`` and ``checkpoint_activations`` (off unless a trainer turns them on)."""

    backend = "torch"  # what runs it (racnn.onnx_model.OnnxRACNN: "onnxruntime")

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        num_classes: int,
        backbones: list[Backbone],
        classes: list[str] | None = None,
        image_size: int | None = None,
    ):
        super().__init__()
        if len(backbones) != cfg.num_scales:
            raise ValueError(f"need {cfg.num_scales} backbones, got {len(backbones)}")
        if classes is not None and len(classes) != num_classes:
            raise ValueError(f"{len(classes)} class names for {num_classes} classes")
        self.cfg = cfg
        # the output contract every consumer reads (losses, evaluation, predict, serve, ONNX): the names of
        # RACNNOutput.logits, the scales' first, then the fusions' (docs/api.md)
        self.scale_keys = scale_keys(cfg.num_scales)
        self.fusion_keys = fusion_keys(cfg.num_scales)
        self.keys = self.scale_keys + self.fusion_keys
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else None
        # side of the image given to forward (resized to input_size when it differs; crop_from="source"
        # crops the zoomed scales from it)
        self.image_size = image_size or cfg.input_size
        self.compile_crop = False  # the crop as compiled code (runtime.compile_crop)
        self.checkpoint_activations = False  # recompute backbone activations in backward (runtime)
        self.training_config: Config | None = None  # the run's config, for a model loaded from a checkpoint
        self.backbones = nn.ModuleList(backbones)
        c = backbones[0].channels
        self.heads = nn.ModuleList(nn.Linear(b.channels, num_classes) for b in backbones)
        self.apns = nn.ModuleList(
            make_apn(
                cfg.apn_kind,
                b.channels,
                grid=cfg.apn_grid,
                hidden=cfg.apn_hidden,
                min_side=cfg.box_min_side,
                max_side=cfg.box_max_side,
            )
            for b in backbones[:-1]
        )
        # fusion over the first n scales, n = 2..N (paper Table 2: "scale 1+2", "scale 1+2+3")
        self.fusions = nn.ModuleList(nn.Linear(c * n, num_classes) for n in range(2, cfg.num_scales + 1))
        if cfg.num_scales > 1:
            # the "weighted" fusion's per-scale weights: row n - 2 holds those of the first n scales (fitted on
            # validation predictions by the Trainer; until then 1/n, i.e. the mean of the log-probabilities)
            self.register_buffer("fusion_weights", _uniform_fusion_weights(cfg.num_scales))
            self.register_load_state_dict_pre_hook(_default_fusion_weights)
        self.dropout = nn.Dropout(cfg.dropout)

    @property
    def preprocessing(self) -> Preprocessing:
        """Normalisation the data pipeline must apply (published by the backbone, read by data code)."""
        return self.backbones[0].preprocessing

    def transforms(self) -> ImageTransform:
        """The evaluation preprocessing of one PIL image: RGB, squash-resized to ``image_size``, normalised as
        the backbone expects. Returns 3 x S x S (the counterpart of torchvision's ``weights.transforms()``)."""
        prep = self.preprocessing
        return eval_transform(self.image_size, mean=prep.mean, std=prep.std)

    @property
    def input_size(self) -> int:
        """Side of scale 1's input (the loader's image is resized to it when it differs)."""
        return self.cfg.input_size

    @property
    def scale_sizes(self) -> list[int]:
        """Input side of every scale (:func:`scale_sizes`)."""
        return scale_sizes(self.cfg)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` / ``head`` (per-scale and fusion FCs) / ``apn``: the parts the phases train or freeze."""
        return {
            "backbone": list(self.backbones.parameters()),
            "head": list(self.heads.parameters()) + list(self.fusions.parameters()),
            "apn": list(self.apns.parameters()),
        }

    def scale_input(self, images: torch.Tensor) -> torch.Tensor:
        """Scale 1's input: ``images`` (B x 3 x H x W) resized to ``input_size`` when they differ."""
        size = self.cfg.input_size
        if images.shape[-2:] == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)

    def trunk(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """Scale ``s``'s conv trunk (0-based): B x 3 x S x S -> its last conv map B x C x h x w, recomputed in
        backward segment by segment when ``checkpoint_activations`` is on."""
        feats = self.backbones[s].features
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            # recompute activations in backward, segment by segment; the recomputation must not update
            # BatchNorm running statistics a second time
            n = len(feats)
            bounds = [round(i * n / 4) for i in range(5)] if n >= 4 else list(range(n + 1))
            for a, b in itertools.pairwise(bounds):
                seg = feats[a:b]
                x = checkpoint(seg, x, use_reentrant=False, context_fn=partial(_recompute_contexts, seg))
            return x
        return feats(x)

    def forward_features(
        self,
        images: torch.Tensor,
        *,
        detach_boxes: bool = False,
        detach_crops: bool = False,
        return_maps: bool = False,
    ) -> RACNNFeatures:
        """Run the scales. ``images``: B x 3 x H x W, normalised; resized to the scale-1 input when H != S.

        ``detach_boxes`` cuts the gradient from the crops into the APNs (classification phase: APNs fixed).
        ``detach_crops`` cuts only the crops' path: the returned boxes keep their gradient but nothing of
        scale s+1 depends on APN s through autograd (APN initialisation: each APN learns its own target).
        """
        x = self.scale_input(images)
        view = None  # the region of `images` that the current scale sees (None: all of it)
        zoom = crop_function(self.compile_crop, images)
        crop = partial(soft_box_gradient, zoom, k=self.cfg.mask_k, k_grad=self.cfg.mask_k_backward)
        pooled, boxes, crops, maps, views = [], [], [], [], []
        for s in range(self.cfg.num_scales):
            fmap = self.trunk(s, x)  # B x C x h x w
            pooled.append(fmap.mean(dim=(2, 3)))  # B x C
            if return_maps:
                maps.append(fmap)
            if s == self.cfg.num_scales - 1:
                break
            if detach_boxes:
                with torch.no_grad():
                    box = self.apns[s](fmap.detach())  # B x 3, fixed attention
            else:
                box = self.apns[s](fmap)
            boxes.append(box)
            if detach_crops:
                box = box.detach()
            view = box if view is None else compose_boxes(view, box)
            views.append(view)
            x = self.zoom_in(s, images, x, box, view, crop=crop)
            crops.append(x)
        return RACNNFeatures(pooled, boxes, crops, maps, views)

    def zoom_in(
        self,
        s: int,
        images: torch.Tensor,
        x: torch.Tensor,
        box: torch.Tensor,
        view: torch.Tensor,
        *,
        crop: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Scale ``s + 1``'s input (B x 3 x S' x S'): ``crop_from="source"`` cuts the region ``view`` (B x 3,
        relative to ``images``) from the real pixels of ``images``; ``"previous"`` (the paper) zooms ``box``
        (B x 3, relative to scale ``s``'s input ``x``) out of ``x``."""
        if crop is None:
            zoom = crop_function(self.compile_crop, images)
            crop = partial(soft_box_gradient, zoom, k=self.cfg.mask_k, k_grad=self.cfg.mask_k_backward)
        size = self.scale_sizes[s + 1]
        return crop(images, view, size) if self.cfg.crop_from == "source" else crop(x, box, size)

    def _heads(self, feats: RACNNFeatures) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per-scale logits ``s1..sN`` and the concat heads' ``s12, s123, ...``, B x K each."""
        pooled = [self.dropout(p) for p in feats.pooled]
        logits = {k: head(p) for k, head, p in zip(self.scale_keys, self.heads, pooled, strict=True)}
        concat = {
            key: fusion(torch.cat(pooled[:n], dim=1))
            for n, (key, fusion) in enumerate(zip(self.fusion_keys, self.fusions, strict=True), start=2)
        }
        return logits, concat

    def _fused(self, kind: str, logits: dict[str, torch.Tensor], concat: dict[str, torch.Tensor]):
        """``{"s12": ..., "s123": ...}`` by the fusion ``kind`` (:mod:`racnn.fusion`)."""
        scales = [logits[k] for k in self.scale_keys]
        return {
            key: fuse(kind, scales[:n], concat=concat[key], weights=self.fusion_weights[n - 2, :n])
            for n, key in enumerate(self.fusion_keys, start=2)
        }

    def forward_scale(self, s: int, x: torch.Tensor) -> torch.Tensor:
        """Scale ``s`` (0-based) alone on its input ``x`` (B x 3 x S x S): trunk, pooling, head -> B x K."""
        return self.heads[s](self.dropout(self.trunk(s, x).mean(dim=(2, 3))))

    def forward_head(self, feats: RACNNFeatures) -> RACNNOutput:
        """The classifiers and the fusion on ``feats``: the per-scale logits, the fused ones of ``model.fusion``
        (B x K each) and the concat heads, with ``feats``' boxes, crops, maps and views."""
        logits, concat = self._heads(feats)
        logits |= self._fused(self.cfg.fusion, logits, concat)
        return RACNNOutput(logits, feats.boxes, feats.crops, feats.maps, feats.views, concat)

    def fusion_variants(self, out: RACNNOutput) -> dict[str, torch.Tensor]:
        """Every fusion kind of ``out``'s fused outputs, side by side: ``{"s123_concat": ..,
        "s123_mean_prob": .., ...}`` (B x K each), for evaluations that compare them."""
        return {
            f"{key}_{kind}": value
            for kind in FUSIONS
            for key, value in self._fused(kind, out.logits, out.concat).items()
        }

    def forward(
        self,
        images: torch.Tensor,
        *,
        detach_boxes: bool = False,
        detach_crops: bool = False,
        return_maps: bool = False,
    ) -> RACNNOutput:
        return self.forward_head(
            self.forward_features(
                images, detach_boxes=detach_boxes, detach_crops=detach_crops, return_maps=return_maps
            )
        )


def _uniform_fusion_weights(num_scales: int) -> torch.Tensor:
    """(N - 1) x N: row n - 2 holds 1/n for the first n scales, 0 after."""
    w = torch.zeros(num_scales - 1, num_scales)
    for n in range(2, num_scales + 1):
        w[n - 2, :n] = 1.0 / n
    return w


def _default_fusion_weights(module: nn.Module, state: dict, prefix: str, *_: object) -> None:
    """State dicts written before the ``weighted`` fusion existed load with its uniform weights."""
    key = prefix + "fusion_weights"
    if key not in state and any(k.startswith(prefix + "fusions.") for k in state):
        state[key] = _uniform_fusion_weights(module.cfg.num_scales)


def build_model(
    cfg: ModelConfig,
    *,
    num_classes: int,
    pretrained: bool | None = None,
    classes: list[str] | None = None,
    image_size: int | None = None,
) -> RACNN:
    """Build RA-CNN from its config: N copies of the backbone (separate parameters, same initialisation).

    ``pretrained`` overrides ``cfg.pretrained`` (``False`` when weights come from a checkpoint next).
    """
    use_pretrained = cfg.pretrained if pretrained is None else pretrained
    first = build_backbone(
        cfg.backbone, pretrained=use_pretrained, weights_file=cfg.weights_file if use_pretrained else None
    )
    backbones = [first] + [copy.deepcopy(first) for _ in range(cfg.num_scales - 1)]
    return RACNN(cfg, num_classes=num_classes, backbones=backbones, classes=classes, image_size=image_size)


def create_model(
    backbone: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    classes: list[str] | None = None,
    image_size: int | None = None,
    **model_options: Any,
) -> RACNN:
    """An RA-CNN on ``backbone`` (``racnn.backbones.list_backbones()``) for ``num_classes`` classes, the
    counterpart of timm's ``create_model``. ``pretrained``: ImageNet weights for every scale, read from the
    torch hub cache (``TORCH_HOME``), never downloaded. ``model_options``: any other key of
    :class:`racnn.config.ModelConfig` (``num_scales=3``, ``input_size=224``, ``fusion="concat"``, ...);
    ``classes``: the class names the model carries; ``image_size``: the side of the images it is given
    (default ``input_size``)."""
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"backbone", "pretrained"}
    unknown = sorted(set(model_options) - known)
    if unknown:
        raise TypeError(
            f"create_model: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    cfg = ModelConfig(backbone=backbone, pretrained=pretrained, **model_options)
    validate_model(cfg)
    return build_model(cfg, num_classes=num_classes, classes=classes, image_size=image_size)
