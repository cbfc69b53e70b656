"""A predictor that encodes each image once and serves every prompt from that embedding.

An optional on-disk cache makes re-runs skip the encoder: the key covers the model, its weights'
sha256, the preprocessing and the image's pixels, so a changed image or model never hits a stale
entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sam4med.engine.checkpoints import write_torch
from sam4med.engine.errors import InputError, check_count
from sam4med.engine.prompts import Prompt
from sam4med.engine.sam_model import Decoded, Embedding, SamModel

Box = tuple[int, int, int, int]  # x0, y0, x1, y1, ends exclusive


class EmbeddingCache:
    """Image embeddings stored as one ``.pt`` file per key (written atomically)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(model: SamModel, image: np.ndarray) -> str:
        digest = hashlib.sha256(json.dumps(model.protocol(), sort_keys=True).encode())
        digest.update(str(image.shape).encode())
        digest.update(np.ascontiguousarray(image).tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def load(self, key: str, device: torch.device) -> torch.Tensor | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except Exception:  # a truncated entry (killed mid-write elsewhere) is recomputed
            path.unlink(missing_ok=True)
            return None

    def store(self, key: str, features: torch.Tensor) -> None:
        write_torch(self._path(key), features.detach().cpu())


class Predictor:
    """Holds one image's embedding; ``predict`` decodes any number of prompts against it."""

    def __init__(self, model: SamModel, cache: EmbeddingCache | None = None, batch_size: int | None = None):
        self.model = model
        self.cache = cache
        self.batch_size = 4 if batch_size is None else check_count(batch_size, "batch_size")
        self.embedding: Embedding | None = None
        self.image: np.ndarray | None = None
        self.encoder_calls = 0

    def set_image(self, image: np.ndarray) -> Embedding:
        """Encode ``image`` (or load its cached embedding); a no-op for the image already set."""
        if image is self.image and self.embedding is not None:
            return self.embedding
        self.image = image
        self.embedding = self.embed(image)
        return self.embedding

    def embed(self, image: np.ndarray) -> Embedding:
        """``image``'s embedding from the cache, or encoded (and cached); the image set is left as it is."""
        cache = self.cache if self.model.cacheable else None
        key = cache.key(self.model, image) if cache else None
        features = cache.load(key, self.model.device) if cache else None
        if features is not None:
            return Embedding(features, self.model.geometry(image.shape[:2]))
        embedding = self.model.encode(image)
        self.encoder_calls += 1
        if cache:
            cache.store(key, embedding.features)
        return embedding

    def embed_ahead(self, image: np.ndarray) -> None:
        """Encode ``image`` into the cache before it is set (the annotator's next frame), leaving the image set as it is."""
        self.embed(image)

    def encode_all(self) -> None:
        """Encode now all that prompts anywhere on the set image could need (here its one embedding, which
        ``set_image`` made). Callers that will visit the whole image call it first, so that encoding is timed
        apart from decoding and no encoder's activations stack on the decoders' results."""
        if self.image is None:
            raise RuntimeError("call set_image before encode_all")

    def grid_regions(self) -> list[tuple[Box, Box]]:
        """Where everything mode lays SAM's point grid, as (core, extent) pairs of (x0, y0, x1, y1) boxes:
        the points lie in the core, the model sees the extent. Here the whole image set, both times."""
        if self.image is None:
            raise RuntimeError("call set_image before grid_regions")
        height, width = self.image.shape[:2]
        return [((0, 0, width, height), (0, 0, width, height))]

    def region_predictor(self, extent: Box) -> Predictor:
        """A predictor over one of ``grid_regions``' extents, in that extent's frame (prompts and masks
        relative to its corner). Here the extent is the whole image: this predictor itself."""
        return self

    @property
    def default_mask_rule(self) -> str:
        return self.model.spec.default_mask_rule

    @property
    def takes_point_prompts(self) -> bool:
        return self.model.spec.takes_point_prompts

    @property
    def protocol(self) -> dict[str, object]:
        """What results made by this predictor record of it: the model's record (``SamModel.protocol``)."""
        return self.model.protocol()

    def prompt_masks(self, image: np.ndarray, prompt: Prompt, multimask: bool) -> tuple[np.ndarray, np.ndarray]:
        """Masks (M, H, W) of one prompt on ``image`` and their predicted IoUs (M,) (``segment.PromptMasks``)."""
        self.set_image(image)
        decoded = self.predict([prompt], multimask=multimask)
        return decoded.masks()[0], decoded.iou[0].cpu().numpy()

    def predict(
        self, prompts: Sequence[Prompt], mask_input: torch.Tensor | None = None, multimask: bool = False,
        min_iou: float | None = None,
    ) -> Decoded:
        """Decode prompts of one structure in batches of ``batch_size``.

        The default batch size, 4, trades a little speed for memory: a batch's intermediates (image tokens
        per prompt, upscaled logits) set the process's peak, and the shared-image decoder runs everything
        mode somewhat faster at 8 for a higher peak; segment_anything's own decoder grows more costly per
        prompt past 4. Tiled predictors decode one prompt a call (``tiling.TILED_BATCH``; figures: the README).
        """
        if self.embedding is None:
            raise RuntimeError("call set_image before predict")
        if isinstance(prompts, Prompt) or not prompts:
            raise InputError(f"prompts: a non-empty list of prompts is needed, got {prompts!r}")
        parts = []
        for start in range(0, len(prompts), self.batch_size):
            chunk_mask = None if mask_input is None else mask_input[start : start + self.batch_size]
            parts.append(self.model.decode(self.embedding, prompts[start : start + self.batch_size],
                                           chunk_mask, multimask, min_iou))
        if len(parts) == 1:
            return parts[0]
        return Decoded(torch.cat([p.low_res for p in parts]), torch.cat([p.iou for p in parts]),
                       self.embedding.geometry, self.model)
