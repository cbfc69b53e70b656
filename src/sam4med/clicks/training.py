"""Training LiteMedSAM's prompt encoder and mask decoder for clicks, on cached image embeddings.

Iterative click simulation, as SAM and SAM-Med2D train:

- each object's first prompt is drawn from {one point, 2-5 points, tight box, jittered box, box + point};
- then ``rounds`` corrective rounds: one click in an error region of the current mask (SAM-Med2D's
  uniformly drawn error pixel or RITM's centre of the largest error region, half the time each;
  missed object -> positive click, false positive -> negative), with the previous low-resolution
  logits fed back as the mask input;
- a lone first click is decoded to SAM's 3 masks and only the best one (lowest loss) is trained, SAM's
  ambiguity rule; every other prompt trains the single-mask output;
- loss per round: 20 x focal + Dice (SAM's 20:1) on the 256 px logits, plus the MSE of the IoU head
  against each mask's real IoU;
- a box alone is decoded by the frozen base decoder (``base_box_decoder``), as the shipped model does at
  inference so that boxes keep the base model's masks; the corrective rounds after it are trained;
- ``click_weight``: each corrective round's mask is also held to every click given so far (the logit under a
  click against its label), since in the mask loss a click's own pixel weighs next to nothing;
- ``first_round_share``: the share of a rollout's loss that its first prompt's mask carries (the rest split evenly
  over the corrective rounds); by default every trained round weighs the same, so more rounds weigh a lone
  click's mask less;
- a few lone clicks on background teach the IoU head what is not an object: their 3 masks are scored
  against the best-overlapping labelled object (usually IoU 0), so SAM's point-grid everything mode can
  filter them by predicted IoU. Their masks get no loss: an unlabelled region may still be a structure.
- ``trainable="iou_head"`` retrains the IoU head alone, on lone clicks only: the masks stay the model's,
  and what improves is which of a click's 3 masks is kept and which point-grid masks pass its filter.

The image encoder is frozen and never run: embeddings come from :mod:`sam4med.clicks.embeddings`
(computed once, mirror images included; for the data sets named in ``tiled``, the tiles of their large
images too, so that small objects are trained at the scale tiled inference shows them). Everything else (run folder, resume, checkpoints, history) is
the shared training loop's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceLoss
from segment_anything.modeling import Sam
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from sam4med.clicks.embeddings import (
    EmbeddedImage,
    check_embedding_folders,
    embed_datasets,
    embedded_images,
    load_embedding,
    tiled_folder_name,
)
from sam4med.engine.datasets import Sample, data_option, load_datasets
from sam4med.engine.distributed import barrier, processes
from sam4med.engine.executors import Executor
from sam4med.engine.imageio import read_mask
from sam4med.engine.checkpoints import file_sha256
from sam4med.engine.errors import (
    InputError,
    check_apart,
    check_counts,
    check_limit,
    check_not_a_file,
    check_number,
    check_precision,
    check_seed,
    check_tiling,
    check_whole,
)
from sam4med.engine.models import base_prompt_path, load_model, load_prompt_parts
from sam4med.engine.metrics import dice
from sam4med.engine.preprocessing import LOW_RES
from sam4med.engine.prompts import center_point, error_click, jitter_box, random_points, tight_box
from sam4med.engine.sam_model import PromptPath
from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split
from sam4med.engine.training import TrainingTask, TrainResult, fit, seed_everything, start_run

CHECKPOINT_KIND = "clicks"
FIRST_PROMPTS = ("point", "points", "box", "box_jitter", "box_point")
BOX_ALONE = ("box", "box_jitter")
TRAINABLE = ("all", "iou_head")  # "all" is stored as None, so that runs from before the option still resume
IOU_HEAD = "mask_decoder.iou_prediction_head."
IOU_RANK_TEMPERATURE = 0.1  # IoUs differ by tenths between a click's masks: softmax over IoU / 0.1
# Decoder passes of one step, every one held for the backward pass (tens of MB each): beyond this a typo in
# --rounds or the counts per step fills the machine's memory before the first step ends
MAX_DECODES_PER_STEP = 256


@dataclass
class ClickTrainConfig:
    """Every choice of a click-training run; stored with its checkpoints."""

    backbone: str = "litemedsam"
    first_prompt_weights: tuple[float, ...] = (0.35, 0.15, 0.2, 0.15, 0.15)  # over FIRST_PROMPTS
    rounds: int = 3
    max_points: int = 5
    box_jitter_percent: float = 10.0
    images_per_step: int = 2
    objects_per_image: int = 4
    steps_per_epoch: int = 200
    epochs: int = 10  # at most, with a patience
    patience: int | None = None  # stop after this many epochs without a better validation Dice
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    lr_gamma: float = 0.8  # per epoch
    focal_weight: float = 20.0
    min_object_area: int = 16  # pixels in the 256 px frame
    max_train_images: int | None = 200  # per data set
    max_val_images: int = 4  # per data set
    flips: bool = True
    tile: int | None = None  # tile core in px for the data sets in ``tiled`` (engine.tiling)
    halo: int = 32
    tiled: tuple[str, ...] = ()  # data set names also trained on the tiles of their images larger than a tile
    balance_datasets: bool = False  # each step draws data sets (tiles apart) evenly, not images
    tile_share: float | None = None  # chance that a drawn image is a tile; None: tiles are images like any other
    base_box_decoder: bool = True  # a box alone is decoded by the frozen base decoder (round 0 not trained)
    background_clicks: int = 2  # lone clicks on background per image and step, for the IoU head
    init_weights: str | None = None  # prompt weights to start from (exported .pt or a run's checkpoint)
    # "iou_head": only the IoU head trains, on lone clicks (objects and background) and no corrections,
    # so every mask stays as it was and only which of a click's 3 masks is kept, and the point grid's
    # filter, change
    trainable: str | None = None  # None: all
    # weight of a ranking term for a lone click's 3 masks (ListNet: cross-entropy between the softmax of the
    # real IoUs and of the predicted ones, temperature IOU_RANK_TEMPERATURE), beside the IoU head's MSE: what
    # inference uses is the argmax, which a small MSE can still get wrong; None: MSE alone
    iou_rank_weight: float | None = None
    # chance that a lone first click is the object's centre (the interior point farthest from its boundary,
    # where annotators click first and the benchmark's point_center mode puts it) rather than a random pixel
    centre_click_share: float | None = None
    # weight of a term that holds each corrective round's mask to every click given so far (binary cross-entropy
    # of the logit under each click against its label, beside the mask loss): in the mask loss a click's own pixel
    # weighs 1 of 65,536, and a decoder trained on it alone leaves a click that should move an edge where it was;
    # None: no such term
    click_weight: float | None = None
    # share of a rollout's loss carried by the first prompt's mask, the rest split evenly over the corrective
    # rounds; None: every trained round weighs the same (1 / (rounds + 1) for the first)
    first_round_share: float | None = None
    seed: int = 0
    split_seed: int = 0
    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    precision: str | None = None  # training steps under "bf16" autocast (engine.training.fit); None or "fp32": fp32

    def check(self) -> None:
        check_precision(self.precision or "fp32")
        weights = self.first_prompt_weights
        if len(weights) != len(FIRST_PROMPTS) or not all(math.isfinite(w) and w >= 0 for w in weights) \
                or sum(weights) <= 0:
            raise InputError(f"first_prompt_weights: {len(FIRST_PROMPTS)} finite non-negative weights for "
                             f"{FIRST_PROMPTS}, not all 0")
        check_counts(images_per_step=self.images_per_step, objects_per_image=self.objects_per_image,
                     steps_per_epoch=self.steps_per_epoch, epochs=self.epochs, max_points=self.max_points)
        check_whole(self.rounds, "--rounds")
        check_whole(self.background_clicks, "--background-clicks")
        decodes = self.images_per_step * (self.objects_per_image * (self.rounds + 1) + self.background_clicks)
        if decodes > MAX_DECODES_PER_STEP:
            raise InputError(f"--rounds {self.rounds}: with --images-per-step {self.images_per_step}, "
                             f"--objects-per-image {self.objects_per_image} and --background-clicks "
                             f"{self.background_clicks}, {decodes} decoder passes a step, each held for the backward "
                             f"pass; at most {MAX_DECODES_PER_STEP} (lower one of them)")
        check_number(self.learning_rate, "--learning-rate", above=0)
        check_number(self.weight_decay, "weight_decay", minimum=0)
        check_number(self.lr_gamma, "lr_gamma", above=0, maximum=1)
        check_number(self.box_jitter_percent, "box_jitter_percent", minimum=0)
        check_number(self.focal_weight, "focal_weight", minimum=0)
        check_seed(self.seed, "--seed")
        check_seed(self.split_seed, "split_seed")
        check_limit(self.min_object_area, "min_object_area")
        check_limit(self.max_train_images, "--max-train-images")
        check_limit(self.patience, "--patience")
        check_limit(self.max_val_images, "max_val_images")
        check_tiling(self.tile, self.halo)
        if self.tile is not None and not self.tiled:
            raise InputError(f"--tile {self.tile}: needs --tiled data sets (only those are cut into tiles)")
        if self.tiled and self.tile is None:
            raise InputError(f"--tiled {self.tiled[0]}: needs --tile")
        if self.tile_share is not None:
            check_number(self.tile_share, "--tile-share", minimum=0, maximum=1)
            if not self.tiled:
                raise InputError("--tile-share: needs --tiled data sets")
        if self.iou_rank_weight is not None:
            check_number(self.iou_rank_weight, "--iou-rank-weight", minimum=0)
        if self.centre_click_share is not None:
            check_number(self.centre_click_share, "--centre-click-share", minimum=0, maximum=1)
        if self.click_weight is not None:
            check_number(self.click_weight, "--click-weight", minimum=0)
        if self.first_round_share is not None:
            check_number(self.first_round_share, "--first-round-share", minimum=0, maximum=1)
        if self.trainable is not None and self.trainable not in TRAINABLE[1:]:
            raise InputError(f"--train-only {self.trainable!r}: choose one of {', '.join(TRAINABLE)}")
        if self.trainable == "iou_head" and self.init_weights is None:
            raise InputError("--train-only iou_head: needs --init (the decoder whose IoU head is retrained)")
        if self.init_weights is not None and not Path(self.init_weights).is_file():
            problem = "a folder, not a weights file" if Path(self.init_weights).is_dir() else "no such file"
            raise InputError(f"--init {self.init_weights}: {problem}")


@dataclass
class ObjectPrompts:
    """The prompts of K objects of one image, in the 256 px frame, grown click by click."""

    points: np.ndarray | None  # (K, n, 2) x, y
    labels: np.ndarray | None  # (K, n) 1 positive, 0 negative, -1 no click (ignored by SAM)
    boxes: np.ndarray | None  # (K, 4)

    def add_clicks(self, clicks: Sequence[tuple[tuple[float, float], int] | None]) -> None:
        new_points = np.array([c[0] if c else (0.0, 0.0) for c in clicks], dtype=np.float32)[:, None]
        new_labels = np.array([c[1] if c else -1 for c in clicks], dtype=np.int64)[:, None]
        self.points = new_points if self.points is None else np.concatenate([self.points, new_points], axis=1)
        self.labels = new_labels if self.labels is None else np.concatenate([self.labels, new_labels], axis=1)

    def tensors(self, scale: float, device: torch.device) -> tuple[tuple[Tensor, Tensor] | None, Tensor | None]:
        points = None if self.points is None else (torch.from_numpy(self.points * scale).to(device),
                                                   torch.from_numpy(self.labels).to(device))  # type: ignore[arg-type]
        boxes = None if self.boxes is None else torch.from_numpy(self.boxes * scale).to(device)
        return points, boxes


def first_prompts(kind: str, objects: Sequence[np.ndarray], rng: np.random.Generator, max_points: int,
                  jitter_percent: float, centre_click_share: float | None = None) -> ObjectPrompts:
    """The first prompt of each object (masks in the 256 px frame); all K share one structure.

    A lone click (``point``) is each object's centre with chance ``centre_click_share``, else a random pixel."""
    size = objects[0].shape
    prompts = ObjectPrompts(None, None, None)
    if kind in ("box", "box_jitter", "box_point"):
        boxes = [tight_box(o) for o in objects]
        if kind == "box_jitter":
            boxes = [jitter_box(b, size, rng, jitter_percent, "percent") for b in boxes]
        prompts.boxes = np.stack(boxes).astype(np.float32)
    if kind == "point" and centre_click_share and rng.random() < centre_click_share:
        prompts.add_clicks([(center_point(o), 1) for o in objects])
    elif kind in ("point", "box_point"):
        prompts.add_clicks([(tuple(random_points(o, 1, rng)[0]), 1) for o in objects])
    elif kind == "points":
        count = int(rng.integers(2, max_points + 1))
        prompts.points = np.stack([random_points(o, count, rng) for o in objects]).astype(np.float32)
        prompts.labels = np.ones((len(objects), count), dtype=np.int64)
    return prompts


