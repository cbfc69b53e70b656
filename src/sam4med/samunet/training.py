"""Training box-prompted segmenters on a SAM backbone: SAM-UNet, and the mask-decoder-only
fine-tuning baseline (the COSMOS study's finding 8, MedSAM-style), with one loop.

Per step: ``images_per_step`` training images, up to ``masks_per_image`` objects from each (the
8-connected components of the mask), each prompted with its tight box jittered by up to
``jitter_px`` pixels per coordinate (SAM-Med2D's rule, which the SAM-UNet authors use); no jitter at
validation or test. Loss: focal + ``dice_weight`` x Dice (MONAI) on the decoder's 256x256 logits
against the object's mask in the model's input frame. Adam with step decay. ``OUT/config.json``,
``split.json``, ``history.jsonl``, ``last.pt`` (resume) and ``best.pt`` (best validation Dice).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from sam4med.engine.data import DEFAULT_FRACTIONS, Sample, load_dataset, load_pair, object_labels, training_split
from sam4med.engine.errors import InputError
from sam4med.engine.models import LOW_RES, TRAINED_CHECKPOINT_KIND, ImageGeometry, SamModel, load_model
from sam4med.engine.prompts import jitter_box, tight_box
from sam4med.engine.runs import append_history, claim_run_folder, write_split
from sam4med.samunet.model import CONV_BRANCHES, SamUNet

METHODS = ("samunet", "decoder")


@dataclass
class PromptTrainConfig:
    """Every choice of a SAM-UNet or decoder fine-tuning run; stored with the checkpoints."""

    method: str = "samunet"
    backbone: str = "litemedsam"
    backbone_checkpoint: str | None = None
    conv_branch: str = "resnet34"
    warm_start: bool = True  # SAM-UNet's new output path starts as the backbone's (samunet.model)
    epochs: int = 4
    images_per_step: int = 2
    masks_per_image: int = 4
    jitter_px: float = 5.0
    learning_rate: float = 1e-4
    lr_step_epochs: int = 2
    lr_gamma: float = 0.5
    dice_weight: float = 20.0
    min_object_area: int = 10
    max_train_images: int | None = None  # per data set
    max_val_images: int | None = 16  # per data set; validation costs an encoder pass per image
    seed: int = 0
    split_seed: int = 0
    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.conv_branch not in CONV_BRANCHES:
            raise InputError(f"--conv-branch {self.conv_branch!r}: choose one of {', '.join(CONV_BRANCHES)}")
        if min(self.epochs, self.images_per_step, self.masks_per_image, self.lr_step_epochs) < 1:
            raise InputError("--epochs, --images-per-step, --masks-per-image and --lr-step-epochs must be >= 1")


class DecoderFineTune(nn.Module):
    """The baseline: SAM's own network with only its mask decoder trained (single-mask output)."""

    def __init__(self, backbone: SamModel):
        super().__init__()
        self.sam = backbone.network
        for name, parameter in self.sam.named_parameters():
            parameter.requires_grad_(name.startswith("mask_decoder."))

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        with torch.no_grad():
            return self.sam.image_encoder(images), None

    def decode(self, embedding: Tensor, _: Tensor | None, boxes: Tensor) -> Tensor:
        sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes, masks=None)
        logits, _ = self.sam.mask_decoder(image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                          sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                          multimask_output=False)
        return logits

    def trained_state(self) -> dict[str, Tensor]:
        return {f"mask_decoder.{k}": v for k, v in self.sam.mask_decoder.state_dict().items()}


class SamUNetTrainable(nn.Module):
    """SAM-UNet as the loop sees it (encode with gradients, decode one image's boxes)."""

    def __init__(self, backbone: SamModel, conv_branch: str, warm_start: bool):
        super().__init__()
        sam = backbone.network
        self.net = SamUNet(sam.image_encoder, sam.prompt_encoder, sam.mask_decoder, backbone.spec.image_size,
                           conv_branch, warm_start)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        return self.net.encode(images)

    def decode(self, embedding: Tensor, multi_scale: Tensor | None, boxes: Tensor) -> Tensor:
        assert multi_scale is not None
        return self.net.decode(embedding, multi_scale, boxes=boxes)

    def trained_state(self) -> dict[str, Tensor]:
        """Everything but the frozen image encoder, which is reloaded from the backbone's weights."""
        return {k: v for k, v in self.net.state_dict().items() if not k.startswith("stages.encoder.")}


def build_trainable(backbone: SamModel, config: PromptTrainConfig) -> nn.Module:
    if config.method == "samunet":
        return SamUNetTrainable(backbone, config.conv_branch, config.warm_start)
    return DecoderFineTune(backbone)


@dataclass
class PreparedObjects:
    """One image with its object labels; targets are cut on demand (MoNuSeg has hundreds)."""

    sample: Sample
    image: np.ndarray
    labels: np.ndarray
    objects: list[int]


def low_res_target(mask: np.ndarray, geometry: ImageGeometry) -> Tensor:
    """An original-size mask in the model's input frame (resize, pad), at the decoder's 256 px."""
    pixels = torch.from_numpy(mask.astype(np.float32))[None, None]
    resized = F.interpolate(pixels, size=geometry.resized_size, mode="bilinear", align_corners=False)
    side = geometry.input_size
    padded = F.pad(resized, (0, side - geometry.resized_size[1], 0, side - geometry.resized_size[0]))
    if side != LOW_RES:
        padded = F.interpolate(padded, size=(LOW_RES, LOW_RES), mode="bilinear", align_corners=False)
    return (padded[0] > 0.5).float()


