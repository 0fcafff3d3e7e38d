"""Pre-norm MoE decoder with rotary self-attention, a KV cache and gated cross-attention to images.

Every FFN is an MoE block. Blocks listed in ``config.cross_attn_layers`` also carry a
``GatedCrossAttention`` sublayer from ``lineinspect.fusion``; the decoder owns the block order,
the cache and the losses, and treats image tokens as opaque (B, L, D) context. At initialisation
the gates are closed, so the output does not depend on the image tokens at all.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from lineinspect.errors import LineInspectError
from lineinspect.fusion.gated_cross_attention import ContextKV, GatedCrossAttention
from lineinspect.moe_lm.attention import CausalSelfAttention, causal_padding_mask, rotary_cos_sin
from lineinspect.moe_lm.config import DecoderConfig
from lineinspect.moe_lm.kv_cache import KVCache
from lineinspect.moe_lm.losses import lm_loss, load_balancing_loss, router_z_loss
from lineinspect.moe_lm.moe import MoEBlock, MoEStats


class DecoderOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None  # LM loss + weighted balance (mode "aux_loss") + weighted z-loss
    router_logits: tuple[torch.Tensor, ...]  # per block: (B*T, E) float32
    expert_counts: torch.Tensor  # (depth, E) long: routed assignments per expert; rows sum to B*T*top_k
    overflow: torch.Tensor  # (depth, E) long: assignments over capacity (training with a capacity factor)
    gate_stats: dict[int, torch.Tensor]  # cross-attention block -> mean gate openness (detached scalar)
    hidden: torch.Tensor  # (B, T, C) final-norm hidden states (pooled for contrastive alignment)
    loss_terms: dict[str, torch.Tensor]  # detached "lm", "balance", "z" when targets are given


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, cross_attention: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.xattn = (
            GatedCrossAttention(config.width, config.context_dim, config.n_heads, config.gate, config.norm_eps)
            if cross_attention
            else None
        )
        self.ffn_norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.moe = MoEBlock(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        context: ContextKV | None,
        context_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, MoEStats, torch.Tensor | None]:
        """x: (B, T, C) -> (B, T, C), MoE stats, gate openness (None without image tokens)."""
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        openness = None
        if self.xattn is not None and context is not None:
            update, openness = self.xattn(x, context, context_mask)
            x = x + update
        moe_out, stats = self.moe(self.ffn_norm(x))
        return x + moe_out, stats, openness


class MoEDecoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.width)
        cross = set(config.cross_attn_layers)
        self.blocks = nn.ModuleList(Block(config, i in cross) for i in range(config.depth))
        self.norm = nn.RMSNorm(config.width, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # nanoGPT/GPT-2: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * depth).
        residual_std = 0.02 / math.sqrt(2 * self.config.depth)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.02)
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.moe.router.proj.weight, std=0.02)
            nn.init.normal_(block.moe.experts.w_gate_up, std=0.02)
            nn.init.normal_(block.moe.experts.w_down, std=residual_std)
            if block.moe.shared is not None:
                nn.init.normal_(block.moe.shared.gate_up.weight, std=0.02)
                nn.init.normal_(block.moe.shared.down.weight, std=residual_std)
            if block.xattn is not None:
                block.xattn.reset_parameters()  # fusion owns its init (the gate starts closed)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        image_tokens: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> DecoderOutput:
        """idx: (B, T) token ids; targets: (B, T) next-token ids, IGNORE_INDEX to skip.

        image_tokens: (B, L, D_img) resampled image tokens, or None; image_mask: (B, L) bool,
        True = valid (a row with no valid token reads no image). attention_mask: (B, T) bool,
        False for left padding. kv_cache: per-request cache, written in place; it also keeps each
        cross-attention block's projected image keys, so later decoding steps may omit image_tokens.
        """
        cfg = self.config
        self._check_inputs(idx, image_tokens, image_mask, kv_cache)
        positions, mask, new_mask = _positions_and_mask(idx, attention_mask, kv_cache)
        cos, sin = rotary_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        if image_tokens is not None and kv_cache is not None:
            kv_cache.image_mask = image_mask
        context_mask = kv_cache.image_mask if (kv_cache is not None and image_tokens is None) else image_mask

        x = self.tok_emb(idx)  # (B, T, C)
        all_stats: list[MoEStats] = []
        gate_stats: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            context = None
            if block.xattn is not None:
                if image_tokens is not None:
                    context = block.xattn.project_context(image_tokens)
                    if kv_cache is not None:
                        kv_cache.cross_kv[i] = context
                elif kv_cache is not None and i in kv_cache.cross_kv:
                    context = ContextKV(*kv_cache.cross_kv[i])
            x, stats, openness = block(x, cos, sin, mask, kv_cache, i, context, context_mask)
            all_stats.append(stats)
            if openness is not None:
                gate_stats[i] = openness
        if kv_cache is not None:
            kv_cache.advance(new_mask)  # new_mask is never None with a cache

        hidden = self.norm(x)
        logits = self.lm_head(hidden)  # (B, T, V)
        router_logits = tuple(s.router_logits for s in all_stats)
        loss, terms = None, {}
        if targets is not None:
            token_mask = attention_mask.reshape(-1) if attention_mask is not None else None
            lm = lm_loss(logits, targets)
            balance = load_balancing_loss(router_logits, cfg.top_k, token_mask)
            z = router_z_loss(router_logits, token_mask)
            loss = lm + cfg.router_z_loss_weight * z
            if cfg.balance == "aux_loss":
                loss = loss + cfg.aux_loss_weight * balance
            terms = {"lm": lm.detach(), "balance": balance.detach(), "z": z.detach()}
        return DecoderOutput(
            logits=logits,
            loss=loss,
            router_logits=router_logits,
            expert_counts=torch.stack([s.counts for s in all_stats]),
            overflow=torch.stack([s.overflow for s in all_stats]),
            gate_stats=gate_stats,
            hidden=hidden,
            loss_terms=terms,
        )

    def _check_inputs(
        self,
        idx: torch.Tensor,
        image_tokens: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        kv_cache: KVCache | None,
    ) -> None:
        cfg = self.config
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > cfg.max_seq_len:
            raise LineInspectError(f"decoder: {start + T} tokens exceed max_seq_len {cfg.max_seq_len}")
        if image_tokens is None:
            if image_mask is not None:
                raise LineInspectError("decoder: image_mask given without image_tokens")
            return
        if not cfg.cross_attn_layers:
            raise LineInspectError("decoder: got image_tokens but cross_attn_every is 0 (no cross-attention)")
        if image_tokens.dim() != 3 or image_tokens.shape[0] != B or image_tokens.shape[2] != cfg.context_dim:
            raise LineInspectError(
                f"decoder: image_tokens must be (B={B}, L, {cfg.context_dim}), got {tuple(image_tokens.shape)}"
            )
        if image_mask is not None and image_mask.shape != image_tokens.shape[:2]:
            raise LineInspectError(
                f"decoder: image_mask must be (B, L) = {tuple(image_tokens.shape[:2])}, got {tuple(image_mask.shape)}"
            )

    @torch.no_grad()
    def update_balance_biases(self, expert_counts: torch.Tensor) -> None:
        """Balance mode "bias": after an optimiser step, nudge each router's selection bias from the
        step's expert load. expert_counts: (depth, E), as returned in DecoderOutput.expert_counts."""
        if self.config.balance != "bias":
            raise LineInspectError("decoder: update_balance_biases needs balance='bias' in the decoder config")
        for block, counts in zip(self.blocks, expert_counts):
            block.moe.router.update_bias(counts, self.config.bias_update_rate)



def _positions_and_mask(
    idx: torch.Tensor, attention_mask: torch.Tensor | None, kv_cache: KVCache | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Rotary positions (B, T), the attention mask (B, 1, T, S) or None for plain causal, and the
    new tokens' padding mask (B, T) (never None with a cache, which it updates).

    Positions count real tokens only, so a left-padded row gets the positions it would get alone.
    """
    B, T = idx.shape
    if kv_cache is not None:
        start = kv_cache.length
        new_mask = attention_mask if attention_mask is not None else idx.new_ones(B, T, dtype=torch.bool)
        key_mask = kv_cache.begin(new_mask)  # (B, start + T)
        positions = kv_cache.n_real[:, None] + new_mask.long().cumsum(dim=1) - 1
        return positions.clamp(min=0), causal_padding_mask(key_mask, start, T), new_mask
    if attention_mask is None:
        return torch.arange(T, device=idx.device)[None].expand(B, T), None, None
    positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return positions, causal_padding_mask(attention_mask, 0, T), attention_mask
