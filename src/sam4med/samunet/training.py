"""Training box-prompted segmenters on a SAM backbone: SAM-UNet, and the mask-decoder-only
fine-tuning baseline (the COSMOS study's finding 8, MedSAM-style), with one loop.

Per step: ``images_per_step`` training images, up to ``masks_per_image`` objects from each (the
8-connected components of the mask), each prompted with its tight box jittered by up to
``jitter_px`` pixels per coordinate (SAM-Med2D's rule, which the SAM-UNet authors use); no jitter at
validation or test. Loss: focal + ``dice_weight`` x Dice (MONAI) on the decoder's 256x256 logits
against the object's mask in the model's input frame. Adam with step decay. The run folder and
resuming are the shared training loop's (``sam4med.engine.training``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss, FocalLoss
from torch import Tensor, nn

from sam4med.engine.datasets import Sample, data_option, load_datasets
from sam4med.engine.errors import (InputError, check_counts, check_limit, check_number, check_precision, check_seed,
                                   read_every)
from sam4med.engine.imageio import load_pair
from sam4med.engine.metrics import batch_dice
from sam4med.engine.models import load_model
from sam4med.engine.objects import object_labels
from sam4med.engine.preprocessing import ImageGeometry, low_res_target
from sam4med.engine.prompts import jitter_box, tight_box
from sam4med.engine.sam_model import SamModel
from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split
from sam4med.engine.training import TrainingTask, TrainResult, fit, seed_everything, start_run
from sam4med.samunet.model import CONV_BRANCHES, SamUNet

METHODS = ("samunet", "decoder")
CHECKPOINT_KIND = "promptable"  # SAM-UNet and decoder fine-tuning runs; loaded by samunet.loading


@dataclass
class PromptTrainConfig:
    """Every choice of a SAM-UNet or decoder fine-tuning run; stored with the checkpoints."""

    method: str = "samunet"
    backbone: str = "litemedsam"
    backbone_checkpoint: str | None = None
    conv_branch: str = "resnet34"
    warm_start: bool = True  # SAM-UNet's new output path starts as the backbone's (samunet.model)
    epochs: int = 4  # at most, with a patience
    patience: int | None = None  # stop after this many epochs without a better validation Dice
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
    precision: str | None = None  # training steps under "bf16" autocast (engine.training.fit); None or "fp32": fp32

    def check(self) -> None:
        check_precision(self.precision or "fp32")
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.conv_branch not in CONV_BRANCHES:
            raise InputError(f"--conv-branch {self.conv_branch!r}: choose one of {', '.join(CONV_BRANCHES)}")
        check_counts(epochs=self.epochs, images_per_step=self.images_per_step, masks_per_image=self.masks_per_image,
                     lr_step_epochs=self.lr_step_epochs)
        check_number(self.learning_rate, "--learning-rate", above=0)
        check_number(self.jitter_px, "--jitter", minimum=0)
        check_number(self.lr_gamma, "lr_gamma", above=0, maximum=1)
        check_number(self.dice_weight, "dice_weight", minimum=0)
        check_limit(self.min_object_area, "min_object_area")
        check_limit(self.patience, "--patience")
        check_limit(self.max_train_images, "--max-train-images")
        check_limit(self.max_val_images, "max_val_images")
        check_seed(self.seed, "--seed")
        check_seed(self.split_seed, "split_seed")


FROZEN_EMBEDDINGS_BYTES = 4 << 30  # decoder fine-tuning keeps at most this much of image embeddings in memory


class DecoderFineTune(nn.Module):
    """The baseline: SAM's own network with only its mask decoder trained (single-mask output).

    Its image encoder is frozen and no image is augmented, so each image's embedding is the same in every
    epoch: it is kept in memory the first time (up to ``FROZEN_EMBEDDINGS_BYTES``; the images past that are
    encoded each time), per autocast type, since training steps may run in bf16 and validation in fp32."""

    def __init__(self, backbone: SamModel):
        super().__init__()
        self.sam = backbone.network
        for name, parameter in self.sam.named_parameters():
            parameter.requires_grad_(name.startswith("mask_decoder."))
        self.embeddings: dict[tuple[object, torch.dtype | None], Tensor] = {}
        self.embedding_bytes = 0

    def train(self, mode: bool = True) -> DecoderFineTune:
        """The frozen image encoder stays in eval mode (its BatchNorm statistics and dropout as at inference)."""
        super().train(mode)
        self.sam.image_encoder.eval()
        return self

    def encode(self, images: Tensor, key: object = None) -> tuple[Tensor, Tensor | None]:
        """The embedding of ``images``; ``key`` names the image for the memory of embeddings (None: no memory)."""
        device = images.device.type
        slot = (key, torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        if slot in self.embeddings:
            return self.embeddings[slot], None
        with torch.no_grad():
            embedding = self.sam.image_encoder(images)
        size = embedding.numel() * embedding.element_size()
        if key is not None and self.embedding_bytes + size <= FROZEN_EMBEDDINGS_BYTES:
            self.embeddings[slot] = embedding
            self.embedding_bytes += size
        return embedding, None

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

    def encode(self, images: Tensor, key: object = None) -> tuple[Tensor, Tensor | None]:
        """``key`` is unused: the conv branch trains and feeds the encoder, so an image's embedding changes with
        every step."""
        return self.net.encode(images)

    def decode(self, embedding: Tensor, multi_scale: Tensor | None, boxes: Tensor) -> Tensor:
        assert multi_scale is not None
        return self.net.decode(embedding, multi_scale, boxes=boxes)

    def trained_state(self) -> dict[str, Tensor]:
        """Everything but the frozen image encoder, which is reloaded from the backbone's weights."""
        return {k: v for k, v in self.net.state_dict().items() if not k.startswith("stages.encoder.")}


