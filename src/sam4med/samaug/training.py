"""Training a standard segmenter on raw, SAMAug-augmented, or both kinds of input.

- ``raw``: the image alone (zero prior channels, so every arm has the same network).
- ``samaug``: the image with its priors.
- ``dual``: both for every batch, SAMAug's recipe; ``summed`` adds the two losses for one
  optimiser step (the paper), ``alternate`` takes one step on each (the authors' polyp code).

Images are resized so that their longer side is ``scale_to`` and trained on random
``image_size`` patches (the whole image when the two are equal), flipped and rotated by 90
degrees (MONAI transforms). Loss: Dice + BCE (MONAI ``DiceCELoss``); Adam with cosine decay.
``OUT/config.json`` and ``OUT/split.json`` record the protocol, ``history.jsonl`` one row per epoch,
``last.pt`` everything needed to resume, ``best.pt`` the model with the best validation Dice.
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
from monai.data import DataLoader
from monai.data import Dataset as MonaiDataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandFlipd, RandRotate90d, RandSpatialCropd, SpatialPadd
from monai.utils import convert_to_tensor, set_determinism
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from sam4med.engine.data import DEFAULT_FRACTIONS, Dataset, Sample, load_dataset, read_image, read_mask, training_split
from sam4med.engine.errors import InputError
from sam4med.engine.metrics import dice
from sam4med.engine.runs import append_history, claim_run_folder, write_split
from sam4med.samaug.networks import NETWORKS, build_network
from sam4med.samaug.priors import POLICIES, compose_input, image_channels_first, input_channels
from sam4med.samaug.store import PriorStore

INPUTS: tuple[str, ...] = ("raw", "samaug", "dual")
DUAL_UPDATES: tuple[str, ...] = ("summed", "alternate")


@dataclass
class TrainConfig:
    """Every choice of a training run; stored in config.json and in the checkpoints."""

    net: str = "unet"
    input: str = "dual"
    policy: str = "add"
    dual_update: str = "summed"
    image_size: int = 128  # patch side; 128 keeps a U-Net step near a second on 2 CPU cores
    scale_to: int | None = None  # longer image side before patching; None: image_size (whole images)
    patches_per_image: int = 1  # random patches drawn from each training image per epoch
    features: int = 16
    epochs: int = 20
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    split_seed: int = 0  # fixed apart from the training seed, so every arm and seed shares one split
    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    max_train_images: int | None = None

    def check(self) -> None:
        for name, value, allowed in (("--net", self.net, NETWORKS), ("--input", self.input, INPUTS),
                                     ("--policy", self.policy, POLICIES), ("--dual-update", self.dual_update, DUAL_UPDATES)):
            if value not in allowed:
                raise InputError(f"{name} {value!r}: choose one of {', '.join(allowed)}")
        if self.image_size < 16 or min(self.epochs, self.batch_size, self.patches_per_image) < 1:
            raise InputError("--image-size must be >= 16; --epochs, --batch-size, --patches-per-image >= 1")
        if self.scale_to is not None and self.scale_to < self.image_size:
            raise InputError(f"--scale-to {self.scale_to}: must be at least --image-size {self.image_size}")

    @property
    def working_side(self) -> int:
        return self.scale_to or self.image_size


@dataclass
class PreparedImage:
    """One image, its priors and mask at the working scale (longer side = ``scale_to``)."""

    dataset: str
    sample: Sample
    image: torch.Tensor  # (C, h, w) in [0, 1]
    priors: torch.Tensor  # (2, h, w)
    mask: torch.Tensor  # (1, h, w), 0 or 1
    original_size: tuple[int, int]


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == size:
        return tensor
    return F.interpolate(tensor[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def working_size(original: tuple[int, int], side: int) -> tuple[int, int]:
    factor = side / max(original)
    return max(1, round(original[0] * factor)), max(1, round(original[1] * factor))


def is_gray(dataset_images: Sequence[np.ndarray]) -> bool:
    """True when every image has three identical channels (``read_image`` replicates gray)."""
    return all(np.array_equal(im[..., 0], im[..., 1]) and np.array_equal(im[..., 0], im[..., 2])
               for im in dataset_images)


def prepare_images(dataset: Dataset, samples: Sequence[Sample], store: PriorStore | None, side: int,
                   gray: bool, need_masks: bool = True) -> list[PreparedImage]:
    """Read, resize and attach priors (zeros when ``store`` is None, for raw-only training)."""
    prepared = []
    for sample in samples:
        pixels = read_image(sample.image_path)
        original = pixels.shape[:2]
        size = working_size(original, side)
        channels = torch.from_numpy(image_channels_first(pixels[..., :1] if gray else pixels))
        if store is not None:
            priors = torch.from_numpy(store.load(sample.id).as_channels())
            if tuple(priors.shape[1:]) != original:
                raise InputError(f"{store.path(sample.id)}: priors are {tuple(priors.shape[1:])}, image is {original}")
        else:
            priors = torch.zeros((2, *original))
        if sample.mask_path is not None:
            mask = torch.from_numpy(read_mask(sample.mask_path, pixels.shape).astype(np.float32))[None]
            mask = (_resize(mask, size) > 0.5).float()
        elif need_masks:
            raise InputError(f"{sample.image_path}: no mask for training or evaluation")
        else:
            mask = torch.zeros((1, *size))
        prepared.append(PreparedImage(dataset.name, sample, _resize(channels, size), _resize(priors, size), mask,
                                      original))
    return prepared


def _train_transform(image_size: int, seed: int) -> Compose:
    keys = ("image", "priors", "mask")
    transform = Compose([
        SpatialPadd(keys, spatial_size=(image_size, image_size)),
        RandSpatialCropd(keys, roi_size=(image_size, image_size), random_size=False),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandRotate90d(keys, prob=0.5),
    ])
    transform.set_random_state(seed)
    return transform


def probabilities(network: torch.nn.Module, image: torch.Tensor, priors: torch.Tensor | None, policy: str,
                  image_size: int) -> torch.Tensor:
    """The network's foreground probability (h, w) for one image at the working scale, by sliding
    ``image_size`` windows (one window, padded, for a whole-image model)."""
    inputs = compose_input(image[None], None if priors is None else priors[None], policy)  # type: ignore[arg-type]
    with torch.inference_mode():
        logits = sliding_window_inference(inputs, (image_size, image_size), sw_batch_size=4, predictor=network,
                                          overlap=0.25, mode="gaussian")
    return torch.sigmoid(torch.as_tensor(logits))[0, 0]


def confidence(prob: torch.Tensor) -> float:
    """SAMAug's selection criterion: mean distance of the probabilities from 0.5."""
    return float((prob - 0.5).abs().mean())


