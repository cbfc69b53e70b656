"""Image embeddings cached once for click training: fp16 features and the objects in the decoder's frame.

Layout: ``EMBEDDINGS/<data set>/embeddings.json`` (model and weights hash, flips, minimum object area),
one ``<image id>.pt`` (and ``<image id>.hflip.pt``, the image flipped left-right) per image, and
``results.jsonl`` with one row per embedded image: the shared resumable item loop runs them, so a killed
run continues where it stopped; it embeds again an image or mask replaced under the same id (the loop
keeps their sha256) and an image whose cached file is gone.

Small objects (nuclei, cells in 500-1000 px images) are a few pixels wide in a whole image's 256 px
frame, and at inference they are prompted on tiles (``engine.tiling``). Training sees them at that scale
too: ``EMBEDDINGS/<data set>@tile<T>h<H>/`` holds every tile of the images larger than one tile, cut as
the tiled predictor cuts them (``<image id>.t<k>.pt``), each tile's objects being what of the image's
objects lies inside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sam4med.engine.checkpoints import write_torch
from sam4med.engine.datasets import Dataset, Sample
from sam4med.engine.errors import InputError
from sam4med.engine.imageio import load_pair
from sam4med.engine.executors import Executor
from sam4med.engine.items import RESULTS_FILE, ItemRunSummary, WorkItem, run_items
from sam4med.engine.objects import object_labels
from sam4med.engine.preprocessing import labels_to_low_res, low_res_content
from sam4med.engine.runs import check_claim, claim_folder, read_jsonl, warn
from sam4med.engine.sam_model import SamModel
from sam4med.engine.tiling import tiles

RECORD_FILE = "embeddings.json"


@dataclass(frozen=True)
class EmbeddedImage:
    """One cached training image: where its embedding is, and how many objects it holds."""

    dataset: str
    image: str
    path: Path
    objects: int
    content: tuple[int, int]  # (h, w) of the image inside the 256 px frame; the rest is padding


def embedding_path(folder: Path, image_id: str, flip: bool, tile: int | None = None) -> Path:
    return folder / f"{image_id}{'' if tile is None else f'.t{tile}'}{'.hflip' if flip else ''}.pt"


def tiled_folder_name(dataset: str, tile: int, halo: int) -> str:
    return f"{dataset}@tile{tile}h{halo}"


def load_embedding(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (1, 256, 64, 64) float32 and the object ids (256, 256) in the decoder's frame.

    A cached file that cannot be read (cut by a full disk, damaged in a copy) is removed, so that the same
    command run again embeds that image anew, and stops the run in one line."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["features"].float()[None], saved["labels"].long()
    except MemoryError:  # the machine's trouble, not the file's
        raise
    except Exception as error:  # zip, pickle, key and type errors all mean a damaged cache file
        path.unlink(missing_ok=True)
        raise InputError(f"{path}: a damaged cached embedding ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:120]}); removed: run the same command again to embed it "
                         "anew") from None


class EmbeddingWorker:
    """The work for one image: encode it (and its mirror image), store features and object labels."""

    def __init__(self, model: SamModel, folder: Path, flips: Sequence[bool], min_area: int,
                 tiling: tuple[int, int] | None = None):
        self.model = model
        self.folder = folder
        self.flips = flips
        self.min_area = min_area
        self.tiling = tiling  # (tile, halo): embed the tiles of images larger than one tile instead

    def __call__(self, item: WorkItem) -> list[dict]:
        image, mask = load_pair(item.sample, labels=True)
        if self.tiling is None:
            views: list[tuple[int | None, np.ndarray, np.ndarray]] = [(None, image, mask)]
        elif max(image.shape[:2]) <= self.tiling[0]:  # the whole image is one tile: the untiled store has it
            return [{"dataset": item.dataset.name, "image": item.sample.id, "tile": None, "objects": 0}]
        else:
            views = [(k, t.crop(image), t.crop(mask)) for k, t in enumerate(tiles(image.shape[:2], *self.tiling))]
        rows = []
        for tile, view, view_mask in views:
            for flip in self.flips:
                pixels, truth = (view[:, ::-1].copy(), view_mask[:, ::-1].copy()) if flip else (view, view_mask)
                embedding = self.model.encode(pixels)
                labels = labels_to_low_res(torch.from_numpy(object_labels(truth)[0]), embedding.geometry)
                areas = torch.bincount(labels.flatten())
                kept = [i for i in range(1, len(areas)) if areas[i] >= self.min_area]
                path = embedding_path(self.folder, item.sample.id, flip, tile)
                write_torch(path, {"features": embedding.features[0].to(torch.float16).cpu(),
                                   "labels": torch.where(torch.isin(labels, torch.tensor(kept)), labels, 0).to(torch.int16)})
                rows.append({"dataset": item.dataset.name, "image": item.sample.id, "tile": tile, "flip": flip,
                             "objects": len(kept), "content": list(low_res_content(embedding.geometry)),
                             "bytes": path.stat().st_size})
        return rows


class CachedWhole:
    """Whether a finished image's cached embeddings are all still there."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.rows: dict[str, list[dict]] = {}
        results = folder / RESULTS_FILE
        for row in read_jsonl(results, skip_damaged=True) if results.is_file() else []:
            if row.get("status") == "ok":
                self.rows.setdefault(row["image"], []).append(row)

    def __call__(self, item: WorkItem) -> bool:
        return all(self._whole(row) for row in self.rows.get(item.sample.id, [])
                   if "flip" in row)  # a whole image in a tiled folder has a row and no file

    def _whole(self, row: dict) -> bool:
        """The file is there, of the size written (a file cut short by a full disk or a copy is embedded anew)."""
        path = embedding_path(self.folder, row["image"], row["flip"], row.get("tile"))
        return path.is_file() and row.get("bytes") in (None, path.stat().st_size)


