"""The GPT model (GPT-2 family), built from gptext's ops. Reads top to bottom:

    embeddings -> n_layer x Block -> final LayerNorm -> head tied to the token embedding

Each Block is pre-LN: x + attn(ln_1(x)), then + mlp(ln_2(x)). The residual adds are fused
into the LayerNorm that follows them (gptext.ops.layernorm_residual): a branch's output is
handed to the next norm, which adds it to the residual stream and normalises the sum in one
pass. So a Block takes the residual stream *and* the previous block's pending MLP output,
and returns the stream and its own pending MLP output; the final norm adds the last one.

Weights are stored as PyTorch stores them (Linear: [out_features, in_features]); the
state_dict keys follow Hugging Face's GPT-2 names (transformer.h.0.attn.c_attn.weight, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import GPTConfig

__all__ = ["GPT", "Step"]


@dataclass
class Step:
    """Where a forward pass's tokens sit, and which cached keys they may attend to.

    positions: (B, T) position ids of the new tokens.
    slots:     (T,) cache slots the new tokens' keys and values are written to; None when
               there is no KV cache (training, plain scoring).
    kv_len:    how many cache slots the queries attend over (from slot 0).
    kv_starts: (B,) int, first real key of each sequence (left padding before it), or None.
    kv_lens:   (B,) int, keys written so far when kv_len covers more (a static-shape decode
               step over the whole cache), or None.
    """

    positions: torch.Tensor
    slots: torch.Tensor | None = None
    kv_len: int = 0
    kv_starts: torch.Tensor | None = None
    kv_lens: torch.Tensor | None = None


class LayerNorm(nn.Module):
    """LayerNorm that first adds a pending branch output to the residual stream.

    forward(stream, branch) -> (layernorm(stream + branch), stream + branch); with no branch,
    (layernorm(stream), stream).
    """

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, stream: torch.Tensor, branch: torch.Tensor | None = None):
        if branch is None:
            return ops.layernorm(stream, self.weight, self.bias, self.eps), stream
        return ops.layernorm_residual(branch, stream, self.weight, self.bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.head_dim = layer, cfg.n_head, cfg.head_dim
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, step: Step, cache=None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = ops.linear(x, self.c_attn.weight, self.c_attn.bias)
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        if cache is not None:
            cache.write(self.layer, k, v, step.slots)
            k, v = cache.read(self.layer, step.kv_len)
        if self.training and self.dropout > 0:
            y = self._attend_with_dropout(q, k, v)
        else:
            y = ops.attention(q, k, v, causal=True, kv_starts=step.kv_starts, kv_lens=step.kv_lens)
        return ops.linear(y.transpose(1, 2).reshape(B, T, C), self.c_proj.weight, self.c_proj.bias)

    def _attend_with_dropout(self, q, k, v):
        """Attention with dropout on the probabilities, for training: the fused op has no
        dropout, so the scores are materialised here."""
        scores = q @ k.transpose(-2, -1)
        probs = ops.softmax(scores, scale=1.0 / math.sqrt(self.head_dim), causal=True)
        return F.dropout(probs, self.dropout) @ v


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.ffn(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, stream, pending, step: Step, cache=None):
        x, stream = self.ln_1(stream, pending)  # stream += previous MLP output; x = ln_1(stream)
        x, stream = self.ln_2(stream, self.dropout(self.attn(x, step, cache)))  # stream += attention
        return stream, self.dropout(self.mlp(x))  # the MLP output is added by the next norm


class GPT(nn.Module):
    """A GPT-2-family language model on gptext's ops.

    model(idx) -> logits (B, T, vocab_size); model(idx, targets) -> (logits, loss).
    GPT.from_pretrained(dir) / model.save_pretrained(dir): Hugging Face GPT-2 checkpoints.
    model.generate(idx, ...): sampling with a KV cache (see gptext.generate).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.context_length, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=LayerNorm(cfg.n_embd, cfg.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input embedding and output head
        self._init_weights()

    def _init_weights(self):
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, unit norms, and the two
        projections that write into the residual stream scaled by 1/sqrt(2 n_layer)."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, residual_std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif "ln_" in name:
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, 0.02)

    # ---- forward ------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits for every position of idx (B, T); with targets (B, T), also the mean
        cross-entropy (targets equal to -1 are ignored)."""
        self.check_tokens(idx)
        B, T = idx.shape
        positions = torch.arange(T, device=idx.device).expand(B, T)
        logits = self.run(idx, Step(positions=positions))
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)}; expected {tuple(idx.shape)} like idx")
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def run(self, idx: torch.Tensor, step: Step, cache=None, last_only: bool = False) -> torch.Tensor:
        """The forward pass proper, on already-checked tokens: logits for every position (or
        only the last one), reading and writing `cache` as `step` says."""
        t = self.transformer
        stream = t.drop(t.wte(idx) + t.wpe(step.positions))
        pending = None
        for block in t.h:
            stream, pending = block(stream, pending, step, cache)
        x, _ = t.ln_f(stream, pending)
        if last_only:
            x = x[:, -1:]
        return ops.linear(x, self.lm_head.weight)

    def check_tokens(self, idx: torch.Tensor) -> None:
        """Clear errors for token tensors the model cannot take."""
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"idx must be an integer tensor of token ids (B, T), got "
                            f"{getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.dim() != 2:
            raise ValueError(f"idx must have shape (batch, tokens), got {tuple(idx.shape)}")
        if idx.shape[1] > self.config.context_length:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than the model's context_length "
                             f"({self.config.context_length})")
        # The range check reads the ids back from the device, which torch.compile cannot
        # trace; compiled, an id out of range fails in the embedding lookup instead.
        if idx.numel() and not torch.compiler.is_compiling():
            low, high = int(idx.min()), int(idx.max())
            if low < 0 or high >= self.config.vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.config.vocab_size}")

    # ---- conveniences ---------------------------------------------------------------------

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device=None) -> "GPT":
        """A model from a local Hugging Face GPT-2 checkpoint directory (config.json plus
        model.safetensors, sharded safetensors, or pytorch_model.bin)."""
        from .weights import load_gpt2

        return load_gpt2(path, dtype=dtype, device=device)

    def save_pretrained(self, path) -> None:
        """Writes a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors)."""
        from .weights import save_gpt2

        save_gpt2(self, path)

    def generate(self, idx, max_new_tokens: int = 50, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None, generator=None, **kwargs):
        """Continues prompts; see gptext.generate.generate for every option."""
        from .generate import generate

        return generate(self, idx, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, generator=generator, **kwargs)
