"""The readers fed arbitrary bytes: a valid result or the one InputError, never another exception."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sam4med.engine.datasets import load_dataset
from sam4med.engine.errors import InputError
from sam4med.engine.imageio import read_image, read_mask
from sam4med.engine.volumes import read_volume

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_png() -> bytes:
    path = Path(tempfile.mkdtemp()) / "seed.png"
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(path)
    return path.read_bytes()


PNG = _valid_png()
# arbitrary bytes, and a real PNG with some of its bytes changed or cut (closer to real damage)
DAMAGED = st.one_of(
    st.binary(max_size=512),
    st.builds(lambda cut, flips: bytes(b ^ 0xFF if i in flips else b for i, b in enumerate(PNG[:cut])),
              st.integers(0, len(PNG)), st.sets(st.integers(0, len(PNG) - 1), max_size=8)),
)


@FUZZ
@given(data=DAMAGED, suffix=st.sampled_from([".png", ".jpg", ".tif", ".bmp"]))
def test_image_and_mask_readers(data, suffix):
    path = Path(tempfile.mkdtemp()) / f"x{suffix}"
    path.write_bytes(data)
    for read in (read_image, read_mask):
        try:
            array = read(path)
        except InputError:
            continue
        assert isinstance(array, np.ndarray) and array.ndim in (2, 3) and array.size > 0


@FUZZ
@given(data=st.binary(max_size=1024), suffix=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha"]))
def test_volume_reader(data, suffix):
    path = Path(tempfile.mkdtemp()) / f"v{suffix}"
    path.write_bytes(data)
    try:
        volume = read_volume(path)
    except InputError:
        return
    assert volume.array.ndim == 3 and np.isfinite(volume.array).all()


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                      max_size=3), max_leaves=6)


@FUZZ
@given(description=st.one_of(
    st.binary(max_size=64),
    st.dictionaries(st.sampled_from(["name", "modality", "target", "groups"]), JSON_VALUES, max_size=4)
    .map(lambda d: json.dumps(d).encode())))
def test_dataset_description(description):
    root = Path(tempfile.mkdtemp())
    (root / "images").mkdir()
    (root / "masks").mkdir()
    (root / "images" / "a.png").write_bytes(PNG)
    (root / "masks" / "a.png").write_bytes(PNG)
    (root / "dataset.json").write_bytes(description)
    try:
        dataset = load_dataset(root)
    except InputError:
        return
    assert isinstance(dataset.name, str) and "/" not in dataset.name and dataset.name not in ("", ".", "..")
    assert isinstance(dataset.modality, str) and isinstance(dataset.target, str)
    assert [s.id for s in dataset.samples] == ["a"]