def combine(raw: torch.Tensor, aug: torch.Tensor, mode: str) -> torch.Tensor:
    """Merge the raw-input and augmented-input probabilities of one image (see ``PREDICT_MODES``)."""
    if mode == "raw":
        return raw
    if mode == "aug":
        return aug
    if mode == "mean":
        return (raw + aug) / 2
    if mode == "confident":
        return aug if confidence(aug) >= confidence(raw) else raw
    if mode == "entropy":
        return aug if mean_entropy(aug) <= mean_entropy(raw) else raw
    raise InputError(f"--mode {mode!r}: choose one of {', '.join(PREDICT_MODES)}")


def mean_entropy(prob: torch.Tensor) -> float:
    """Mean binary entropy (bits) of a probability map; lower is more certain."""
    p = prob.clamp(1e-6, 1 - 1e-6)
    return float((-(p * p.log2() + (1 - p) * (1 - p).log2())).mean())


PREDICT_MODES: tuple[str, ...] = ("raw", "aug", "mean", "confident", "entropy")


def default_mode(input_kind: str) -> str:
    """How a model is used by default: the input it was trained on; dual models pick the confident one."""
    return {"raw": "raw", "samaug": "aug", "dual": "confident"}[input_kind]


def _set_seeds(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    set_determinism(seed)


def _validation_dice(network: torch.nn.Module, images: list[PreparedImage], config: TrainConfig) -> float:
    network.eval()
    scores = []
    for item in images:
        raw = probabilities(network, item.image, None, config.policy, config.image_size)
        aug = raw if config.input == "raw" else probabilities(network, item.image, item.priors, config.policy,
                                                                config.image_size)
        prob = combine(raw, aug, default_mode(config.input))
        scores.append(dice((prob > 0.5).numpy(), item.mask[0].numpy() > 0))
    network.train()
    return float(np.mean(scores))


@dataclass
class TrainResult:
    out: Path
    best_val_dice: float
    best_epoch: int
    seconds: float
    epochs_run: int


def train(
    data: Sequence[str | Path],
    priors: str | Path | None,
    out: str | Path,
    config: TrainConfig | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train one segmenter; calling again with the same ``out`` and config resumes from ``last.pt``.

    ``priors`` is the folder given to ``sam4med priors --out`` (one sub-folder per data set); it is
    needed unless ``config.input == "raw"``.
    """
    config = config or TrainConfig()
    config.check()
    out = Path(out)
    if config.input != "raw" and priors is None:
        raise InputError(f"--input {config.input}: needs --priors (run `sam4med priors` first)")
    datasets = [load_dataset(d) for d in data]
    stores = {d.name: PriorStore(Path(priors) / d.name) if priors is not None else None for d in datasets}
    prior_keys = {name: store.record["key"] for name, store in stores.items() if store is not None}
    claim_run_folder(out, asdict(config))
    splits = {d.name: training_split(d, config.fractions, config.split_seed) for d in datasets}
    write_split(out, splits)
    gray = all(is_gray([read_image(s.image_path) for s in d.samples[:8]]) for d in datasets)
    train_items: list[PreparedImage] = []
    val_items: list[PreparedImage] = []
    for dataset in datasets:
        store = stores[dataset.name]
        train_samples = splits[dataset.name]["train"][: config.max_train_images]
        train_items += prepare_images(dataset, train_samples, store, config.working_side, gray)
        val_items += prepare_images(dataset, splits[dataset.name]["val"], store, config.working_side, gray)

    _set_seeds(config.seed)
    image_channels = train_items[0].image.shape[0]
    network = build_network(config.net, input_channels(image_channels, config.policy), config.features,  # type: ignore[arg-type]
                            config.image_size)
    optimizer = torch.optim.Adam(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    loss_function = DiceCELoss(sigmoid=True)
    state = {"epoch": 0, "best_val_dice": -1.0, "best_epoch": -1, "seconds": 0.0}
    if (out / "last.pt").is_file():
        last = torch.load(out / "last.pt", weights_only=True)
        network.load_state_dict(last["network"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        state = last["state"]
        torch.set_rng_state(last["torch_rng"])

    records = [{"image": item.image, "priors": item.priors, "mask": item.mask}
               for item in train_items for _ in range(config.patches_per_image)]
    loader = DataLoader(MonaiDataset(records, _train_transform(config.image_size, config.seed + state["epoch"])),
                        batch_size=config.batch_size, shuffle=True, num_workers=0, drop_last=len(records) > config.batch_size,
                        generator=torch.Generator().manual_seed(config.seed + state["epoch"]))
    checkpoint_meta = {"config": asdict(config), "in_channels": input_channels(image_channels, config.policy),
                       "image_channels": image_channels, "gray": gray, "prior_keys": prior_keys,
                       "datasets": [d.name for d in datasets]}
    network.train()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), disable=not show_progress) as progress:
        task = progress.add_task(f"train {config.net}/{config.input}", total=config.epochs, completed=state["epoch"],
                                 status="")
        for epoch in range(state["epoch"], config.epochs):
            start = time.perf_counter()
            losses = []
            for batch in loader:
                images, maps, target = batch["image"], batch["priors"], batch["mask"]
                losses.append(_step(network, optimizer, loss_function, images, maps, target, config))
            scheduler.step()
            val_dice = _validation_dice(network, val_items, config)
            state["seconds"] += time.perf_counter() - start
            state["epoch"] = epoch + 1
            row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_dice": val_dice,
                   "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - start, 2)}
            if val_dice > state["best_val_dice"]:
                state.update(best_val_dice=val_dice, best_epoch=epoch + 1)
                torch.save({**checkpoint_meta, "network": network.state_dict(), "epoch": epoch + 1,
                            "val_dice": val_dice}, out / "best.pt")
            torch.save({**checkpoint_meta, "network": network.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "state": state, "torch_rng": torch.get_rng_state()},
                       out / "last.pt")
            append_history(out, row)
            progress.update(task, advance=1, status=f"loss {row['loss']:.3f} val Dice {val_dice:.3f}")
    return TrainResult(out, state["best_val_dice"], state["best_epoch"], state["seconds"], state["epoch"])


def _step(network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_function: torch.nn.Module,
          images: torch.Tensor, maps: torch.Tensor, target: torch.Tensor, config: TrainConfig) -> float:
    """One batch: one optimiser step (raw, samaug, dual summed) or two (dual alternate)."""
    # plain tensors: MONAI's MetaTensor tracking through the network made a step several times slower
    images, maps, target = (convert_to_tensor(t, track_meta=False) for t in (images, maps, target))
    inputs = {"raw": [None], "samaug": [maps], "dual": [None, maps]}[config.input]
    if config.input == "dual" and config.dual_update == "alternate":
        total = 0.0
        for prior in inputs:
            optimizer.zero_grad()
            loss = loss_function(network(compose_input(images, prior, config.policy)), target)  # type: ignore[arg-type]
            loss.backward()
            optimizer.step()
            total += loss.item()
        return total
    optimizer.zero_grad()
    loss = sum(loss_function(network(compose_input(images, prior, config.policy)), target) for prior in inputs)  # type: ignore[arg-type]
    loss.backward()  # type: ignore[union-attr]
    optimizer.step()
    return loss.item()  # type: ignore[union-attr]