def mask_losses(logits: Tensor, targets: Tensor, focal_weight: float, dice: DiceLoss) -> Tensor:
    """Focal x weight + Dice per mask: logits (K, M, H, W), targets (K, 1, H, W) -> (K, M)."""
    expanded = targets.expand_as(logits)
    focal = sigmoid_focal_loss(logits, expanded, reduction="none").flatten(2).mean(2)
    overlap = dice(logits.flatten(0, 1)[:, None], expanded.flatten(0, 1)[:, None]).reshape(logits.shape[:2])
    return focal_weight * focal + overlap


def iou_rank_loss(predicted_iou: Tensor, iou_target: Tensor) -> Tensor:
    """ListNet over a click's masks (K, M): cross-entropy of the predicted order against the real one."""
    target = torch.softmax(iou_target / IOU_RANK_TEMPERATURE, dim=1)
    return -(target * torch.log_softmax(predicted_iou / IOU_RANK_TEMPERATURE, dim=1)).sum(1).mean()


def click_agreement_loss(logits: Tensor, points: np.ndarray, labels: np.ndarray) -> Tensor:
    """Mean binary cross-entropy of the logit under each click (``logits`` (K, H, W), ``points`` (K, n, 2) x, y in
    the logits' frame) against its label (``labels`` (K, n); -1, no click, is left out); 0 without clicks."""
    keep = labels >= 0
    if not keep.any():
        return logits.sum() * 0
    objects = np.nonzero(keep)[0]
    clicked = points[keep].astype(np.int64)
    height, width = logits.shape[-2:]
    xs, ys = np.clip(clicked[:, 0], 0, width - 1), np.clip(clicked[:, 1], 0, height - 1)
    under = logits[torch.from_numpy(objects), torch.from_numpy(ys), torch.from_numpy(xs)]
    target = torch.from_numpy(labels[keep].astype(np.float32)).to(logits.device)
    return nn.functional.binary_cross_entropy_with_logits(under.float(), target)


