"""lineinspect.fusion: resampler, dynamic-gated cross-attention, contrastive alignment, freezing.

Imports nothing from lineinspect.moe_lm: the decoder imports the cross-attention layer from here.
"""

from lineinspect.fusion.contrastive import ContrastiveHead, contrastive_loss, masked_mean
from lineinspect.fusion.freezing import freeze, log_parameter_counts, parameter_counts, unfreeze
from lineinspect.fusion.gated_cross_attention import ContextKV, GatedCrossAttention
from lineinspect.fusion.resampler import Resampler, ResamplerConfig

__all__ = [
    "ContextKV", "ContrastiveHead", "GatedCrossAttention", "Resampler", "ResamplerConfig", "contrastive_loss",
    "freeze", "log_parameter_counts", "masked_mean", "parameter_counts", "unfreeze",
]
