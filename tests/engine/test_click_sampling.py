"""Property tests of the corrective-click sampler: every click lies in the current error region and is
labelled by what the pixel should be."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sam4med.engine.prompts import error_click

masks = arrays(np.bool_, st.tuples(st.integers(1, 24), st.integers(1, 24)))


@settings(max_examples=300, deadline=None)
@given(st.data(), st.sampled_from(["largest", "random"]), st.integers(0, 2**31))
def test_every_corrective_click_is_inside_the_error_region(data, rule, seed):
    truth = data.draw(masks)
    pred = data.draw(arrays(np.bool_, truth.shape))
    click = error_click(pred, truth, np.random.default_rng(seed), rule)
    errors = pred ^ truth
    if not errors.any():
        assert click is None
        return
    (x, y), label = click
    assert float(x).is_integer() and float(y).is_integer()
    assert errors[int(y), int(x)], (x, y)
    assert label == int(truth[int(y), int(x)])  # positive on a missed pixel, negative on a false one
