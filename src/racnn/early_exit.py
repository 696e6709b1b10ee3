"""Early exit: the scales run one after another, and an image stops as soon as the prediction so far (the
fusion of the scales run so far, ``model.fusion``) is confident enough.

RA-CNN pays three backbone passes per image; most images are already clear at scale 1 or after scales 1 and 2.
With ``exit_confidence=P``, an image whose top probability after scale s is at least P is answered there, and
only the others go on to scale s + 1. ``P`` is chosen on validation, never on test (``racnn eval --split val
--exit-sweep``, :func:`choose_exit_confidence`): the fewest scales whose answers are the full model's on all but
half a percent of the images.

A stage is one scale as a module of its own (:class:`ScaleStage`): its backbone and head, the fusion of the
scales so far, and, but for the last, its APN and the crop that is the next scale's input. The eager predictor
runs the stages of the PyTorch model; the onnxruntime one runs them as separate graphs
(:func:`racnn.onnx_export.export_stages`): a graph cannot send part of its batch on, so one graph per scale is
the only way an image that stops early skips the later scales' cost.

Stage signatures (B images; C the pooled channels, K the classes; scale s 0-based):

- stage 0: ``images`` (B x 3 x H x W) -> ``fused`` (B x K, = scale 1's logits), ``logits`` (B x 1 x K),
  ``pooled`` (B x 1 x C), ``box`` (B x 3, also the view of the next scale), ``next_input`` (B x 3 x S' x S');
- stage s > 0: ``images``, ``x`` (its input), ``view`` (the region ``x`` shows), ``logits`` (B x s x K) and
  ``pooled`` (B x s x C) of the earlier scales -> ``fused`` (the fusion of scales 1..s+1), ``logits``,
  ``pooled`` (B x (s+1) x ...), and, but for the last stage, ``box``, ``view``, ``next_input``. (In the stage
  graphs the inputs that share an output's name end in ``_in``.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attention import compose_boxes
from .fusion import fuse
from .model import RACNN, RACNNOutput

# the entry of racnn.inference.forward_probs's probabilities that says how many scales answered each image
EXIT_KEY = "scales_run"
# a stage's outputs by name, in this order (the last stage has the first three only; the first has no "view",
# which is its box: a graph cannot name one value twice)
STAGE_OUTPUTS = ("fused", "logits", "pooled", "box", "view", "next_input")
# the thresholds choose_exit_confidence tries, and the share of the full model's answers it may change (half a
# percent: the accuracy early exit may cost is at most that share)
EXIT_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
EXIT_MAX_DISAGREE = 0.005


def stage_outputs(s: int, num_scales: int) -> list[str]:
    """The output names of stage ``s`` (0-based) of a model of ``num_scales`` scales."""
    if s == num_scales - 1:
        return list(STAGE_OUTPUTS[:3])
    return [n for n in STAGE_OUTPUTS if s > 0 or n != "view"]


class ScaleStage(nn.Module):
    """Scale ``s`` (0-based) of ``model`` as a module of its own (signatures: the module's docstring)."""

    def __init__(self, model: RACNN, s: int) -> None:
        super().__init__()
        self.model, self.s = model, s
        self.last = s == model.cfg.num_scales - 1

    def forward(
        self,
        images: torch.Tensor,
        x: torch.Tensor | None = None,
        view: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        m, s = self.model, self.s
        if s == 0:  # the first scale reads the image alone
            x, view, logits, pooled = m.scale_input(images), None, None, None
        fmap = m.trunk(s, x)  # B x C x h x w
        p = fmap.mean(dim=(2, 3))  # B x C
        z = m.heads[s](m.dropout(p))  # B x K
        logits = z[:, None] if logits is None else torch.cat([logits, z[:, None]], dim=1)
        pooled = p[:, None] if pooled is None else torch.cat([pooled, p[:, None]], dim=1)
        fused = z if s == 0 else self._fused(logits, pooled)
        if self.last:
            return fused, logits, pooled
        box = m.apns[s](fmap)
        if view is None:  # the first scale: its box is the view of the next, relative to the image
            return fused, logits, pooled, box, m.zoom_in(s, images, x, box, box)
        view = compose_boxes(view, box)
        return fused, logits, pooled, box, view, m.zoom_in(s, images, x, box, view)

    def _fused(self, logits: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The model's fusion of the n = s + 1 scales run: ``logits`` B x n x K, ``pooled`` B x n x C."""
        m, n = self.model, self.s + 1
        concat = m.fusions[n - 2](m.dropout(pooled.flatten(1)))  # the concat head of n scales: B x K
        weights = m.fusion_weights[n - 2, :n]
        return fuse(m.cfg.fusion, list(logits.unbind(1)), concat=concat, weights=weights)


def model_stages(model: RACNN) -> list[Callable[..., tuple[torch.Tensor, ...]]]:
    """The stages of ``model``: an onnxruntime model's stage graphs, or eager ones (no gradient)."""
    if hasattr(model, "stages"):  # racnn.onnx_model.OnnxRACNN
        return model.stages()
    return [torch.no_grad()(ScaleStage(model, s)) for s in range(model.cfg.num_scales)]


def check_exit_confidence(p: float | None, tta: str | None = None) -> None:
    """``None`` (every scale) or a probability in [0, 1] (0: scale 1 answers every image; 1: only a certain
    prediction stops); not with test-time augmentation (ValueError)."""
    if p is None:
        return
    if not 0.0 <= p <= 1.0:  # (NaN fails too)
        raise ValueError(f"the exit confidence must be in [0, 1], got {p}")
    if tta is not None:
        raise ValueError("early exit and test-time augmentation do not combine: pass one of them")


@dataclass
class ExitOutput:
    """What the staged run gives a batch of B images: the outputs each image ran (NaN rows for those it did not
    run), the boxes and views it ran (NaN where not), and how many scales answered it (B, 1..N)."""

    out: RACNNOutput
    scales_run: torch.Tensor  # B, int64

    def answer_keys(self, keys: Sequence[str]) -> list[str]:
        """The output that answered each image: ``s1`` for 1 scale, ``s12`` for 2, ``s123`` for 3 ..."""
        return [answer_key(keys, int(n)) for n in self.scales_run]


def answer_key(keys: Sequence[str], ran: int) -> str:
    """The output that answers an image that ran ``ran`` scales: ``s1``, ``s12``, ``s123``, ... (``keys``: the
    model's output keys, scales first)."""
    return [keys[0], *[k for k in keys if len(k) > 2]][ran - 1]


def outputs_run(keys: Sequence[str], ran: int) -> list[str]:
    """The outputs an image that ran ``ran`` scales has: its scales' and the fusions of them."""
    return [k for k in keys if int(max(k[1:])) <= ran]


def staged_forward(
    stages: Sequence[Callable[..., tuple[torch.Tensor, ...]]],
    images: torch.Tensor,
    *,
    keys: Sequence[str],
    exit_confidence: float,
) -> ExitOutput:
    """Run ``stages`` (eager or onnxruntime, :func:`model_stages`) on ``images`` (B x 3 x H x W), each image as
    far as its fused prediction's top probability stays below ``exit_confidence`` (1: every scale).
    ``keys``: the model's output keys. Returns every output's logits (B x K; NaN rows where an image stopped
    before that output), boxes and views alike, and the scales each image ran."""
    b, n = images.shape[0], len(stages)
    scale_names, fusion_names = keys[:n], keys[n:]
    logits: dict[str, torch.Tensor] = {}
    boxes: list[torch.Tensor] = []
    views: list[torch.Tensor] = []
    scales_run = torch.ones(b, dtype=torch.long)
    rows = torch.arange(b)  # the images still running
    state: tuple[torch.Tensor, ...] = ()
    for s, stage in enumerate(stages):
        got = dict(zip(stage_outputs(s, n), stage(images[rows], *state), strict=True))
        fused, per_scale = got["fused"].float(), got["logits"].float()
        _fill(logits, scale_names[s], rows, per_scale[:, -1], b)
        if s > 0:
            _fill(logits, fusion_names[s - 1], rows, fused, b)
        scales_run[rows] = s + 1
        if s == n - 1:
            break
        box, nxt = got["box"].float(), got["next_input"]
        view = got.get("view", got["box"]).float()
        boxes.append(_scatter(rows, box, b))
        views.append(_scatter(rows, view, b))
        # a threshold of 1 is the full model: a float32 softmax reaches 1.0 exactly on confident logits
        go_on = (fused.softmax(1).amax(1) < exit_confidence).cpu() | (exit_confidence >= 1.0)
        if not bool(go_on.any()):
            break
        rows = rows[go_on]
        state = (nxt[go_on], view[go_on], got["logits"][go_on], got["pooled"][go_on])
    k = logits[scale_names[0]].shape[1]
    logits = {key: logits.get(key, torch.full((b, k), float("nan"))) for key in keys}  # every key, run or not
    return ExitOutput(RACNNOutput(logits, boxes, [], views=views), scales_run)


def _scatter(rows: torch.Tensor, values: torch.Tensor, b: int) -> torch.Tensor:
    """``values`` (len(rows) x ...) into a B x ... tensor of NaN at ``rows``."""
    out = torch.full((b, *values.shape[1:]), float("nan"), dtype=values.dtype)
    out[rows] = values.cpu()
    return out


def _fill(
    logits: dict[str, torch.Tensor], key: str, rows: torch.Tensor, values: torch.Tensor, b: int
) -> None:
    logits[key] = _scatter(rows, values, b)


def exit_decisions(
    stage_probs: Sequence[torch.Tensor], exit_confidence: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What early exit at ``exit_confidence`` answers, from one run of every scale: ``stage_probs[r - 1]`` (B x
    K) is the prediction after r scales (the probabilities of ``answer_key(keys, r)``: ``s1``, ``s12``,
    ``s123``, ... of a staged run at exit confidence 1). Returns the class answered (B) and the scales run (B):
    the decisions :func:`staged_forward` takes, for any threshold, without running the model again."""
    n = len(stage_probs)
    ran = torch.full(stage_probs[0].shape[:1], n, dtype=torch.long, device=stage_probs[0].device)
    if exit_confidence < 1.0:  # (1 is the full model, as in staged_forward)
        for r in range(n - 1, 0, -1):  # the earliest confident stage wins; NaN stops, as there
            ran = torch.where(~(stage_probs[r - 1].amax(1) < exit_confidence), r, ran)
    classes = torch.stack([p.argmax(1) for p in stage_probs], dim=1)  # B x n
    return classes.gather(1, (ran - 1)[:, None]).squeeze(1), ran


def choose_exit_confidence(
    stage_probs: Sequence[torch.Tensor],
    grid: Sequence[float] = EXIT_GRID,
    *,
    max_disagree: float = EXIT_MAX_DISAGREE,
    labels: torch.Tensor | None = None,
) -> tuple[float | None, list[dict[str, float]]]:
    """The threshold of ``grid`` that runs the fewest scales on average while its answers differ from the full
    model's on at most ``max_disagree`` of the images (``stage_probs``: :func:`exit_decisions`'s, of a held-out
    split; None when no threshold qualifies), and every threshold's ``disagree`` share and ``scales_mean``
    (and, given the ``labels``, the answers' ``top1``, which the choice does not read).

    The reference is the full model's decision, not the label: early exit is meant to answer as the full
    model would, agreement counts every image (a label-based rule sees only the images whose correctness
    changes, and ties on a small split), and no labels are needed. (0.5% of fewer than 200 images is less
    than one: there the rule asks that no answer change.) A 1-scale model has nothing to exit: ValueError."""
    if len(stage_probs) < 2:
        raise ValueError("early exit needs a model of at least 2 scales")
    full, _ = exit_decisions(stage_probs, 1.0)
    tried = []
    for p in grid:
        answers, ran = exit_decisions(stage_probs, p)
        row = {"exit_confidence": p, "disagree": float((answers != full).double().mean())}
        row["scales_mean"] = float(ran.double().mean())
        if labels is not None:
            row["top1"] = float((answers == labels).double().mean())
        tried.append(row)
    keep = [t for t in tried if t["disagree"] <= max_disagree + 1e-12]
    best = min(keep, key=lambda t: (t["scales_mean"], -t["exit_confidence"])) if keep else None
    return (best["exit_confidence"] if best else None), tried
