"""A small offline data set for the demo: the Shepp-Logan phantom, whose structures give exact masks.

It ships with scikit-image, so the README's first command needs no data from the user and no
network. Variants (rotations, noise, contrast) give the benchmark something to average over.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.data import shepp_logan_phantom
from skimage.transform import resize

from sam4med.engine.objects import connected_components
from sam4med.engine.runs import write_json


def phantom_structures(phantom: np.ndarray) -> np.ndarray:
    """The inner structures: the two dark ventricles, the grey ellipses and the bright small one."""
    values = np.round(phantom, 3)
    structures = np.zeros(phantom.shape, dtype=bool)
    dark = connected_components(values == 0.0, connectivity=1)
    outside = np.unique(np.concatenate([dark[0], dark[-1], dark[:, 0], dark[:, -1]]))
    structures |= (dark > 0) & ~np.isin(dark, outside)
    structures |= (values == 0.298) | (values == 0.4)
    return ndimage.binary_opening(structures, iterations=1)


def build_demo_dataset(out: str | Path, size: int = 256, seed: int = 0) -> Path:
    """Write the phantom data set (8 images) in the sam4med dataset layout; returns its folder."""
    root = Path(out) / "phantom"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    phantom = resize(shepp_logan_phantom(), (size, size), order=0, anti_aliasing=False, preserve_range=True)
    mask = phantom_structures(phantom)
    for rotation in range(4):
        for noise in (0.0, 0.05):
            image = np.rot90(phantom, rotation) + rng.normal(0, noise, phantom.shape)
            pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
            name = f"phantom_rot{rotation * 90}_noise{int(noise * 100):02d}"
            Image.fromarray(pixels).save(root / "images" / f"{name}.png")
            Image.fromarray((np.rot90(mask, rotation) * 255).astype(np.uint8)).save(root / "masks" / f"{name}.png")
    write_json(root / "dataset.json", {
        "name": "phantom",
        "modality": "CT (synthetic phantom)",
        "target": "Shepp-Logan inner structures",
        "source": "skimage.data.shepp_logan_phantom, rotated and with Gaussian noise",
        "licence": "BSD-3-Clause (scikit-image)",
    })
    return root


def run_demo(out: str | Path) -> tuple[Path, Path]:
    """The main job on the bundled default model (LiteMedSAM-click): every default prompt mode on the
    phantom set, then the report; returns the results file and the report."""
    from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
    from sam4med.evaluation.report import write_report

    out = Path(out)
    results = run_benchmark([build_demo_dataset(out / "data")], out / "results", BenchmarkConfig(max_objects_per_image=4))
    return results, write_report(results.parent)