def _prepare(samples: Sequence[Sample], min_area: int) -> list[PreparedObjects]:
    prepared = []
    for sample in samples:
        image, mask = load_pair(sample)
        labels, objects = object_labels(mask, min_area=min_area)
        if objects:
            prepared.append(PreparedObjects(sample, image, labels, objects))
    return prepared


def _boxes_and_targets(item: PreparedObjects, chosen: Sequence[int], geometry: ImageGeometry,
                       rng: np.random.Generator | None, jitter_px: float) -> tuple[Tensor, Tensor]:
    """Boxes in the model's input frame (jittered when ``rng``) and low-res targets (P, 1, 256, 256)."""
    boxes, targets = [], []
    scale = np.array(geometry.scale_xy * 2)
    for label in chosen:
        mask = item.labels == label
        box = tight_box(mask)
        if rng is not None and jitter_px > 0:
            box = jitter_box(box, mask.shape, rng, jitter_px)
        boxes.append(box * scale)
        targets.append(low_res_target(mask, geometry))
    return torch.tensor(np.stack(boxes), dtype=torch.float32), torch.stack(targets)


def _dice(logits: Tensor, targets: Tensor) -> list[float]:
    pred = logits > 0
    truth = targets > 0.5
    inter = (pred & truth).flatten(1).sum(1).float()
    total = pred.flatten(1).sum(1).float() + truth.flatten(1).sum(1).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).tolist()


def _validate(model: nn.Module, backbone: SamModel, items: list[PreparedObjects], max_objects: int) -> float:
    model.eval()
    scores: list[float] = []
    with torch.no_grad():
        for item in items:
            images, geometry = backbone.preprocess(item.image)
            embedding, multi_scale = model.encode(images)
            chosen = item.objects[:max_objects]
            boxes, targets = _boxes_and_targets(item, chosen, geometry, None, 0.0)
            scores += _dice(model.decode(embedding, multi_scale, boxes), targets)
    model.train()
    return float(np.mean(scores)) if scores else float("nan")


@dataclass
class PromptTrainResult:
    out: Path
    best_val_dice: float
    best_epoch: int
    seconds: float
    epochs_run: int


def train_promptable(data: Sequence[str | Path], out: str | Path, config: PromptTrainConfig | None = None,
                     device: str | None = None, show_progress: bool = True) -> PromptTrainResult:
    """Train SAM-UNet (``method="samunet"``) or fine-tune the mask decoder (``"decoder"``); resumable."""
    config = config or PromptTrainConfig()
    config.check()
    out = Path(out)
    claim_run_folder(out, asdict(config))
    datasets = [load_dataset(d) for d in data]
    splits = {d.name: training_split(d, config.fractions, config.split_seed) for d in datasets}
    write_split(out, splits)
    train_items = [item for d in datasets
                   for item in _prepare(splits[d.name]["train"][: config.max_train_images], config.min_object_area)]
    val_items = [item for d in datasets
                 for item in _prepare(splits[d.name]["val"][: config.max_val_images], config.min_object_area)]
    if not train_items:
        raise InputError("no training image has an object of at least --min-object-area pixels")

    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    backbone = load_model(config.backbone, config.backbone_checkpoint, device or "cpu", shared_decoder=False)
    model = build_trainable(backbone, config)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.lr_step_epochs, gamma=config.lr_gamma)
    focal, dice_loss = FocalLoss(), DiceLoss(sigmoid=True)
    state = {"epoch": 0, "best_val_dice": -1.0, "best_epoch": -1, "seconds": 0.0}
    if (out / "last.pt").is_file():
        last = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(last["model"], strict=False)
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        state = last["state"]
    meta = {"kind": TRAINED_CHECKPOINT_KIND, "config": asdict(config), "backbone": config.backbone,
            "backbone_sha256": backbone.weights_sha256, "datasets": [d.name for d in datasets]}

    model.train()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), disable=not show_progress) as progress:
        steps = -(-len(train_items) // config.images_per_step)
        task = progress.add_task(f"train {config.method} ({config.backbone})", total=config.epochs * steps,
                                 completed=state["epoch"] * steps, status="")
        for epoch in range(state["epoch"], config.epochs):
            start = time.perf_counter()
            rng = np.random.default_rng([config.seed, epoch])
            order = rng.permutation(len(train_items))
            losses = []
            for first in range(0, len(order), config.images_per_step):
                optimizer.zero_grad()
                loss = torch.zeros(())
                for index in order[first : first + config.images_per_step]:
                    item = train_items[index]
                    images, geometry = backbone.preprocess(item.image)
                    count = min(config.masks_per_image, len(item.objects))
                    chosen = rng.choice(item.objects, size=count, replace=False)
                    boxes, targets = _boxes_and_targets(item, chosen, geometry, rng, config.jitter_px)
                    embedding, multi_scale = model.encode(images)
                    logits = model.decode(embedding, multi_scale, boxes)
                    loss = loss + focal(logits, targets) + config.dice_weight * dice_loss(logits, targets)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                progress.update(task, advance=1, status=f"loss {losses[-1]:.3f}")
            scheduler.step()
            val_dice = _validate(model, backbone, val_items, 8)
            state["seconds"] += time.perf_counter() - start
            state["epoch"] = epoch + 1
            if val_dice > state["best_val_dice"]:
                state.update(best_val_dice=val_dice, best_epoch=epoch + 1)
                torch.save({**meta, "state": model.trained_state(), "epoch": epoch + 1, "val_dice": val_dice},
                           out / "best.pt")
            torch.save({**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": state},
                       out / "last.pt")
            append_history(out, {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": val_dice,
                                 "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - start, 2)})
            progress.update(task, status=f"loss {np.mean(losses):.3f} val Dice {val_dice:.3f}")
    return PromptTrainResult(out, state["best_val_dice"], state["best_epoch"], state["seconds"], state["epoch"])
