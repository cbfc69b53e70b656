"""The shared-image decoder computes what segment_anything's MaskDecoder computes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything.modeling.mask_decoder import MaskDecoder

from sam4med.engine.decoder import REJECTED_LOGIT, SharedImageDecoder, supports
from sam4med.engine.everything import EverythingSettings, generate_masks
from sam4med.engine.sam_model import Embedding, SamModel
from sam4med.engine.predictor import Predictor
from sam4med.engine.prompts import Prompt

from conftest import make_ellipse_image

# Logits reach about +-40 (LiteMedSAM's unused multimask outputs about +-0.5); the re-associated
# products differ from the reference by float rounding (measured: at most 1e-6 of the logits' range),
# far below anything that moves a mask boundary.
RELATIVE_TOLERANCE = 1e-5
IOU_TOLERANCE = 1e-5


def _assert_logits_close(fast: torch.Tensor, slow: torch.Tensor) -> None:
    scale = float(slow.abs().max())
    assert scale > 0.1  # real logits, not an empty comparison
    assert float((fast - slow).abs().max()) <= RELATIVE_TOLERANCE * scale + 1e-6


@pytest.fixture(scope="module")
def reference(litemedsam) -> SamModel:
    return SamModel(litemedsam.spec, litemedsam.network, litemedsam.weights_sha256, litemedsam.device,
                    use_shared_decoder=False)


@pytest.fixture(scope="module")
def embedding(litemedsam) -> Embedding:
    image, _ = make_ellipse_image()
    return litemedsam.encode(image)


def _prompts(kind: str, count: int, seed: int = 0) -> list[Prompt]:
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        x0, y0 = rng.uniform(0, 150), rng.uniform(0, 100)
        box = np.array([x0, y0, x0 + rng.uniform(20, 140), y0 + rng.uniform(20, 95)])
        points = [rng.uniform([0, 0], [299, 199]), rng.uniform([0, 0], [299, 199])]
        if kind == "box":
            prompts.append(Prompt(box=box))
        elif kind == "points":
            prompts.append(Prompt(points=points, labels=[1, 0]))
        else:
            prompts.append(Prompt(box=box, points=points[:1], labels=[1]))
    return prompts


@pytest.mark.parametrize("kind", ["box", "points", "box_point"])
@pytest.mark.parametrize("count", [1, 5])
@pytest.mark.parametrize("multimask", [False, True])
def test_shared_decoder_matches_reference(litemedsam, reference, embedding, kind, count, multimask):
    assert litemedsam.shared_decoder is not None and reference.shared_decoder is None
    prompts = _prompts(kind, count)
    fast = litemedsam.decode(Embedding(embedding.features, embedding.geometry), prompts, multimask=multimask)
    slow = reference.decode(Embedding(embedding.features, embedding.geometry), prompts, multimask=multimask)
    assert fast.low_res.shape == slow.low_res.shape == (count, 3 if multimask else 1, 256, 256)
    _assert_logits_close(fast.low_res, slow.low_res)
    torch.testing.assert_close(fast.iou, slow.iou, atol=IOU_TOLERANCE, rtol=0)


def test_state_is_made_once_per_embedding_and_reused(litemedsam, reference, embedding):
    shared = Embedding(embedding.features, embedding.geometry)
    litemedsam.decode(shared, _prompts("box", 2, seed=1))
    state = shared.decoder_states[litemedsam.main_path]
    assert state is not None and state.keys.shape == (64 * 64, 256)
    second = litemedsam.decode(shared, _prompts("box", 3, seed=2))
    assert shared.decoder_states[litemedsam.main_path] is state
    expected = reference.decode(Embedding(embedding.features, embedding.geometry), _prompts("box", 3, seed=2))
    _assert_logits_close(second.low_res, expected.low_res)


@pytest.mark.parametrize("multimask", [False, True])
def test_mask_input_matches_reference_and_leaves_the_shared_state_alone(litemedsam, reference, embedding, multimask):
    """Interactive rounds feed the previous logits back: a per-prompt dense embedding."""
    shared = Embedding(embedding.features, embedding.geometry)
    prompts = _prompts("box_point", 3, seed=3)
    previous = reference.decode(Embedding(embedding.features, embedding.geometry), prompts).low_res
    fast = litemedsam.decode(shared, prompts, mask_input=previous, multimask=multimask)
    slow = reference.decode(Embedding(embedding.features, embedding.geometry), prompts, mask_input=previous,
                            multimask=multimask)
    _assert_logits_close(fast.low_res, slow.low_res)
    torch.testing.assert_close(fast.iou, slow.iou, atol=IOU_TOLERANCE, rtol=0)
    # the image's state (made during a mask-input call) still serves prompts without a mask input
    plain = litemedsam.decode(shared, _prompts("box", 2, seed=4))
    expected = reference.decode(Embedding(embedding.features, embedding.geometry), _prompts("box", 2, seed=4))
    _assert_logits_close(plain.low_res, expected.low_res)


@pytest.mark.parametrize("kind", ["box", "points", "box_point", "mask_input"])
def test_bf16_autocast_keeps_the_fp32_masks(click_model, kind):
    """Under bfloat16 autocast the per-prompt image tokens stay bf16 from layer to layer (layer norms
    included); the masks must still be fp32's but for pixels at their edges, and the IoUs close."""
    image, _ = make_ellipse_image()
    bf16 = copy.copy(click_model)
    bf16.precision = "bf16"
    prompts = _prompts("box_point" if kind == "mask_input" else kind, 6, seed=5)
    previous = click_model.decode(click_model.encode(image), prompts).low_res if kind == "mask_input" else None
    features = click_model.encode(image)
    exact = click_model.decode(Embedding(features.features, features.geometry), prompts, mask_input=previous,
                               multimask=True)
    fast = bf16.decode(Embedding(features.features, features.geometry), prompts, mask_input=previous, multimask=True)
    assert fast.low_res.dtype == torch.float32
    exact_masks, fast_masks = exact.low_res > 0, fast.low_res > 0
    areas = exact_masks.flatten(2).sum(2)
    overlap = (exact_masks & fast_masks).flatten(2).sum(2)
    dice = 2 * overlap / (areas + fast_masks.flatten(2).sum(2)).clamp(min=1)
    assert int((areas >= 100).sum()) >= 6  # real masks to compare
    assert float(dice[areas >= 100].min()) >= 0.9 and float(dice[areas >= 100].mean()) >= 0.97
    assert float((exact_masks == fast_masks).float().mean()) >= 0.995
    assert float((exact.iou - fast.iou).abs().max()) <= 0.03