def rollout_loss(round_losses: Sequence[Tensor], first_trained: bool, first_round_share: float | None) -> Tensor:
    """A rollout's loss from its trained rounds' losses: their mean, or with ``first_round_share`` (and the first
    prompt's round trained, and corrections after it) that share for the first and the rest evenly over the others."""
    if first_round_share is None or not first_trained or len(round_losses) < 2:
        return torch.stack(list(round_losses)).mean()
    corrections = torch.stack(list(round_losses[1:])).mean()
    return first_round_share * round_losses[0] + (1 - first_round_share) * corrections


def real_iou(logits: Tensor, targets: Tensor) -> Tensor:
    pred = logits > 0
    truth = targets.expand_as(pred) > 0.5
    inter = (pred & truth).flatten(2).sum(2).float()
    union = (pred | truth).flatten(2).sum(2).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def best_object_iou(logits: Tensor, labels: Tensor) -> Tensor:
    """IoU of each mask (B, M, H, W logits) with the labelled object (H, W ids) it overlaps best; 0 for
    a mask that touches none, an empty mask included."""
    ids = torch.unique(labels)
    ids = ids[ids > 0]
    pred = (logits > 0).flatten(2).float()  # (B, M, HW)
    if len(ids) == 0:
        return torch.zeros(pred.shape[:2], device=pred.device)
    objects = (labels.flatten()[None] == ids[:, None]).float()  # (O, HW)
    inter = pred @ objects.t()  # (B, M, O)
    union = pred.sum(2, keepdim=True) + objects.sum(1) - inter
    return (inter / union.clamp(min=1)).amax(2)


