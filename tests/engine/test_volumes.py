"""3D input: reading volumes in each format, windowing, slicing and writing labels back."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sam4med.engine.errors import InputError
from sam4med.engine.volumes import (
    Volume,
    read_label_volume,
    read_volume,
    slices,
    window,
    write_label_volume,
)

SHAPE = (20, 32, 32)  # z, y, x
SPACING = (2.5, 0.8, 0.7)  # z, y, x in mm
ORIGIN = (-10.0, 20.0, 5.0)  # x, y, z in mm


def sphere() -> np.ndarray:
    z, y, x = np.indices(SHAPE)
    inside = (z - 10) ** 2 * 4 + (y - 16) ** 2 + (x - 15) ** 2 < 10**2
    return np.where(inside, 300, -100).astype(np.int16) + (x % 3).astype(np.int16)


def itk_image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(SPACING)))
    image.SetOrigin(ORIGIN)
    return image


def write_dicom_series(array: np.ndarray, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1") -> None:
    """One CT slice file per z, with the tags a series reader needs to order and space them."""
    folder.mkdir(parents=True, exist_ok=True)
    image = itk_image(array)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(array.shape[0]):
        plane = image[:, :, z]
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        for tag, value in {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{z + 1}",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.0",
            "0020|000e": series_uid,
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(SPACING[0]),
        }.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}_{z:03d}.dcm"))
        writer.Execute(plane)


@pytest.mark.parametrize("name", ["sphere.nii.gz", "sphere.nii", "sphere.nrrd", "sphere.mha"])
def test_volume_files_round_trip(tmp_path, name):
    array = sphere()
    sitk.WriteImage(itk_image(array), str(tmp_path / name))
    volume = read_volume(tmp_path / name)
    assert volume.array.dtype == np.float32 and volume.array.shape == SHAPE
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-6)
    np.testing.assert_allclose(volume.origin, ORIGIN, atol=1e-4)
    assert volume.path == tmp_path / name


def test_dicom_series_round_trips(tmp_path):
    array = sphere()
    write_dicom_series(array, tmp_path / "ct")
    write_dicom_series(array[:3], tmp_path / "ct", series_uid="1.2.826.0.1.3680043.2.1125.2")  # a shorter series
    volume = read_volume(tmp_path / "ct")
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.spacing, SPACING, rtol=1e-4)
    np.testing.assert_allclose(volume.origin, ORIGIN, atol=1e-3)


def test_dicom_series_with_a_broken_or_missing_slice(tmp_path, capfd):
    write_dicom_series(sphere(), tmp_path / "ct")
    broken = sorted((tmp_path / "ct").iterdir())[5]
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(InputError, match="ct: DICOM series has missing or unevenly spaced slices"):
        read_volume(tmp_path / "ct")
    broken.unlink()
    with pytest.raises(InputError, match="ct: DICOM series has missing or unevenly spaced slices"):
        read_volume(tmp_path / "ct")
    assert capfd.readouterr().err == ""  # ITK's own "missing slices" warning stays off stderr: our line says it


def test_folder_without_dicom(tmp_path, capfd):
    """One message, ours: ITK's own warning about the missing series stays off stderr."""
    with pytest.raises(InputError, match="no DICOM series found"):
        read_volume(tmp_path)
    assert capfd.readouterr().err == ""


def test_bad_volume_files(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"x")
    with pytest.raises(InputError, match=r"scan.png: unknown volume extension"):
        read_volume(tmp_path / "scan.png")
    with pytest.raises(InputError, match=r"absent.nii.gz: no such file"):
        read_volume(tmp_path / "absent.nii.gz")



@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz", "v.nrrd", "v.mha"])
@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_volume_files(tmp_path, name, cut):
    sitk.WriteImage(itk_image(sphere()), str(tmp_path / name))
    data = (tmp_path / name).read_bytes()
    (tmp_path / f"cut_{name}").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InputError, match=rf"cut_{name}: (cannot read volume|truncated file)") as error:
        read_volume(tmp_path / f"cut_{name}")
    assert "\n" not in str(error.value) and "No such file" not in str(error.value)  # the file is there


