"""Reference values of the loss pieces: tiny inputs, expected values worked out by hand or
by a formula written out here independently of ``napari_ssl_seg.losses``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.segmentation import find_boundaries

from napari_ssl_seg.losses import (
    compute_sdf,
    heaviside,
    masked_sdf_targets,
    soft_dice_loss,
    weighted_ce_dice,
    weighted_mse,
)
from napari_ssl_seg.methods.simcvd import info_nce, sample_voxels, similarity_distillation

torch.set_num_threads(1)


def square_sdf_by_hand(size=9, lo=2, hi=6):
    """DTC's SDF of the square [lo, hi]^2 in a size x size map, from distances to a box."""
    expected = np.zeros((size, size))
    depth_max = (hi - lo) // 2 + 1  # distance of the centre to the nearest outside voxel
    far = math.hypot(lo, lo)  # a corner of the map to the nearest corner of the square
    for i in range(size):
        for j in range(size):
            di, dj = max(lo - i, 0, i - hi), max(lo - j, 0, j - hi)
            if di or dj:
                expected[i, j] = math.hypot(di, dj) / far
            else:  # inside: distance to the nearest outside voxel along an axis
                depth = min(i - lo, hi - i, j - lo, hi - j) + 1
                expected[i, j] = 0.0 if depth == 1 else -depth / depth_max
    return expected


def test_sdf_of_a_5x5_square():
    target = np.zeros((1, 9, 9), np.int64)
    target[0, 2:7, 2:7] = 1
    sdf = compute_sdf(target, 2)
    assert sdf.shape == (1, 1, 9, 9)
    np.testing.assert_allclose(sdf[0, 0], square_sdf_by_hand(), atol=1e-6)
    assert sdf[0, 0, 4, 4] == pytest.approx(-1.0)  # the centre, 3 voxels deep
    assert sdf[0, 0, 3, 4] == pytest.approx(-2 / 3)
    assert sdf[0, 0, 2, 4] == 0.0  # inner boundary
    assert sdf[0, 0, 0, 0] == pytest.approx(1.0)  # the farthest outside voxel
    assert sdf[0, 0, 1, 4] == pytest.approx(1 / math.sqrt(8))


def dtc_compute_sdf(mask: np.ndarray) -> np.ndarray:
    """DTC's ``compute_sdf`` for one binary map, as the reference writes it (scipy + skimage)."""
    from scipy.ndimage import distance_transform_edt as distance

    posdis, negdis = distance(mask), distance(~mask)
    boundary = find_boundaries(mask, mode="inner")
    sdf = (negdis - negdis.min()) / (negdis.max() - negdis.min()) - (posdis - posdis.min()) / (
        posdis.max() - posdis.min()
    )
    sdf[boundary] = 0
    return sdf


def test_sdf_matches_the_reference_and_the_crop_edge_is_no_boundary():
    rng = np.random.default_rng(0)
    target = np.zeros((2, 12, 10), np.int64)
    target[0, :, :4] = 1  # touches three crop edges
    target[0, 5:9, 6:9] = 2
    target[1] = rng.random((12, 10)) < 0.4
    sdf = compute_sdf(target, 3)
    for b, c in [(0, 1), (0, 2), (1, 1)]:
        np.testing.assert_allclose(sdf[b, c - 1], dtc_compute_sdf(target[b] == c), atol=1e-6)
    # the object is 4 columns wide: column 0 is 4 voxels from the background, not boundary
    np.testing.assert_allclose(sdf[0, 0, :, 0], -1.0)
    np.testing.assert_allclose(sdf[0, 0, 0, :3], [-1.0, -0.75, -0.5])
    assert (sdf[0, 0, :, 3] == 0).all()  # the real boundary
    assert (sdf[1, 1] == 0).all()  # class 2 absent


def test_masked_targets_equal_the_sdf_where_annotated_voxels_decide():
    target = torch.zeros(1, 9, 9, dtype=torch.int64)
    target[0, 2:7, 2:7] = 1
    weight = torch.ones(1, 9, 9)
    sdf, loss_weight = masked_sdf_targets(target, weight, 2)
    assert sdf.shape == loss_weight.shape == (1, 1, 9, 9)
    # trusted: the distance is at most the distance to the ring just beyond the crop
    ii, jj = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
    to_edge = np.minimum.reduce([ii + 1, jj + 1, 9 - ii, 9 - jj])
    by_hand = square_sdf_by_hand()
    distance = np.where(by_hand > 0, by_hand * math.sqrt(8), -by_hand * 3)
    distance[(by_hand == 0)] = 1.0  # boundary voxels are 1 from the outside
    expected_trust = distance <= to_edge
    np.testing.assert_array_equal(loss_weight[0, 0].numpy() > 0, expected_trust)
    assert not expected_trust[0, 0] and not expected_trust[0, 4] and expected_trust[1, 1]
    np.testing.assert_allclose(sdf[0, 0].numpy()[expected_trust], by_hand[expected_trust])


