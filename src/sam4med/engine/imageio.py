"""Reading 2D images and masks as SAM-family models take them: every decoding failure is one InputError.

Photos and microscopy (PNG, JPEG, TIFF, BMP) are read with PIL; the medical formats of one 2D image (a DICOM
file such as a radiograph, or a one-slice NIfTI, MetaImage or NRRD file) with SimpleITK, imported only then.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from sam4med.engine.datasets import IMAGE_EXTENSIONS, MEDICAL_EXTENSIONS, Sample, image_extension
from sam4med.engine.errors import InputError, hw, not_there, one_line
from sam4med.engine.runtime import release_free_memory

# PIL modes whose pixels numpy takes as they are stored; others go through convert("RGB").
_HIGH_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "F"}
_NUMPY_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"} | _HIGH_BIT_MODES
_TIFF_SUFFIXES = {".tif", ".tiff"}


def read_image(path: str | Path) -> np.ndarray:
    """Read a 2D image as HxWx3 uint8 RGB, the input of SAM-family models.

    8-bit gray is replicated to three channels, alpha is dropped and palettes are expanded.
    Images of more than 8 bits (16-bit or float gray or colour) are mapped to 8 bits with the
    [0.5, 99.5] percentile window of all their channels together (see ``volumes.window``).
    """
    pixels = read_intensities(path)
    if pixels.dtype != np.uint8:
        from sam4med.engine.volumes import window  # SimpleITK only for images that need it

        pixels = window(pixels)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    pixels = np.ascontiguousarray(pixels)
    release_free_memory()  # the decoder's buffers (twice the pixels' size), else kept by the tuned allocator
    return pixels


def read_intensities(path: str | Path) -> np.ndarray:
    """A 2D image's values as stored (HxW gray or HxWx3 colour, 8 or more bits, alpha dropped, palettes
    expanded, bilevel as 0/255), for a viewer's window and level; NaN or inf is refused."""
    path = Path(path)
    pixels = _stored_pixels(path, expand_palette=True)
    if pixels.ndim == 3:
        pixels = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., 0]  # drop alpha
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    elif pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise InputError(f"{path}: image contains NaN or inf values")
    return pixels