def test_a_truncated_metaimage_says_why_in_its_one_line_and_prints_nothing_else(tmp_path, capfd):
    sitk.WriteImage(itk_image(sphere()), str(tmp_path / "v.mha"), useCompression=False)
    data = (tmp_path / "v.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(data[:-1000])
    with pytest.raises(InputError, match=r"cut.mha: cannot read volume \(.*data not read completely"):
        read_volume(tmp_path / "cut.mha")
    assert capfd.readouterr().err == ""
    assert read_volume(tmp_path / "v.mha").array.shape == SHAPE  # the captured stream is given back


@pytest.mark.parametrize("name", ["nan.nrrd", "nan.nii.gz", "nan.nii", "nan.mha"])
def test_nan_volume_is_rejected(tmp_path, name):
    """NIfTI too, although ITK's reader turns its NaN into 0."""
    array = sphere().astype(np.float32)
    array[4, 5, 6] = np.nan
    array[4, 5, 7] = np.inf
    sitk.WriteImage(itk_image(array), str(tmp_path / name))
    with pytest.raises(InputError, match=rf"{name}: volume contains 2 NaN or inf voxels"):
        read_volume(tmp_path / name)
    array[4, 5, 6:8] = 1.0
    sitk.WriteImage(itk_image(array), str(tmp_path / name))
    assert read_volume(tmp_path / name).array.shape == array.shape


def test_float_nifti_is_read_twice_only_when_itk_shows_a_zero_where_nan_may_have_been(tmp_path, monkeypatch):
    import sam4med.engine.volumes as volumes

    calls = []
    counted = volumes.nifti_nonfinite
    monkeypatch.setattr(volumes, "nifti_nonfinite", lambda path: calls.append(path) or counted(path))
    array = sphere().astype(np.float32) + 0.5  # no exact zero anywhere
    sitk.WriteImage(itk_image(array), str(tmp_path / "positive.nii.gz"))
    assert np.array_equal(read_volume(tmp_path / "positive.nii.gz").array, array)
    assert calls == []
    array[4, 5, 6] = np.nan
    sitk.WriteImage(itk_image(array), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputError, match="1 NaN or inf voxels"):
        read_volume(tmp_path / "nan.nii.gz")
    assert calls == [tmp_path / "nan.nii.gz"]


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nrrd"])
def test_nan_label_volume_is_rejected_not_read_as_background(tmp_path, name):
    labels = sphere().astype(np.float32)
    labels[4, 5, 6] = np.nan
    sitk.WriteImage(itk_image(labels), str(tmp_path / name))
    with pytest.raises(InputError, match=rf"{name}: .*NaN"):
        read_label_volume(tmp_path / name)


def test_2d_file_is_not_a_volume(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 8), np.uint8)), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputError, match="flat.nii.gz: image is 2D"):
        read_volume(tmp_path / "flat.nii.gz")


def test_labels_round_trip_on_the_image_grid(tmp_path):
    sitk.WriteImage(itk_image(sphere()), str(tmp_path / "image.nii.gz"))
    volume = read_volume(tmp_path / "image.nii.gz")
    labels = volume.array > 0
    written = write_label_volume(labels, volume, tmp_path / "labels.nrrd")
    back = read_label_volume(written, like=volume)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)
    image = sitk.ReadImage(str(written))
    np.testing.assert_allclose(image.GetSpacing(), tuple(reversed(SPACING)), rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-4)
    assert image.GetDirection() == volume.direction
    many = np.arange(np.prod(SHAPE)).reshape(SHAPE) % 300
    np.testing.assert_array_equal(read_label_volume(write_label_volume(many, volume, tmp_path / "l.nii.gz")), many)


