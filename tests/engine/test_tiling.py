"""Tiled embeddings: small objects in a large image, each prompt decoded on the tile that holds it."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.draw import ellipse

from sam4med.engine.errors import InputError
from sam4med.engine.metrics import dice
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import Prompt, tight_box
from sam4med.engine.segment import segment_image
from sam4med.engine.tiling import TiledPredictor, tile_boxes, tiles


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


def test_the_cores_cover_the_image_once_and_the_halo_stays_inside():
    cut = tiles((1000, 700), 256, 32)
    cover = np.zeros((1000, 700), int)
    for tile in cut:
        x0, y0, x1, y1 = tile.core
        cover[y0:y1, x0:x1] += 1
        ex0, ey0, ex1, ey1 = tile.extent
        assert ex0 == max(0, x0 - 32) and ey1 == min(1000, y1 + 32)
    assert (cover == 1).all() and len(cut) == len(tile_boxes((1000, 700), 256)) == 4 * 3


def test_small_objects_in_a_large_image_are_segmented_far_better_on_tiles(litemedsam):
    image, masks = small_blobs()
    whole, tiled = Predictor(litemedsam), TiledPredictor(litemedsam, tile=256, halo=32)
    scores = {"whole": [], "tiled": []}
    for mask in masks:
        prompt = Prompt(box=tight_box(mask, 2))
        scores["whole"].append(dice(segment_image(whole, image, prompt), mask))
        scores["tiled"].append(dice(segment_image(tiled, image, prompt), mask))
    assert np.mean(scores["tiled"]) > 0.85 and np.mean(scores["tiled"]) > np.mean(scores["whole"]) + 0.1, scores
    assert tiled.encoder_calls <= 16  # each tile encoded once, only the tiles that prompts needed


def test_a_prompt_no_tile_holds_goes_to_the_whole_image_and_batches_keep_their_order(litemedsam):
    image, masks = small_blobs(count=3, seed=1)
    tiled = TiledPredictor(litemedsam, tile=256, halo=16)
    tiled.set_image(image)
    spanning = Prompt(box=[100, 100, 900, 900])
    assert tiled.route(spanning) is None
    prompts = [Prompt(box=tight_box(m, 2)) for m in masks] + [spanning]
    decoded = tiled.predict(prompts)
    assert decoded.logits.shape == (4, 1, 1024, 1024) and tiled.encoder_calls == 4  # 3 tiles + the whole image
    for k, mask in enumerate(masks):  # each mask lands where its object is
        assert dice(decoded.masks()[k, 0], mask) > 0.7
        assert tiled.route(prompts[k]) is not None


def test_bad_tiling_is_one_input_error(litemedsam):
    with pytest.raises(InputError, match="--tile 8"):
        TiledPredictor(litemedsam, tile=8)
    with pytest.raises(InputError, match="--halo -1"):
        TiledPredictor(litemedsam, tile=256, halo=-1)


def test_the_benchmark_records_its_tiling_and_scores_on_tiles(tmp_path):
    import json

    from PIL import Image

    from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
    from sam4med.evaluation.summary import load_results

    image, masks = small_blobs(size=512, count=4, seed=2)
    (tmp_path / "blobs" / "images").mkdir(parents=True)
    (tmp_path / "blobs" / "masks").mkdir()
    Image.fromarray(image).save(tmp_path / "blobs" / "images" / "a.png")
    Image.fromarray((np.any(masks, axis=0) * 255).astype(np.uint8)).save(tmp_path / "blobs" / "masks" / "a.png")
    config = BenchmarkConfig(model="litemedsam", modes=("box",), tile=256, halo=16)
    results = run_benchmark([tmp_path / "blobs"], tmp_path / "out", config, device="cpu", show_progress=False)
    protocol = json.loads((tmp_path / "out" / "protocol.json").read_text())
    assert (protocol["tile"], protocol["halo"]) == (256, 16)
    frame = load_results(results)
    assert len(frame) == 4 and frame.dice.mean() > 0.85