def test_a_correction_box_inside_an_object_has_no_boundary_at_its_edge():
    # A 12 x 12 slice: a 4 x 6 box of known foreground inside an object nobody annotated,
    # plus known background in column 0..1 (a real edge of the object at column 1 | 2).
    target = torch.zeros(1, 12, 12, dtype=torch.int64)
    weight = torch.zeros(1, 12, 12)
    target[0, 4:8, 2:8] = 1
    weight[0, 4:8, 0:8] = 1.0
    sdf, loss_weight = masked_sdf_targets(target, weight, 2)
    trusted = loss_weight[0, 0] > 0
    # the box edges that meet unannotated voxels (rows 4 and 7, column 7) carry no target
    assert not trusted[4, 3:8].any() and not trusted[7, 3:8].any() and not trusted[4:8, 7].any()
    # the known edge, background | foreground between columns 1 and 2, is a boundary
    assert trusted[5:7, 2].all() and (sdf[0, 0, 5:7, 2] == 0).all()
    assert trusted[5:7, 1].all() and (sdf[0, 0, 5:7, 1] > 0).all()
    assert not trusted[weight[0] == 0].any()
    # with no known background at all, nothing about the distance is known
    alone = torch.where(target > 0, 1.0, 0.0)
    _, none_trusted = masked_sdf_targets(target, alone, 2)
    assert none_trusted.sum() == 0


def test_masked_targets_treat_the_crop_edge_as_unknown():
    target = torch.zeros(1, 8, 8, dtype=torch.int64)
    target[0, :, :4] = 1  # the object leaves the crop on three sides
    sdf, loss_weight = masked_sdf_targets(target, torch.ones(1, 8, 8), 2)
    trusted = loss_weight[0, 0] > 0
    assert not trusted[:, 0].any()  # 4 voxels from the background, 1 from the crop edge
    assert trusted[:, 3].all() and (sdf[0, 0, :, 3] == 0).all()  # the real boundary
    assert trusted[3, 2] and sdf[0, 0, 3, 2] == pytest.approx(-0.5)  # 2 of at most 4 deep
    assert not trusted[0, 2]  # 2 voxels deep but 1 from the crop edge


def test_masked_targets_keep_pseudo_label_weights_and_ignore_unannotated_classes():
    target = torch.zeros(1, 6, 6, dtype=torch.int64)
    target[0, 2:4, 2:4] = 1
    weight = torch.full((1, 6, 6), 0.5)
    _, loss_weight = masked_sdf_targets(target, weight, 3)
    assert set(loss_weight[0, 0].unique().tolist()) <= {0.0, 0.5}
    assert loss_weight[0, 0, 2, 2] == 0.5
    assert loss_weight[0, 1].sum() == 0  # class 2 was never annotated here


def test_weighted_mse_per_voxel_and_per_channel():
    pred = torch.tensor([[[1.0, 2.0]], [[3.0, 5.0]]]).view(1, 2, 1, 2)  # (B=1, C=2, 1, 2)
    target = torch.zeros(1, 2, 1, 2)
    per_voxel = torch.tensor([[[1.0, 0.0]]])
    # channel 0 voxel 0: 1, channel 1 voxel 0: 9 -> (1 + 9) / 2
    assert weighted_mse(pred, target, per_voxel).item() == pytest.approx(5.0)
    per_channel = torch.tensor([[[1.0, 1.0]], [[0.0, 0.5]]]).view(1, 2, 1, 2)
    # (1 + 4 + 0.5 * 25) / 2.5
    assert weighted_mse(pred, target, per_channel).item() == pytest.approx(17.5 / 2.5)
    assert weighted_mse(pred, target, torch.zeros(1, 1, 2)).item() == 0.0