@pytest.mark.parametrize("name", ["l.nii.nii.gz", "l.nii.gz.nii.gz", "L.MHA", "L.NII.GZ", "L.Nrrd", "l.mha.nii"])
def test_label_volumes_named_in_capitals_or_with_doubled_suffixes_are_one_file_read_back_whole(tmp_path, name):
    """ITK picks a writer by the lower-case suffix and derives names from the rest (an upper-case .MHA was
    written as .mhd + .zraw under temporary names, a.nii.nii.gz as a.nii.gz): the name asked for is what appears."""
    sitk.WriteImage(itk_image(sphere()), str(tmp_path / "image.nrrd"))
    volume = read_volume(tmp_path / "image.nrrd")
    (tmp_path / "out").mkdir()
    written = write_label_volume(volume.array > 0, volume, tmp_path / "out" / name)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [name]
    np.testing.assert_array_equal(read_label_volume(written, like=volume), volume.array > 0)
    np.testing.assert_array_equal(read_volume(written).array, volume.array > 0)


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nii", "labels.nrrd"])
@pytest.mark.parametrize("kept", [0.0, 0.5])
def test_a_label_volume_cut_short_by_a_full_disk_leaves_the_file_there_as_it_was(tmp_path, monkeypatch, name, kept):
    """ITK's writers neither throw nor stop on a full disk (a NIfTI is left empty or cut short and the command said
    it succeeded): the written file is read back, and one cut short replaces nothing."""
    sitk.WriteImage(itk_image(sphere()), str(tmp_path / "image.nrrd"))
    volume = read_volume(tmp_path / "image.nrrd")
    (tmp_path / name).write_bytes(b"yesterday's labels")
    write_image = sitk.WriteImage

    def full_disk(image, path, *args, **kwargs):
        write_image(image, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: int(len(data) * kept)])

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    with pytest.raises(InputError, match=f"{name}: cannot write label volume"):
        write_label_volume(volume.array > 0, volume, tmp_path / name)
    assert (tmp_path / name).read_bytes() == b"yesterday's labels"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["image.nrrd", name])  # no temporary left


def test_a_float64_volume_past_float32_is_read_in_float64(tmp_path):
    array = sphere().astype(np.float64)
    array[array > 0] = 1e300
    sitk.WriteImage(itk_image(array), str(tmp_path / "wide.nii.gz"))
    volume = read_volume(tmp_path / "wide.nii.gz")
    assert volume.array.dtype == np.float64 and volume.array.max() == 1e300
    assert np.array_equal(window(volume.array) == 255, array > 0)
    sitk.WriteImage(itk_image(array / 1e290), str(tmp_path / "narrow.nii.gz"))  # within float32: kept as before
    assert read_volume(tmp_path / "narrow.nii.gz").array.dtype == np.float32
    near = np.where(array > 0, 2e38, -2e38)  # float32 holds these, not their difference: one rule with window()
    sitk.WriteImage(itk_image(near), str(tmp_path / "near.nii.gz"))
    volume = read_volume(tmp_path / "near.nii.gz")
    assert volume.array.dtype == np.float64 and np.array_equal(window(volume.array) == 255, array > 0)


def test_label_volume_must_match_its_image(tmp_path):
    sitk.WriteImage(itk_image(sphere()), str(tmp_path / "image.nii.gz"))
    volume = read_volume(tmp_path / "image.nii.gz")
    sitk.WriteImage(itk_image(np.zeros((19, 32, 32), np.uint8)), str(tmp_path / "short.nii.gz"))
    with pytest.raises(InputError, match=r"short.nii.gz: label volume has shape \(19, 32, 32\) but the image"):
        read_label_volume(tmp_path / "short.nii.gz", like=volume)
    moved = itk_image(np.zeros(SHAPE, np.uint8))
    moved.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(moved, str(tmp_path / "moved.nii.gz"))
    with pytest.raises(InputError, match=r"moved.nii.gz: label volume spacing"):
        read_label_volume(tmp_path / "moved.nii.gz", like=volume)
    sitk.WriteImage(itk_image(np.full(SHAPE, 0.5, np.float32)), str(tmp_path / "soft.nii.gz"))
    with pytest.raises(InputError, match="non-integer"):
        read_label_volume(tmp_path / "soft.nii.gz")
    with pytest.raises(InputError, match=r"labels have shape \(2, 2, 2\)"):
        write_label_volume(np.zeros((2, 2, 2), np.uint8), volume, tmp_path / "x.nii.gz")
    for name in ("x.png", "x.mhd", "x.nhdr"):  # a detached header's data file would keep a temporary name
        with pytest.raises(InputError, match="label volumes are written as .nii, .nii.gz, .nrrd, .mha"):
            write_label_volume(np.zeros(SHAPE, np.uint8), volume, tmp_path / name)
    assert not list(tmp_path.glob("x.*"))


