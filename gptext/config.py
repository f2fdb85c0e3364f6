"""GPTConfig: the shape of a GPT model, with presets for the GPT-2 family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["GPTConfig"]

_GPT2_PRESETS = {
    # name: (n_embd, n_layer, n_head); all share vocab 50257 and context 1024
    "gpt2-124m": (768, 12, 12),
    "gpt2-355m": (1024, 24, 16),
    "gpt2-774m": (1280, 36, 20),
    "gpt2-1558m": (1600, 48, 25),
}


@dataclass(frozen=True)
class GPTConfig:
    """The hyperparameters of a GPT-2-style model (a frozen dataclass: use
    ``dataclasses.replace(cfg, n_layer=2)`` for a variant).

    vocab_size:      tokens in the vocabulary (GPT-2: 50257)
    context_length:  longest sequence the position embedding covers (GPT-2: 1024)
    n_embd:          width of the residual stream
    n_layer:         transformer blocks
    n_head:          attention heads; head_dim = n_embd // n_head
    dropout:         dropout on attention probabilities and residual branches (training only)
    qkv_bias:        whether the q/k/v projection has a bias (GPT-2: yes)
    layer_norm_eps:  LayerNorm epsilon (GPT-2: 1e-5)
    """

    vocab_size: int = 50257
    context_length: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named configuration: gpt2-124m, gpt2-355m, gpt2-774m, gpt2-1558m. Keyword
        arguments override fields (e.g. ``GPTConfig.preset("gpt2-124m", n_layer=2)``)."""
        if name not in _GPT2_PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(cls.presets())}")
        n_embd, n_layer, n_head = _GPT2_PRESETS[name]
        return dataclasses.replace(cls(n_embd=n_embd, n_layer=n_layer, n_head=n_head), **overrides)

    @staticmethod
    def presets() -> list[str]:
        return list(_GPT2_PRESETS)

    def num_parameters(self) -> int:
        """Parameters of the model this config builds (the tied head counted once)."""
        c, v, t, layers = self.n_embd, self.vocab_size, self.context_length, self.n_layer
        qkv_bias = 3 * c if self.qkv_bias else 0
        per_block = (2 * 2 * c) + (3 * c * c + qkv_bias) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
        return v * c + t * c + layers * per_block + 2 * c
