"""Large images as overlapping tiles (micro-sam's tiled embeddings): each tile (its core grown by a halo)
is encoded at the model's input size, a prompt is decoded on the tile that holds it, and its logits are put
back in place. A 1000 px H&E image shrunk whole to 256 px leaves nuclei a few pixels wide; a 256 px core
with a 32 px halo shrinks by 0.8 instead of 0.26."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from sam4med.engine.errors import check_tiling
from sam4med.engine.predictor import Box, EmbeddingCache, Predictor
from sam4med.engine.prompts import Prompt
from sam4med.engine.preprocessing import ImageGeometry
from sam4med.engine.sam_model import Decoded, Embedding, SamModel

OUTSIDE_LOGIT = -1e4  # where a tile's mask does not reach
# Prompts per decoder call on tiles. A tiled image is a large one, and its peak memory is set by everything mode's
# grid decoding: one prompt a call lowered it by about 0.2 GB on 1000 px H&E for about 2% more time (README).
TILED_BATCH = 1
Stitched = TypeVar("Stitched", np.ndarray, torch.Tensor)


def tile_boxes(size: tuple[int, int], tile: int) -> list[tuple[int, int, int, int]]:
    """Tiles (x0, y0, x1, y1, ends exclusive) of at most ``tile`` pixels a side, as equal as possible,
    counted per axis. segment_anything's ``generate_crop_boxes`` does not fit here: its layers cut
    both axes into the same 2^k crops, so a 128x256 image with 128 px tiles would become four 64x128
    crops instead of two 128x128 ones."""
    def edges(length: int) -> list[tuple[int, int]]:
        cuts = np.linspace(0, length, max(1, -(-length // tile)) + 1).round().astype(int)
        return list(zip(cuts[:-1].tolist(), cuts[1:].tolist()))

    return [(x0, y0, x1, y1) for y0, y1 in edges(size[0]) for x0, x1 in edges(size[1])]


@dataclass(frozen=True)
class Tile:
    core: tuple[int, int, int, int]  # x0, y0, x1, y1 (ends exclusive): the tiles' cores cover the image once
    extent: tuple[int, int, int, int]  # the core grown by the halo, clipped to the image: what is encoded

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The pixels this tile encodes."""
        x0, y0, x1, y1 = self.extent
        return np.ascontiguousarray(image[y0:y1, x0:x1])

    def holds(self, box: np.ndarray) -> bool:
        x0, y0, x1, y1 = self.extent
        return bool(box[0] >= x0 and box[1] >= y0 and box[2] <= x1 - 1 and box[3] <= y1 - 1)

    def core_holds(self, x: float, y: float) -> bool:
        x0, y0, x1, y1 = self.core
        return x0 <= x < x1 and y0 <= y < y1


def tiles(size: tuple[int, int], tile: int, halo: int) -> list[Tile]:
    height, width = size
    return [Tile((x0, y0, x1, y1), (max(0, x0 - halo), max(0, y0 - halo), min(width, x1 + halo), min(height, y1 + halo)))
            for x0, y0, x1, y1 in tile_boxes(size, tile)]


