"""GPTConfig: the shape of a GPT model, with presets for the GPT-2 and gpt-oss families."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["GPTConfig", "ARCHS"]

ARCHS = ("gpt2", "gpt-oss")

_PRESETS = {
    # GPT-2: vocab 50257, context 1024, LayerNorm, learned positions, GELU MLP, tied head.
    "gpt2-124m": dict(n_embd=768, n_layer=12, n_head=12),
    "gpt2-355m": dict(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-774m": dict(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-1558m": dict(n_embd=1600, n_layer=48, n_head=25),
    # gpt-oss (OpenAI's released ModelConfig); the two differ in depth and expert count.
    "gpt-oss-20b": dict(arch="gpt-oss", vocab_size=201088, context_length=131072, n_embd=2880, n_layer=24,
                        n_head=64, n_kv_head=8, head_width=64, n_experts=32),
    "gpt-oss-120b": dict(arch="gpt-oss", vocab_size=201088, context_length=131072, n_embd=2880, n_layer=36,
                         n_head=64, n_kv_head=8, head_width=64, n_experts=128),
}


@dataclass(frozen=True)
class GPTConfig:
    """The hyperparameters of a GPT model (a frozen dataclass: use
    ``dataclasses.replace(cfg, n_layer=2)`` for a variant).

    arch:            "gpt2" (LayerNorm, learned positions, GELU MLP, tied head) or "gpt-oss"
                     (RMSNorm, RoPE/YaRN, grouped-query attention with sinks and a sliding
                     window on alternate layers, mixture-of-experts SwiGLU MLP, untied head)
    vocab_size:      tokens in the vocabulary (GPT-2: 50257, gpt-oss: 201088)
    context_length:  longest sequence the model takes (GPT-2: 1024, its learned positions)
    n_embd:          width of the residual stream
    n_layer:         transformer blocks
    n_head:          attention (query) heads
    dropout:         dropout on attention probabilities and residual branches (training only;
                     GPT-2 only)
    qkv_bias:        whether the q/k/v projection has a bias (both families: yes)
    layer_norm_eps:  epsilon of every LayerNorm / RMSNorm (both families: 1e-5)

    gpt-oss only (the defaults are gpt-oss's; a GPT-2 config ignores them):
    n_kv_head:          key/value heads, dividing n_head (None: n_head)
    head_width:         width of each attention head (None: n_embd // n_head)
    n_experts:          experts in each MoE layer
    experts_per_token:  experts each token is routed to (the softmax runs over their logits)
    expert_width:       hidden width of each expert's SwiGLU
    swiglu_limit:       clamp of the SwiGLU's inputs (gate above, linear half both ways)
    sliding_window:     keys an even-numbered layer's query sees (itself included); odd
                        layers attend over the whole context
    rope_theta, rope_scaling_factor, rope_ntk_alpha, rope_ntk_beta, rope_initial_context:
                        RoPE with YaRN's frequency interpolation and attention scaling
    """

    arch: str = "gpt2"
    vocab_size: int = 50257
    context_length: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    dropout: float = 0.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    n_kv_head: int | None = None
    head_width: int | None = None
    n_experts: int = 128
    experts_per_token: int = 4
    expert_width: int = 2880
    swiglu_limit: float = 7.0
    sliding_window: int = 128
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    rope_initial_context: int = 4096

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"GPTConfig.arch must be one of {', '.join(map(repr, ARCHS))}, got {self.arch!r}")
        positive = ["vocab_size", "context_length", "n_embd", "n_layer", "n_head"]
        if self.arch == "gpt-oss":
            positive += ["n_experts", "experts_per_token", "expert_width", "sliding_window", "rope_initial_context"]
        for name in positive + [n for n in ("n_kv_head", "head_width") if getattr(self, n) is not None]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")
        if self.arch == "gpt2":
            if self.n_embd % self.n_head != 0:
                raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            if self.n_kv_head not in (None, self.n_head) or self.head_width not in (None, self.n_embd // self.n_head):
                raise ValueError("GPTConfig: a gpt2 model has one key/value head per query head and heads of "
                                 "n_embd // n_head; n_kv_head and head_width are for arch='gpt-oss'")
            return
        if self.head_width is None and self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), "
                             f"or head_width given")
        if self.n_head % self.kv_heads != 0:
            raise ValueError(f"GPTConfig: n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"GPTConfig: RoPE needs an even head width, got {self.head_dim}")
        if self.experts_per_token > self.n_experts:
            raise ValueError(f"GPTConfig: experts_per_token ({self.experts_per_token}) exceeds n_experts "
                             f"({self.n_experts})")
        if self.dropout != 0.0:
            raise ValueError("GPTConfig: gpt-oss models have no dropout (dropout must be 0)")
        for name in ("swiglu_limit", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"GPTConfig.{name} must be a positive finite number, got {value!r}")
        if self.rope_theta <= 1.0:
            raise ValueError(f"GPTConfig.rope_theta must be greater than 1, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        """Width of each attention head."""
        return self.head_width if self.head_width is not None else self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads (n_head unless grouped-query attention shares them)."""
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def tied_head(self) -> bool:
        """Whether the output head is the token embedding (GPT-2) or a matrix of its own."""
        return self.arch == "gpt2"

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named configuration (see presets()). Keyword arguments override fields
        (e.g. ``GPTConfig.preset("gpt2-124m", n_layer=2)``)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(cls.presets())}")
        return dataclasses.replace(cls(**_PRESETS[name]), **overrides)

    @staticmethod
    def presets() -> list[str]:
        return list(_PRESETS)

    def num_parameters(self) -> int:
        """Parameters of the model this config builds (a tied head counted once)."""
        c, v, layers = self.n_embd, self.vocab_size, self.n_layer
        if self.arch == "gpt2":
            t = self.context_length
            qkv_bias = 3 * c if self.qkv_bias else 0
            per_block = (2 * 2 * c) + (3 * c * c + qkv_bias) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
            return v * c + t * c + layers * per_block + 2 * c
        q, kv = self.n_head * self.head_dim, self.kv_heads * self.head_dim
        e, hidden = self.n_experts, self.expert_width
        attention = c * (q + 2 * kv) + (q + 2 * kv if self.qkv_bias else 0) + q * c + c + self.n_head
        experts = e * (c * 2 * hidden + 2 * hidden + hidden * c + c)
        per_block = 2 * c + attention + (e * c + e) + experts
        return 2 * v * c + layers * per_block + c