def test_percentile_and_fixed_windows():
    values = np.arange(1000, dtype=np.float32)
    values[0], values[-1] = -1e6, 1e6  # outliers the percentiles ignore
    windowed = window(values)
    assert windowed.dtype == np.uint8 and windowed[0] == 0 and windowed[-1] == 255
    assert int(windowed[500]) == pytest.approx(127, abs=2)
    hu = np.array([-1000, -160, 40, 240, 3000], dtype=np.float32)
    np.testing.assert_array_equal(window(hu, level_width=(40, 400)), [0, 0, 128, 255, 255])
    mostly_zero = np.zeros(10000, np.float32)
    mostly_zero[:3] = 5
    assert window(mostly_zero).max() == 255  # empty percentile range falls back to min-max
    assert window(np.full(5, 7.0)).max() == 0
    for bad in ({"level_width": (0, 0)}, {"lower_percentile": 60, "upper_percentile": 40}):
        with pytest.raises(InputError, match="window"):
            window(values, **bad)
    with pytest.raises(InputError, match="NaN"):
        window(np.array([1.0, np.nan]))


def test_windows_of_values_past_float32_and_of_infinite_widths(recwarn):
    huge = np.linspace(0, 1e300, 1000)  # finite float64 that float32 would turn into inf
    windowed = window(huge)
    assert windowed[0] == 0 and windowed[-1] == 255 and int(windowed[500]) == pytest.approx(127, abs=2)
    extreme = np.array([-3e38, 0, 3e38], dtype=np.float32)  # their difference passes float32's range
    np.testing.assert_array_equal(window(extreme, 0, 100), [0, 128, 255])
    for level_width in ((0, np.inf), (np.nan, 10), (1e308, 1e308)):  # the annotator's window from the page
        with pytest.raises(InputError, match="finite"):
            window(huge, level_width=level_width)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_slices_along_each_axis():
    array = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    for axis, expected in ((0, (32, 32)), (1, (20, 32)), (2, (20, 32))):
        planes = list(slices(array, axis))
        assert len(planes) == SHAPE[axis] and planes[0].shape == expected
    np.testing.assert_array_equal(list(slices(array, 1))[5], array[:, 5, :])
    with pytest.raises(InputError, match="axis"):
        slices(array, 3)
    with pytest.raises(InputError, match="3D"):
        slices(array[0])


def test_real_brain_mr_volume(shared_data):
    folder = shared_data / "brain_mr" / "volumes"
    volume = read_volume(folder / "brain1_image.nrrd")
    assert volume.array.shape == (25, 256, 256)
    np.testing.assert_allclose(volume.spacing, (6.5, 0.78125, 0.78125), rtol=1e-6)
    labels = read_label_volume(folder / "brain1_label.nrrd", like=volume)
    assert labels.shape == volume.array.shape and set(np.unique(labels)) == {0, 1}
    axial = [z for z, plane in enumerate(slices(labels)) if plane.any()]
    assert axial == list(range(11, 18))  # the slices brain_mr/images holds for brain1
    with pytest.raises(InputError, match="brain2_label.nrrd: label volume has shape"):
        read_label_volume(folder / "brain2_label.nrrd", like=volume)
    assert isinstance(read_volume(folder / "brain2_image.nrrd"), Volume)
