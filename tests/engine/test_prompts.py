"""Prompt samplers on masks whose answers are known by construction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sam4med.engine.errors import InputError
from sam4med.engine.prompts import (
    Prompt,
    center_point,
    centroid_point,
    error_click,
    jitter_box,
    negative_points,
    random_points,
    select_mask,
    stride_points,
    tight_box,
)


def square(size=20, top=5, left=7, side=6):
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_tight_box_is_inclusive_pixel_indices():
    assert tight_box(square()).tolist() == [7, 5, 12, 10]
    with pytest.raises(InputError, match="empty mask"):
        tight_box(np.zeros((4, 4), bool))


def test_centroid_can_fall_outside_a_ring_but_center_point_cannot():
    yy, xx = np.mgrid[:41, :41]
    radius = np.hypot(yy - 20, xx - 20)
    ring = (radius > 10) & (radius < 16)
    x, y = centroid_point(ring)
    assert (x, y) == (20, 20) and not ring[int(y), int(x)]
    x, y = center_point(ring)
    assert ring[int(y), int(x)]
    # in a square the farthest-from-boundary pixel is its middle
    assert center_point(square(side=7)) == (10, 8)


def test_random_and_stride_points_stay_in_the_object():
    mask = square()
    rng = np.random.default_rng(0)
    for points in (random_points(mask, 5, rng), stride_points(mask, 5)):
        assert points.shape == (5, 2)
        assert mask[points[:, 1].astype(int), points[:, 0].astype(int)].all()
    # stride sampling spreads over the raster-ordered list: first and last rows are both reached
    rows = stride_points(mask, 5)[:, 1]
    assert rows.min() <= 6 and rows.max() >= 9


def test_negatives_lie_on_background_inside_the_doubled_box():
    mask = square(size=40, top=15, left=15, side=10)
    negatives = negative_points(mask, mask, 20, np.random.default_rng(1), "double_box")
    xs, ys = negatives[:, 0], negatives[:, 1]
    assert not mask[ys.astype(int), xs.astype(int)].any()
    assert xs.min() >= 9 and xs.max() <= 30 and ys.min() >= 9 and ys.max() <= 30
    anywhere = negative_points(mask, mask, 200, np.random.default_rng(1), "image")
    assert anywhere[:, 0].max() > 30 or anywhere[:, 1].max() > 30


@pytest.mark.parametrize("kind", ["corners", "shift", "scale"])
def test_jitter_is_bounded_and_seeded(kind):
    box = np.array([10, 10, 29, 19], np.float32)
    first = jitter_box(box, (100, 100), np.random.default_rng(3), 5, "px", kind)
    again = jitter_box(box, (100, 100), np.random.default_rng(3), 5, "px", kind)
    assert np.array_equal(first, again)
    assert np.abs(first - box).max() <= 5 + 1e-6
    assert not np.array_equal(first, box)
    relative = jitter_box(box, (100, 100), np.random.default_rng(3), 10, "percent", kind)
    assert np.abs(relative - box)[[0, 2]].max() <= 2.0 + 1e-6  # 10% of a 20 px wide box


def test_jitter_is_clipped_to_the_image():
    box = np.array([0, 0, 9, 9], np.float32)
    for seed in range(20):
        x0, y0, x1, y1 = jitter_box(box, (10, 10), np.random.default_rng(seed), 5)
        assert 0 <= x0 <= x1 <= 9 and 0 <= y0 <= y1 <= 9


def test_mask_rules():
    gt = square()
    masks = np.stack([np.zeros_like(gt), gt, square(side=4)])
    assert select_mask(masks, np.array([0.9, 0.1, 0.5]), "oracle", gt) == 1
    assert select_mask(masks, np.array([0.9, 0.1, 0.5]), "iou") == 0
    assert select_mask(masks[:1], np.array([0.2]), "single") == 0
    with pytest.raises(InputError):
        select_mask(masks, np.zeros(3), "oracle")
    with pytest.raises(InputError, match="unknown mask rule"):
        select_mask(masks, np.zeros(3), "best")


def test_error_click_targets_the_largest_error_region():
    gt = square(size=30, top=5, left=5, side=12)
    pred = gt.copy()
    pred[5:17, 5:9] = False  # a 12x4 miss
    pred[25:27, 25:27] = True  # a 2x2 false positive
    (x, y), label = error_click(pred, gt, np.random.default_rng(0))
    assert label == 1 and gt[int(y), int(x)] and not pred[int(y), int(x)]
    extra = gt | square(size=30, top=20, left=20, side=8)
    (x, y), label = error_click(extra, gt, np.random.default_rng(0))
    assert label == 0 and extra[int(y), int(x)] and not gt[int(y), int(x)]
    assert error_click(gt, gt, np.random.default_rng(0)) is None
    (x, y), label = error_click(pred, gt, np.random.default_rng(0), "random")
    assert pred[int(y), int(x)] != gt[int(y), int(x)] and label == int(gt[int(y), int(x)])


def test_prompt_validation():
    with pytest.raises(InputError, match="x0 <= x1"):
        Prompt(box=[10, 10, 5, 20])
    with pytest.raises(InputError, match="2 points but 1 labels"):
        Prompt(points=[(1, 1), (2, 2)], labels=[1])
    with pytest.raises(InputError, match="needs points, a box"):
        Prompt()
    with pytest.raises(InputError, match="outside the 20x10 image"):
        Prompt(points=[(25, 2)]).check_inside((10, 20))
    prompt = Prompt(box=[1, 2, 3, 4]).add_point((2, 3), 0)
    assert prompt.structure == "box=True,points=1"
    assert prompt.to_record() == {"points": [[2.0, 3.0]], "labels": [0], "box": [1.0, 2.0, 3.0, 4.0]}
    assert prompt.before_last_point().to_record() == {"box": [1.0, 2.0, 3.0, 4.0]}
    two = prompt.add_point((4, 5), 1).before_last_point()
    assert two.to_record() == prompt.to_record()
    assert Prompt(points=[(2, 3)]).before_last_point() is None and Prompt(box=[1, 2, 3, 4]).before_last_point() is None


def test_prompt_rejects_nan_and_unknown_labels():
    with pytest.raises(InputError, match="finite"):
        Prompt(box=[float("nan"), 50, 200, 200])
    with pytest.raises(InputError, match="finite"):
        Prompt(points=[(float("inf"), 3)])
    with pytest.raises(InputError, match="1 \\(foreground\\) or 0"):
        Prompt(points=[(1, 1)], labels=[7])
    with pytest.raises(InputError, match=r"point labels \[1e\+300\]: expected integers"):  # not wrapped round
        Prompt(points=[(1, 1)], labels=[1e300])
    with pytest.raises(InputError, match="four numbers"):
        Prompt(box=[1, 2, 3])


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-10**6, 10**6))


@settings(max_examples=300, deadline=None)
@given(points=st.one_of(st.none(), st.lists(NUMBERS, max_size=7), st.lists(st.lists(NUMBERS, max_size=3), max_size=3),
                        st.text(max_size=3)),
       labels=st.one_of(st.none(), st.lists(NUMBERS, max_size=4), st.text(max_size=2)),
       box=st.one_of(st.none(), st.lists(NUMBERS, max_size=6), st.text(max_size=2)),
       size=st.tuples(st.integers(1, 500), st.integers(1, 500)))
def test_prompt_constructor_gives_a_valid_prompt_or_one_input_error(points, labels, box, size):
    """Whatever arrives from a command line or a request: a usable prompt, or InputError, nothing else."""
    try:
        prompt = Prompt(points=points, labels=labels, box=box)
        prompt.check_inside(size)
    except InputError:
        return
    if prompt.points is not None:
        assert prompt.points.shape == (len(prompt.labels), 2) and np.isfinite(prompt.points).all()
        assert set(prompt.labels.tolist()) <= {0, 1}
    if prompt.box is not None:
        assert np.isfinite(prompt.box).all() and prompt.box[0] <= prompt.box[2] and prompt.box[1] <= prompt.box[3]


MASKS = st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1), st.floats(0, 1)).map(
    lambda a: np.random.default_rng(a[2]).random((a[0], a[1])) < a[3])  # empty, sparse, full; any shape


@settings(max_examples=300, deadline=None)
@given(mask=MASKS, other=MASKS, k=st.integers(-2, 9), seed=st.integers(0, 2**32 - 1),
       amount=NUMBERS, unit=st.sampled_from(["px", "percent"]), kind=st.sampled_from(["corners", "shift", "scale"]),
       region=st.sampled_from(["double_box", "image"]))
def test_prompt_samplers_give_valid_prompts_or_one_input_error(mask, other, k, seed, amount, unit, kind, region):
    """Any object mask, count and jitter: points on the object (negatives on background), boxes inside the
    image with x0 <= x1 and y0 <= y1, or InputError, nothing else."""
    rng = np.random.default_rng(seed)
    height, width = mask.shape
    foreground = mask | (other if other.shape == mask.shape else False)

    def attempt(sample):
        try:
            return sample()
        except InputError:
            return None

    for points in (attempt(lambda: random_points(mask, k, rng)), attempt(lambda: stride_points(mask, k))):
        if points is not None:
            assert points.shape == (k, 2) and mask[points[:, 1].astype(int), points[:, 0].astype(int)].all()
    center = attempt(lambda: center_point(mask))
    if center is not None:
        assert mask[int(center[1]), int(center[0])]
    centroid = attempt(lambda: centroid_point(mask))
    assert (centroid is None) == (not mask.any()) and (centroid is None or np.isfinite(centroid).all())
    negatives = attempt(lambda: negative_points(mask, foreground, k, rng, region))
    if negatives is not None:
        assert negatives.shape == (k, 2) and not foreground[negatives[:, 1].astype(int), negatives[:, 0].astype(int)].any()
    box = attempt(lambda: tight_box(mask))
    assert (box is None) == (not mask.any())
    if box is not None:
        jittered = attempt(lambda: jitter_box(box, (height, width), rng, amount, unit, kind))
        assert (jittered is None) == (not (np.isfinite(amount) and amount >= 0))
        if jittered is not None:
            assert np.isfinite(jittered).all() and 0 <= jittered[0] <= jittered[2] <= width - 1
            assert 0 <= jittered[1] <= jittered[3] <= height - 1


def test_a_prompts_record_stays_finite_and_rounded_near_float32s_limit():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 * 100 overflowed before the record rounded in float64
        record = Prompt(points=[(3e38, 0.1)], box=[0.1, 0.2, 3e38, 3e38]).to_record()
    assert np.isfinite(record["points"]).all() and np.isfinite(record["box"]).all()
    assert record["points"][0][1] == 0.1 and record["box"][:2] == [0.1, 0.2]
