"""Tiled embeddings: small objects in a large image, each prompt decoded on the tile that holds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.draw import ellipse

from sam4med.engine.errors import InputError
from sam4med.engine.metrics import dice
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import Prompt, center_point, tight_box
from sam4med.engine.sam_model import SamModel
from sam4med.engine.segment import segment_image
from sam4med.engine.tiling import TiledPredictor, tile_boxes, tiles
from conftest import small_blobs


def encoder_and_decoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """"encode" and "decode", in the order any model is called, from now until the test ends."""
    calls: list[str] = []
    for step in ("encode", "decode"):
        def logged(self: SamModel, *args, _original=getattr(SamModel, step), _step=step, **kwargs):
            calls.append(_step)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(SamModel, step, logged)
    return calls


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
    stitched = decoded.masks()  # from each tile's masks, without the batch's float logits at full size
    assert decoded.logits.shape == (4, 1, 1024, 1024) and tiled.encoder_calls == 4  # 3 tiles + the whole image
    assert np.array_equal(stitched, (decoded.logits > 0).numpy()) and stitched[:3].any(axis=(1, 2, 3)).all()
    whole = Predictor(litemedsam)
    whole.set_image(image)
    batch = whole.predict(prompts, multimask=True)
    one_by_one = batch.masks()  # prompt by prompt
    assert np.array_equal(one_by_one, (batch.logits > 0).numpy()) and one_by_one.any()
    for k, mask in enumerate(masks):  # each mask lands where its object is
        assert dice(decoded.masks()[k, 0], mask) > 0.7
        assert tiled.route(prompts[k]) is not None


def test_clicks_spread_over_tiles_go_to_the_whole_image_without_the_home_tiles_mask(litemedsam):
    image, masks = small_blobs(count=2, seed=3)
    tiled = TiledPredictor(litemedsam, tile=256, halo=32)
    tiled.set_image(image)
    first, second = (center_point(m) for m in masks)
    local = Prompt(points=np.array([first]), labels=np.array([1]))
    spread = Prompt(points=np.array([first, second]), labels=np.array([1, 1]))
    assert tiled.route(local) == tiled.home(local) == tiled.home(spread) is not None
    assert tiled.route(spread) is None  # the second click lies outside the first one's tile
    previous = tiled.predict([local]).low_res  # in the home tile's frame
    fed_back = tiled.predict([spread], mask_input=previous)
    assert torch.equal(fed_back.logits, tiled.predict([spread]).logits)  # the home tile's mask is left out
    assert fed_back.logits.shape == (1, 1, 1024, 1024)
    kept = tiled.predict([local], mask_input=previous)  # on its home tile the mask still counts
    assert not torch.equal(kept.logits, tiled.predict([local]).logits)


def test_a_tiled_predictor_records_its_tiling_beside_the_models_record(litemedsam):
    assert Predictor(litemedsam).protocol == litemedsam.protocol()
    assert TiledPredictor(litemedsam, tile=256, halo=16).protocol == {**litemedsam.protocol(),
                                                                     "tiling": {"tile": 256, "halo": 16}}


def test_bad_tiling_is_one_input_error(litemedsam):
    with pytest.raises(InputError, match="--tile 8"):
        TiledPredictor(litemedsam, tile=8)
    with pytest.raises(InputError, match="--halo -1"):
        TiledPredictor(litemedsam, tile=256, halo=-1)


def test_the_benchmark_records_its_tiling_encodes_every_tile_before_decoding_and_scores_on_tiles(tmp_path, monkeypatch):
    """Every tile is encoded in the image's set-up: encode_s is all of its encoding (it was about 0 on tiles,
    encodes being counted in the first mode's decode_s), and no encoder runs on top of decoder results."""
    import json

    from PIL import Image

    from sam4med.evaluation.benchmark import BenchmarkConfig, run_benchmark
    from sam4med.evaluation.summary import load_results

    calls = encoder_and_decoder_calls(monkeypatch)
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
    assert calls[:4] == ["encode"] * 4 and "encode" not in calls[4:] and "decode" in calls  # 2 x 2 tiles



