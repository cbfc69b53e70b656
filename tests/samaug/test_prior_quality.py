"""Scores of SAMAug's priors against the ground truth, before any training."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from sam4med.samaug.prior_quality import measure_prior_quality, score_priors
from sam4med.samaug.priors import Priors
from sam4med.samaug.store import generate_priors
from conftest import make_ellipse_image, write_dataset


def test_priors_that_are_the_mask_score_one_and_a_uniform_prior_scores_chance():
    _, mask = make_ellipse_image(96, 128, centre=(48, 64), radii=(20, 30))
    exact = Priors(mask.astype(np.float32) * 0.97, find_boundaries(mask, mode="thick").astype(np.float32), 1)
    assert score_priors(exact, mask) == {"auroc": 1.0, "covered_dice": 1.0, "boundary_f": 1.0,
                                         "covered_fraction": pytest.approx(mask.mean()), "masks": 1.0}
    everywhere = Priors(np.ones(mask.shape, np.float32), np.zeros(mask.shape, np.float32), 1)
    scores = score_priors(everywhere, mask)
    assert scores["auroc"] == 0.5 and scores["boundary_f"] == 0.0
    assert scores["covered_dice"] == pytest.approx(2 * mask.sum() / (mask.size + mask.sum()))
    inverted = Priors((~mask).astype(np.float32), np.zeros(mask.shape, np.float32), 1)
    assert score_priors(inverted, mask)["auroc"] == 0.0


def test_point_grid_priors_of_the_click_model_carry_a_bright_ellipse(tmp_path, click_model):
    """SAMAug's generator (32x32 grid) on LiteMedSAM-click: the kept masks are the ellipse, not the image."""
    data = write_dataset(tmp_path / "ellipses", broken=False, count=2)
    generate_priors([data], tmp_path / "priors", click_model, figures_per_dataset=0, show_progress=False,
                    image_ids={"case0"})
    [row] = measure_prior_quality([data], tmp_path / "priors", {"case0"}).to_dict("records")
    assert row["image"] == "case0" and row["auroc"] > 0.95 and row["covered_dice"] > 0.9
    assert row["boundary_f"] > 0.4 and row["covered_fraction"] < 0.3