def background_points(labels: Tensor, content: tuple[int, int], count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` (x, y) points on unlabelled pixels of the image content (not its padding)."""
    y, x = np.nonzero(labels[: content[0], : content[1]].numpy() == 0)
    if len(x) == 0 or count == 0:
        return np.zeros((0, 2), dtype=np.float32)
    chosen = rng.choice(len(x), min(count, len(x)), replace=False)
    return np.stack([x[chosen], y[chosen]], axis=1).astype(np.float32)


@dataclass
class ImageStep:
    image: EmbeddedImage
    object_ids: list[int]
    kind: str
    seed: int


class ImageSampler:
    """Which training images each step sees: evenly over images, over data sets (``balance_datasets``),
    and with ``tile_share`` a tile or a whole image by that chance first, so that the many tiles of a
    few tiled sets cannot crowd out the large objects of whole images."""

    def __init__(self, train: list[EmbeddedImage], config: ClickTrainConfig):
        self.config = config
        groups: dict[str, list[int]] = {}
        for index, image in enumerate(train):
            groups.setdefault(image.dataset, []).append(index)
        self.count = len(train)
        self.groups = list(groups.values())  # data sets, their tiles apart
        tile_names = {tiled_folder_name(name, config.tile, config.halo) for name in config.tiled} if config.tile else set()
        self.pools = ([g for name, g in groups.items() if name in tile_names],  # tiles, whole images
                      [g for name, g in groups.items() if name not in tile_names])
        self.pooled = [np.concatenate(pool) if pool else np.empty(0, int) for pool in self.pools]  # their images

    def draw(self, rng: np.random.Generator) -> list[int]:
        """One step's image indices: distinct images drawn evenly, or with ``balance_datasets`` one image
        from each of ``images_per_step`` data sets drawn evenly (with replacement). ``tile_share`` (when
        there are both tiles and whole images) draws each image from the tiles or the whole images alone. A set
        with fewer training images than ``images_per_step`` gives each step all of them."""
        config = self.config
        if config.tile_share is not None and all(self.pools):
            return [self._draw_from(0 if rng.random() < config.tile_share else 1, rng) for _ in range(config.images_per_step)]
        if not config.balance_datasets:
            return rng.choice(self.count, min(config.images_per_step, self.count), replace=False).tolist()
        return [int(rng.choice(self.groups[g])) for g in rng.integers(len(self.groups), size=config.images_per_step)]

    def _draw_from(self, pool: int, rng: np.random.Generator) -> int:
        """One image of ``pools[pool]``: a group evenly then one of its images (balance_datasets), or any image."""
        if self.config.balance_datasets:
            groups = self.pools[pool]
            return int(rng.choice(groups[int(rng.integers(len(groups)))]))
        return int(rng.choice(self.pooled[pool]))


class ClickTask(TrainingTask):
    """Click training of a SAM network's prompt parts, for the shared loop."""

    kind = CHECKPOINT_KIND
    unused_parameters = True  # a box alone goes to the frozen base decoder and reaches nothing trained

    def __init__(self, config: ClickTrainConfig, network: Sam, image_size: int, train: list[EmbeddedImage],
                 val: list[EmbeddedImage], meta: dict[str, object], base: PromptPath | None = None,
                 device: torch.device | str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.scale = image_size / LOW_RES  # 256 px frame -> model input frame
        self.train_images = train
        self.sampler = ImageSampler(train, config)
        self.val_images = val
        self.meta = meta
        self.module = PromptPath(network.prompt_encoder, network.mask_decoder, use_shared_decoder=False).to(self.device)
        self.iou_head_only = config.trainable == "iou_head"
        for name, parameter in self.module.named_parameters():
            parameter.requires_grad_(not self.iou_head_only or name.startswith(IOU_HEAD))
        # the frozen base prompt encoder and decoder: decodes a box alone, as at inference
        self.base = None if base is None else base.to(self.device)
        self.optimizer = torch.optim.AdamW([p for p in self.module.parameters() if p.requires_grad],
                                           lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, config.lr_gamma)
        self.dice = DiceLoss(sigmoid=True, reduction="none")
        weights = np.array(config.first_prompt_weights, dtype=float)
        self.kind_probabilities = weights / weights.sum()

    def batches(self, epoch: int, rng: np.random.Generator) -> list[list[ImageStep]]:
        batches = []
        for _ in range(self.config.steps_per_epoch):
            step = []
            for index in self.sampler.draw(rng):
                image = self.train_images[index]
                count = min(self.config.objects_per_image, image.objects)
                kind = "point" if self.iou_head_only else str(rng.choice(FIRST_PROMPTS, p=self.kind_probabilities))
                step.append(ImageStep(image, [], kind, int(rng.integers(2**31))))
                step[-1].object_ids = rng.permutation(image.objects)[:count].tolist()  # ranks among kept objects
            batches.append(step)
        return batches

    def _objects(self, labels: Tensor, ranks: Sequence[int]) -> list[np.ndarray]:
        ids = torch.unique(labels)
        ids = ids[ids > 0]
        return [(labels == ids[r]).numpy() for r in ranks]

    def loss(self, batch: list[ImageStep], update: int = 0) -> Tensor:
        """The click-simulation rollouts and background clicks of the batch's images, averaged."""
        total = torch.zeros((), device=self.device)
        for item in batch:
            features, labels = load_embedding(item.image.path)
            features = features.to(self.device)
            objects = self._objects(labels, item.object_ids)
            rng = np.random.default_rng(item.seed)
            prompts = first_prompts(item.kind, objects, rng, self.config.max_points, self.config.box_jitter_percent,
                                    self.config.centre_click_share)
            loss = self._rollout(features, objects, prompts, item.kind == "point", rng, train=True,
                                 rounds=0 if self.iou_head_only else None, base_first=item.kind in BOX_ALONE)[0]
            total = total + loss + self._background_loss(features, labels, item.image.content, rng)
        return total / max(1, len(batch))

    def _background_loss(self, features: Tensor, labels: Tensor, content: tuple[int, int],
                         rng: np.random.Generator) -> Tensor:
        """MSE of the IoU head for lone clicks on background (the point grid's most common case)."""
        points = background_points(labels, content, self.config.background_clicks, rng)
        if len(points) == 0:
            return torch.zeros((), device=self.device)
        coords = torch.from_numpy(points[:, None] * self.scale).to(self.device)
        positive = torch.ones(len(points), 1, dtype=torch.int64, device=self.device)
        logits, predicted_iou = self.module(features, (coords, positive), None, None, True)
        return nn.functional.mse_loss(predicted_iou, best_object_iou(logits.detach(), labels.to(self.device)))

    def _rollout(self, features: Tensor, objects: list[np.ndarray], prompts: ObjectPrompts, lone_click: bool,
                 rng: np.random.Generator, train: bool, rounds: int | None = None,
                 base_first: bool = False) -> tuple[Tensor, list[list[float]]]:
        """The first prompts, then corrective rounds; returns the loss (:func:`rollout_loss`) and each round's Dice
        per object.

        ``lone_click``: the first prompt is one click, decoded to 3 masks (the best one is kept).
        ``base_first``: the first prompt is a box alone, decoded by the frozen base decoder when there is one."""
        config = self.config
        rounds = config.rounds if rounds is None else rounds
        targets = torch.from_numpy(np.stack(objects)).float()[:, None].to(self.device)
        mask_input = None
        round_losses = []
        dice_per_round = []
        for round_index in range(rounds + 1):
            multimask = lone_click and round_index == 0
            points, boxes = prompts.tensors(self.scale, self.device)
            if base_first and round_index == 0 and self.base is not None:
                with torch.no_grad():
                    logits = self.base(features, points, boxes, None, False)[0]
                chosen = logits[:, 0]
            else:
                logits, predicted_iou = self.module(features, points, boxes, mask_input, multimask)
                losses = mask_losses(logits, targets, config.focal_weight, self.dice)
                if multimask and not train:  # as at inference: the mask the model itself ranks highest
                    best = predicted_iou.argmax(1)
                else:
                    best = losses.argmin(1)
                chosen = logits[torch.arange(len(objects), device=self.device), best]
                iou_target = real_iou(logits.detach(), targets)
                loss = losses.gather(1, best[:, None]).mean() + nn.functional.mse_loss(predicted_iou, iou_target)
                if multimask and train and config.iou_rank_weight:
                    loss = loss + config.iou_rank_weight * iou_rank_loss(predicted_iou, iou_target)
                if round_index > 0 and train and config.click_weight:
                    loss = loss + config.click_weight * click_agreement_loss(chosen, prompts.points, prompts.labels)
                round_losses.append(loss)
            masks = (chosen.detach() > 0).cpu().numpy()
            dice_per_round.append([dice(m, o) for m, o in zip(masks, objects)])
            if round_index < rounds:
                rule = "largest" if not train or rng.random() < 0.5 else "random"
                prompts.add_clicks([error_click(m, o, rng, rule) for m, o in zip(masks, objects)])  # type: ignore[arg-type]
                mask_input = chosen.detach()[:, None]
        if not round_losses:
            return torch.zeros((), device=self.device), dice_per_round
        first_trained = not (base_first and self.base is not None)
        return rollout_loss(round_losses, first_trained, config.first_round_share), dice_per_round

    @torch.no_grad()
    def validate(self, max_objects: int = 4) -> float:
        """Mean Dice over validation objects of: a tight box, one centre click, and the centre click
        after 2 corrective clicks (centre of the largest error region)."""
        scores = []
        for image in self.val_images:
            features, labels = load_embedding(image.path)
            features = features.to(self.device)
            objects = self._objects(labels, range(min(max_objects, image.objects)))
            rng = np.random.default_rng(0)
            boxes = ObjectPrompts(None, None, np.stack([tight_box(o) for o in objects]).astype(np.float32))
            scores += self._rollout(features, objects, boxes, False, rng, train=False, rounds=0, base_first=True)[1][0]
            centres = ObjectPrompts(np.array([[center_point(o)] for o in objects], dtype=np.float32),
                                    np.ones((len(objects), 1), dtype=np.int64), None)
            dice_per_round = self._rollout(features, objects, centres, True, rng, train=False, rounds=2)[1]
            scores += dice_per_round[0] + dice_per_round[2]
        return float(np.mean(scores)) if scores else float("nan")

    def trained_weights(self) -> dict[str, Tensor]:
        """The prompt encoder and mask decoder under the network's own key names."""
        return self.module.state_dict()

    def checkpoint_meta(self) -> dict[str, object]:
        return self.meta


def spread(items: list[EmbeddedImage], count: int) -> list[EmbeddedImage]:
    """At most ``count`` of ``items``, evenly spaced (the tiles of several validation images, not all of one)."""
    if len(items) <= count:
        return items
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, count).round()]


def _any_foreground(samples: Iterable[Sample]) -> bool:
    """Whether any of the samples' masks holds a foreground pixel (stops at the first that does); an unreadable
    mask is passed over here, and the embedding run records why."""
    for sample in samples:
        try:
            if sample.mask_path is not None and read_mask(sample.mask_path).any():
                return True
        except InputError:
            continue
    return False


def train_clicks(data: Sequence[str | Path], out: str | Path, config: ClickTrainConfig | None = None,
                 embeddings: str | Path | None = None, encoder_backend: str = "torch",
                 show_progress: bool = True, device: str | None = None, executor: Executor | None = None) -> TrainResult:
    """Train the prompt encoder and mask decoder of ``config.backbone`` for clicks; resumable.

    The training side of every data set (its first ``max_train_images``) and a few validation images
    are embedded once into ``embeddings`` (default ``OUT/embeddings``; share it between runs), then the
    shared loop trains. ``best.pt`` loads as a model: ``load_model(backbone, checkpoint=best.pt)``.
    ``device``: where the encoder embeds and the prompt parts train (default: CUDA when present).
    """
    config = config or ClickTrainConfig()
    config.check()
    out = Path(out)
    datasets = load_datasets(data)
    store = Path(embeddings) if embeddings is not None else out / "embeddings"
    inputs, roots = [folder for d in datasets for folder in d.folders], [d.root for d in datasets]
    check_apart(out, inputs, roots=roots)  # --out first: the embeddings' default folder is inside it
    check_apart(store, inputs, "--embeddings", roots)
    check_not_a_file(store, "--embeddings")  # before start_run writes into --out
    splits = {d.name: training_split(d, config.fractions, config.split_seed) for d in datasets}
    backbone = load_model(config.backbone, device=device, encoder_backend=encoder_backend)
    if backbone.spec.prompt_weights is not None:
        raise InputError(f"--backbone {config.backbone}: already carries trained prompt weights; train on its base "
                         "model and start from them with --init")
    # the base decoder is copied before --init replaces the prompt parts; a bad --init is refused before any embedding
    base = base_prompt_path(backbone.network, use_shared_decoder=False) if config.base_box_decoder else None
    if config.init_weights is not None:
        load_prompt_parts(backbone.network, Path(config.init_weights))
    sides = {d.name: (splits[d.name]["train"][: config.max_train_images], splits[d.name]["val"][: config.max_val_images])
             for d in datasets}
    unknown = sorted(set(config.tiled) - {d.name for d in datasets})
    if unknown:
        raise InputError(f"--tiled {unknown[0]}: not one of the data sets given with --data")
    folders = {d.name: [d.name] + ([tiled_folder_name(d.name, config.tile, config.halo)]  # type: ignore[arg-type]
                                   if d.name in config.tiled else []) for d in datasets}
    if not _any_foreground(s for d in datasets for s in sides[d.name][0]):  # before hours of embedding
        raise InputError(f"{data_option(datasets)}: every training image's mask is empty (or unreadable); "
                         "nothing to train on")
    flips = (False, True) if config.flips else (False,)
    tiling = None if config.tile is None else (config.tile, config.halo)
    check_embedding_folders(backbone, [d.name for d in datasets], store, flips, config.min_object_area, config.tiled,
                            tiling)
    start_run(out, asdict(config), splits)  # once the model, --init, --tiled, the masks and the cache are checked
    group = processes()
    if group.leader:  # under torchrun the others wait for the embeddings
        chosen = {d.name: (d, sides[d.name][0] + sides[d.name][1]) for d in datasets}
        embed_datasets(backbone, chosen, store, flips, config.min_object_area, show_progress, executor)
        if config.tiled:
            embed_datasets(backbone, {name: chosen[name] for name in config.tiled}, store, flips,
                           config.min_object_area, show_progress, executor, tiling)
    barrier(group)
    train = [e for d in datasets for folder in folders[d.name]
             for e in embedded_images(store, folder, [s.id for s in sides[d.name][0]])]
    val = [e for d in datasets for folder in folders[d.name]
           for e in spread([e for e in embedded_images(store, folder, [s.id for s in sides[d.name][1]])
                            if ".hflip" not in e.path.name], config.max_val_images)]
    if not train:
        raise InputError(f"{data_option(datasets)}: no training image has an object of at "
                         f"least {config.min_object_area} pixels at 256 px (are the masks empty?)")
    seed_everything(config.seed)
    meta = {"backbone": config.backbone, "backbone_sha256": backbone.weights_sha256,
            "datasets": [d.name for d in datasets], "train_images": len(train), "val_images": len(val),
            "train_objects": sum(e.objects for e in train), "embeddings": str(store),
            "train_per_folder": {f: sum(e.dataset == f for e in train) for fs in folders.values() for f in fs}}
    if config.init_weights is not None:
        meta["init_weights_sha256"] = file_sha256(Path(config.init_weights))
    task = ClickTask(config, backbone.network, backbone.spec.image_size, train, val, meta, base, backbone.device)
    return fit(task, out, asdict(config), config.epochs, config.seed, f"train clicks ({config.backbone})",
               show_progress, config.patience)
