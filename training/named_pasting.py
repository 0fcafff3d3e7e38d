"""Paste the generator's named defect kinds (scratch, crack, ...) onto a line's good images.

Besides the generic synthetic defects, training renders these realistic kinds on the line's own
surfaces (`--paste-types`, all by default). Leaving some kinds out of the pasting and testing on
them measures generalisation to defects nobody predicted. Each pasted image's kind is returned
too, for objectives that want to name it.
"""

from __future__ import annotations

import numpy as np
import torch

from lineinspect.errors import LineInspectError


def paste_named_defects(images: torch.Tensor, masks: torch.Tensor, has: torch.Tensor, kinds: tuple[str, ...],
                        g: torch.Generator, share: float = 0.5
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Replace a `share` of the defect-free images in the batch by ones with a named defect.

    images (B,3,S,S) in [0,1]; masks (B,1,S,S); has (B,) bool. Returns the updated triple and
    each image's kind as an index into `kinds` (B,) long, -1 where nothing named was pasted.
    """
    from lineinspect.training.synth import DEFECT_TYPES, render_defect

    unknown = [k for k in kinds if k not in DEFECT_TYPES]
    if unknown:
        raise LineInspectError(f"--paste-types: unknown defect type(s) {unknown}; choose from {DEFECT_TYPES}")
    free = torch.nonzero(~has).flatten().tolist()
    rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))
    images, masks, has = images.clone(), masks.clone(), has.clone()
    kind_index = torch.full((len(images),), -1, dtype=torch.long)
    for i in free:
        if rng.random() >= share:
            continue
        k = int(rng.integers(len(kinds)))
        kind = kinds[k]
        img = (images[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        out, mask = render_defect(img, kind, rng)
        images[i] = torch.from_numpy(out).permute(2, 0, 1).to(images) / 255
        masks[i, 0] = torch.from_numpy(mask).to(masks)
        has[i] = bool(mask.any())
        kind_index[i] = k if has[i] else -1
    return images, masks, has, kind_index.to(images.device)