@dataclass
class PreparedObjects:
    """One image with its object labels; targets are cut on demand (MoNuSeg has hundreds)."""

    sample: Sample
    image: np.ndarray
    labels: np.ndarray
    objects: list[int]


def _prepare(samples: Sequence[Sample], min_area: int) -> list[PreparedObjects]:
    """The samples with an object of ``min_area`` pixels; every file that cannot be used is named in one InputError."""

    def prepare(sample: Sample) -> PreparedObjects | None:  # None: an image without objects is not kept
        image, mask = load_pair(sample, labels=True)
        labels, objects = object_labels(mask, min_area=min_area)
        return PreparedObjects(sample, image, labels, objects) if objects else None

    return [item for item in read_every(samples, prepare) if item is not None]


def _boxes(item: PreparedObjects, chosen: Sequence[int], geometry: ImageGeometry,
           rng: np.random.Generator | None, jitter_px: float) -> Tensor:
    """Boxes (P, 4) of the chosen objects in the model's input frame, jittered when ``rng``."""
    boxes = []
    for label in chosen:
        box = tight_box(item.labels == label)
        if rng is not None and jitter_px > 0:
            box = jitter_box(box, item.labels.shape, rng, jitter_px)
        boxes.append(box * np.array(geometry.scale_xy * 2))
    return torch.tensor(np.stack(boxes), dtype=torch.float32)


def _targets(item: PreparedObjects, chosen: Sequence[int], geometry: ImageGeometry) -> Tensor:
    """Low-res targets (P, 1, 256, 256) of the chosen objects."""
    return torch.stack([low_res_target(torch.from_numpy(item.labels == label), geometry) for label in chosen])


