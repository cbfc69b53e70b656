"""segment_image_file and segment_volume_file check every argument and input file before a model loads."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from sam4med.engine.errors import InputError
from sam4med.engine.prompts import Prompt
from sam4med.engine.segment import DeferredPredictor, segment_image_file, segment_volume_file


def never_loaded():
    raise AssertionError("the model was loaded before the arguments were checked")


@pytest.fixture()
def image_path(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(path)
    return path


@pytest.mark.parametrize(("out", "overlay", "prompt", "rule", "message"), [
    ("mask.jpg", None, Prompt(box=[1, 1, 20, 20]), None, "unknown extension"),
    ("folder", None, Prompt(box=[1, 1, 20, 20]), None, "is a folder"),
    ("mask.png", "overlay.tif", Prompt(box=[1, 1, 20, 20]), None, "--overlay"),
    ("mask.png", None, Prompt(box=[1, 1, 20, 200]), None, r"image.png: prompt .* outside the 60x40 image"),
    ("mask.png", None, Prompt(box=[1, 1, 20, 20]), "biggest", "--mask-rule"),
    ("mask.png", None, Prompt(box=[1, 1, 20, 20]), "oracle", "--mask-rule 'oracle': needs ground truth"),
    ("image.png", None, Prompt(box=[1, 1, 20, 20]), None, "--out .*image.png: is the input"),
    ("mask.png", "image.png", Prompt(box=[1, 1, 20, 20]), None, "--overlay .*: is the input .*image.png"),
    ("mask.png", "mask.png", Prompt(box=[1, 1, 20, 20]), None, "--overlay .*mask.png: is the --out mask too"),
    ("image.png/mask.png", None, Prompt(box=[1, 1, 20, 20]), None, "--out .*: .*image.png is a file, not a folder"),
])
def test_image_arguments_are_checked_before_the_model_loads(tmp_path, image_path, out, overlay, prompt, rule, message):
    (tmp_path / "folder").mkdir()
    before = image_path.read_bytes()
    with pytest.raises(InputError, match=message):
        segment_image_file(never_loaded, image_path, prompt, tmp_path / out,
                           tmp_path / overlay if overlay else None, rule)
    assert not (tmp_path / "mask.png").exists() and image_path.read_bytes() == before


def test_unreadable_image_is_reported_before_the_model_loads(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png"):
        segment_image_file(never_loaded, tmp_path / "broken.png", Prompt(box=[1, 1, 5, 5]), tmp_path / "mask.png")



def test_an_overlay_that_cannot_be_written_leaves_an_existing_mask_as_it_was(tmp_path, image_path, click_model):
    from sam4med.engine.predictor import Predictor

    (tmp_path / "mask.png").write_bytes(b"yesterday's mask")
    (tmp_path / "afile").write_bytes(b"a file where the overlay's folder would go")
    with pytest.raises(InputError, match="--overlay .*afile is a file, not a folder"):  # before the model's work
        segment_image_file(Predictor(click_model), image_path, Prompt(box=[1, 1, 20, 20]), tmp_path / "mask.png",
                           tmp_path / "afile" / "overlay.png")
    assert (tmp_path / "mask.png").read_bytes() == b"yesterday's mask"


def test_an_overlay_that_fails_while_written_leaves_an_existing_mask_as_it_was(tmp_path, image_path, click_model,
                                                                                 monkeypatch):
    """A full disk or a read-only folder is found only by writing: --out is replaced after the overlay is written."""
    import errno

    from sam4med.engine import overlays
    from sam4med.engine.predictor import Predictor

    def full_disk(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(overlays, "write_overlay", full_disk)
    (tmp_path / "mask.png").write_bytes(b"yesterday's mask")
    with pytest.raises(OSError, match="No space left") as raised:
        segment_image_file(Predictor(click_model), image_path, Prompt(box=[1, 1, 20, 20]), tmp_path / "mask.png",
                           tmp_path / "overlay.png")
    assert raised.value.filename == str(tmp_path / "overlay.png")  # the file that failed, not --out
    assert (tmp_path / "mask.png").read_bytes() == b"yesterday's mask"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "mask.png"]  # no temporary left behind


def test_an_image_without_contrast_is_flagged_and_still_segmented(tmp_path, click_model, capsys):
    """A blank frame (a constant 16-bit image is windowed to one value) gives a mask that means nothing: said."""
    from sam4med.engine.predictor import Predictor

    Image.fromarray(np.full((64, 80), 4000, np.uint16)).save(tmp_path / "blank.png")
    mask = segment_image_file(Predictor(click_model), tmp_path / "blank.png", Prompt(box=[0, 0, 79, 63]),
                              tmp_path / "mask.png")
    assert mask.shape == (64, 80) and (tmp_path / "mask.png").is_file()
    assert capsys.readouterr().err == (f"warning: {tmp_path / 'blank.png'}: every pixel is [0, 0, 0]; an image without "
                                       "contrast gives a mask that means nothing\n")
    Image.fromarray(np.tile(np.arange(80, dtype=np.uint16) * 50, (64, 1))).save(tmp_path / "ramp.png")
    segment_image_file(Predictor(click_model), tmp_path / "ramp.png", Prompt(box=[0, 0, 79, 63]), tmp_path / "mask.png")
    assert capsys.readouterr().err == ""


def test_an_image_thinner_than_one_embedding_token_at_the_models_size_is_flagged(tmp_path, click_model, capsys):
    """A 4000 x 12 strip is 0.8 px wide at 256: no mask can follow it, and the runtimes differ on it."""
    from sam4med.engine.predictor import Predictor

    strip = np.full((4000, 12), 40, np.uint8)
    strip[1000:2000] = 200
    Image.fromarray(strip).save(tmp_path / "strip.png")
    segment_image_file(Predictor(click_model), tmp_path / "strip.png", Prompt(box=[0, 500, 11, 2500]),
                       tmp_path / "mask.png")
    assert "strip.png: its shorter side becomes 0.8 px at the model's 256 px input" in capsys.readouterr().err
    Image.fromarray(strip[750:1750:4]).save(tmp_path / "shorter.png")  # 250 x 12: 12 px wide at 256
    segment_image_file(Predictor(click_model), str(tmp_path / "shorter.png"), Prompt(box=[0, 50, 11, 200]),
                       str(tmp_path / "mask.png"))  # the Python functions take str paths as well
    assert capsys.readouterr().err == ""

@pytest.mark.parametrize(("out", "box3d", "axis", "message"), [
    ("labels.png", (1, 1, 0, 5, 5, 2), 0, "unknown extension"),
    ("labels.nii.gz", (1, 1, 0, 5, 5, 9), 0, "outside the volume's 4 slices"),
    ("labels.nii.gz", (1, 1, 3, 5, 5, 1), 0, "z0 must not exceed z1"),
    ("labels.nii.gz", (1, 1, 3.6, 5, 5, 3.9), 0, "slice indices"),  # below 4, but 3.9 would round to slice 4
    ("labels.nii.gz", (1, float("nan"), 0, 5, 5, 2), 0, "six finite numbers"),
    ("labels.nii.gz", (1, 1, 0, 5, 5, 2), 3, "--axis"),
    ("labels.nii.gz", (1, 1, 0, 16, 5, 2), 0,
     r"--box3d 1 1 0 16 5 2: x 1..16 and y 1..5 reach outside the 16x16 slices \(x 0..15, y 0..15, the slices cut "
     r"along --axis 0\)"),
    ("labels.nii.gz", (9, 1, 0, 5, 5, 2), 0, "x0 must not exceed x1"),
    ("labels.mhd", (1, 1, 0, 5, 5, 2), 0, "unknown extension"),  # a detached header: its data file apart
    ("volume.nrrd", (1, 1, 0, 5, 5, 2), 0, "is the input"),
    ("volume.nrrd/labels.nii.gz", (1, 1, 0, 5, 5, 2), 0, "volume.nrrd is a file, not a folder"),
])
def test_volume_arguments_are_checked_before_the_model_loads(tmp_path, out, box3d, axis, message):
    volume = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)), str(volume))
    before = volume.read_bytes()
    with pytest.raises(InputError, match=message):
        segment_volume_file(never_loaded, volume, box3d, tmp_path / out, axis)
    assert volume.read_bytes() == before and (out == "volume.nrrd" or not (tmp_path / out).exists())


def test_volume_window_options_are_named_and_a_constant_volume_is_flagged(tmp_path, capsys):
    volume = tmp_path / "volume.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 16, 16), np.float32)), str(volume))
    with pytest.raises(InputError, match=r"--lower-percentile 99, --upper-percentile 1: need 0 <= lower < upper"):
        segment_volume_file(never_loaded, volume, (1, 1, 0, 5, 5, 2), tmp_path / "labels.nii.gz", 0, (99, 1))
    with pytest.raises(AssertionError, match="the model was loaded"):  # flagged before the model loads
        segment_volume_file(never_loaded, str(volume), (1, 1, 0, 5, 5, 2), str(tmp_path / "labels.nii.gz"))
    assert "every voxel is 0.0; a volume without contrast" in capsys.readouterr().err


def test_a_click_for_a_box_only_model_is_refused_by_the_api_too(tmp_path, litemedsam):
    """The command refuses ``--point`` for LiteMedSAM before loading it; a Python caller gets the same line, not a
    mask that ignores the click."""
    from sam4med.engine.predictor import Predictor

    from conftest import make_ellipse_image

    image, _ = make_ellipse_image()
    Image.fromarray(image).save(tmp_path / "image.png")
    with pytest.raises(InputError, match=r"^--point: model litemedsam takes boxes only"):
        segment_image_file(Predictor(litemedsam), tmp_path / "image.png", Prompt(points=[[60, 60]]),
                           tmp_path / "mask.png")
    # where the source knows the model's registry entry, before the model loads; where it cannot (a run's
    # checkpoint may add clicks), once the model is made
    with pytest.raises(InputError, match=r"^--point: model litemedsam takes boxes only"):
        segment_image_file(DeferredPredictor(never_loaded, "litemedsam", False), tmp_path / "image.png",
                           Prompt(points=[[60, 60]]), tmp_path / "mask.png")
    with pytest.raises(InputError, match=r"^--point: model litemedsam takes boxes only"):
        segment_image_file(DeferredPredictor(lambda: Predictor(litemedsam), "litemedsam", None),
                           tmp_path / "image.png", Prompt(points=[[60, 60]]), tmp_path / "mask.png")
    assert not (tmp_path / "mask.png").exists()
