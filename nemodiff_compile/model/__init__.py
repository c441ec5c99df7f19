"""PyTorch reference model, static KV cache, checkpoint IO, tokenizer. Imports torch."""

from .cache import StaticKVCache
from .checkpoint import (
    load_checkpoint, load_draft_lora, random_model, read_draft_lora, save_checkpoint, save_draft_lora,
)
from .model import NemotronLabsDiffusion, Pattern
from .tokenizer import decode, encode_prompt, load_tokenizer

__all__ = [
    "NemotronLabsDiffusion", "Pattern", "StaticKVCache", "load_checkpoint", "save_checkpoint",
    "load_draft_lora", "read_draft_lora", "save_draft_lora", "random_model", "load_tokenizer",
    "encode_prompt", "decode",
]