class PromptableTask(TrainingTask):
    """Box-prompted training of SAM-UNet or of the mask decoder, for the shared loop."""

    kind = CHECKPOINT_KIND
    unused_parameters = True  # the decoder's IoU head and multi-mask tokens get no loss here

    def __init__(self, config: PromptTrainConfig, backbone: SamModel, train_items: list[PreparedObjects],
                 val_items: list[PreparedObjects], datasets: list[str]):
        self.config = config
        self.backbone = backbone
        self.train_items = train_items
        self.val_items = val_items
        self.datasets = datasets
        self.module = SamUNetTrainable(backbone, config.conv_branch, config.warm_start) \
            if config.method == "samunet" else DecoderFineTune(backbone)
        # convolution weights in channels-last layout: oneDNN then skips reordering every activation and
        # gradient to and from NCHW in each step (the same arithmetic, up to float rounding)
        self.module.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.Adam([p for p in self.module.parameters() if p.requires_grad],
                                          lr=config.learning_rate)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, config.lr_step_epochs, config.lr_gamma)
        self.focal = FocalLoss()
        self.dice_loss = DiceLoss(sigmoid=True)

    def batches(self, epoch: int, rng: np.random.Generator) -> list[list[tuple[PreparedObjects, list[int], Tensor]]]:
        """Per step: images, the objects drawn from each and their (jittered) boxes."""
        order = rng.permutation(len(self.train_items))
        batches = []
        for first in range(0, len(order), self.config.images_per_step):
            batch = []
            for index in order[first : first + self.config.images_per_step]:
                item = self.train_items[index]
                chosen = rng.choice(item.objects, size=min(self.config.masks_per_image, len(item.objects)),
                                    replace=False).tolist()
                geometry = self.backbone.geometry(item.image.shape[:2])
                batch.append((item, chosen, _boxes(item, chosen, geometry, rng, self.config.jitter_px)))
            batches.append(batch)
        return batches

    def loss(self, batch: list[tuple[PreparedObjects, list[int], Tensor]], update: int = 0) -> Tensor:
        """Focal + Dice of the boxed objects, averaged over the batch's images."""
        loss = torch.zeros(())
        for item, chosen, boxes in batch:
            images, geometry = self.backbone.preprocess(item.image)
            targets = _targets(item, chosen, geometry)
            embedding, multi_scale = self.module.encode(images, key=item.sample.image_path)
            logits = self.module.decode(embedding, multi_scale, boxes)
            loss = loss + self.focal(logits, targets) + self.config.dice_weight * self.dice_loss(logits, targets)
        return loss / max(1, len(batch))

    @torch.no_grad()
    def validate(self, max_objects: int = 8) -> float:
        scores: list[float] = []
        for item in self.val_items:
            images, geometry = self.backbone.preprocess(item.image)
            embedding, multi_scale = self.module.encode(images, key=item.sample.image_path)
            chosen = item.objects[:max_objects]
            logits = self.module.decode(embedding, multi_scale, _boxes(item, chosen, geometry, None, 0.0))
            scores += batch_dice(logits, _targets(item, chosen, geometry))
        return float(np.mean(scores)) if scores else float("nan")

    def trained_weights(self) -> dict[str, Tensor]:
        return self.module.trained_state()

    def checkpoint_meta(self) -> dict[str, object]:
        return {"backbone": self.config.backbone, "backbone_sha256": self.backbone.weights_sha256,
                "datasets": self.datasets}


def train_promptable(data: Sequence[str | Path], out: str | Path, config: PromptTrainConfig | None = None,
                     device: str | None = None, show_progress: bool = True) -> TrainResult:
    """Train SAM-UNet (``method="samunet"``) or fine-tune the mask decoder (``"decoder"``); resumable, on any
    ``device`` (default: CUDA when present)."""
    config = config or PromptTrainConfig()
    config.check()
    out = Path(out)
    datasets = load_datasets(data)
    splits = {d.name: training_split(d, config.fractions, config.split_seed) for d in datasets}
    train_items: list[PreparedObjects] = []
    val_items: list[PreparedObjects] = []
    for d in datasets:  # both sides at once: one error names every unusable file of the set
        train, val = splits[d.name]["train"][: config.max_train_images], splits[d.name]["val"][: config.max_val_images]
        prepared = _prepare([*train, *val], config.min_object_area)
        train_ids = {sample.id for sample in train}
        train_items += [item for item in prepared if item.sample.id in train_ids]
        val_items += [item for item in prepared if item.sample.id not in train_ids]
    if not train_items:
        raise InputError(f"{data_option(datasets)}: no training image has an object of at "
                         f"least {config.min_object_area} pixels (are the masks empty?)")
    seed_everything(config.seed)
    backbone = load_model(config.backbone, config.backbone_checkpoint, device, use_shared_decoder=False)
    start_run(out, asdict(config), splits)  # once the data and the backbone have been checked
    task = PromptableTask(config, backbone, train_items, val_items, [d.name for d in datasets])
    return fit(task, out, asdict(config), config.epochs, config.seed, f"train {config.method} ({config.backbone})",
               show_progress, config.patience)