class TiledPredictor(Predictor):
    """A :class:`Predictor` that encodes tiles (lazily, each once per image) instead of the whole image.

    A prompt's home is the tile whose extent holds its box (or, without a box, its first point, so that
    clicks added later keep the tile and its fed-back logits), preferring the tile whose core holds the
    box's centre. It is decoded there when every click lies inside that tile too; otherwise (a box no
    tile holds, clicks spread over a vessel tree) on the whole image's embedding, and a fed-back mask made
    on the home tile is left out, being in that tile's frame. Images no larger than one tile are not
    tiled."""

    def __init__(self, model: SamModel, tile: int, halo: int = 32, cache: EmbeddingCache | None = None,
                 batch_size: int | None = None):
        check_tiling(tile, halo)
        super().__init__(model, cache, batch_size or TILED_BATCH)
        self.tile, self.halo = tile, halo
        self._tiles: list[Tile] = []
        self._tile_embeddings: dict[int, Embedding] = {}

    def set_image(self, image: np.ndarray) -> Embedding | None:  # type: ignore[override]
        """Take ``image``; tiles are encoded when a prompt first needs them (the whole image when untiled)."""
        if self._untiled(image):
            self._tiles = []
            return super().set_image(image)
        if image is not self.image:
            self.image, self.embedding = image, None
            self._tiles, self._tile_embeddings = tiles(image.shape[:2], self.tile, self.halo), {}
        return None

    @property
    def protocol(self) -> dict[str, object]:
        return {**super().protocol, "tiling": {"tile": self.tile, "halo": self.halo}}

    def _untiled(self, image: np.ndarray) -> bool:
        """Images no larger than one tile are encoded whole."""
        return image.shape[0] <= self.tile and image.shape[1] <= self.tile

    def _encode(self, index: int | None) -> Embedding:
        """Tile ``index``'s embedding, or the whole image's for None; each made once per image.

        The shared decoder's per-image work (``Embedding.decoder_states``: the image tokens and their first
        projections, several times the embedding's size per prompt path) is kept for the tile in use alone:
        held for every tile of a large image it outweighed the embeddings themselves, and remaking it when a
        prompt returns to a tile costs a few projections of its image tokens."""
        assert self.image is not None
        if index is None:
            if self.embedding is None:
                self.embedding = self.embed(self.image)
            return self.embedding
        for other, embedding in self._tile_embeddings.items():
            if other != index:
                embedding.decoder_states.clear()
        if index not in self._tile_embeddings:
            self._tile_embeddings[index] = self.embed(self._tiles[index].crop(self.image))
        return self._tile_embeddings[index]

    def encode_all(self) -> None:
        """Encode every tile of the set image (the lazy path encodes a tile when a prompt first needs it)."""
        super().encode_all()
        for index in range(len(self._tiles)):
            self._encode(index)

    def embed_ahead(self, image: np.ndarray) -> None:
        """Encode every tile of ``image`` into the cache (or the whole image when it is not tiled)."""
        if self._untiled(image):
            self.embed(image)
            return
        for tile in tiles(image.shape[:2], self.tile, self.halo):
            self.embed(tile.crop(image))

    def grid_regions(self) -> list[tuple[Box, Box]]:
        """One grid per tile core (micro-sam's tiled automatic segmentation): each tile gets the points a
        whole image would, so small objects keep the grid's density in the model's frame."""
        return [(tile.core, tile.extent) for tile in self._tiles] or super().grid_regions()

    def region_predictor(self, extent: Box) -> Predictor:
        """The tile of this extent as a plain predictor in its own frame, so that everything mode filters a
        tile's grid on tile-sized logits instead of image-sized ones."""
        index = next((i for i, tile in enumerate(self._tiles) if tile.extent == extent), None)
        if index is None:
            return super().region_predictor(extent)
        assert self.image is not None
        view = Predictor(self.model, batch_size=self.batch_size)
        view.image, view.embedding = self._tiles[index].crop(self.image), self._encode(index)
        return view

    def home(self, prompt: Prompt) -> int | None:
        """The tile that holds the prompt's box (or first point), or None when no tile does."""
        anchor = prompt.box if prompt.box is not None else np.tile(prompt.points[0], 2)  # type: ignore[index]
        holding = [i for i, t in enumerate(self._tiles) if t.holds(anchor)]
        centre = ((anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2)
        return next((i for i in holding if self._tiles[i].core_holds(*centre)), holding[0] if holding else None)

    def route(self, prompt: Prompt) -> int | None:
        """The tile a prompt is decoded on (its home, when that holds every click), or None for the whole
        image."""
        home = self.home(prompt)
        if home is None or prompt.points is None:
            return home
        spread = np.concatenate([prompt.points.min(0), prompt.points.max(0)])
        return home if self._tiles[home].holds(spread) else None

    def predict(self, prompts: Sequence[Prompt], mask_input: torch.Tensor | None = None, multimask: bool = False,
                min_iou: float | None = None) -> Decoded:
        if not self._tiles:
            return super().predict(prompts, mask_input, multimask, min_iou)
        assert self.image is not None
        height, width = self.image.shape[:2]
        groups: dict[tuple[int | None, bool], list[int]] = {}
        for position, prompt in enumerate(prompts):
            route = self.route(prompt)
            # a mask fed back from the home tile is in that tile's frame: not usable elsewhere
            keeps_mask = mask_input is not None and route == self.home(prompt)
            groups.setdefault((route, keeps_mask), []).append(position)
        low_res = iou = None
        pieces = []
        for (index, keeps_mask), positions in groups.items():
            embedding = self._encode(index)
            x0, y0 = self._tiles[index].extent[:2] if index is not None else (0, 0)
            shifted = [prompts[p].moved(-x0, -y0) for p in positions]
            part_masks = mask_input[positions] if keeps_mask else None  # type: ignore[index]
            parts = [self.model.decode(embedding, shifted[s : s + self.batch_size],
                                       None if part_masks is None else part_masks[s : s + self.batch_size],
                                       multimask, min_iou) for s in range(0, len(shifted), self.batch_size)]
            part = Decoded(torch.cat([p.low_res for p in parts]), torch.cat([p.iou for p in parts]),
                           embedding.geometry, self.model)
            if low_res is None:
                low_res = torch.zeros((len(prompts), *part.low_res.shape[1:]), device=part.low_res.device)
                iou = torch.zeros((len(prompts), part.iou.shape[1]), device=part.iou.device)
            low_res[positions], iou[positions] = part.low_res, part.iou
            pieces.append(TilePiece(positions, x0, y0, part))
        assert low_res is not None and iou is not None
        return TiledDecoded(low_res, iou, self.model.geometry((height, width)), self.model, pieces=pieces)


@dataclass
class TilePiece:
    """The prompts decoded on one tile (or the whole image): their positions in the batch, the tile's corner,
    and their output in the tile's frame."""

    positions: list[int]
    x0: int
    y0: int
    decoded: Decoded


@dataclass
class TiledDecoded(Decoded):
    """A tiled batch's output: ``low_res`` and ``iou`` per prompt (each in its tile's frame); masks and
    logits at the image's size are stitched from the tiles' only when asked for."""

    pieces: list[TilePiece] = field(default_factory=list)

    def _stitched(self, empty: Stitched, part_of: Callable[[Decoded], Stitched]) -> Stitched:
        """Each tile's part (masks or logits, in the tile's frame) put in place on ``empty``."""
        for piece in self.pieces:
            part = part_of(piece.decoded)
            empty[piece.positions, :, piece.y0 : piece.y0 + part.shape[2], piece.x0 : piece.x0 + part.shape[3]] = part
        return empty

    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            size = (*self.low_res.shape[:2], *self.geometry.original_size)
            self._logits = self._stitched(torch.full(size, OUTSIDE_LOGIT, device=self.low_res.device),
                                          lambda part: part.logits)
        return self._logits

    def pick(self, pairs: Sequence[tuple[int, int]]) -> Decoded:
        pieces = []
        for piece in self.pieces:
            home = {position: local for local, position in enumerate(piece.positions)}
            chosen = [(index, (home[b], m)) for index, (b, m) in enumerate(pairs) if b in home]
            if chosen:
                pieces.append(TilePiece([index for index, _ in chosen], piece.x0, piece.y0,
                                        piece.decoded.pick([pair for _, pair in chosen])))
        base = super().pick(pairs)
        return TiledDecoded(base.low_res, base.iou, self.geometry, self.model, pieces=pieces)

    @property
    def frame(self) -> tuple[int, int, ImageGeometry]:
        if len(self.pieces) != 1:
            raise ValueError("prompts decoded on several tiles have no one frame")
        piece = self.pieces[0]
        return piece.x0, piece.y0, piece.decoded.geometry

    def with_low_res(self, low_res: torch.Tensor) -> TiledDecoded:
        pieces = [TilePiece(p.positions, p.x0, p.y0, p.decoded.with_low_res(low_res[p.positions])) for p in self.pieces]
        return TiledDecoded(low_res, self.iou, self.geometry, self.model, pieces=pieces)

    def masks(self) -> np.ndarray:
        if self._logits is not None:
            return super().masks()
        return self._stitched(np.zeros((*self.low_res.shape[:2], *self.geometry.original_size), dtype=bool),
                              lambda part: part.masks())


def make_predictor(model: SamModel, tile: int | None = None, halo: int = 32, cache: EmbeddingCache | None = None
                   ) -> Predictor:
    """A whole-image predictor, or a tiled one when ``tile`` is given."""
    return TiledPredictor(model, tile, halo, cache) if tile else Predictor(model, cache)
