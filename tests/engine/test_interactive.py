"""Interactive correction: what a corrective click may change (local, global, auto), on whole images and on
tiles, and on real data whether a box mask survives its corrections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_ellipse_image, small_blobs
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from sam4med.engine.errors import InputError
from sam4med.engine.interactive import (
    LOCAL_RADIUS,
    check_correction,
    correct,
    corrects_locally,
    local_change,
    run_interactive,
)
from sam4med.engine.metrics import dice
from sam4med.engine.objects import object_labels
from sam4med.engine.predictor import Predictor
from sam4med.engine.preprocessing import ImageGeometry
from sam4med.engine.prompts import Prompt, tight_box
from sam4med.engine.tiling import TiledPredictor

SIDE = 256
GEOMETRY = ImageGeometry((SIDE, SIDE), (SIDE, SIDE), SIDE)  # a square image: frame pixels are logits pixels


def logits(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.where(mask, 4.0, -4.0).astype(np.float32))[None, None]


def test_a_click_takes_the_change_it_lands_in_and_leaves_changes_elsewhere():
    before = np.zeros((SIDE, SIDE), bool)
    before[60:200, 60:200] = True
    after = before.copy()
    after[60:200, 40:60] = True  # grown on the left, where the click is
    after[60:200, 190:200] = False  # shrunk on the far right
    after[10:20, 230:240] = True  # a new blob far away
    near = (35, 130)  # a change of 2 px, 3 px left of the grown region: apart from it, within the radius
    after[near[1], near[0] : near[0] + 2] = True
    merged = local_change(logits(before), logits(after), (50.0, 130.0), GEOMETRY)[0, 0].numpy() > 0
    expected = before.copy()
    expected[60:200, 40:60] = True
    expected[near[1], near[0] : near[0] + 2] = True
    assert np.array_equal(merged, expected)


def test_a_click_outside_every_change_keeps_the_previous_mask():
    before = np.zeros((SIDE, SIDE), bool)
    before[60:200, 60:200] = True
    after = before.copy()
    after[60:200, 190:200] = False
    previous = logits(before)
    assert torch.equal(local_change(previous, logits(after), (20.0, 20.0), GEOMETRY), previous)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), x=st.integers(0, 63), y=st.integers(0, 63))
def test_local_change_takes_new_logits_only_on_changes_that_touch_or_are_near_the_click(seed, x, y):
    rng = np.random.default_rng(seed)
    size = 64
    geometry = ImageGeometry((size, size), (size, size), size)
    blocks = lambda: np.kron(rng.random((8, 8)) < 0.5, np.ones((8, 8), bool))  # noqa: E731
    previous, new = logits(blocks()), logits(blocks())
    merged = local_change(previous, new, (float(x), float(y)), geometry)
    assert bool(((merged == previous) | (merged == new)).all())  # each logit is the old one or the new one
    changed = ((previous[0, 0] > 0) ^ (new[0, 0] > 0)).numpy()
    taken = ((merged[0, 0] > 0) ^ (previous[0, 0] > 0)).numpy()
    assert not (taken & ~changed).any()  # nothing changes where the decoder changed nothing
    regions, _ = ndimage.label(changed, structure=np.ones((3, 3)))
    near_click = np.unique(regions[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2])
    rows, columns = np.ogrid[:size, :size]
    allowed = np.isin(regions, near_click[near_click > 0]) | ((rows - y) ** 2 + (columns - x) ** 2
                                                              <= (LOCAL_RADIUS * size) ** 2)
    assert np.array_equal(taken, changed & allowed)


def test_auto_is_local_once_the_prompt_holds_a_box_and_global_for_clicks_alone():
    clicks = Prompt(points=[(10.0, 10.0)]).add_point((12.0, 12.0), 1).add_point((3.0, 3.0), 0)
    boxed = Prompt(box=np.array([0, 0, 20, 20], dtype=np.float32)).add_point((5.0, 5.0), 0)
    assert corrects_locally(boxed, "auto") and not corrects_locally(boxed, "global")
    assert not corrects_locally(clicks, "auto") and corrects_locally(clicks, "local")


def test_an_unknown_correction_is_one_input_error():
    with pytest.raises(InputError, match="--correction 'nearby': choose one of auto, local, global"):
        check_correction("nearby")


@pytest.fixture()
def boxed_ellipse(click_model):
    """A predictor on the clean ellipse, the ellipse's tight box, and that box's mask and round."""
    image, truth = make_ellipse_image()
    predictor = Predictor(click_model)
    predictor.set_image(image)
    box = Prompt(box=tight_box(truth))
    mask, _, boxed = correct(predictor, box, None, "auto")
    return predictor, box, mask, boxed


def test_auto_corrects_a_box_locally_and_clicks_alone_globally(boxed_ellipse):
    predictor, box, _, boxed = boxed_ellipse
    with_click = box.add_point((150.0, 60.0), 0)  # a negative click near the ellipse's top edge
    local, _, _ = correct(predictor, with_click, boxed, "auto", "local")
    automatic, _, _ = correct(predictor, with_click, boxed, "auto", "auto")
    assert np.array_equal(automatic, local)
    click = Prompt(points=[(150.0, 100.0)])
    _, _, clicked = correct(predictor, click, None, "auto")
    second = click.add_point((150.0, 60.0), 0)
    globally, _, _ = correct(predictor, second, clicked, "auto", "global")
    automatic, _, _ = correct(predictor, second, clicked, "auto", "auto")
    assert np.array_equal(automatic, globally)


def test_a_local_correction_leaves_the_mask_far_from_the_click_as_it_was(boxed_ellipse):
    predictor, box, before, boxed = boxed_ellipse
    after, _, merged = correct(predictor, box.add_point((85.0, 100.0), 1), boxed, "auto", "local")
    # the click is near the left end (x 80); everything right of the middle is farther than the radius
    assert np.array_equal(after[:, 160:], before[:, 160:])
    assert merged.frame == boxed.frame == (0, 0, predictor.embedding.geometry)


def test_corrections_on_a_tile_are_merged_in_the_tiles_frame_and_not_across_frames(click_model):
    image, blobs = small_blobs(count=6, seed=3)
    predictor = TiledPredictor(click_model, tile=256, halo=32)
    predictor.set_image(image)
    truth = blobs[0]
    box = Prompt(box=tight_box(truth))
    boxed_mask, _, boxed = correct(predictor, box, None, "auto")
    x0, y0 = boxed.frame[:2]
    assert (x0, y0) != (0, 0) or boxed.frame[2].original_size != image.shape[:2]  # decoded on a tile
    centre = np.argwhere(truth).mean(0)
    inside = box.add_point((float(centre[1]), float(centre[0])), 1)
    mask, _, merged = correct(predictor, inside, boxed, "auto")
    assert merged.frame == boxed.frame
    assert dice(mask, truth) > 0.5 and dice(boxed_mask, truth) > 0.5
    far = inside.add_point((float(image.shape[1] - 5), float(image.shape[0] - 5)), 0)  # another tile: whole image
    _, _, elsewhere = correct(predictor, far, merged, "auto")
    assert elsewhere.frame[:2] == (0, 0) and elsewhere.frame != merged.frame


def test_on_real_data_a_box_mask_survives_its_corrections_locally_but_not_globally(click_model, shared_data):
    """Kvasir-SEG's validation side (seen by LiteMedSAM in training): from a tight box, 5 corrective clicks
    with ``auto`` (local from a box) end at least as good as the box; with ``global`` they end worse."""
    from sam4med.engine.datasets import load_dataset
    from sam4med.engine.imageio import load_pair
    from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split

    dataset = load_dataset(shared_data / "kvasir_seg")
    predictor = Predictor(click_model)
    scores: dict[str, list[list[float]]] = {"auto": [], "global": []}
    for sample in training_split(dataset, dict(DEFAULT_FRACTIONS), 0)["val"][:4]:
        image, mask = load_pair(sample)
        labels, ids = object_labels(mask > 0, min_area=16)
        predictor.set_image(image)
        for index in ids:
            truth = labels == index
            for correction in scores:
                scores[correction].append(run_interactive(
                    predictor, truth, Prompt(box=tight_box(truth)), 5, np.random.default_rng(index), "largest",
                    "auto", correction).dice_per_round)
    local, globally = np.mean(scores["auto"], 0), np.mean(scores["global"], 0)
    assert local[0] == globally[0] > 0.9  # the same box mask
    assert local[-1] >= local[0] - 0.005, local
    assert local[-1] > globally[-1] + 0.05, (local, globally)
