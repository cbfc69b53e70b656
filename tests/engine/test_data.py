"""2D data sets: reading images and masks, data set layouts, objects, splits and factors."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from PIL import Image, ImageFile
from skimage.draw import disk

from conftest import write_dataset

from sam4med.engine.datasets import Dataset, Sample, load_dataset, load_datasets
from sam4med.engine.imageio import load_pair, read_image, read_intensities, read_labels, read_mask, read_mask_labels
from sam4med.engine.objects import object_factors, object_labels
from sam4med.engine.splits import DEFAULT_FRACTIONS, predefined_split, split_samples, training_split
from sam4med.engine.errors import InputError, check_apart
from sam4med.engine.volumes import window

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)


def save(array: np.ndarray, path: Path, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def square_mask(shape=(40, 50), box=(5, 25, 10, 30)) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[box[0] : box[1], box[2] : box[3]] = 255
    return mask


def make_dataset(root: Path, ids, *, meta=None, image_ext="png", fov=False) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for image_id in ids:
        save(RGB, root / "images" / f"{image_id}.{image_ext}")
        save(square_mask(), root / "masks" / f"{image_id}.png")
        if fov:
            (root / "fov").mkdir(exist_ok=True)
            save(np.full((40, 50), 255, np.uint8), root / "fov" / f"{image_id}.png")
    if meta is not None:
        (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def synthetic_dataset(group_sizes: list[int] | None, n: int = 0) -> Dataset:
    samples = []
    if group_sizes is None:
        samples = [Sample(f"s{i:03d}", Path(f"s{i:03d}.png"), Path(f"m{i:03d}.png")) for i in range(n)]
    else:
        for g, size in enumerate(group_sizes):
            samples += [
                Sample(f"g{g:02d}_{i:02d}", Path(f"g{g:02d}_{i:02d}.png"), group=f"patient{g:02d}") for i in range(size)
            ]
    return Dataset("synthetic", "unknown", "unknown", Path("."), sorted(samples, key=lambda s: s.id))


# --- read_image ---------------------------------------------------------------------------


def test_rgb_png_round_trips(tmp_path):
    image = read_image(save(RGB, tmp_path / "rgb.png"))
    assert image.dtype == np.uint8 and image.shape == (40, 50, 3)
    np.testing.assert_array_equal(image, RGB)


def test_8bit_gray_is_replicated_to_three_channels(tmp_path):
    gray = RGB[..., 0]
    image = read_image(save(gray, tmp_path / "gray.png"))
    assert image.shape == (40, 50, 3)
    for channel in range(3):
        np.testing.assert_array_equal(image[..., channel], gray)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.dstack([RGB, np.full((40, 50), 7, np.uint8)])
    np.testing.assert_array_equal(read_image(save(rgba, tmp_path / "rgba.png")), RGB)


def test_palette_image_is_expanded_to_rgb(tmp_path):
    palette_image = Image.fromarray(RGB).quantize(colors=16)
    palette_image.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_image(tmp_path / "palette.png"), np.asarray(palette_image.convert("RGB")))


def test_16bit_gray_tiff_is_percentile_windowed(tmp_path):
    gray16 = (RNG.random((40, 50)) * 4000).astype(np.uint16)  # 12-bit data in a 16-bit file
    image = read_image(save(gray16, tmp_path / "gray16.tif"))
    assert image.dtype == np.uint8 and image.shape == (40, 50, 3)
    np.testing.assert_array_equal(image[..., 0], window(gray16))
    assert image.max() == 255 and image.min() == 0


def test_16bit_rgb_tiff_keeps_its_low_bits(tmp_path):
    rgb16 = (RGB.astype(np.uint16) * 16)  # 12-bit colour: the high byte alone would be dark
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb16)
    image = read_image(tmp_path / "rgb16.tif")
    np.testing.assert_array_equal(image, window(rgb16))
    assert image.max() == 255


def test_float_tiff_with_nan_is_rejected(tmp_path):
    values = RNG.random((40, 50)).astype(np.float32)
    assert read_image(save(values, tmp_path / "float.tif")).dtype == np.uint8
    values[3, 4] = np.nan
    with pytest.raises(InputError, match="nan_float.tif.*NaN"):
        read_image(save(values, tmp_path / "nan_float.tif"))


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_tiff_that_pil_cannot_read_is_read_with_tifffile(tmp_path, dtype):
    values = (RNG.random((40, 50)) * 1000).astype(dtype)  # PIL: "cannot identify image file"
    tifffile.imwrite(tmp_path / "gray.tif", values)
    np.testing.assert_array_equal(read_image(tmp_path / "gray.tif")[..., 0], window(values))
    np.testing.assert_array_equal(read_mask(tmp_path / "gray.tif"), values > 0)


def test_float_rgb_tiff_stored_plane_by_plane_is_channels_last(tmp_path):
    rgb = RGB.astype(np.float64) / 255
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "planar.tif"), window(rgb))


def test_tiff_of_complex_or_many_float_pages_is_refused(tmp_path):
    tifffile.imwrite(tmp_path / "complex.tif", np.ones((40, 50), np.complex64))
    with pytest.raises(InputError, match="complex.tif: complex64 pixels"):
        read_image(tmp_path / "complex.tif")
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 40, 50), np.float64), photometric="minisblack")
    with pytest.raises(InputError, match="stack.tif: 5 frames"):
        read_image(tmp_path / "stack.tif")


def test_jpeg_reads_close_to_original(tmp_path):
    smooth = np.dstack([np.tile(np.linspace(0, 255, 50, dtype=np.uint8), (40, 1))] * 3)
    image = read_image(save(smooth, tmp_path / "smooth.jpg", quality=95))
    assert image.shape == (40, 50, 3)
    assert np.abs(image.astype(int) - smooth).mean() < 3


def test_a_jpeg_with_an_exif_orientation_is_read_as_stored_and_said_once(tmp_path, capsys):
    """Pixels, prompts and masks stay in the file's own frame, as the data sets' masks are drawn; since viewers
    show the photo turned, a box read off one would be misplaced: the user is told, once per file."""
    stored = np.zeros((40, 50, 3), np.uint8)
    stored[:10, :20] = 255
    exif = Image.Image.getexif(Image.new("RGB", (1, 1)))
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=95)
    image = read_image(tmp_path / "turned.jpg")
    assert image.shape == (40, 50, 3) and image[:10, :20].mean() > 200 and image[30:, 30:].mean() < 50
    read_image(tmp_path / "turned.jpg")
    read_image(tmp_path / "plain.jpg")
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and f"{tmp_path / 'turned.jpg'}: its EXIF orientation (6) is ignored" in err
    assert "(50 wide, 40 high), which viewers show turned or mirrored" in err


@pytest.mark.parametrize("ext", ["png", "jpg", "tif"])
@pytest.mark.parametrize("load_truncated", [False, True])
def test_truncated_file_is_an_input_error(tmp_path, monkeypatch, ext, load_truncated):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)  # as other code may set it
    data = save(RGB, tmp_path / f"full.{ext}").read_bytes()
    truncated = tmp_path / f"truncated.{ext}"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=f"truncated.{ext}") as error:
        read_image(truncated)
    assert "\n" not in str(error.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is load_truncated


def test_a_data_sets_layout_folders_are_inputs_that_no_output_may_enter(tmp_path):
    root = write_dataset(tmp_path / "set", broken=False)
    (root / "fov").mkdir()
    for name in ("case0", "case1"):
        Image.fromarray(np.full((128, 160), 255, np.uint8)).save(root / "fov" / f"{name}.png")
    dataset = load_dataset(root)
    assert [folder.name for folder in dataset.folders] == ["fov", "images", "masks"]
    with pytest.raises(InputError, match="--out .*fov/results: lies inside the input"):
        check_apart(root / "fov" / "results", dataset.folders, roots=[root])


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"image.gif: unknown image extension"):
        read_image(tmp_path / "image.gif")
    with pytest.raises(InputError, match=r"missing.png: no such file$"):
        read_image(tmp_path / "missing.png")
    save(RGB, tmp_path / "case.png")  # a table written where names ignore case
    with pytest.raises(InputError, match=r"Case.PNG: no such file \(case.png is there: names are case-sensitive"):
        read_image(tmp_path / "Case.PNG")
    os.mkfifo(tmp_path / "pipe.png")  # read, it would block; /dev/zero would never end
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    for name in ("pipe.png", "zero.png"):
        with pytest.raises(InputError, match=f"{name}: not a regular file"):
            read_image(tmp_path / name)


def test_multi_page_tiff_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 40, 50), np.uint8))
    with pytest.raises(InputError, match="stack.tif: 5 frames"):
        read_image(tmp_path / "stack.tif")


# --- medical 2D formats (SimpleITK) -------------------------------------------------------

RADIOGRAPH = (np.arange(40 * 50).reshape(40, 50) * 3 % 4000).astype(np.uint16)  # 12-bit values


def write_dicom(array: np.ndarray, path: Path, photometric: str = "MONOCHROME2") -> Path:
    """A one-frame DICOM file; GDCM writes MONOCHROME2, so MONOCHROME1 is set in the written header."""
    written = path.with_name(path.name + ".dcm")  # ITK picks its writer by extension; the file may have none
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=array.ndim == 3), str(written))
    data = written.read_bytes()
    written.unlink()
    assert data.count(b"MONOCHROME2") == (array.ndim == 2)
    path.write_bytes(data.replace(b"MONOCHROME2", photometric.encode()))
    return path


def test_dicom_radiograph_is_windowed_like_a_16bit_tiff(tmp_path):
    dicom = write_dicom(RADIOGRAPH, tmp_path / "chest.dcm")
    assert np.array_equal(read_intensities(dicom), RADIOGRAPH)
    tifffile.imwrite(tmp_path / "chest.tif", RADIOGRAPH)
    assert np.array_equal(read_image(dicom), read_image(tmp_path / "chest.tif"))


def test_monochrome1_dicom_reads_with_low_values_bright(tmp_path):
    normal = read_image(write_dicom(RADIOGRAPH, tmp_path / "m2.dcm"))
    inverted = read_image(write_dicom(RADIOGRAPH, tmp_path / "m1.dcm", "MONOCHROME1"))
    assert np.abs(normal.astype(int) + inverted.astype(int) - 255).max() <= 1
    assert inverted[0, 0, 0] == 255 and normal[0, 0, 0] == 0


def test_colour_dicom_and_dicom_without_extension(tmp_path):
    colour = read_image(write_dicom(RGB, tmp_path / "IM0001"))
    assert np.array_equal(colour, RGB)


@pytest.mark.parametrize("shape", [(40, 50), (1, 40, 50)])
def test_one_slice_nifti_is_a_2d_image_and_mask(tmp_path, shape):
    sitk.WriteImage(sitk.GetImageFromArray(RADIOGRAPH.astype(np.int16).reshape(shape)), str(tmp_path / "x.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray((square_mask() > 0).astype(np.uint8).reshape(shape)), str(tmp_path / "m.nii.gz"))
    assert read_image(tmp_path / "x.nii.gz").shape == (40, 50, 3)
    assert np.array_equal(read_mask(tmp_path / "m.nii.gz", (40, 50)), square_mask() > 0)


def test_medical_files_that_are_not_one_2d_image_are_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 40, 50), np.float32)), str(tmp_path / "ct.nii.gz"))
    with pytest.raises(InputError, match=r"ct.nii.gz: 50x40x3 voxels; a 2D image must have one slice"):
        read_image(tmp_path / "ct.nii.gz")
    with_nan = RADIOGRAPH.astype(np.float32)
    with_nan[3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(with_nan), str(tmp_path / "nan.nii"))
    with pytest.raises(InputError, match=r"nan.nii: image contains 1 NaN or inf values"):
        read_image(tmp_path / "nan.nii")
    (tmp_path / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 40)
    with pytest.raises(InputError, match=r"broken.dcm: cannot read image") as error:
        read_image(tmp_path / "broken.dcm")
    assert "\n" not in str(error.value)


def test_dataset_of_medical_files_keys_ids_without_their_extension(tmp_path):
    root = tmp_path / "xray"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    write_dicom(RADIOGRAPH, root / "images" / "1.2.840.113619.2.5")  # a UID file name, no extension
    sitk.WriteImage(sitk.GetImageFromArray(RADIOGRAPH), str(root / "images" / "b.nii.gz"))
    save(square_mask(), root / "masks" / "1.2.840.113619.2.5.png")
    sitk.WriteImage(sitk.GetImageFromArray(square_mask()), str(root / "masks" / "b.nii.gz"))
    dataset = load_dataset(root)
    assert [s.id for s in dataset] == ["1.2.840.113619.2.5", "b"]
    for sample in dataset:
        image, mask = load_pair(sample)
        assert image.shape == (40, 50, 3) and mask.sum() == 400


# --- read_mask ----------------------------------------------------------------------------


@pytest.mark.parametrize("foreground", [255, 1, 7])
def test_mask_foreground_is_nonzero(tmp_path, foreground):
    mask = square_mask() // 255 * foreground
    np.testing.assert_array_equal(read_mask(save(mask, tmp_path / "mask.png")), mask > 0)


def test_a_colour_mask_gives_each_colour_but_black_a_label_and_gray_stored_as_colour_keeps_its_values(tmp_path):
    """A mask drawn in green (its red channel empty) is not read as empty, nor a blue object left out."""
    red, blue = square_mask() > 0, square_mask(box=(30, 38, 35, 45)) > 0
    mask = np.zeros((40, 50, 3), np.uint8)
    mask[red, 0] = 255
    mask[blue, 2] = 200
    labels = read_labels(save(mask, tmp_path / "mask.png"))
    assert labels.dtype == np.uint16 and set(np.unique(labels)) == {0, 1, 2}
    assert len(np.unique(labels[red])) == len(np.unique(labels[blue])) == 1 and labels[red][0] != labels[blue][0]
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), red | blue)
    green = np.dstack([np.zeros((40, 50), np.uint8), square_mask(), np.zeros((40, 50), np.uint8)])
    np.testing.assert_array_equal(read_mask(save(green, tmp_path / "green.png")), red)
    rgba = np.dstack([green, np.full((40, 50), 255, np.uint8)])  # opaque alpha is not a colour
    np.testing.assert_array_equal(read_mask(save(rgba, tmp_path / "rgba.png")), red)
    gray = np.repeat((square_mask() // 255 * 7)[..., None], 3, axis=2)
    np.testing.assert_array_equal(read_labels(save(gray, tmp_path / "gray.png")), square_mask() // 255 * 7)
    jpeg = read_mask(save(green, tmp_path / "green.jpg", quality=75))  # its brightest channel, > 127
    assert (jpeg != red).sum() < 10


def test_a_sixteen_bit_colour_png_keeps_its_sixteen_bits(tmp_path):
    """Pillow reads 16-bit RGB(A) PNG samples as their high byte: values below 256 would all be 0."""
    import struct
    import zlib

    rgb16 = RGB.astype(np.uint16) + 40  # 40..295: most below 256, which the high byte alone reads as 0
    for name, samples in (("rgb16.png", rgb16), ("rgba16.png", np.dstack([rgb16, np.full((40, 50), 65535, np.uint16)]))):
        height, width, channels = samples.shape
        rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", width, height, 16, {3: 2, 4: 6}[channels], 0, 0, 0)
        (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                                      + chunk(b"IEND", b""))
        assert Image.open(tmp_path / name).mode in ("RGB", "RGBA")  # what Pillow makes of it
        np.testing.assert_array_equal(read_intensities(tmp_path / name), rgb16)
        np.testing.assert_array_equal(read_image(tmp_path / name), window(rgb16))


def test_an_image_past_pillows_warning_size_is_read_quietly_and_one_past_its_limit_is_one_line(tmp_path, monkeypatch):
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # Pillow warns past this and refuses past twice this
    path = save(RGB, tmp_path / "large.png")  # 2000 pixels
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(read_image(path), RGB)
    assert not [w for w in shown if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 900)
    with pytest.raises(InputError, match=r"large.png: 2,000 pixels, more than the 1,800 an image may have .*cut it"):
        read_image(path)


def test_jpeg_mask_ignores_compression_noise(tmp_path):
    mask = read_mask(save(square_mask(), tmp_path / "mask.jpg", quality=75))
    assert (mask != (square_mask() > 0)).sum() < 10


def test_an_antialiased_or_resized_0_255_mask_is_read_at_half_and_labels_beside_255_keep_the_nonzero_rule(tmp_path):
    """A disk drawn at 4x and shrunk with Pillow's default filter has a ring of values between 0 and 255; read > 0
    the ring made the object 7% larger (Dice 0.967 with the disk it was drawn as, against 0.998 at half)."""
    large = np.zeros((400, 400), np.uint8)
    large[disk((200, 200), 120)] = 255
    small = np.asarray(Image.fromarray(large).resize((100, 100), Image.Resampling.BILINEAR))
    truth = np.zeros((100, 100), bool)
    truth[disk((49.5, 49.5), 30)] = True
    assert ((small > 0) & (small < 255)).sum() > 100  # the soft ring
    mask = read_mask(save(small, tmp_path / "soft.png"))
    assert np.array_equal(mask, small > 127) and abs(int(mask.sum()) - int(truth.sum())) < 20
    labels = np.zeros((100, 100), np.uint8)
    labels[10:30, 10:30], labels[60:90, 60:90], labels[40, 40] = 255, 100, 3  # objects of three values, apart
    assert np.array_equal(read_mask(save(labels, tmp_path / "labels.png")), labels > 0)


def test_mask_size_mismatch_names_file_and_both_sizes(tmp_path):
    path = save(square_mask(), tmp_path / "mask.png")
    assert read_mask(path, (40, 50, 3)).shape == (40, 50)
    with pytest.raises(InputError, match=r"mask.png: mask is 40x50 \(HxW\) but the image is 40x60"):
        read_mask(path, (40, 60))


def test_load_pair_checks_sizes_and_mask(tmp_path):
    image = save(RGB, tmp_path / "a.png")
    good = Sample("a", image, save(square_mask(), tmp_path / "a_mask.png"))
    loaded, mask = load_pair(good)
    assert loaded.shape == (40, 50, 3) and mask.dtype == bool and mask.sum() == 20 * 20
    with pytest.raises(InputError, match=r"b_mask.png: mask is 30x50 \(HxW\) but the image is 40x50"):
        load_pair(Sample("b", image, save(square_mask((30, 50)), tmp_path / "b_mask.png")))
    with pytest.raises(InputError, match="a.png: sample 'a' has no mask"):
        load_pair(Sample("a", image))


# --- objects ------------------------------------------------------------------------------


def sizes(mask, **kwargs):
    labels, kept = object_labels(mask, **kwargs)
    return [int((labels == label).sum()) for label in kept]


def test_objects_are_8_connected_components_in_raster_order():
    mask = np.zeros((20, 20), bool)
    mask[10:15, 2:7] = True  # 25 px, starts lower
    mask[1:3, 12:14] = True  # 4 px, starts first in raster order
    mask[3, 14] = True  # touches the 2x2 square diagonally only
    mask[18, 18] = True  # a speck
    assert sizes(mask) == [5, 25, 1]
    assert sizes(mask, connectivity=1) == [4, 1, 25, 1]
    assert sizes(mask, min_area=2) == [5, 25]
    assert sizes(np.zeros((5, 5), bool)) == []


def test_touching_objects_of_two_labels_stay_two_objects(tmp_path):
    """A label image or a colour mask names its objects: two touching ones were one object (one box round both)."""
    labels = np.zeros((20, 20), np.uint16)
    labels[2:10, 2:8], labels[2:10, 8:14] = 1, 2  # side by side
    labels[15:18, 2:5] = labels[15:18, 10:13] = 3  # one label in two parts: two objects, as a binary mask's
    assert sizes(labels) == [48, 48, 9, 9]
    assert sizes(labels > 0) == [96, 9, 9]  # the binary view of the same pixels
    colours = np.zeros((20, 20, 3), np.uint8)
    colours[2:10, 2:8] = (255, 0, 0)
    colours[2:10, 8:14] = (0, 255, 0)
    read = read_mask_labels(save(colours, tmp_path / "colours.png"))
    assert sizes(read) == [48, 48]
    np.testing.assert_array_equal(read > 0, read_mask(tmp_path / "colours.png"))
    soft = np.zeros((20, 20), np.uint8)  # an antialiased 0/255 mask: one object, cut at > 127 as read_mask does
    soft[4:12, 4:12], soft[4:12, 12] = 255, 100
    assert set(np.unique(read_mask_labels(save(soft, tmp_path / "soft.png")))) == {0, 1}
    blurred = np.zeros((20, 20), np.uint8)  # 0/255 with an edge too wide for soft_edged: one foreground, not rings
    blurred[6:14, 6:14] = 255
    for width, value in enumerate((200, 150, 100, 50), start=1):
        ring = np.zeros((20, 20), bool)
        ring[6 - width:14 + width, 6 - width:14 + width] = True
        ring[7 - width:13 + width, 7 - width:13 + width] = False
        blurred[ring] = value
    assert sizes(read_mask_labels(save(blurred, tmp_path / "blurred.png"))) == [16 * 16]
    classes = np.zeros((20, 20), np.uint8)  # an 8-bit label image (classes 1 and 2 side by side): two objects
    classes[2:10, 2:8], classes[2:10, 8:14] = 1, 2
    assert sizes(read_mask_labels(save(classes, tmp_path / "classes.png"))) == [48, 48]
    signed = np.array([[-1, 0, 5]], np.int16)  # values <= 0 are background
    assert read_mask_labels(save(signed, tmp_path / "signed.tif")).tolist() == [[0, 0, 5]]


def test_object_labels_rejects_bad_input():
    with pytest.raises(InputError, match="2D"):
        object_labels(np.zeros((2, 4, 4), bool))
    with pytest.raises(InputError, match="connectivity"):
        object_labels(np.zeros((4, 4), bool), connectivity=3)


# --- load_dataset -------------------------------------------------------------------------


def test_dataset_folder_with_description_groups_and_fov(tmp_path):
    meta = {"name": "toy", "modality": "CT", "target": "liver", "groups": {"b": "p1", "a": "p1", "c": "p2"}}
    root = make_dataset(tmp_path / "toy_folder", ["c", "a", "b"], meta=meta, fov=True)
    (root / "images" / ".DS_Store").write_bytes(b"junk")  # hidden files are skipped
    dataset = load_dataset(root)
    assert (dataset.name, dataset.modality, dataset.target, len(dataset)) == ("toy", "CT", "liver", 3)
    assert [s.id for s in dataset] == ["a", "b", "c"]
    assert {g: [s.id for s in members] for g, members in dataset.groups.items()} == {"p1": ["a", "b"], "p2": ["c"]}
    assert dataset.samples[0] == Sample(
        "a", root / "images" / "a.png", root / "masks" / "a.png", "p1", root / "fov" / "a.png"
    )
    assert load_dataset(root, modality="MRI").modality == "MRI"


def test_dataset_folder_without_description(tmp_path):
    dataset = load_dataset(make_dataset(tmp_path / "plain", ["x", "y"], image_ext="jpg"))
    assert (dataset.name, dataset.modality, dataset.target) == ("plain", "unknown", "unknown")
    assert [s.image_path.name for s in dataset] == ["x.jpg", "y.jpg"]
    assert all(s.group is None and s.fov_path is None for s in dataset)
    image, mask = load_pair(dataset.samples[0])
    assert image.shape == (40, 50, 3) and mask.sum() == 400


def test_explicit_image_and_mask_folders_match_by_stem(tmp_path):
    (tmp_path / "study" / "img").mkdir(parents=True)
    (tmp_path / "study" / "gt").mkdir()
    for image_id in ["02", "01"]:
        save(RGB, tmp_path / "study" / "img" / f"{image_id}.tif")
        save(square_mask(), tmp_path / "study" / "gt" / f"{image_id}.png")
    dataset = load_dataset(images=tmp_path / "study" / "img", masks=tmp_path / "study" / "gt", name="study2")
    assert dataset.name == "study2" and [s.id for s in dataset] == ["01", "02"]
    assert dataset.samples[1].mask_path == tmp_path / "study" / "gt" / "02.png"
    assert len(load_dataset(tmp_path / "study", images="img", masks="gt")) == 2


def test_image_without_mask(tmp_path):
    root = make_dataset(tmp_path / "d", ["a", "b"])
    (root / "masks" / "b.png").unlink()
    with pytest.raises(InputError, match=r"images/b.png: no mask in .*masks"):
        load_dataset(root)
    dataset = load_dataset(root, require_masks=False)
    assert [s.mask_path is None for s in dataset] == [False, True]
    with pytest.raises(InputError, match="no masks folder"):
        load_dataset(images=root / "images")
    assert len(load_dataset(images=root / "images", require_masks=False)) == 2


def test_mask_without_image(tmp_path):
    root = make_dataset(tmp_path / "d", ["a"])
    save(square_mask(), root / "masks" / "orphan.png")
    with pytest.raises(InputError, match=r"masks/orphan.png: mask without an image of id 'orphan'"):
        load_dataset(root)
    images_only = load_dataset(root, require_masks=False)  # priors, prediction: masks are not needed
    assert [s.id for s in images_only] == ["a"] and images_only.samples[0].mask_path is not None


def test_unknown_file_in_images_is_named(tmp_path):
    root = make_dataset(tmp_path / "d", ["a"])
    (root / "images" / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(InputError, match=r"images/notes.txt: not an image file"):
        load_dataset(root)


def test_duplicate_ids_are_rejected(tmp_path):
    root = make_dataset(tmp_path / "d", ["a"])
    save(RGB, root / "images" / "a.jpg")
    with pytest.raises(InputError, match=r"a.png: id 'a' is also used by a.jpg"):
        load_dataset(root)


def test_bad_description_and_missing_group(tmp_path):
    root = make_dataset(tmp_path / "d", ["a", "b"])
    (root / "dataset.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(InputError, match=r"dataset.json: cannot read"):
        load_dataset(root)
    (root / "dataset.json").write_text(json.dumps({"groups": {"a": "p1"}}), encoding="utf-8")
    with pytest.raises(InputError, match=r"images/b.png: no entry in dataset.json groups"):
        load_dataset(root)
    folder = make_dataset(tmp_path / "folder", ["a"])
    (folder / "dataset.json").mkdir()  # not passed over: its groups would be lost from every split
    with pytest.raises(InputError, match=r"folder/dataset.json: cannot read data set description \(.*directory"):
        load_dataset(folder)


@pytest.mark.parametrize("name", ["../escape", "/tmp/anywhere", "..", "a\\b", "", " padded", "tab\tname", 7, ["x"]])
def test_a_data_set_name_must_be_one_safe_path_component(tmp_path, name):
    """The name becomes part of output paths (priors, overlays): it must not lead outside --out."""
    root = make_dataset(tmp_path / "d", ["a"], meta={"name": name})
    with pytest.raises(InputError, match="dataset.json|data set name"):
        load_dataset(root)


@pytest.mark.parametrize(("encoding", "message"), [
    ({"format": "png uint8", "background": 255, "foreground": 0}, "declares background 255 and foreground 0"),
    ({"foreground": 0}, "foreground 0"),
    ("inverted", '"mask" must describe the mask encoding'),
])
def test_a_declared_mask_encoding_other_than_background_zero_is_refused(tmp_path, encoding, message):
    """Inverted masks were read with background and object swapped (Dice of the background, without a word)."""
    root = make_dataset(tmp_path / "d", ["a"], meta={"name": "inv", "mask": encoding})
    with pytest.raises(InputError, match=message):
        load_dataset(root)


@pytest.mark.parametrize("encoding", [{"format": "png uint8", "background": 0, "foreground": 255},
                                      {"background": 0, "foreground": 1}, {"format": "png uint16"}])
def test_the_mask_encodings_sam4med_reads_are_accepted(tmp_path, encoding):
    root = make_dataset(tmp_path / "d", ["a"], meta={"name": "ok", "mask": encoding})
    assert [sample.id for sample in load_dataset(root).samples] == ["a"]


def test_modality_and_target_must_be_strings(tmp_path):
    root = make_dataset(tmp_path / "d", ["a"], meta={"name": "ok", "modality": ["x"]})
    with pytest.raises(InputError, match='"modality" must be a string'):
        load_dataset(root)


def test_the_same_data_set_twice_is_refused(tmp_path):
    first = make_dataset(tmp_path / "one", ["a"], meta={"name": "polyps"})
    second = make_dataset(tmp_path / "two", ["b"], meta={"name": "polyps"})
    assert [d.name for d in load_datasets([first])] == ["polyps"]
    with pytest.raises(InputError, match="also the name of"):
        load_datasets([first, first])
    with pytest.raises(InputError, match="two: data set name 'polyps' is also the name of"):
        load_datasets([first, second])


def test_one_folder_given_alone_is_one_data_set_and_none_is_refused(tmp_path):
    root = make_dataset(tmp_path / "one", ["a"], meta={"name": "polyps"})
    assert [d.name for d in load_datasets(str(root))] == ["polyps"]  # not a data set per character of the path
    assert [d.name for d in load_datasets(root)] == ["polyps"]
    with pytest.raises(InputError, match="--data: no data set given"):
        load_datasets([])


def test_missing_folders(tmp_path):
    with pytest.raises(InputError, match="images folder not found"):
        load_dataset(tmp_path)
    with pytest.raises(InputError, match="give a data set folder"):
        load_dataset()


# --- splits -------------------------------------------------------------------------------


def test_group_split_keeps_each_group_on_one_side():
    dataset = synthetic_dataset([1, 7, 3, 12, 5, 2, 9, 4, 6, 8, 3, 10, 2, 5, 7])
    for seed in range(5):
        split = split_samples(dataset, seed=seed)
        assert sorted(s.id for side in split.values() for s in side) == [s.id for s in dataset]
        sides_of_group: dict[str, set[str]] = {}
        for side, members in split.items():
            for sample in members:
                sides_of_group.setdefault(sample.group, set()).add(side)
        assert all(len(sides) == 1 for sides in sides_of_group.values())
        assert abs(len(split["train"]) / len(dataset) - 0.7) < 0.15
        assert all(split.values())
    assert split_samples(dataset, seed=3) == split_samples(dataset, seed=3)
    assert split_samples(dataset, seed=3) != split_samples(dataset, seed=4)


def test_split_without_groups_reaches_fractions():
    dataset = synthetic_dataset(None, 100)
    split = split_samples(dataset, seed=1)
    assert {side: len(members) for side, members in split.items()} == {"train": 70, "val": 10, "test": 20}
    assert split == split_samples(dataset, seed=1)
    assert len(split_samples(dataset, {"a": 0.5, "b": 0.5})["a"]) == 50
    members = split["test"]
    assert members == sorted(members, key=lambda s: s.id)  # data-set order within a side


def test_bad_fractions():
    with pytest.raises(InputError, match="fractions"):
        split_samples(synthetic_dataset(None, 10), {"train": 0.8, "test": 0.3})
    with pytest.raises(InputError, match="fractions"):
        split_samples(synthetic_dataset(None, 10), {"train": 1.0, "test": 0.0})


def test_predefined_split():
    samples = [
        Sample("a", Path("a.png"), group="training"),
        Sample("b", Path("b.png"), group="Test"),
        Sample("c", Path("c.png"), group="validation"),
        Sample("d", Path("d.png"), group="train"),
    ]
    dataset = Dataset("toy", "unknown", "unknown", Path("."), samples)
    split = predefined_split(dataset)
    assert list(split) == ["train", "val", "test"]
    assert [s.id for s in split["train"]] == ["a", "d"]
    with pytest.raises(InputError, match="use predefined_split"):
        split_samples(dataset)
    with pytest.raises(InputError, match="sample 'g00_00' has group 'patient00', not a split name"):
        predefined_split(synthetic_dataset([2, 2]))
    only_test = Dataset("toy", "unknown", "unknown", Path("."),
                        [Sample(k, Path(f"{k}.png"), group="test") for k in "ab"])
    with pytest.raises(InputError, match="its groups name no training side"):
        training_split(only_test, DEFAULT_FRACTIONS, 0)


def test_a_split_refused_for_too_few_groups_says_so_rather_than_too_few_images():
    """Eight images of one patient: 'too few images' sent the user looking for more images."""
    with pytest.raises(InputError, match=r"8 images in 1 group\(s\) are too few for a train/val/test split "
                                         r"\(its val side would be empty; a group's images stay on one side\)"):
        training_split(synthetic_dataset([8]), DEFAULT_FRACTIONS, 0)
    with pytest.raises(InputError, match=r": 2 images are too few"):
        training_split(synthetic_dataset(None, 2), DEFAULT_FRACTIONS, 0)


# --- object factors -----------------------------------------------------------------------


def test_object_factors_of_a_disc():
    mask = np.zeros((200, 200), bool)
    mask[disk((100, 100), 30)] = True
    image = np.full((200, 200, 3), 50, np.uint8)
    image[mask] = 200
    factors = object_factors(image, mask)
    assert factors["object_area"] == mask.sum()
    assert factors["area_fraction"] == pytest.approx(mask.sum() / 200**2)
    assert factors["boundary_complexity"] == pytest.approx(1, abs=0.1)
    assert factors["contrast"] == pytest.approx(150 / 255)


def test_object_factors_ragged_shape_and_edge_cases():
    comb = np.zeros((60, 60), bool)
    comb[10:50, 10:50:2] = True
    comb[10:12, 10:50] = True
    image = np.zeros((60, 60), np.uint8)
    assert object_factors(image, comb)["boundary_complexity"] > 3
    assert object_factors(image, comb)["contrast"] == 0
    assert np.isnan(object_factors(image, np.ones((60, 60), bool))["contrast"])
    with pytest.raises(InputError, match="empty"):
        object_factors(image, np.zeros((60, 60), bool))
    with pytest.raises(InputError, match="60x50 but the image is 60x60"):
        object_factors(image, np.ones((60, 50), bool))


# --- real data ----------------------------------------------------------------------------

REAL_PAIRS = {"kvasir_seg": 998, "cvc_clinicdb": 609, "monuseg": 30, "drive": 40, "isbi2012_em": 30, "brain_mr": 10}


@pytest.mark.parametrize("name", REAL_PAIRS)
def test_real_dataset_loads(shared_data, name):
    dataset = load_dataset(shared_data / name)
    assert dataset.name == name and len(dataset) == REAL_PAIRS[name]
    for sample in dataset:
        image, mask = load_pair(sample)
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert mask.any(), sample.mask_path
    assert all(s.fov_path is not None for s in dataset) == (name == "drive")


def test_real_cvc_split_keeps_video_sequences_together(shared_data):
    dataset = load_dataset(shared_data / "cvc_clinicdb")
    assert len(dataset.groups) == 29
    split = split_samples(dataset, seed=0)
    groups_by_side = {side: {s.group for s in members} for side, members in split.items()}
    assert not groups_by_side["train"] & groups_by_side["val"]
    assert not groups_by_side["train"] & groups_by_side["test"]
    assert not groups_by_side["val"] & groups_by_side["test"]
    assert sum(len(members) for members in split.values()) == 609


def test_real_predefined_splits(shared_data):
    drive = predefined_split(load_dataset(shared_data / "drive"))
    assert {side: len(members) for side, members in drive.items()} == {"train": 20, "test": 20}
    monuseg = predefined_split(load_dataset(shared_data / "monuseg"))
    assert {side: len(members) for side, members in monuseg.items()} == {"train": 24, "val": 6}
