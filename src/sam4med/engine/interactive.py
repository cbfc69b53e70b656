"""Interactive correction: simulated clicks on the error of the previous round.

Each round adds one click (see :func:`sam4med.engine.prompts.error_click`) to the prompt and
feeds the previous round's low-res logits back as ``mask_input``, as SAM was trained to use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from sam4med.engine.predictor import Predictor
from sam4med.engine.metrics import dice
from sam4med.engine.prompts import Prompt, error_click, select_mask, wants_multimask


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
) -> InteractiveResult:
    """Simulate ``rounds`` corrective clicks on one object of the image set in ``predictor``."""
    prompt, mask_input = initial, None
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
        decoded = predictor.predict([prompt], mask_input=mask_input, multimask=wants_multimask(mask_rule, prompt))
        masks = decoded.masks()[0]
        choice = select_mask(masks, decoded.iou[0].cpu().numpy(), mask_rule, gt)
        mask = masks[choice]
        mask_input = decoded.low_res[:, choice : choice + 1]
        prompts.append(prompt)
        dice_per_round.append(dice(mask, gt))
    return InteractiveResult(dice_per_round, prompts, mask)
