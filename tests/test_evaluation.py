"""Evaluation counts on hand-made boxes: IoU, the head hit, and how much of each scale's view lies on the
object."""

from __future__ import annotations

import math

import pytest
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
    acc = Accumulator(1)
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
    acc = Accumulator(3, keep_scores=True)
    keys = ["s1", "s2", "s3", "s12", "s123"] + [f"s123_k{i}" for i in range(8)]
    logits = {k: torch.randn(4, 5) for k in keys}
    acc.update(logits, [], [], {"label": torch.arange(4)})
    logp, target = acc.scores()
    assert logp.shape == (3, 4, 5) and torch.allclose(logp[2], logits["s3"].log_softmax(1))
    assert torch.equal(target, torch.arange(4))


def _ranked(orders: list[list[int]]) -> torch.Tensor:
    """Logits whose row i ranks the classes as ``orders[i]`` (best first)."""
    out = torch.zeros(len(orders), len(orders[0]))
    for i, order in enumerate(orders):
        out[i, order] = -torch.arange(len(order), dtype=torch.float)
    return out


def test_top5_per_class_and_confusions_against_a_hand_count() -> None:
    labels = [0, 1, 2, 2, 5]
    fused = _ranked(
        [
            [0, 1, 2, 3, 4, 5],  # right
            [2, 3, 4, 5, 0, 1],  # taken for 2; the label is 6th: not in the top 5
            [1, 2, 3, 4, 5, 0],  # taken for 1; 2nd
            [2, 0, 1, 3, 4, 5],  # right
            [0, 1, 2, 3, 5, 4],  # taken for 0; 5th
        ]
    )
    scale1 = torch.nn.functional.one_hot(torch.tensor(labels), 6).float()  # always right: not what is counted
    parts = []
    for rows in (slice(0, 3), slice(3, 5)):  # two evaluation shards, merged
        acc = Accumulator(3)
        batch = {"label": torch.tensor(labels[rows])}
        acc.update({"s1": scale1[rows], "s123": fused[rows], "s123_concat": scale1[rows]}, [], [], batch)
        parts.append(acc)
    acc = Accumulator.merged(parts)
    m = acc.summary()
    assert (m["acc_s123"], m["top5_s123"], m["acc_s1"], m["top5_s1"]) == (2 / 5, 4 / 5, 1.0, 1.0)
    assert m["top5_s123_concat"] == 1.0
    names = ["a", "b", "c", "d", "e", "f"]
    report = acc.class_report(names)
    assert report["per_class_acc"] == {"a": 1.0, "b": 0.0, "c": 0.5, "d": None, "e": None, "f": 0.0}
    assert m["mean_per_class_acc"] == report["mean_per_class_acc"] == (1 + 0 + 0.5 + 0) / 4
    assert report["most_confused"] == [["b", "c", 1], ["c", "b", 1], ["f", "a", 1]]  # ties in class order
    assert acc.confusion is not None and int(acc.confusion.sum()) == 5 and acc.confusion[2, 2] == 1


def test_class_report_of_no_image() -> None:
    """Every image unreadable and skipped: a report with no accuracy rather than an error."""
    acc = Accumulator.merged([Accumulator(3), Accumulator(3)])
    report = acc.class_report(["a", "b", "c"])
    assert report["per_class_acc"] == {"a": None, "b": None, "c": None} and report["most_confused"] == []
    assert math.isnan(report["mean_per_class_acc"]) and math.isnan(acc.summary()["mean_per_class_acc"])


def _tiny_model() -> torch.nn.Module:
    import racnn

    torch.manual_seed(0)
    return racnn.create_model("tiny", num_classes=3, input_size=32, apn_grid=2, apn_hidden=8)


def test_flip_tta_on_symmetric_images_equals_no_tta_and_else_averages_the_views() -> None:
    from racnn.evaluation import accumulate

    model = _tiny_model()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    symmetric = [{"image": (x + x.flip(3)) / 2, "label": labels}]
    plain, tta = (accumulate(model, symmetric, progress=False, tta=t).summary() for t in (None, "flip"))
    assert {k: v for k, v in tta.items() if k.startswith(("acc_", "top5_"))} == {
        k: v for k, v in plain.items() if k.startswith(("acc_", "top5_"))
    }
    for k in (k for k in plain if k.startswith("pt_")):
        assert tta[k] == pytest.approx(plain[k], abs=1e-6), k
    # images that are not symmetric: each output's true-class probability and top-1 are those of the mean
    # of the two views' probabilities, each view run through the model on its own
    m = accumulate(model, [{"image": x, "label": labels}], progress=False, tta="flip").summary()
    assert model.training  # restored after the evaluation
    with torch.no_grad():
        model.eval()
        views = [model(v).logits for v in (x, x.flip(3))]
    for k in views[0]:
        p, q = views[0][k].softmax(1), views[1][k].softmax(1)
        assert (p - q).abs().max() > 100 * 1e-6, k  # the views disagree far beyond the tolerance
        mean = (p + q) / 2
        assert m[f"pt_{k}"] == pytest.approx(float(mean.gather(1, labels[:, None]).mean()), abs=1e-6), k
        assert m[f"acc_{k}"] == float((mean.argmax(1) == labels).float().mean()), k


@pytest.mark.slow  # 200 class names twice: about 10 s of text rendering on a busy CPU
def test_confusion_figure_of_200_classes(tmp_path) -> None:
    from PIL import Image

    from racnn.visualization import confusion_figure

    gen = torch.Generator().manual_seed(0)
    confusion = torch.diag(torch.randint(5, 30, (200,), generator=gen)) + (
        torch.rand(200, 200, generator=gen) > 0.995
    )
    names = [f"{i:03d}.Some_long_bird_name_{i}" for i in range(200)]
    out = confusion_figure(confusion, names, [(names[3], names[7], 4)], tmp_path / "figs" / "confusion.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width >= 2500 and image.height >= 2000  # room for 200 names


def test_the_table_lists_every_output_of_the_model_it_comes_from() -> None:
    """The table's accuracy rows follow the model's output keys: 2 and 4 scales as well as 3."""
    from racnn.evaluation import format_table

    two = format_table({"acc_s1": 0.5, "acc_s2": 0.6, "acc_s12": 0.7})
    assert [line.split("  ")[0] for line in two.splitlines()[2:]] == ["scale 1", "scale 2", "scale 1+2"]
    four = {f"acc_{k}": 0.5 for k in ("s1", "s2", "s3", "s4", "s12", "s123", "s1234")}
    labels = [line.split("  ")[0].strip() for line in format_table(four).splitlines()[2:]]
    assert labels == ["scale 1", "scale 2", "scale 3", "scale 4", "scale 1+2", "scale 1+2+3", "scale 1+2+3+4"]