def test_heaviside_of_known_distances():
    distances = torch.tensor([-0.01, 0.0, 0.01])
    # negative inside: about 1 inside, 0.5 on the level set, about 0 outside
    expected = [1 / (1 + math.exp(-1)), 0.5, 1 / (1 + math.exp(1))]
    torch.testing.assert_close(heaviside(distances, 100.0), torch.tensor(expected))
    sharp = heaviside(torch.tensor([-0.01, 0.01]), 1500.0)
    assert sharp[0] > 1 - 1e-6 and sharp[1] < 1e-6


def test_soft_dice_of_known_probabilities():
    eps = 1e-5
    # two voxels, K = 2: targets (1, 0), foreground probabilities (0.8, 0.4)
    probs = torch.tensor([[0.2, 0.6], [0.8, 0.4]]).view(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    background = (2 * 0.6 + eps) / (0.2**2 + 0.6**2 + 1 + eps)
    foreground = (2 * 0.8 + eps) / (0.8**2 + 0.4**2 + 1 + eps)
    loss = soft_dice_loss(probs, target, torch.ones(1, 1, 2))
    assert loss.item() == pytest.approx(1 - (background + foreground) / 2, rel=1e-6)
    # only the first voxel annotated: background has no target there, Dice ~ 0 for it
    background = eps / (0.2**2 + eps)
    foreground = (2 * 0.8 + eps) / (0.8**2 + 1 + eps)
    loss = soft_dice_loss(probs, target, torch.tensor([[[1.0, 0.0]]]))
    assert loss.item() == pytest.approx(1 - (background + foreground) / 2, rel=1e-6)


def test_weighted_ce_dice_of_known_logits():
    logits = torch.tensor([[0.0, 2.0], [math.log(3.0), 0.0]]).view(1, 2, 1, 2)
    target = torch.tensor([[[1, 0]]])
    weight = torch.tensor([[[1.0, 0.5]]])
    # softmax per voxel: (0.25, 0.75) and (1 - q, q) with q = 1 / (1 + e^2)
    q = 1 / (1 + math.exp(2.0))
    ce = (-math.log(0.75) + 0.5 * -math.log(1 - q)) / 1.5
    probs = torch.tensor([[0.25, 1 - q], [0.75, q]]).view(1, 2, 1, 2)
    dice = soft_dice_loss(probs, target, weight).item()
    background = (2 * 0.5 * (1 - q) + 1e-5) / (0.25**2 + 0.5 * (1 - q) ** 2 + 0.5 + 1e-5)
    foreground = (2 * 0.75 + 1e-5) / (0.75**2 + 0.5 * q**2 + 1 + 1e-5)
    assert dice == pytest.approx(1 - (background + foreground) / 2, rel=1e-6)
    loss = weighted_ce_dice(logits, target, weight)
    assert loss.item() == pytest.approx(0.5 * (ce + dice), rel=1e-6)
    assert weighted_ce_dice(logits, target, torch.zeros(1, 1, 2)).item() == 0.0


def test_info_nce_of_orthogonal_embeddings():
    e = torch.eye(2)
    tau = 0.5
    # each positive has cosine 1, the negative 0: CE = log(1 + e^(-1/tau))
    assert info_nce(e, e, tau).item() == pytest.approx(math.log(1 + math.exp(-1 / tau)))
    # positives orthogonal, negatives aligned: CE = log(1 + e^(1/tau))
    swapped = e.flip(0)
    assert info_nce(e, swapped, tau).item() == pytest.approx(math.log(1 + math.exp(1 / tau)))


def test_similarity_distillation_of_known_pairs():
    student = torch.eye(2)  # similarity matrix I
    teacher = torch.tensor([[1.0, 0.0], [1.0, 1.0]]) / torch.tensor([[1.0], [math.sqrt(2)]])
    # teacher similarities [[1, 1/sqrt 2], [1/sqrt 2, 1]]: two entries differ by 1/sqrt 2
    assert similarity_distillation(student, teacher).item() == pytest.approx(2 * 0.5 / 4)
    assert similarity_distillation(teacher, teacher).item() == 0.0


def test_sample_voxels_takes_the_same_voxels_of_both_maps():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 4, 5)
    teacher = 2 * student
    z_s, z_t = sample_voxels(student, teacher, 7)
    assert z_s.shape == (7, 3)
    torch.testing.assert_close(z_t, 2 * z_s)
    flat = student.movedim(1, -1).reshape(-1, 3)
    assert all((flat == row).all(1).any() for row in z_s)  # rows are voxels, channels intact
