"""Evaluation as the paper reports it (Table 2: scale 1, 2, 3, 1+2, 1+2+3) plus attention localisation, of
a loader (:func:`evaluate`) or of a run's split, over every process of a distributed run
(:func:`evaluate_split`).

Boxes are compared in the normalised coordinates of the evaluated (squash-resized, uncropped) image; IoU is
invariant to the per-axis scaling that maps them back to the original pixels.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .attention import box_to_xyxy
from .config import Config
from .early_exit import ExitOutput, answer_key, check_exit_confidence, model_stages, staged_forward
from .fusion import fit_model_weights
from .model import RACNN, fusion_keys, scale_keys
from .runtime import autocast, place_batch

if TYPE_CHECKING:
    from .training.distributed import DistEnv

# the rows after the outputs' accuracies (those come from the model's keys: :func:`output_rows`)
TABLE_ROWS = [
    ("mean_per_class_acc", "mean per-class accuracy (fused)"),
    ("loc_iou_mean", "scale-1 box IoU (mean)"),
    ("loc_acc_iou50", "scale-1 box IoU >= 0.5"),
    ("loc_centre_hit", "scale-1 box holds the object centre"),
    ("head_hit_s2", "scale-2 box holds the head"),
    ("view_in_object_s2", "scale-2 view >= half on the object"),
    ("view_in_object_s3", "scale-3 view >= half on the object"),
    ("box_side_s1", "box side, scale 1"),
    ("box_side_s2", "box side, scale 2"),
]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two xyxy box sets, N x 4 each -> N."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(1)  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-12)


def share_inside(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Share of each box of ``a`` whose area lies inside the matching box of ``b``: N x 4 xyxy each -> N."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    return inter / (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1).clamp(min=1e-12)


def head_hits(
    box_xyxy: torch.Tensor, parts: torch.Tensor, head: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether every visible head part lies in the box. B x 4, B x P x 3 -> (hit B bool, has_head B bool)."""
    p = parts[:, head]  # B x H x 3
    vis = p[..., 2] > 0
    inside = (
        (p[..., 0] >= box_xyxy[:, None, 0])
        & (p[..., 0] <= box_xyxy[:, None, 2])
        & (p[..., 1] >= box_xyxy[:, None, 1])
        & (p[..., 1] <= box_xyxy[:, None, 3])
    )
    return (inside | ~vis).all(1) & vis.any(1), vis.any(1)


TOP5 = 5  # the second figure every fine-grained table reports besides top-1
TTA_KINDS = ("flip",)  # test-time augmentations of accumulate() and racnn.predict