def test_subclassed_decoders_are_not_taken_over(litemedsam):
    class Changed(MaskDecoder):
        pass

    decoder = litemedsam.network.mask_decoder
    changed = Changed(transformer_dim=256, transformer=decoder.transformer)
    assert supports(decoder) and not supports(changed)
    with pytest.raises(TypeError, match="not segment_anything's MaskDecoder"):
        SharedImageDecoder(changed)


@pytest.mark.parametrize("multimask", [False, True])
def test_early_rejection_skips_only_prompts_below_the_iou_threshold(litemedsam, reference, embedding, multimask):
    prompts = _prompts("box", 6, seed=5)
    slow = reference.decode(Embedding(embedding.features, embedding.geometry), prompts, multimask=multimask)
    best = slow.iou.max(dim=1).values.sort().values
    # half the prompts pass; midway between two prompts' IoUs, so float rounding of the fast path's
    # IoU cannot move a prompt across it (a median sits on one prompt's IoU)
    threshold = float(best[len(best) // 2 - 1] + best[len(best) // 2]) / 2
    fast = litemedsam.decode(Embedding(embedding.features, embedding.geometry), prompts, multimask=multimask,
                             min_iou=threshold)
    torch.testing.assert_close(fast.iou, slow.iou, atol=IOU_TOLERANCE, rtol=0)
    kept = (slow.iou >= threshold).any(dim=1)
    assert 0 < int(kept.sum()) < len(prompts)
    _assert_logits_close(fast.low_res[kept], slow.low_res[kept])
    assert bool((fast.low_res[~kept] == REJECTED_LOGIT).all())


def test_everything_mode_keeps_the_same_masks_with_early_rejection(litemedsam, reference):
    image, _ = make_ellipse_image()
    settings = EverythingSettings(method="boxes")
    fast = generate_masks(Predictor(litemedsam), image, settings)
    slow = generate_masks(Predictor(reference, batch_size=1), image, settings)
    assert len(fast) == len(slow) >= 1
    for a, b in zip(fast, slow):
        assert np.logical_xor(a.mask, b.mask).sum() <= 0.001 * a.mask.size
        assert a.predicted_iou == pytest.approx(b.predicted_iou, abs=IOU_TOLERANCE)
