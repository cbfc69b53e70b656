"""Training a standard segmenter on raw, SAMAug-augmented, or both kinds of input.

- ``raw``: the image alone (zero prior channels, so every arm has the same network).
- ``samaug``: the image with its priors.
- ``dual``: both for every batch, SAMAug's recipe; ``summed`` adds the two losses for one
  optimiser step (the paper), ``alternate`` takes one step on each (the authors' polyp code).

Images are resized so that their longer side is ``scale_to`` and trained on random
``image_size`` patches (the whole image when the two are equal), flipped and rotated by 90
degrees (MONAI transforms). Loss: Dice + BCE (MONAI ``DiceCELoss``); Adam with cosine decay.
The run folder, checkpoints and resuming are the shared training loop's (``sam4med.engine.training``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from monai.data import Dataset as MonaiDataset
from monai.losses import DiceCELoss
from monai.transforms import Compose, RandFlipd, RandRotate90d, RandSpatialCropd, SpatialPadd
from monai.utils import convert_to_tensor, set_determinism

from sam4med.engine.checkpoints import read_trained_checkpoint
from sam4med.engine.datasets import data_option, load_datasets
from sam4med.engine.errors import InputError, check_counts, check_limit, check_number, check_precision, check_seed
from sam4med.engine.metrics import dice
from sam4med.engine.models import resolve_device
from sam4med.engine.runs import warn
from sam4med.engine.splits import DEFAULT_FRACTIONS, training_split
from sam4med.engine.training import LAST_FILE, TrainingTask, TrainResult, fit, seed_everything, start_run
from sam4med.samaug.inputs import POLICIES, PreparedImage, compose_input, dataset_is_gray, input_channels, prepare_images
from sam4med.samaug.networks import NETWORKS, build_network
from sam4med.samaug.prediction import combine, default_mode, probabilities
from sam4med.samaug.store import PriorStore

INPUTS: tuple[str, ...] = ("raw", "samaug", "dual")
DUAL_UPDATES: tuple[str, ...] = ("summed", "alternate")
CHECKPOINT_KIND = "samaug-segmenter"
MAX_IMAGE_SIZE = 2048  # a training patch's side; a whole image may be --scale-to up to 4x that


@dataclass
class TrainConfig:
    """Every choice of a training run; stored in config.json and in the checkpoints."""

    net: str = "unet"
    input_kind: str = "dual"
    policy: str = "add"
    dual_update: str = "summed"
    image_size: int = 128  # patch side
    scale_to: int | None = None  # longer image side before patching; None: image_size (whole images)
    patches_per_image: int = 1  # random patches drawn from each training image per epoch
    features: int = 16
    epochs: int = 20  # at most, with a patience
    patience: int | None = None  # stop after this many epochs without a better validation Dice
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    split_seed: int = 0  # fixed apart from the training seed, so every arm and seed shares one split
    fractions: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_FRACTIONS))
    max_train_images: int | None = None
    precision: str | None = None  # training steps under "bf16" autocast (engine.training.fit); None or "fp32": fp32

    def check(self) -> None:
        check_precision(self.precision or "fp32")
        for name, value, allowed in (("--net", self.net, NETWORKS), ("--input", self.input_kind, INPUTS),
                                     ("--policy", self.policy, POLICIES), ("--dual-update", self.dual_update, DUAL_UPDATES)):
            if value not in allowed:
                raise InputError(f"{name} {value!r}: choose one of {', '.join(allowed)}")
        check_number(self.image_size, "--image-size", minimum=16, maximum=MAX_IMAGE_SIZE)
        if self.image_size % 16:  # four halvings down to the bottleneck and back must give the same size
            raise InputError(f"--image-size {self.image_size}: must be a multiple of 16 (the networks halve it 4 times)")
        if self.net == "swin_unet" and (self.image_size % 32 or self.image_size < 64):
            raise InputError(f"--image-size {self.image_size}: swin_unet needs a multiple of 32 of at least 64")
        if self.scale_to is not None:
            check_number(self.scale_to, "--scale-to", maximum=MAX_IMAGE_SIZE * 4)
        check_counts(epochs=self.epochs, batch_size=self.batch_size, patches_per_image=self.patches_per_image,
                     features=self.features)
        check_number(self.learning_rate, "--learning-rate", above=0)
        check_number(self.weight_decay, "weight_decay", minimum=0)
        if self.scale_to is not None and self.scale_to < self.image_size:
            raise InputError(f"--scale-to {self.scale_to}: must be 0 (whole images at the patch size) or at least "
                             f"--image-size {self.image_size}")
        for option, value, default, used in (("--policy", self.policy, "add", self.input_kind != "raw"),
                                             ("--dual-update", self.dual_update, "summed", self.input_kind == "dual")):
            if value != default and not used:  # recorded all the same: the run folder holds what was asked
                warn(f"{option} {value}: has no effect with --input {self.input_kind}")
        check_seed(self.seed, "--seed")
        check_seed(self.split_seed, "--split-seed")
        check_limit(self.max_train_images, "--max-train-images")
        check_limit(self.patience, "--patience")

    @property
    def working_side(self) -> int:
        return self.scale_to or self.image_size


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


class SegmenterTask(TrainingTask):
    """A MONAI segmenter on raw, SAMAug or dual input, for the shared loop."""

    kind = CHECKPOINT_KIND

    def __init__(self, config: TrainConfig, train_items: list[PreparedImage], val_items: list[PreparedImage],
                 meta: dict[str, object], device: torch.device | None = None):
        self.config = config
        self.device = device or torch.device("cpu")
        self.val_items = val_items
        self.meta = meta
        self.records = [{"image": item.image, "priors": item.priors, "mask": item.mask}
                        for item in train_items for _ in range(config.patches_per_image)]
        self.module = build_network(config.net, meta["in_channels"], config.features).to(self.device)  # type: ignore[arg-type]
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=config.learning_rate,
                                          weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.epochs)
        self.criterion = DiceCELoss(sigmoid=True)
        self.updates_per_batch = 2 if config.input_kind == "dual" and config.dual_update == "alternate" else 1

    def batches(self, epoch: int, rng: np.random.Generator) -> DataLoader:
        seed = int(rng.integers(2**31))
        return DataLoader(MonaiDataset(self.records, _train_transform(self.config.image_size, seed)),
                          batch_size=self.config.batch_size, shuffle=True, num_workers=0,
                          drop_last=len(self.records) > self.config.batch_size,
                          generator=torch.Generator().manual_seed(seed))

    def loss(self, batch: dict[str, torch.Tensor], update: int = 0) -> torch.Tensor:
        """Raw, SAMAug or dual input: the losses of both inputs summed, or (dual, alternate) the input of this
        update."""
        # plain tensors: MONAI's MetaTensor tracking through the network made a step several times slower
        images, maps, target = (convert_to_tensor(batch[key], track_meta=False).to(self.device)
                                for key in ("image", "priors", "mask"))
        inputs = {"raw": [None], "samaug": [maps], "dual": [None, maps]}[self.config.input_kind]
        if self.updates_per_batch > 1:
            inputs = [inputs[update]]
        return sum(self.criterion(self.module(compose_input(images, prior, self.config.policy)), target)  # type: ignore[return-value]
                   for prior in inputs)

    def validate(self) -> float:
        scores = []
        for item in self.val_items:
            raw = probabilities(self.module, item.image, None, self.config.policy, self.config.image_size)
            aug = raw if self.config.input_kind == "raw" else probabilities(
                self.module, item.image, item.priors, self.config.policy, self.config.image_size)
            prob = combine(raw, aug, default_mode(self.config.input_kind))
            scores.append(dice((prob > 0.5).numpy(), item.mask[0].numpy() > 0))
        return float(np.mean(scores))

    def checkpoint_meta(self) -> dict[str, object]:
        return self.meta


def _check_same_priors(out: Path, prior_keys: dict[str, str]) -> None:
    """A run resumes on the priors it was trained on: a priors folder made with other settings or another model
    would train its later epochs on other input without a word (config.json names the folder, not what is in it)."""
    last = out / LAST_FILE
    if not last.is_file():
        return
    trained_on = read_trained_checkpoint(last, CHECKPOINT_KIND)["meta"].get("prior_keys")
    if trained_on is not None and trained_on != prior_keys:
        changed = sorted(name for name in trained_on.keys() | prior_keys.keys()
                         if trained_on.get(name) != prior_keys.get(name))
        raise InputError(f"{out}: trained on priors made with other settings or another model ({', '.join(changed)}); "
                         "give the --priors it was trained on, or train again into another --out")


def train(
    data: Sequence[str | Path],
    priors: str | Path | None,
    out: str | Path,
    config: TrainConfig | None = None,
    show_progress: bool = True,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train one segmenter; calling again with the same ``out`` and config resumes from ``last.pt`` (on any
    device: the device is not part of the run's config).

    ``priors`` is the folder given to ``sam4med samaug priors --out`` (one sub-folder per data set); it
    is needed unless ``config.input_kind == "raw"``, which does not read it (an experiment may pass the same
    ``priors`` to every arm). ``device``: None is a CUDA GPU where there is one.
    """
    config = config or TrainConfig()
    config.check()
    resolved = resolve_device(device)
    out = Path(out)
    if config.input_kind == "raw":
        priors = None
    elif priors is None:
        raise InputError(f"--input {config.input_kind}: needs --priors (run `sam4med samaug priors` first)")
    datasets = load_datasets(data)
    stores = {d.name: PriorStore(Path(priors) / d.name) if priors is not None else None for d in datasets}
    prior_keys = {name: store.record["key"] for name, store in stores.items() if store is not None}
    _check_same_priors(out, prior_keys)
    splits = {d.name: training_split(d, config.fractions, config.split_seed) for d in datasets}
    gray = all(dataset_is_gray(d) for d in datasets)
    train_items: list[PreparedImage] = []
    val_items: list[PreparedImage] = []
    for dataset in datasets:
        store = stores[dataset.name]
        train_samples = splits[dataset.name]["train"][: config.max_train_images]
        prepared = prepare_images(dataset, [*train_samples, *splits[dataset.name]["val"]], store, config.working_side,
                                  gray)  # one error names every unusable file of both sides
        train_items += prepared[: len(train_samples)]
        val_items += prepared[len(train_samples) :]
    if not any(item.mask.any() for item in train_items):
        raise InputError(f"{data_option(datasets)}: every training mask is empty; "
                         "there is nothing to learn")
    start_run(out, asdict(config), splits)  # once every image, mask and prior has been read
    seed_everything(config.seed)
    set_determinism(config.seed)
    image_channels = train_items[0].image.shape[0]
    meta = {"in_channels": input_channels(image_channels, config.policy), "image_channels": image_channels,  # type: ignore[arg-type]
            "gray": gray, "prior_keys": prior_keys, "datasets": [d.name for d in datasets]}
    task = SegmenterTask(config, train_items, val_items, meta, resolved)
    return fit(task, out, asdict(config), config.epochs, config.seed, f"train {config.net}/{config.input_kind}",
               show_progress, config.patience)
