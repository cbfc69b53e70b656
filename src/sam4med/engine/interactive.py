"""Interactive correction: each click corrects the mask of the round before.

Each round adds one click (see :func:`sam4med.engine.prompts.error_click`) to the prompt and
feeds the previous round's low-res logits back as ``mask_input``, as SAM was trained to use them.

What a click may change (``correction``):

- ``global``: the decoder's new mask replaces the old one everywhere (SAM's own loop);
- ``local``: the new logits are taken only where the mask changed in a region that holds the click, or
  within ``LOCAL_RADIUS`` of it, and the previous logits are kept elsewhere. A click says what is wrong
  where it lands; FocalClick (Chen et al., CVPR 2022) refines a local crop around each click for the same
  reason;
- ``auto`` (default): ``local`` once the prompt holds a box, ``global`` for clicks alone. A box fixes the
  object's extent, and a decoder that redraws the whole object on every click can undo a good box mask far
  from the click. A lone click is ambiguous and its mask often far off: the clicks after it may rightly
  redraw the whole object. Chosen on the data sets' validation sides, held on their test sides (figures in
  the README).

The merge is done on the low-res logits, in the frame they were decoded in, so the mask shown and the
logits fed back to the next round agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

from sam4med.engine.errors import InputError
from sam4med.engine.metrics import dice
from sam4med.engine.predictor import Predictor
from sam4med.engine.preprocessing import ImageGeometry
from sam4med.engine.prompts import Prompt, error_click, select_mask, wants_multimask
from sam4med.engine.sam_model import Decoded

Correction = Literal["auto", "local", "global"]
CORRECTIONS = ("auto", "local", "global")
# Besides the changed regions that hold the click: changes within this share of the logits' side of it are
# taken too (a small object's outline moves all around it). Chosen on the validation sides (README).
LOCAL_RADIUS = 1 / 16


def check_correction(correction: str) -> None:
    if correction not in CORRECTIONS:
        raise InputError(f"--correction {correction!r}: choose one of {', '.join(CORRECTIONS)}")


@dataclass(frozen=True)
class Round:
    """The mask a round kept, as what the next round builds on: its low-res logits (1, 1, S, S) and the frame
    they are in (the corner of the tile they were decoded on, or (0, 0), and that frame's geometry)."""

    low_res: torch.Tensor = field(repr=False)
    frame: tuple[int, int, ImageGeometry]


def local_change(previous: torch.Tensor, new: torch.Tensor, click: tuple[float, float], geometry: ImageGeometry,
                 radius: float = LOCAL_RADIUS) -> torch.Tensor:
    """Low-res logits (1, 1, S, S): ``new`` on the connected regions of the changed pixels that touch the click
    (``click``: x, y in the frame's pixels) and on the changed pixels within ``radius`` x S of it, ``previous``
    elsewhere."""
    side = new.shape[-1]
    factor = side / geometry.input_size
    scale_x, scale_y = geometry.scale_xy
    x = min(max(int(click[0] * scale_x * factor), 0), side - 1)
    y = min(max(int(click[1] * scale_y * factor), 0), side - 1)
    changed = ((previous[0, 0] > 0) ^ (new[0, 0] > 0)).cpu().numpy()
    regions, _ = ndimage.label(changed, structure=np.ones((3, 3)))
    near = regions[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2]
    accept = np.isin(regions, np.unique(near[near > 0]))
    rows, columns = np.ogrid[:side, :side]
    accept |= changed & ((rows - y) ** 2 + (columns - x) ** 2 <= (radius * side) ** 2)
    return torch.where(torch.from_numpy(accept).to(new.device)[None, None], new, previous)


def corrects_locally(prompt: Prompt, correction: Correction) -> bool:
    """Whether a click (the prompt's last point) may change the mask only near itself."""
    return correction == "local" or (correction == "auto" and prompt.box is not None)


def correct(predictor: Predictor, prompt: Prompt, previous: Round | None, mask_rule: str,
            correction: Correction = "auto", gt: np.ndarray | None = None) -> tuple[np.ndarray, float, Round]:
    """One round: decode ``prompt`` (its last point the new click) with the previous round fed back, and keep
    what ``correction`` lets the click change. Returns the mask at the image's size, the model's IoU estimate
    of the decoded mask, and the round to build on next. ``gt`` only for the ``oracle`` mask rule."""
    decoded = predictor.predict([prompt], mask_input=None if previous is None else previous.low_res,
                                multimask=wants_multimask(mask_rule, prompt))
    masks, iou = decoded.masks()[0], decoded.iou[0].cpu().numpy()
    choice = select_mask(masks, iou, mask_rule, gt)
    kept: Decoded = decoded.pick([(0, choice)])
    current = Round(kept.low_res, kept.frame)
    if prompt.points is not None and previous is not None and previous.frame == current.frame \
            and corrects_locally(prompt, correction):
        x0, y0, geometry = current.frame
        click = prompt.points[-1]
        merged = local_change(previous.low_res, kept.low_res, (click[0] - x0, click[1] - y0), geometry)
        return kept.with_low_res(merged).masks()[0, 0], float(iou[choice]), Round(merged, current.frame)
    return masks[choice], float(iou[choice]), current


@dataclass
class InteractiveResult:
    dice_per_round: list[float]  # round 0 is the initial prompt, then one entry per click
    prompts: list[Prompt] = field(repr=False)
    final_mask: np.ndarray = field(repr=False)

    def clicks_to_reach(self, threshold: float) -> int:
        """Interactions (initial prompt = 1) until Dice >= threshold; capped at rounds + 1 (NoC)."""
        for index, score in enumerate(self.dice_per_round):
            if score >= threshold:
                return index + 1
        return len(self.dice_per_round)


def run_interactive(
    predictor: Predictor,
    gt: np.ndarray,
    initial: Prompt,
    rounds: int,
    rng: np.random.Generator,
    click_rule: Literal["largest", "random"] = "largest",
    mask_rule: str = "single",
    correction: Correction = "auto",
) -> InteractiveResult:
    """Simulate ``rounds`` corrective clicks on one object of the image set in ``predictor``."""
    prompt, previous = initial, None
    dice_per_round: list[float] = []
    prompts: list[Prompt] = []
    mask = np.zeros_like(gt)
    for round_index in range(rounds + 1):
        if round_index > 0:
            click = error_click(mask, gt, rng, click_rule)
            if click is None:  # perfect already: later rounds keep the same mask
                dice_per_round.append(dice_per_round[-1])
                continue
            prompt = prompt.add_point(*click)
        mask, _, previous = correct(predictor, prompt, previous, mask_rule, correction, gt)
        prompts.append(prompt)
        dice_per_round.append(dice(mask, gt))
    return InteractiveResult(dice_per_round, prompts, mask)
