"""Boxes from conv activation maps (racnn.localization): the APN initialisation's targets and the object prior."""

from __future__ import annotations

import torch

from racnn.localization import aolm_boxes, peak_response_boxes, region_response_boxes


def test_peak_response_box_is_centred_on_the_peak_and_inside() -> None:
    fmap = torch.zeros(2, 4, 8, 8)
    fmap[0, :, 2, 5] = 10.0  # row 2 (y), column 5 (x)
    fmap[1, :, 0, 0] = 10.0  # corner: the box is moved inside
    box = peak_response_boxes(fmap, side=0.5)
    assert torch.allclose(box[0], torch.tensor([5.5 / 8, 2.5 / 8, 0.25]))
    assert torch.allclose(box[1], torch.tensor([0.25, 0.25, 0.25]))


def test_region_response_box_is_sized_to_the_hot_cells() -> None:
    fmap = torch.zeros(3, 2, 8, 8)
    fmap[0, :, 2:4, 4:8] = 5.0  # hot rows 2-3, columns 4-7: 2 x 4 cells, area 8/64
    fmap[0, :, 6, 0] = 1.0  # below the threshold: ignored
    fmap[1, :, 3, 3] = 1.0  # one hot cell: side 1/8, clamped up to min_side
    box = region_response_boxes(fmap, 0.5, min_side=0.25, max_side=0.9)
    # (the response is smoothed by a 3x3 binomial kernel first: around a single cell, a ring reaches half)
    # rows 2-3 and columns 4-7: centre (6/8, 3/8), side sqrt(2/8 * 4/8)
    assert torch.allclose(box[0], torch.tensor([6 / 8, 3 / 8, (2 / 8 * 4 / 8) ** 0.5 / 2]))
    assert torch.allclose(box[1], torch.tensor([3.5 / 8, 3.5 / 8, 0.1875]))  # the cell and its ring: 3/8
    one = region_response_boxes(fmap[1:2], 0.6, min_side=0.25, max_side=0.9)  # the cell alone: 1/8 -> 0.25
    assert torch.allclose(one[0], torch.tensor([3.5 / 8, 3.5 / 8, 0.125]))
    assert torch.allclose(
        box[2], torch.tensor([0.5, 0.5, 0.45])
    )  # flat: every cell hot, whole image, max_side
    # the box stays inside the image and its side within the bounds
    assert bool(((box[:, :2] - box[:, 2:]) >= -1e-6).all() and ((box[:, :2] + box[:, 2:]) <= 1 + 1e-6).all())
    # a larger hot region gives a larger box: the side follows the response, unlike peak_response_boxes
    big = torch.zeros(1, 1, 8, 8)
    big[0, 0, 1:7, 1:7] = 1.0
    assert float(region_response_boxes(big, 0.5, 0.25, 1.0)[0, 2]) > float(box[0, 2])


def test_aolm_box_frames_the_largest_region_above_the_mean() -> None:
    fmap = torch.zeros(3, 2, 8, 8)
    fmap[0, :, 1:5, 2:7] = 3.0  # the object: rows 1-4, columns 2-6 (20 cells)
    fmap[0, :, 7, 0] = 9.0  # a stronger but single cell apart: not connected, smaller, ignored
    fmap[1, :, 2:4, 2:4] = 1.0
    fmap[1, :, 3, 4] = 1.0  # joined to the block by a side: one region (2 x 3 bounding box)
    box = aolm_boxes(fmap, min_side=0.1, max_side=0.9)
    side0 = (5 / 8 * 4 / 8) ** 0.5  # same area as the 5 x 4 cell bounding box, centred on it
    assert torch.allclose(box[0], torch.tensor([4.5 / 8, 3 / 8, side0 / 2]))
    assert torch.allclose(box[1], torch.tensor([3.5 / 8, 3 / 8, (3 / 8 * 2 / 8) ** 0.5 / 2]))
    assert torch.allclose(box[2], torch.tensor([0.5, 0.5, 0.45]))  # flat map: the whole image, max side
    # the region above the mean, not the one above half the range: a dim but large object wins over a peak
    region = region_response_boxes(fmap[:1], 0.5, 0.1, 0.9)
    assert float(region[0, 2]) > float(box[0, 2])  # region stretches over both blobs
    # diagonal neighbours connect (8-connectivity), and the box stays inside the image within its bounds
    diag = torch.zeros(1, 1, 8, 8)
    diag[0, 0, [0, 1, 2], [0, 1, 2]] = 1.0
    box = aolm_boxes(diag, min_side=0.5, max_side=0.9)
    assert torch.allclose(box[0], torch.tensor([0.25, 0.25, 0.25]))  # 3 x 3 cells: side 3/8 -> 0.5, inside
    assert not box.requires_grad
