"""Evaluation counts on hand-made boxes: IoU, the head hit, and how much of each scale's view lies on the
object."""

from __future__ import annotations

import math

import torch

from racnn.attention import compose_boxes
from racnn.evaluation import Accumulator, share_inside


def test_share_inside() -> None:
    a = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.6, 0.6, 0.8, 0.8]])
    b = torch.tensor([[0.25, 0.0, 1.0, 1.0]] * 3)
    torch.testing.assert_close(share_inside(a, b), torch.tensor([0.5, 0.75, 1.0]))


def test_views_on_the_object_and_the_head() -> None:
    # two images, object box x 0.2-0.8, y 0.2-0.8 in both
    box1 = torch.tensor([[0.5, 0.5, 0.3], [0.2, 0.2, 0.2]])  # scale-1 boxes: on the object; mostly off it
    box2 = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.5, 0.5]])  # relative to the scale-1 boxes
    # the scale-2 box in the image: [0.35, 0.2, 0.65, 0.5] (inside the object) and box 1 itself (mostly off)
    batch = {
        "label": torch.tensor([0, 1]),
        "has_box": torch.tensor([1, 1]),
        "box": torch.tensor([[0.2, 0.2, 0.8, 0.8]] * 2),
        # one head part per image: at (0.5, 0.3), visible
        "parts": torch.tensor([[[0.5, 0.3, 1.0]], [[0.5, 0.3, 1.0]]]),
    }
    acc = Accumulator()
    logits = {"s1": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    views = [box1, compose_boxes(box1, box2)]  # what the model's output carries
    acc.update(logits, [box1, box2], views, batch, head_parts=[0])
    m = acc.summary()
    assert m["acc_s1"] == 0.5
    # image 0: view of scale 2 (the scale-1 box) is 0.6 x 0.6 inside the object; image 1: 0.2 x 0.2 of 0.4 x 0.4
    assert m["view_in_object_s2"] == 0.5
    assert m["view_in_object_s3"] == 0.5  # image 0's scale-2 box lies inside; image 1's is box 1 again
    assert m["head_hit_s2"] == 0.5  # (0.5, 0.3) lies in image 0's scale-2 box, not in image 1's
    assert math.isclose(m["loc_acc_iou50"], 0.5)
    torch.testing.assert_close(views[1], torch.tensor([[0.5, 0.35, 0.15], [0.2, 0.2, 0.2]]))


def test_kept_scores_are_the_scales_only() -> None:
    """With every fusion kind among the outputs, the kept scores are the N scales' (not s12, a fused output)."""
    acc = Accumulator(keep_scores=True)
    keys = ["s1", "s2", "s3", "s12", "s123"] + [f"s123_k{i}" for i in range(8)]
    logits = {k: torch.randn(4, 5) for k in keys}
    acc.update(logits, [], [], {"label": torch.arange(4)})
    logp, target = acc.scores()
    assert logp.shape == (3, 4, 5) and torch.allclose(logp[2], logits["s3"].log_softmax(1))
    assert torch.equal(target, torch.arange(4))
