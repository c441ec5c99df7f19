"""PyTorch reference model, static KV cache, checkpoint IO, tokenizer. Imports torch."""

from .cache import StaticKVCache
from .model import NemotronLabsDiffusion, Pattern

__all__ = ["NemotronLabsDiffusion", "Pattern", "StaticKVCache"]