def embedding_record(model: SamModel, flips: Sequence[bool], min_area: int,
                     tiling: tuple[int, int] | None = None) -> dict[str, object]:
    """What a folder of cached embeddings records: a folder made with another model or settings is refused."""
    record = {"model": model.protocol(), "flips": list(flips), "min_area": min_area,
              "features": "fp16 (256, 64, 64)", "labels": "int16 (256, 256)"}
    return record if tiling is None else {**record, "tile": tiling[0], "halo": tiling[1]}


def cache_folder(out: Path, dataset: str, tiling: tuple[int, int] | None = None) -> Path:
    """Where a data set's embeddings (or, with ``tiling``, its tiles') are cached under ``out``."""
    return out / (dataset if tiling is None else tiled_folder_name(dataset, *tiling))


def check_embedding_folders(model: SamModel, names: Sequence[str], out: Path, flips: Sequence[bool], min_area: int,
                            tiled: Sequence[str] = (), tiling: tuple[int, int] | None = None) -> None:
    """Refuse, naming --embeddings and before a run folder is claimed, a cache folder that :func:`embed_datasets`
    would refuse (another run's rows, other settings)."""
    for name, cut in [(name, None) for name in names] + [(name, tiling) for name in tiled]:
        check_claim(cache_folder(out, name, cut), RECORD_FILE, embedding_record(model, flips, min_area, cut),
                    "--embeddings")


def embed_datasets(model: SamModel, splits: dict[str, tuple[Dataset, list[Sample]]], out: Path,
                   flips: Sequence[bool] = (False, True), min_area: int = 16,
                   show_progress: bool = True, executor: Executor | None = None,
                   tiling: tuple[int, int] | None = None) -> list[ItemRunSummary]:
    """Embed the given samples of each data set under ``out/<data set>/`` (resumable), or with ``tiling``
    (tile, halo) their tiles under ``out/<data set>@tile<T>h<H>/``; ``executor``: where
    (``engine.executors``; on several machines ``out`` must be storage they share)."""
    summaries = []
    for name, (dataset, samples) in splits.items():
        folder = cache_folder(out, name, tiling)
        claim_folder(folder, RECORD_FILE, embedding_record(model, flips, min_area, tiling), "--embeddings")
        worker = EmbeddingWorker(model, folder, flips, min_area, tiling)
        summaries.append(run_items([WorkItem(dataset, s) for s in samples], worker, folder / RESULTS_FILE,
                                   f"embed {name}", show_progress=show_progress,
                                   check_done=CachedWhole(folder), executor=executor, option="--embeddings"))
        failed = [row for row in read_jsonl(folder / RESULTS_FILE, skip_damaged=True) if row.get("status") == "error"]
        if failed:  # this run's and earlier runs' failures alike: the user learns which images training lacks
            warn(f"{folder / RESULTS_FILE}: {len(failed)} image(s) could not be embedded and are left out "
                 f"(first: {failed[0].get('error')})")
    return summaries


def embedded_images(out: Path, dataset: str, image_ids: Sequence[str]) -> list[EmbeddedImage]:
    """The cached images (or tiles, for a tiled folder name) of ``image_ids`` that hold at least one
    object, both flips, in id order."""
    wanted = set(image_ids)
    folder = out / dataset
    rows = [r for r in read_jsonl(folder / RESULTS_FILE)
            if r["status"] == "ok" and r["image"] in wanted and r["objects"] > 0]
    rows.sort(key=lambda r: (r["image"], -1 if r.get("tile") is None else r["tile"], r["flip"]))
    return [EmbeddedImage(dataset, r["image"], embedding_path(folder, r["image"], r["flip"], r.get("tile")),
                          r["objects"], tuple(r["content"])) for r in rows]

