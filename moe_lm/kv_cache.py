"""Per-request KV cache: plain tensors passed to the decoder explicitly, never stored on a module.

Rows are left-padded, so all rows share one slot counter (``length``); ``key_mask`` marks the
slots that hold real tokens and ``n_real`` gives each row's next rotary position. The projected
image keys and values of each cross-attention block are computed once (at prefill) and kept here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.config import DecoderConfig


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per block: (B, H_kv, S_max, hd)
    values: list[torch.Tensor]  # per block: (B, H_kv, S_max, hd)
    key_mask: torch.Tensor  # (B, S_max) bool: True where the slot holds a real (non-pad) token
    n_real: torch.Tensor  # (B,) long: real tokens written per row = next token's position
    length: int = 0  # slots filled, the same for every row
    cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # block -> (K, V)
    image_mask: torch.Tensor | None = None  # (B, L) bool for the cached image keys, None = all valid

    @classmethod
    def allocate(
        cls, config: DecoderConfig, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype
    ) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens (prompt + generated)."""
        if max_len > config.max_seq_len:
            raise LineInspectError(
                f"kv cache: {max_len} tokens exceed the decoder's max_seq_len {config.max_seq_len}; "
                "shorten the prompt or max_new_tokens"
            )
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        return cls(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.depth)],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.depth)],
            key_mask=torch.zeros(batch, max_len, dtype=torch.bool, device=device),
            n_real=torch.zeros(batch, dtype=torch.long, device=device),
        )

    @property
    def capacity(self) -> int:
        return self.key_mask.shape[1]

    @property
    def batch(self) -> int:
        return self.key_mask.shape[0]

    def begin(self, new_mask: torch.Tensor) -> torch.Tensor:
        """Record the padding mask (B, T) of the tokens about to be written; return (B, length + T)."""
        T = new_mask.shape[1]
        if new_mask.shape[0] != self.batch:
            raise LineInspectError(f"kv cache: holds {self.batch} rows, got a batch of {new_mask.shape[0]}")
        if self.length + T > self.capacity:
            raise LineInspectError(
                f"kv cache: {self.length} + {T} tokens exceed its capacity {self.capacity}; allocate a longer one"
            )
        self.key_mask[:, self.length : self.length + T] = new_mask
        return self.key_mask[:, : self.length + T]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one block's new keys/values (B, H_kv, T, hd); return all so far (B, H_kv, length + T, hd)."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_mask: torch.Tensor) -> None:
        """After all blocks have written: move the slot counter past the new tokens (B, T)."""
        self.length += new_mask.shape[1]
        self.n_real += new_mask.sum(dim=1)
