"""The MoE decoder's one config: a frozen dataclass, validated once, with named presets.

A variant is a few keyword arguments. ``tiny`` is the test and CPU-demo decoder, ``l14`` the
decoder that pairs with the ViT-L/14 encoder on GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from lineinspect.errors import LineInspectError

BALANCE_MODES = ("aux_loss", "bias")
GATE_MODES = ("head", "channel")
EXPERT_IMPLS = ("auto", "grouped_mm", "padded_bmm")


@dataclass(frozen=True)
class DecoderConfig:
    preset: str
    vocab_size: int  # must equal the tokenizer's vocabulary size
    width: int
    depth: int
    n_heads: int
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads (plain multi-head)
    max_seq_len: int = 1024  # prompt + generated tokens; bounds the KV cache
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # the LM head reuses the token embedding matrix
    # --- mixture of experts: every FFN is an MoE block ---
    n_routed_experts: int = 16
    top_k: int = 2
    n_shared_experts: int = 1  # always-on experts added to the routed output (0 = none)
    expert_hidden: int = 2048  # SwiGLU hidden width of one routed expert
    shared_expert_hidden: int | None = None  # per shared expert; None = expert_hidden
    # Capacity per expert = ceil(factor * tokens * top_k / n_routed_experts), applied in training only
    # (at inference a capacity would make a token's output depend on which requests share its batch).
    # Assignments over capacity are counted in the stats, never dropped silently; the token still
    # gets its shared experts and its other routed experts. None = unlimited.
    capacity_factor: float | None = None
    expert_dropout: float = 0.0  # dropout on the experts' hidden activations (Switch), training only
    # Balancing. "aux_loss" (default, Switch/Mixtral): the training loss adds aux_loss_weight times the
    # load-balancing loss. "bias" (DeepSeek-V3, auxiliary-loss-free): a non-gradient per-expert bias
    # is added to the scores for expert *selection* only, and the training step nudges it from the
    # observed expert load with MoEDecoder.update_balance_biases; no balance term enters the loss.
    balance: str = "aux_loss"
    aux_loss_weight: float = 0.01
    bias_update_rate: float = 1e-3
    router_z_loss_weight: float = 1e-3  # ST-MoE z-loss keeps router logits small (both modes)
    # "auto" uses torch._grouped_mm where the device and dtype support it, else padded torch.bmm.
    expert_impl: str = "auto"
    # --- cross-modal fusion ---
    cross_attn_every: int = 4  # blocks i with (i + 1) % k == 0 gain gated cross-attention; 0 = none
    image_dim: int | None = None  # width of the image tokens cross-attention reads; None = width
    gate: str = "head"  # dynamic gate granularity: one value per head or per channel

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> LineInspectError:
            return LineInspectError(f"decoder config {self.preset!r}: {field} {why}")

        for name in ("vocab_size", "width", "depth", "n_heads", "max_seq_len", "n_routed_experts",
                     "top_k", "expert_hidden"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        if self.width % self.n_heads:
            raise bad("width", f"{self.width} is not a multiple of n_heads {self.n_heads}")
        if (self.width // self.n_heads) % 2:
            raise bad("n_heads", f"gives head width {self.width // self.n_heads}; rotary needs an even one")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise bad("n_kv_heads", f"{self.n_kv_heads} must be positive and divide n_heads {self.n_heads}")
        if self.top_k > self.n_routed_experts:
            raise bad("top_k", f"{self.top_k} exceeds n_routed_experts {self.n_routed_experts}")
        if self.n_shared_experts < 0:
            raise bad("n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        if self.shared_expert_hidden is not None and self.shared_expert_hidden <= 0:
            raise bad("shared_expert_hidden", f"must be positive, got {self.shared_expert_hidden}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise bad("capacity_factor", f"must be positive or None (unlimited), got {self.capacity_factor}")
        if not 0.0 <= self.expert_dropout < 1.0:
            raise bad("expert_dropout", f"must be in [0, 1), got {self.expert_dropout}")
        if self.balance not in BALANCE_MODES:
            raise bad("balance", f"{self.balance!r} is not one of {BALANCE_MODES}")
        if self.expert_impl not in EXPERT_IMPLS:
            raise bad("expert_impl", f"{self.expert_impl!r} is not one of {EXPERT_IMPLS}")
        if self.gate not in GATE_MODES:
            raise bad("gate", f"{self.gate!r} is not one of {GATE_MODES}")
        for name in ("aux_loss_weight", "router_z_loss_weight", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.cross_attn_every < 0:
            raise bad("cross_attn_every", f"must be >= 0 (0 = no cross-attention), got {self.cross_attn_every}")
        if self.image_dim is not None and self.image_dim <= 0:
            raise bad("image_dim", f"must be positive or None (= width), got {self.image_dim}")

    @property
    def head_dim(self) -> int:
        return self.width // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def context_dim(self) -> int:
        return self.image_dim or self.width

    @property
    def cross_attn_layers(self) -> tuple[int, ...]:
        """Indices of the blocks that carry a gated cross-attention sublayer."""
        k = self.cross_attn_every
        return tuple(i for i in range(self.depth) if k and (i + 1) % k == 0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DecoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LineInspectError(f"decoder config: unknown fields {unknown}; is the file from a newer version?")
        return cls(**data)


PRESETS: dict[str, DecoderConfig] = {
    # A few-hundred-thousand-parameter decoder for tests and the CPU demo; every block cross-attends.
    "tiny": DecoderConfig("tiny", vocab_size=512, width=64, depth=2, n_heads=4, n_kv_heads=2,
                          max_seq_len=256, expert_hidden=64, cross_attn_every=1),
    # Pairs with the ViT-L/14 encoder: width 1024 like the encoder, 16 routed experts of hidden 2048
    # plus one shared expert, top-2. About 1.3B parameters in all, about 0.3B active per token.
    # Cross-attention in every third block reads resampled image tokens of width 1024.
    "l14": DecoderConfig("l14", vocab_size=16384, width=1024, depth=12, n_heads=16, n_kv_heads=8,
                         max_seq_len=1024, expert_hidden=2048, cross_attn_every=3),
}


def preset(name: str, **overrides) -> DecoderConfig:
    """The named preset, optionally with fields replaced (e.g. ``vocab_size=tok.vocab_size``)."""
    if name not in PRESETS:
        raise LineInspectError(f"unknown decoder preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)