class Accumulator:
    """Sums over batches of a model of ``num_scales`` scales; ``summary()`` turns them into the metrics dict.
    ``keep_scores``: also keep every scale's log-probabilities and the labels (:meth:`scores`), for fusion
    weights fitted on this split."""

    def __init__(self, num_scales: int, *, keep_scores: bool = False) -> None:
        self.num_scales = num_scales
        self.scale_keys = scale_keys(num_scales)
        self.output_keys = self.scale_keys + fusion_keys(num_scales)  # the model's (not the s123_<kind> ones)
        # the confusion matrix's output: the fusion of every scale (the one scale of a 1-scale model)
        self.fused_key = self.output_keys[-1]
        self.correct: dict[str, int] = defaultdict(int)
        self.correct5: dict[str, int] = defaultdict(int)  # the label among the 5 highest scores
        self.confusion: torch.Tensor | None = None  # true class x predicted class counts of fused_key
        self.pt: dict[str, float] = defaultdict(float)  # summed softmax probability of the true class
        self.n = 0
        self.ious: list[torch.Tensor] = []
        self.centre_hits: list[torch.Tensor] = []
        self.sides: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.in_object: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.head_hit = 0
        self.head_n = 0
        self.keep_scores = keep_scores
        self.logprobs: list[torch.Tensor] = []  # per batch, N x B x K (keep_scores)
        self.targets: list[torch.Tensor] = []  # per batch, B (keep_scores)
        self.scales_run: list[torch.Tensor] = []  # per batch, B: the scales each image ran (early exit)

    def update(
        self,
        logits: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        views: list[torch.Tensor],
        batch: dict[str, Any],
        head_parts: list[int] | None = None,
    ) -> None:
        """Count one batch: ``logits`` by output key, the APN ``boxes`` (each relative to its scale's input,
        for their sides) and the ``views`` of scales 2..N relative to the image (``RACNNOutput.views``)."""
        target = batch["label"].to(next(iter(logits.values())).device)
        self.n += target.numel()
        for k, v in logits.items():
            self.correct[k] += int((v.argmax(1) == target).sum())
            top = v.topk(min(TOP5, v.shape[1]), dim=1).indices
            self.correct5[k] += int((top == target[:, None]).any(1).sum())
            if k in self.output_keys:  # the ranking loss's p_t
                self.pt[k] += float(v.float().softmax(1).gather(1, target[:, None]).sum())
        self._confuse(logits[self.fused_key], target)
        if self.keep_scores:
            scales = [logits[k] for k in self.scale_keys]
            self.logprobs.append(torch.stack([z.float().log_softmax(1).cpu() for z in scales]))
            self.targets.append(target.cpu())
        for s, box in enumerate(boxes):  # (early exit: NaN where an image stopped before the box)
            side = (2 * box[:, 2]).float().cpu()
            self.sides[s + 1].append(side[~side.isnan()])
        if not boxes:
            return
        views = [v.float().cpu() for v in views]
        has_box = (
            batch["has_box"].bool().cpu()
            if "has_box" in batch
            else torch.zeros(len(target), dtype=torch.bool)
        )
        has_box &= ~views[0].isnan().any(1)
        if has_box.any():
            att, gt = box_to_xyxy(views[0][has_box]), batch["box"][has_box].float()
            self.ious.append(box_iou(att, gt))
            centre = (gt[:, :2] + gt[:, 2:]) / 2  # the object's centre lies in the attention box
            self.centre_hits.append(((centre >= att[:, :2]) & (centre <= att[:, 2:])).all(1))
            for s, view in enumerate(views, start=2):  # the region scale s sees, at least half on the object
                ran = ~view[has_box].isnan().any(1)  # (early exit: the images that ran scale s)
                self.in_object[s].append(share_inside(box_to_xyxy(view[has_box][ran]), gt[ran]) >= 0.5)
        if head_parts and len(views) > 1 and "parts" in batch and batch["parts"].shape[1] > 0:
            hit, has = head_hits(box_to_xyxy(views[1]), batch["parts"].float(), head_parts)
            has &= ~views[1].isnan().any(1)
            self.head_hit += int((hit & has).sum())
            self.head_n += int(has.sum())

    def count_exits(self, scales_run: torch.Tensor) -> None:
        """Early exit: how many scales each image of the batch ran (B)."""
        self.scales_run.append(scales_run.cpu())

    def _confuse(self, scores: torch.Tensor, target: torch.Tensor) -> None:
        """Add the batch's ``scores`` (B x K, the fused output) to the confusion matrix."""
        k = scores.shape[1]
        pairs = target.long() * k + scores.argmax(1)
        counts = torch.bincount(pairs, minlength=k * k).reshape(k, k).cpu()
        self.confusion = counts if self.confusion is None else self.confusion + counts

    def per_class_acc(self) -> torch.Tensor:
        """Top-1 accuracy of the fused output per true class (K; NaN for a class without images)."""
        if self.confusion is None:
            return torch.zeros(0)
        seen = self.confusion.sum(1).double()
        return torch.where(seen > 0, self.confusion.diag().double() / seen.clamp(min=1), math.nan)

    def class_report(self, classes: list[str], pairs: int = 50) -> dict[str, Any]:
        """What an error analysis needs, by class name: ``per_class_acc`` (fused output; None for a class
        without images), ``mean_per_class_acc`` and ``most_confused``: up to ``pairs`` (true class, predicted
        class, count) of the off-diagonal confusion counts, the largest first. No image counted: every
        class None, the mean NaN, no pair."""
        acc = self.per_class_acc()
        if self.confusion is None:  # no image counted: no class has an accuracy
            acc = torch.full((len(classes),), math.nan, dtype=torch.float64)
        if len(classes) != len(acc):
            raise ValueError(f"{len(classes)} class names for a confusion matrix of {len(acc)} classes")
        per_class = {c: (None if math.isnan(a) else a) for c, a in zip(classes, acc.tolist(), strict=True)}
        return {
            "per_class_acc": per_class,
            "mean_per_class_acc": _nanmean(acc),
            "most_confused": [[classes[t], classes[p], n] for t, p, n in self.most_confused(pairs)],
        }

    def most_confused(self, pairs: int) -> list[tuple[int, int, int]]:
        """The ``pairs`` largest off-diagonal confusion counts as (true index, predicted index, count); ties
        in class order."""
        if self.confusion is None:
            return []
        off = self.confusion.clone()
        off.fill_diagonal_(0)
        counts, order = off.flatten().sort(descending=True, stable=True)  # stable: ties in class order
        k = off.shape[1]
        top = zip(counts[:pairs].tolist(), order[:pairs].tolist(), strict=True)
        return [(i // k, i % k, n) for n, i in top if n > 0]

    @classmethod
    def merged(cls, parts: list[Accumulator]) -> Accumulator:
        """One accumulator holding the counts of ``parts`` (evaluation shards, at least one), in their order."""
        out = cls(parts[0].num_scales, keep_scores=any(p.keep_scores for p in parts))
        for p in parts:
            for k, c in p.correct.items():
                out.correct[k] += c
            for k, c in p.pt.items():
                out.pt[k] += c
            for k, c in p.correct5.items():
                out.correct5[k] += c
            if p.confusion is not None:
                out.confusion = p.confusion if out.confusion is None else out.confusion + p.confusion
            out.n += p.n
            out.ious += p.ious
            out.centre_hits += p.centre_hits
            for s, sides in p.sides.items():
                out.sides[s] += sides
            for s, hits in p.in_object.items():
                out.in_object[s] += hits
            out.head_hit += p.head_hit
            out.head_n += p.head_n
            out.logprobs += p.logprobs
            out.targets += p.targets
        return out

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every scale's log-probabilities (N x M x K) and the labels (M) of the images seen so far."""
        if not self.logprobs:
            return torch.zeros(0, 0, 0), torch.zeros(0, dtype=torch.long)
        return torch.cat(self.logprobs, 1), torch.cat(self.targets)

    def summary(self) -> dict[str, float]:
        n = max(self.n, 1)
        out = {("acc_" + k): c / n for k, c in self.correct.items()}
        out |= {("pt_" + k): c / n for k, c in self.pt.items()}
        out |= {("top5_" + k): c / n for k, c in self.correct5.items()}
        out["mean_per_class_acc"] = _nanmean(self.per_class_acc())
        if self.ious:
            iou = torch.cat(self.ious)
            out["loc_iou_mean"] = float(iou.mean())
            out["loc_acc_iou50"] = float((iou >= 0.5).float().mean())
            out["loc_centre_hit"] = float(torch.cat(self.centre_hits).float().mean())
        else:
            out["loc_iou_mean"] = out["loc_acc_iou50"] = out["loc_centre_hit"] = math.nan
        out["head_hit_s2"] = self.head_hit / self.head_n if self.head_n else math.nan
        for s, hits in self.in_object.items():
            out[f"view_in_object_s{s}"] = float(torch.cat(hits).float().mean())
        for s, sides in self.sides.items():
            side = torch.cat(sides)
            out[f"box_side_s{s}"] = float(side.mean())
            out[f"box_side_std_s{s}"] = float(side.std()) if side.numel() > 1 else 0.0
        if self.scales_run:  # early exit: the mean scales run, and the share each answer took
            ran = torch.cat(self.scales_run)
            out["exit_scales_mean"] = float(ran.float().mean())
            answers = [self.scale_keys[0], *self.output_keys[self.num_scales :]]  # s1, s12, s123
            for n, key in enumerate(answers, start=1):
                out[f"exit_share_{key}"] = float((ran == n).float().mean())
        out["num_images"] = self.n
        return out


@torch.no_grad()
def accumulate(
    model: RACNN,
    loader: Iterable[dict[str, Any]],
    *,
    device: torch.device | str = "cpu",
    amp: bool = False,
    channels_last: bool = False,
    head_parts: list[int] | None = None,
    desc: str = "eval",
    progress: bool = True,
    keep_scores: bool = False,
    tta: str | None = None,
    exit_confidence: float | None = None,
) -> Accumulator:
    """Run ``model`` (in eval mode, restored after) over ``loader`` and sum the evaluation counts: every
    output, every fusion kind (``acc_s123_<kind>``), the boxes. ``tta="flip"``: every output's scores are
    the mean probabilities of the image and its mirror image (:func:`flip_tta_logits`); the boxes are the
    original image's. ``exit_confidence``: early exit (:func:`exit_logits`)."""
    check_tta(tta)
    check_exit_confidence(exit_confidence, tta)
    device = torch.device(device)
    was_training = model.training
    model.eval()
    acc = Accumulator(model.cfg.num_scales, keep_scores=keep_scores)
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        images = place_batch(batch["image"], device, channels_last=channels_last)  # B x 3 x S x S
        if exit_confidence is not None:
            ran = staged_forward(
                model_stages(model), images, keys=model.keys, exit_confidence=exit_confidence
            )
            acc.update(exit_logits(ran, model.keys), ran.out.boxes, ran.out.views, batch, head_parts)
            acc.count_exits(ran.scales_run)
            continue
        with autocast(device, amp):
            out = model(images)
            mirrored = model(images.flip(3)) if tta == "flip" else None
        logits = {k: v.float() for k, v in (out.logits | model.fusion_variants(out)).items()}
        if mirrored is not None:
            logits = flip_tta_logits(logits, mirrored.logits | model.fusion_variants(mirrored))
        acc.update(logits, out.boxes, out.views, batch, head_parts)
    model.train(was_training)
    return acc


def exit_logits(ran: ExitOutput, keys: list[str]) -> dict[str, torch.Tensor]:
    """Early exit's prediction as an evaluation counts it: under the last fusion's key (``s123``), each image's
    answer (the fusion of the scales it ran). The other outputs are left out: not every image ran them."""
    rows = torch.stack([ran.out.logits[key][i] for i, key in enumerate(ran.answer_keys(keys))])
    return {keys[-1]: rows}


def check_tta(tta: str | None) -> None:
    """A known test-time augmentation or None (ValueError naming the known ones)."""
    if tta is not None and tta not in TTA_KINDS:
        raise ValueError(f"unknown test-time augmentation {tta!r} (known: {', '.join(TTA_KINDS)})")


def flip_tta_logits(
    logits: dict[str, torch.Tensor], mirrored: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Flip TTA: each output's log of the mean of the two views' probabilities (each view ran the whole
    model, its own boxes included). A log-probability is a logit: argmax, top-k and softmax read it alike."""
    return {
        k: torch.logaddexp(v.float().log_softmax(1), mirrored[k].float().log_softmax(1)) - math.log(2)
        for k, v in logits.items()
    }


def _nanmean(values: torch.Tensor) -> float:
    """Mean of the finite entries (NaN when there are none)."""
    finite = values[~values.isnan()]
    return float(finite.mean()) if finite.numel() else math.nan


def evaluate(model: RACNN, loader: Iterable[dict[str, Any]], **kwargs: Any) -> dict[str, float]:
    """Top-1 accuracy of every scale and fusion (the model's, and every kind as ``acc_s123_<kind>``), scale-1
    box IoU with the object box, scale-2 head hits, the share of images whose scale-s view lies at least
    half on the object, and box side mean/std per scale (fractions of that scale's input side). Keywords
    as :func:`accumulate` (whose counts the trainer and `racnn eval` read: this is its one-call form)."""
    return accumulate(model, loader, **kwargs).summary()


def evaluate_split(
    model: RACNN,
    dataset: Any,
    cfg: Config,
    env: DistEnv,
    *,
    device: torch.device,
    desc: str,
    progress: bool,
    channels_last: bool = False,
    fit_fusion: bool = False,
) -> dict[str, float]:
    """:func:`evaluate` on ``dataset`` through the run's loader (``cfg``'s ``data`` and ``runtime.amp``); in a
    run of N processes (``env``) each rank evaluates a shard (no collectives inside the model: it runs in eval
    mode, where synchronised BatchNorm uses its running statistics) and the accumulators are merged, so every
    rank returns the figures of one process. ``fit_fusion``: fit the model's ``weighted`` fusion on these
    predictions (:func:`racnn.fusion.fit_model_weights`; every rank fits the same merged scores alike). With
    ``data.skip_bad_images`` the unreadable images are counted in ``bad_images``."""
    from .training import distributed, loaders  # (racnn.training imports this module)

    loader = loaders.make_loader(dataset, cfg, world_size=env.world_size, rank=env.rank)
    acc = accumulate(
        model,
        loader,
        device=device,
        amp=cfg.runtime.amp,
        channels_last=channels_last,
        head_parts=getattr(dataset, "head_parts", None),
        desc=desc,
        progress=progress,
        keep_scores=fit_fusion,
    )
    acc = distributed.gather_accumulator(acc, env)
    metrics = acc.summary()
    if fit_fusion:
        metrics |= fit_model_weights(model, *acc.scores())
    if cfg.data.skip_bad_images:
        metrics["bad_images"] = int(distributed.all_reduce_sum(torch.tensor(loader.bad_images), env))
    return distributed.broadcast_object(metrics, env)


def output_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """``(acc_<key>, label)`` of every output of the model ``metrics`` come from, in the model's order (its
    :func:`~racnn.model.scale_keys` and :func:`~racnn.model.fusion_keys`; the number of scales is that of the
    highest scale a key names: early exit reports the fusion of every scale alone): ``scale 1``, ...,
    ``scale 1+2``, ``scale 1+2+3``, ..."""
    digits = [k[5:] for k in metrics if k.startswith("acc_s") and k[5:].isdigit()]
    n = max((int(max(d)) for d in digits), default=0)
    if n == 0:
        return []
    rows = [(f"acc_{k}", f"scale {k[1:]}") for k in scale_keys(n)]
    return rows + [(f"acc_{k}", "scale " + "+".join(k[1:])) for k in fusion_keys(n)]


def format_table(metrics: dict[str, float], title: str = "RA-CNN") -> str:
    """The paper-style table as aligned text."""
    rows = output_rows(metrics) + TABLE_ROWS
    width = max(len(label) for _, label in rows)
    lines = [f"{title}", "-" * (width + 12)]
    for key, label in rows:
        if key in metrics and not (isinstance(metrics[key], float) and math.isnan(metrics[key])):
            v = metrics[key]
            if not key.startswith(("acc", "mean_per", "loc", "head", "view")):
                lines.append(f"{label:<{width}}  {v:8.3f}")
                continue
            line = f"{label:<{width}}  {100 * v:7.2f}%"
            top5 = metrics.get(key.replace("acc_", "top5_", 1)) if key.startswith("acc_") else None
            lines.append(line + (f"   top-5 {100 * top5:6.2f}%" if top5 is not None else ""))
    if "exit_scales_mean" in metrics:  # early exit: the last fusion's row is the early-exit model's answer
        shares = ", ".join(
            f"{k.removeprefix('exit_share_')} {100 * v:.1f}%"
            for k, v in metrics.items()
            if k.startswith("exit_share_")
        )
        lines.append(f"early exit: {metrics['exit_scales_mean']:.2f} scales per image (answered by {shares})")
    return "\n".join(lines)


def json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """NaN (a metric that does not apply, e.g. no boxes in the data) -> None, so the JSON is standard."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def epoch_line(rec: dict[str, Any], fused: str) -> str:
    """One metrics.jsonl record as the line printed after each epoch."""
    parts = [f"epoch {rec['epoch']:>3} {rec['phase']:<8}", f"loss {rec['loss']:.4f}"]
    for k in ("train_acc_s1", "val_acc_s1", "val_acc_s2", f"val_acc_{fused}", "val_box_side_s1"):
        if k in rec:
            parts.append(f"{k.replace('_acc', '')} {rec[k]:.3f}")
    parts.append(f"{rec['images_per_s']:.1f} img/s")
    return " | ".join(parts)


@torch.no_grad()
def stage_predictions(
    model: RACNN,
    loader: Iterable[dict[str, Any]],
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every image's prediction after 1, 2, ..., N scales (the probabilities of ``s1``, ``s12``, ``s123``, ...:
    n x K each, on the CPU) from one staged run of every scale, and the labels (n): what early exit answers at
    any threshold follows from them (:func:`racnn.early_exit.exit_decisions`, ``choose_exit_confidence``)."""
    keys = [answer_key(model.keys, r) for r in range(1, len(model.scale_keys) + 1)]
    stages = model_stages(model)
    got: list[list[torch.Tensor]] = [[] for _ in keys]
    labels = []
    was_training = model.training
    model.eval()  # (dropout off, BatchNorm statistics kept)
    try:
        for batch in tqdm(loader, desc="early exit sweep", leave=False, disable=not progress):
            x = place_batch(batch["image"], device)
            ran = staged_forward(stages, x, keys=model.keys, exit_confidence=1.0)
            for out, k in zip(got, keys, strict=True):
                out.append(ran.out.logits[k].float().softmax(1).cpu())
            labels.append(batch["label"].cpu())
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("stage_predictions: the loader gave no images")
    return [torch.cat(g) for g in got], torch.cat(labels)
