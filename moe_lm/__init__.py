"""lineinspect.moe_lm: tokenizer, MoE decoder (routed + shared experts), KV cache, generation."""

from lineinspect.moe_lm.config import DecoderConfig, preset
from lineinspect.moe_lm.decoder import DecoderOutput, MoEDecoder
from lineinspect.moe_lm.generate import SamplingConfig, Step, generate, stream
from lineinspect.moe_lm.kv_cache import KVCache
from lineinspect.moe_lm.losses import IGNORE_INDEX, lm_loss, load_balancing_loss, router_z_loss
from lineinspect.moe_lm.tokenizer import TextTokenizer, load_tokenizer, save_tokenizer, train_tokenizer

__all__ = [
    "IGNORE_INDEX", "DecoderConfig", "DecoderOutput", "KVCache", "MoEDecoder", "SamplingConfig", "Step",
    "TextTokenizer", "generate", "lm_loss", "load_balancing_loss", "load_tokenizer", "preset",
    "router_z_loss", "save_tokenizer", "stream", "train_tokenizer",
]
