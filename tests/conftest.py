"""Shared fixtures: the bundled model (loaded once), synthetic images, and the real data when present."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.draw import ellipse

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets in ../shared/data, which a fresh clone does not have."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present (real data sets are not part of the repository)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def litemedsam():
    """The bundled default model on the CPU, loaded once for the whole session."""
    from sam4med.engine.models import load_model

    return load_model("litemedsam", device="cpu")


def make_ellipse_image(height=200, width=300, centre=(100, 150), radii=(40, 70), seed=0):
    """A bright noisy ellipse on a dark background, and its exact mask."""
    mask = np.zeros((height, width), bool)
    rr, cc = ellipse(*centre, *radii, shape=mask.shape)
    mask[rr, cc] = True
    image = np.where(mask[..., None], 200.0, 40.0) + np.random.default_rng(seed).normal(0, 10, (height, width, 3))
    return image.clip(0, 255).astype(np.uint8), mask


@pytest.fixture(scope="session")
def ellipse_image():
    return make_ellipse_image()


@pytest.fixture()
def small_disk(tmp_path):
    """A 64 KB tmpfs: a disk that fills up (skipped where mounting is not allowed)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@contextmanager
def _held_elsewhere(folder: Path) -> Iterator[int]:
    """Another process holding ``folder`` (engine.runs.sole_writer) until the block ends; yields its pid."""
    script = ("import sys; from pathlib import Path; from sam4med.engine.runs import sole_writer\n"
              "with sole_writer(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.communicate("")  # stdin closed: it lets go and exits


@pytest.fixture()
def held_elsewhere() -> Callable[[Path], AbstractContextManager[int]]:
    """``with held_elsewhere(folder) as pid:`` another process writes into ``folder`` meanwhile."""
    return _held_elsewhere


@pytest.fixture(scope="session")
def click_model():
    """The default click-capable model on the CPU, loaded once."""
    from sam4med.engine.models import load_model

    return load_model("litemedsam-click", device="cpu")


def write_images(folder: Path, count: int = 3, size: tuple[int, int] = (160, 200)) -> dict[str, np.ndarray]:
    """A plain folder of ellipse images (no masks); the true mask of each, by id."""
    folder.mkdir(parents=True, exist_ok=True)
    truths = {}
    for index in range(count):
        image, mask = make_ellipse_image(*size, centre=(70 + 4 * index, 95), radii=(35, 55), seed=index)
        Image.fromarray(image).save(folder / f"case{index}.png")
        truths[f"case{index}"] = mask
    return truths


def write_disc_volume(path: Path, depth: int = 12, first: int = 2, last: int = 9) -> np.ndarray:
    """An NRRD volume (z, y, x) with a bright elliptic disc on slices first..last; returns the true labels."""
    import SimpleITK as sitk

    zz, yy, xx = np.mgrid[:depth, :64, :80]
    truth = ((yy - 32) ** 2 / 18**2 + (xx - 40) ** 2 / 24**2 <= 1) & (zz >= first) & (zz <= last)
    volume = np.where(truth, 220.0, 30.0) + np.random.default_rng(0).normal(0, 5, truth.shape)
    image = sitk.GetImageFromArray(volume.astype(np.float32))
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((10.0, -5.0, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return truth


def write_dataset(root: Path, broken: bool = True, count: int = 2) -> Path:
    """A data set of ellipse images with their masks (and, when ``broken``, one truncated image)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for index in range(count):
        image, mask = make_ellipse_image(128, 160, centre=(60 + 5 * index, 80), radii=(25, 35), seed=index)
        Image.fromarray(image).save(root / "images" / f"case{index}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(root / "masks" / f"case{index}.png")
    if broken:  # a truncated image: recorded as a failure, the run goes on
        good = (root / "images" / "case0.png").read_bytes()
        (root / "images" / "case9.png").write_bytes(good[: len(good) // 2])
        Image.fromarray(np.zeros((128, 160), np.uint8)).save(root / "masks" / "case9.png")
    (root / "dataset.json").write_text(json.dumps({"name": "ellipses", "modality": "synthetic", "target": "ellipse"}),
                                       encoding="utf-8")
    return root


def small_blobs(size: int = 1024, count: int = 12, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """A large noisy image with small bright ellipses (about 10 px across), and each one's mask."""
    rng = np.random.default_rng(seed)
    masks = []
    image = rng.normal(50, 12, (size, size, 3))
    for _ in range(count):
        mask = np.zeros((size, size), bool)
        mask[ellipse(*rng.integers(40, size - 40, 2), *rng.integers(5, 8, 2), shape=mask.shape)] = True
        image[mask] = rng.normal(190, 12, (int(mask.sum()), 3))
        masks.append(mask)
    return image.clip(0, 255).astype(np.uint8), masks


def write_three_blobs(folder: Path) -> list[np.ndarray]:
    """``folder/a.png``: a noisy image with three ellipses of different brightness; their masks."""
    rng = np.random.default_rng(0)
    image = rng.normal(60, 10, (240, 320, 3))
    truths = []
    for cy, cx, ry, rx, value in [(70, 80, 30, 40, 200), (160, 220, 35, 28, 170), (170, 80, 22, 22, 140)]:
        mask = np.zeros((240, 320), bool)
        mask[ellipse(cy, cx, ry, rx, shape=mask.shape)] = True
        image[mask] = rng.normal(value, 10, (int(mask.sum()), 3))
        truths.append(mask)
    folder.mkdir()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / "a.png")
    return truths