def test_everything_mode_lays_its_grid_on_every_tile_and_finds_small_objects_the_whole_image_misses(click_model,
                                                                                                     monkeypatch):
    """Blobs on points of the tiles' grids (8 per 256 px core: every 32 px from 16) that lie between the
    points of the whole image's grid (8 per 512 px: every 64 px from 32). Every tile is encoded before the first
    decode, so no encoder's activations sit on top of a tile's decoding; each tile done is reported."""
    from sam4med.engine.everything import EverythingSettings, everything_masks

    rng = np.random.default_rng(3)
    image = rng.normal(50, 12, (512, 512, 3))
    masks = []
    for y, x in ((48, 48), (48, 272), (176, 400), (304, 112), (400, 240), (464, 464)):
        mask = np.zeros((512, 512), bool)
        mask[ellipse(y, x, 8, 8, shape=mask.shape)] = True
        image[mask] = rng.normal(190, 12, (int(mask.sum()), 3))
        masks.append(mask)
    image = image.clip(0, 255).astype(np.uint8)
    settings = EverythingSettings(method="points", points_per_side=8)
    tiled = TiledPredictor(click_model, tile=256, halo=32)
    found, heard, calls = {}, {}, encoder_and_decoder_calls(monkeypatch)
    for name, predictor in (("whole", Predictor(click_model)), ("tiled", tiled)):
        calls.clear()
        heard[name] = []
        predictor.set_image(image)
        proposals = everything_masks(predictor, settings, lambda done, total: heard[name].append((done, total)))
        found[name] = [max((dice(p.mask, m) for p in proposals), default=0.0) for m in masks]
    assert calls[:4] == ["encode"] * 4 and "encode" not in calls[4:] and calls.count("decode") >= 4
    assert tiled.grid_regions() == [(t.core, t.extent) for t in tiles((512, 512), 256, 32)]
    assert heard == {"whole": [(1, 1)], "tiled": [(1, 4), (2, 4), (3, 4), (4, 4)]}  # what the annotator shows
    assert min(found["tiled"]) > 0.6 and max(found["whole"]) < 0.5, found


def test_the_tiled_grid_drops_masks_its_tile_cut_and_counts_areas_per_tile(click_model):
    """A band wider than the halo across the tiles' seam: each tile sees only part of it, and those parts end
    on the tile's extent; what survives never does. A blob of 0.04% of the image is 0.16% of a tile: over the
    0.05% floor only per tile."""
    from sam4med.engine.everything import EverythingSettings, generate_masks

    rng = np.random.default_rng(4)
    image = rng.normal(50, 12, (512, 512, 3))
    band = np.zeros((512, 512), bool)
    band[200:260, 150:360] = True  # crosses x = 256, beyond both halos (224 and 288)
    blob = np.zeros((512, 512), bool)
    blob[ellipse(400, 400, 6, 6, shape=blob.shape)] = True
    image[band | blob] = rng.normal(190, 12, (int((band | blob).sum()), 3))
    tiled = TiledPredictor(click_model, tile=256, halo=32)
    proposals = generate_masks(tiled, image.clip(0, 255).astype(np.uint8),
                               EverythingSettings(method="points", points_per_side=8, min_area_fraction=0.001))
    inner_edges = {224, 288}  # x where the two columns of tiles' extents end inside the image
    assert not [p.box for p in proposals if p.overlap(band) and ({p.box[0], p.box[2]} & inner_edges)]
    assert max(p.dice(blob) for p in proposals) > 0.6  # 113 px: 0.0004 of the image, 0.0017 of a tile


def test_a_small_object_in_a_volume_of_large_slices_is_propagated_on_tiles(litemedsam):
    """A blob about 16 px across through slices 1..4 of 768 px slices: whole slices shrink it to 5 px."""
    from sam4med.engine.segment import segment_volume

    rng = np.random.default_rng(5)
    slices, truth = [], []
    for z in range(6):
        mask = np.zeros((768, 768), bool)
        if 1 <= z <= 4:
            mask[ellipse(400, 380, 7 + z % 2, 8, shape=mask.shape)] = True
        slices.append(np.where(mask, rng.normal(200, 10, mask.shape), rng.normal(50, 10, mask.shape))
                      .clip(0, 255).astype(np.uint8))
        truth.append(mask)
    ys, xs = np.nonzero(truth[2])
    box3d = (xs.min() - 2, ys.min() - 2, 1, xs.max() + 2, ys.max() + 2, 4)
    scores = {}
    for name, predictor in (("whole", Predictor(litemedsam)), ("tiled", TiledPredictor(litemedsam, 256, 32))):
        labels = segment_volume(predictor, slices, box3d)
        assert not labels[0].any() and not labels[5].any()
        scores[name] = np.mean([dice(labels[z], truth[z]) for z in range(1, 5)])
    assert scores["tiled"] > 0.8 and scores["tiled"] > scores["whole"] + 0.1, scores


def test_the_decoders_per_image_work_is_kept_for_one_tile_at_a_time_and_remade_to_the_same_masks(click_model):
    image, masks = small_blobs(count=4, seed=5)
    tiled = TiledPredictor(click_model, tile=256, halo=32)
    tiled.set_image(image)
    prompts = [Prompt(points=np.array([center_point(m)]), labels=np.array([1])) for m in masks]
    routes = {tiled.route(p) for p in prompts}
    assert None not in routes and len(routes) >= 3
    first = tiled.predict(prompts, multimask=True)
    holding = [i for i, e in tiled._tile_embeddings.items() if e.decoder_states]
    assert len(tiled._tile_embeddings) == len(routes) and len(holding) == 1
    again = tiled.predict(prompts, multimask=True)  # every tile but the last remakes its state
    assert torch.allclose(first.low_res, again.low_res, atol=1e-4) and torch.equal(first.iou, again.iou)
