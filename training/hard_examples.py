"""Hard-example sampling: draw part of each batch in proportion to how wrong the model last was on each image.

A line's good parts are not all alike: a few carry a turning-centre pip or a groove glint that a
freshly trained model reads as a small defect. Drawn uniformly, those few are seen as often as the
plain ones and, half the time, with a defect pasted over them, so the model never learns that they
are normal (on two held-out lines they held 3-5 of 50 good parts above the threshold). The sampler
keeps, for every training image, the image score's error the last times it was shown as it is (no
pasted defect) and draws `share` of each batch in proportion to it; the rest stays uniform, so
no image drops out and the error estimates keep being refreshed.
"""

from __future__ import annotations

import torch


class HardExampleSampler:
    def __init__(self, size: int, share: float, momentum: float = 0.7, floor: float = 0.02) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"hard-example share must be between 0 and 1, got {share:g}")
        self.share = share
        self.momentum = momentum
        self.floor = floor  # keeps an image the model already gets right drawable
        self.error = torch.full((size,), 0.5)  # unknown until first shown

    def draw(self, pool: torch.Tensor, count: int, gen: torch.Generator) -> torch.Tensor:
        """`count` rows of `pool` (a CPU index tensor): the hard share by error, the rest uniformly."""
        hard = round(count * self.share)
        uniform = pool[torch.randint(len(pool), (count - hard,), generator=gen)]
        if hard == 0:
            return uniform
        weights = self.error[pool] + self.floor
        chosen = pool[torch.multinomial(weights, hard, replacement=True, generator=gen)]
        return torch.cat([uniform, chosen])

    def update(self, index: torch.Tensor, target: torch.Tensor, labelled: torch.Tensor,
               image_logit: torch.Tensor) -> None:
        """Record |target - score| for the images shown as they are (target equals their own label);
        images with a pasted defect say nothing about the image itself and are left alone."""
        as_is = (target == labelled).cpu()
        if not as_is.any():
            return
        score = torch.sigmoid(image_logit.detach().float()).cpu()
        err = (target.float().cpu() - score).abs()[as_is]
        rows = index.cpu()[as_is]
        self.error[rows] = self.momentum * self.error[rows] + (1 - self.momentum) * err