def read_mask(path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read a binary mask as HxW bool: foreground is value > 0 of the first channel (label
    images count as one foreground); JPEG masks and antialiased 0/255 masks use > 127, since
    compression, antialiased drawing or a bilinear resize leave faint non-zero pixels around the
    object. ``shape`` (HxW, or an image's HxWxC) must match."""
    return read_mask_labels(path, shape) > 0


def read_mask_labels(path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A mask's foreground as HxW integer labels, 0 the background: a label image's (or colour mask's) values, so
    that touching objects of two values stay two objects (``engine.objects.object_labels``); a binary mask 0/1
    (an 8-bit mask holding 255 is one: 0/255 with whatever edges), JPEG and antialiased 0/255 masks cut at > 127
    as :func:`read_mask` does; values <= 0 are background."""
    path = Path(path)
    values = read_labels(path, shape)
    if path.suffix.lower() in (".jpg", ".jpeg") or soft_edged(values):
        return (values > 127).astype(np.uint8)
    if values.dtype.kind not in "iu" or (values.dtype == np.uint8 and values.max(initial=0) == 255):
        # bool or float values, and 8-bit masks drawn in 255 whatever else they hold (a blurred or resampled edge
        # wider than soft_edged allows), are one foreground: their values are not labels
        return (values > 0).astype(np.uint8)
    return values if values.dtype.kind == "u" else np.where(values > 0, values, 0)


SOFT_EDGE_PX = 2  # how far from a 255 pixel an antialiased or resampled edge's values reach


def soft_edged(values: np.ndarray) -> bool:
    """Whether an 8-bit mask is 0/255 with soft edges: every value between 0 and 255 lies within ``SOFT_EDGE_PX``
    of a 255 pixel. A label image's objects of other values (1, 2, ... beside 255) lie apart from it and keep
    the > 0 rule."""
    if values.dtype != np.uint8 or values.max(initial=0) != 255:
        return False
    between = (values > 0) & (values < 255)
    if not between.any():
        return False
    from scipy import ndimage  # only for masks with values between 0 and 255

    near_full = ndimage.binary_dilation(values == 255, np.ones((3, 3), bool), iterations=SOFT_EDGE_PX)
    return bool(near_full[between].all())


def read_labels(path: str | Path, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A mask file's values as stored, HxW (palettes as their indices): a label image's object values. A colour
    mask (RGB, alpha dropped) whose channels differ gives each colour but black a label of its own (1, 2, ...
    in the order of the colours), a JPEG one its brightest channel (compression blurs its colours); gray
    stored as colour keeps its value. ``shape`` (HxW, or an image's HxWxC) must match; NaN or inf is refused."""
    path = Path(path)
    pixels = _stored_pixels(path, expand_palette=False)
    if pixels.ndim == 3:
        pixels = _colour_labels(pixels, path) if pixels.shape[-1] >= 3 else pixels[..., 0]
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise InputError(f"{path}: mask contains NaN or inf values")
    if shape is not None and pixels.shape != tuple(shape[:2]):
        raise InputError(f"{path}: mask is {hw(pixels.shape)} (HxW) but the image is {hw(shape)}")
    return pixels


def _colour_labels(pixels: np.ndarray, path: Path) -> np.ndarray:
    """HxW labels of an HxWxC colour mask (see :func:`read_labels`); a mask drawn in green or blue, or with
    objects in several colours, is not read as its red channel alone."""
    colour = pixels[..., :3]
    if (colour == colour[..., :1]).all():
        return colour[..., 0]
    if path.suffix.lower() in (".jpg", ".jpeg"):
        return colour.max(axis=-1)
    if colour.dtype.kind == "f":
        raise InputError(f"{path}: a colour mask of float values (expected integer colours or gray labels)")
    bits = 8 * colour.dtype.itemsize
    packed = sum(colour[..., channel].astype(np.uint64) << np.uint64(bits * (2 - channel)) for channel in range(3))
    values, labels = np.unique(packed, return_inverse=True)
    labels = labels.reshape(colour.shape[:2]) + (values[0] != 0)  # black, where present, is the first value
    return labels.astype(np.uint16 if labels.max() <= np.iinfo(np.uint16).max else np.uint32)


def load_pair(sample: Sample, labels: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The image (HxWx3 uint8) and mask (HxW bool, or with ``labels`` its :func:`read_mask_labels`) of a sample,
    checked to be the same size."""
    if sample.mask_path is None:
        raise InputError(f"{sample.image_path}: sample '{sample.id}' has no mask")
    image = read_image(sample.image_path)
    return image, (read_mask_labels if labels else read_mask)(sample.mask_path, image.shape)


def _stored_pixels(path: Path, expand_palette: bool) -> np.ndarray:
    """The pixels of any 2D image file as stored; palettes as RGB with ``expand_palette``, else as indices."""
    if _is_medical(path):
        return _medical_pixels(path)
    try:
        with _opened(path) as image:
            _say_if_turned(image, path)
            if expand_palette and image.mode in ("P", "PA"):
                return np.asarray(image.convert("RGB"))
            return _pixels(image, path)
    except _TiffPilCannotRead:
        return _tiff_pixels(path)


_EXIF_ORIENTATION = 0x0112
_TURNED_SAID: set[Path] = set()


def _say_if_turned(image: Image.Image, path: Path) -> None:
    """Viewers and browsers turn a photo by its EXIF orientation; sam4med keeps the pixels as stored, as ITK,
    scikit-image and data sets' masks do. Said once per file: a box or click read off a viewer would be misplaced,
    and a mask would not lie over the picture the viewer shows."""
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation not in (1, None) and path not in _TURNED_SAID:
        _TURNED_SAID.add(path)
        from sam4med.engine.runs import warn

        warn(f"{path}: its EXIF orientation ({orientation}) is ignored: pixel coordinates (prompts, masks) are "
             f"those of the image as stored ({image.width} wide, {image.height} high), which viewers show turned "
             "or mirrored")


def _is_medical(path: Path) -> bool:
    """Whether SimpleITK reads ``path``; a missing file or an unknown extension is an InputError here."""
    extension = image_extension(path)
    if extension is None and (path.exists() or path.suffix):
        raise InputError(f"{path}: unknown image extension (expected one of {', '.join(IMAGE_EXTENSIONS)}, "
                         "or a DICOM file)")
    if not path.is_file():
        raise InputError(f"{path}: {not_there(path)}")
    return extension in MEDICAL_EXTENSIONS


def _medical_pixels(path: Path) -> np.ndarray:
    """One 2D image of a medical file as stored (HxW, or HxWxC for colour DICOM). ITK's DICOM reader already
    shows MONOCHROME1 radiographs (low values bright) the MONOCHROME2 way round; ``read_itk_file`` refuses
    NaN in float NIfTI data, which ITK would read as 0."""
    import SimpleITK as sitk

    from sam4med.engine.volumes import read_itk_file

    image = read_itk_file(path, "image")
    size = image.GetSize()
    if image.GetDimension() > 3 or (image.GetDimension() == 3 and size[2] != 1):
        raise InputError(f"{path}: {'x'.join(map(str, size))} voxels; a 2D image must have one slice "
                         "(a volume: sam4med segment-volume, or sam4med annotate on the file itself)")
    components = image.GetNumberOfComponentsPerPixel()
    if components not in (1, 3, 4):
        raise InputError(f"{path}: {components} components per pixel (expected gray, RGB or RGBA)")
    pixels = sitk.GetArrayFromImage(image)
    pixels = pixels.reshape(pixels.shape[-3:] if components > 1 else pixels.shape[-2:])
    return pixels


class _TiffPilCannotRead(Exception):
    """A TIFF whose pixel layout PIL does not know (float64, float16, float RGB): tifffile reads it."""


def _tiff_pixels(path: Path) -> np.ndarray:
    """A TIFF that PIL cannot read (float64, float16, float RGB, planar samples), read with tifffile."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tiff:
            if len(tiff.pages) != 1:
                raise _many_frames(path, len(tiff.pages))
            page = tiff.pages[0]
            pixels = page.asarray()
            planar = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    except InputError:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt or unsupported files
        raise InputError(f"{path}: cannot read image ({one_line(exc)})") from exc
    if planar and pixels.ndim == 3:
        pixels = np.moveaxis(pixels, 0, -1)  # samples stored plane by plane: channels last
    if pixels.dtype.kind not in "biuf" or pixels.ndim not in (2, 3):
        raise InputError(f"{path}: {pixels.dtype} pixels of shape {pixels.shape} (expected real-valued gray or "
                         "colour samples)")
    return pixels


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """A fully decoded single-frame image; every decoding failure becomes one InputError.

    Truncated files must fail here rather than come back partly gray, so PIL's global
    LOAD_TRUNCATED_IMAGES (which other code may have set) is forced off while decoding.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            # an image past Pillow's warning size is read without its warning on stderr (Pillow refuses one
            # twice that size, which becomes the one line below)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                frames = getattr(image, "n_frames", 1)
                if frames > 1:
                    raise _many_frames(path, frames)
                image.load()
                yield image
    except InputError:
        raise
    except Image.DecompressionBombError as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        raise InputError(f"{path}: {size}, more than the {2 * Image.MAX_IMAGE_PIXELS:,} an image may have (Pillow's "
                         "guard against decompression bombs); cut it into smaller images") from exc
    except Exception as exc:  # PIL and tifffile raise many types for corrupt files
        if isinstance(exc, UnidentifiedImageError) and path.suffix.lower() in _TIFF_SUFFIXES:
            raise _TiffPilCannotRead from exc
        raise InputError(f"{path}: cannot read image ({one_line(exc)})") from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _many_frames(path: Path, frames: int) -> InputError:
    return InputError(f"{path}: {frames} frames (pages, or planes read as pages); a 2D image or mask must have one "
                      "(read 3D data with sam4med.engine.volumes.read_volume)")


def _pixels(image: Image.Image, path: Path) -> np.ndarray:
    """Pixel values as stored (palette indices for palette images), channels last."""
    if image.format == "PNG" and image.mode in ("RGB", "RGBA") and _png_bit_depth(path) == 16:
        return _sixteen_bit_colour_png(path)  # PIL cuts them to 8 bits, as colour TIFFs below
    if image.format == "TIFF" and image.mode not in _HIGH_BIT_MODES and _bits(image) > 8:
        import tifffile

        return tifffile.imread(path, key=0)  # PIL cuts colour samples over 8 bits to their high byte
    if image.mode in _NUMPY_MODES:
        return np.asarray(image)
    return np.asarray(image.convert("RGB"))


def _png_bit_depth(path: Path) -> int:
    """The bit depth in a PNG file's header (IHDR, right after the signature)."""
    with path.open("rb") as handle:
        header = handle.read(25)
    return header[24] if len(header) == 25 else 8


def _sixteen_bit_colour_png(path: Path) -> np.ndarray:
    """A 16-bit RGB(A) PNG's samples as stored, read with SimpleITK (whose PNG reader keeps all 16 bits)."""
    import SimpleITK as sitk

    from sam4med.engine.volumes import read_itk_file

    return sitk.GetArrayFromImage(read_itk_file(path, "image"))


def _bits(image: Image.Image) -> int:
    bits = image.tag_v2.get(258, 1)  # TIFF BitsPerSample, one value or one per channel
    return max(bits) if isinstance(bits, tuple) else int(bits)
