"""The GPT model, built from gptext's ops, in its two families (GPTConfig.arch):

GPT-2:    token + learned position embeddings -> n_layer x Block -> LayerNorm -> head tied
          to the token embedding
gpt-oss:  token embedding -> n_layer x OssBlock -> RMSNorm -> untied head; each OssBlock is
          grouped-query attention with RoPE (YaRN), per-head sinks and, on even layers, a
          sliding window, then a mixture of SwiGLU experts

Every block is pre-norm: x + attn(norm_1(x)), then + mlp(norm_2(x)). The residual adds are
fused into the norm that follows them (gptext.ops.layernorm_residual / rmsnorm_residual): a
branch's output is handed to the next norm, which adds it to the residual stream and
normalises the sum in one pass. So a block takes the residual stream *and* the previous
block's pending MLP output, and returns the stream and its own pending MLP output; the
final norm adds the last one.

Weights are stored as PyTorch stores them (Linear: [out_features, in_features], experts
[expert, out, in]); the state_dict keys follow Hugging Face's names for each family
(transformer.h.0.attn.c_attn.weight, ...; model.layers.0.self_attn.q_proj.weight, ...).
RoPE runs on gptext.ops.rope; the MoE's routing (top-k) is plain PyTorch here, the
experts' products gptext.ops.expert_linear (or, on the reference backend past a decode
step's few routes, gptext.ops.linear per expert).

With model.activation_checkpointing set, a forward pass that records gradients keeps only
each block's inputs (the residual stream and the pending MLP output) and runs the block
again in the backward pass to rebuild the rest (torch.utils.checkpoint, non-reentrant, with
the random state restored so that dropout draws the same masks): a block's activations are
alive one block at a time, for a second forward pass of the blocks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from . import ops, reference
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
    rotary:    (cos, sin) of the new tokens' positions, each (B, T, head_dim / 2) fp32, for
               a gpt-oss model (GPT.run fills it in).
    """

    positions: torch.Tensor
    slots: torch.Tensor | None = None
    kv_len: int = 0
    kv_starts: torch.Tensor | None = None
    kv_lens: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None


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
        if torch.is_grad_enabled() and self.c_fc.weight.requires_grad:
            # Training: the first product's pre-activation is kept for the backward, as eager
            # PyTorch keeps it, where the fused ffn's backward would compute it again (a
            # sixth of a GPT-2 training step's GEMM work).
            pre = ops.linear(x, self.c_fc.weight, self.c_fc.bias)
            return ops.linear(F.gelu(pre, approximate="tanh"), self.c_proj.weight, self.c_proj.bias)
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


# ---- gpt-oss ----------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMSNorm that first adds a pending branch output to the residual stream, as LayerNorm
    above does."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, stream: torch.Tensor, branch: torch.Tensor | None = None):
        if branch is None:
            return ops.rmsnorm(stream, self.weight, self.eps), stream
        return ops.rmsnorm_residual(branch, stream, self.weight, self.eps)


def yarn_frequencies(cfg: GPTConfig, device=None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies with YaRN scaling, and the factor on cos and sin.

    Frequencies that turn fewer than ntk_alpha times over the training context
    (rope_initial_context) are interpolated (divided by the scaling factor), those that turn
    more than ntk_beta times are kept, with a linear ramp between; cos and sin are scaled by
    0.1 ln(factor) + 1 (YaRN's "concentration"). fp32 throughout, as gpt-oss computes them."""
    half = cfg.head_dim // 2
    base = torch.tensor(cfg.rope_theta, dtype=torch.float32, device=device)
    inv_freq = 1.0 / base ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim)
    factor = cfg.rope_scaling_factor
    if factor <= 1.0:
        return inv_freq, 1.0

    def ramp_edge(turns: float) -> float:  # the dimension whose frequency turns `turns` times
        return half * math.log(cfg.rope_initial_context / (turns * 2 * math.pi)) / math.log(cfg.rope_theta)

    low, high = max(ramp_edge(cfg.rope_ntk_beta), 0.0), min(ramp_edge(cfg.rope_ntk_alpha), cfg.head_dim - 1.0)
    if high == low:
        high += 0.001
    ramp = ((torch.arange(half, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    inv_freq = (inv_freq / factor) * ramp + inv_freq * (1 - ramp)
    return inv_freq, 0.1 * math.log(factor) + 1.0


class Rotary(nn.Module):
    """cos and sin of every position's rotation angles, for RoPE."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        # Made where the default device is, but never on "meta": a model built there for
        # loading gets real weights assigned, and this (a buffer, not a weight) must be real.
        device = torch.get_default_device()
        inv_freq, self.concentration = yarn_frequencies(cfg, "cpu" if device.type == "meta" else device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions (B, T), each (B, T, head_dim / 2) fp32: what
        gptext.ops.rope takes."""
        angles = positions[..., None].float() * self.inv_freq.to(positions.device)
        return angles.cos() * self.concentration, angles.sin() * self.concentration


class GroupedQueryAttention(nn.Module):
    """gpt-oss attention: n_head query heads share kv_heads key/value heads, RoPE on q and k,
    a learned logit per head (a "sink") in every softmax denominator, and on even layers a
    sliding window."""

    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.kv_heads, self.head_dim = layer, cfg.n_head, cfg.kv_heads, cfg.head_dim
        q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, q, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, cfg.n_embd, bias=True)
        self.sinks = nn.Parameter(torch.zeros(cfg.n_head))
        self.window = cfg.sliding_window if layer % 2 == 0 else None

    def forward(self, x: torch.Tensor, step: Step, cache=None) -> torch.Tensor:
        B, T, _ = x.shape

        def heads(proj: nn.Linear, n: int) -> torch.Tensor:  # (B, n, T, D)
            return ops.linear(x, proj.weight, proj.bias).view(B, T, n, self.head_dim).transpose(1, 2)

        q = ops.rope(heads(self.q_proj, self.n_head), *step.rotary)  # read in place, written contiguous
        k = ops.rope(heads(self.k_proj, self.kv_heads), *step.rotary)
        v = heads(self.v_proj, self.kv_heads)
        if cache is not None:
            cache.write(self.layer, k, v, step.slots)
            k, v = cache.read(self.layer, step.kv_len)
        y = ops.attention(q, k, v, causal=True, window=self.window, sinks=self.sinks, kv_starts=step.kv_starts,
                          kv_lens=step.kv_lens)
        return ops.linear(y.transpose(1, 2).reshape(B, T, -1), self.o_proj.weight, self.o_proj.bias)


class Experts(nn.Module):
    """The weights of n_experts SwiGLU MLPs, stacked: expert e is
    down_proj[e] @ swiglu(gate_up_proj[e] @ x + gate_up_proj_bias[e]) + down_proj_bias[e]."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        e, c, hidden = cfg.n_experts, cfg.n_embd, cfg.expert_width
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * hidden, c))  # rows alternate gate, linear
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(e, 2 * hidden))
        self.down_proj = nn.Parameter(torch.empty(e, c, hidden))
        self.down_proj_bias = nn.Parameter(torch.zeros(e, c))


class MoE(nn.Module):
    """Mixture of experts: a linear router scores every expert, each token goes to its top
    experts_per_token, and their outputs are summed weighted by the softmax of the chosen
    logits.

    Two ways to the same function. gptext.ops.expert_linear takes the routes as they are:
    each expert's matrix read in place, the SwiGLU fused, the routing never read back to the
    host (so a CUDA graph can capture the step); its kernels take few routes (a decode step)
    one by one and many (a prefill) grouped by expert, on the device. The other way groups
    the routes by expert here, each expert one pair of GEMMs over its tokens, which needs the
    group sizes on the host: the way of the reference backend beyond ROUTED_MAX_ROUTES
    routes (its expert_linear goes route by route). Training takes the op too: its backward
    reads the group sizes back once, for the weight gradient.
    """

    ROUTED_MAX_ROUTES = 64

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.top_k, self.limit = cfg.experts_per_token, cfg.swiglu_limit
        self.router = nn.Linear(cfg.n_embd, cfg.n_experts)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits = ops.linear(flat, self.router.weight, self.router.bias)
        top, chosen = logits.topk(self.top_k, dim=-1)  # (tokens, top_k)
        weights = ops.softmax(top)
        if self.groups_on_host(chosen.numel(), flat):
            out = self._grouped(flat, chosen, weights)
        else:
            out = self._routed(flat, chosen, weights)
        return out.to(x.dtype).view(x.shape)

    @classmethod
    def groups_on_host(cls, routes: int, x: torch.Tensor) -> bool:
        """Whether `routes` routes of x's tokens take the way that reads the routing back to
        the host in the forward pass."""
        return routes > cls.ROUTED_MAX_ROUTES and ops.implementation("expert_linear", x) == "reference"

    def _routed(self, flat, chosen, weights):
        w = self.experts
        # In training the fused SwiGLU's backward computes the pre-activation again: keeping
        # it instead, as MLP does for GPT-2, was slower on a 2-core CPU (PyTorch's element-wise
        # SwiGLU cost more than the routes' product it saves).
        h = ops.expert_linear(flat, w.gate_up_proj, w.gate_up_proj_bias, chosen, "swiglu", self.limit)
        y = ops.expert_linear(h, w.down_proj, w.down_proj_bias, chosen)  # (tokens, top_k, C)
        return (y.float() * weights.float()[..., None]).sum(1)

    def _grouped(self, flat, chosen, weights):
        weights = weights.reshape(-1, 1)
        routes = chosen.reshape(-1)  # route r sends token r // top_k to expert routes[r]
        order = routes.argsort(stable=True)
        counts = torch.bincount(routes, minlength=self.router.weight.shape[0]).tolist()
        w = self.experts
        out = torch.zeros(flat.shape, dtype=torch.float32, device=flat.device)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            picked = order[start:start + count]
            start += count
            tokens = picked // self.top_k
            h = reference.swiglu(ops.linear(flat[tokens], w.gate_up_proj[e], w.gate_up_proj_bias[e]), self.limit)
            y = ops.linear(h, w.down_proj[e], w.down_proj_bias[e])
            out.index_add_(0, tokens, y.float() * weights[picked].float())
        return out


class OssBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.self_attn = GroupedQueryAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.layer_norm_eps)
        self.mlp = MoE(cfg)

    def forward(self, stream, pending, step: Step, cache=None):
        x, stream = self.input_layernorm(stream, pending)
        x, stream = self.post_attention_layernorm(stream, self.self_attn(x, step, cache))
        return stream, self.mlp(x)


# ---- the model ------------------------------------------------------------------------

class GPT(nn.Module):
    """A GPT-2- or gpt-oss-family language model on gptext's ops (cfg.arch picks).

    model(idx) -> logits (B, T, vocab_size); model(idx, targets) -> (logits, loss);
    model.loss(idx, targets) -> loss, without materialising the logits (for training).
    GPT.from_pretrained(dir) / model.save_pretrained(dir): Hugging Face checkpoints.
    model.generate(idx, ...): sampling with a KV cache (see gptext.generate).
    model.activation_checkpointing = True: forward passes that record gradients recompute
    each block in the backward pass instead of keeping its activations (see above).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.activation_checkpointing = False
        if cfg.arch == "gpt2":
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.context_length, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=LayerNorm(cfg.n_embd, cfg.layer_norm_eps),
            ))
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight  # tied input embedding and output head
        else:
            self.model = nn.ModuleDict(dict(
                embed_tokens=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                layers=nn.ModuleList(OssBlock(cfg, i) for i in range(cfg.n_layer)),
                norm=RMSNorm(cfg.n_embd, cfg.layer_norm_eps),
            ))
            self.rotary = Rotary(cfg)
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self):
        """N(0, 0.02) weights, zero biases, unit norms; GPT-2 also scales the two projections
        that write into the residual stream by 1/sqrt(2 n_layer), and gpt-oss draws its
        sinks and router biases from N(0, 0.02) too (as Hugging Face initialises them)."""
        gpt2 = self.config.arch == "gpt2"
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if gpt2 and name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, residual_std)
            elif name.endswith("bias") and not name.endswith("router.bias"):
                nn.init.zeros_(p)
            elif name.endswith("norm.weight") or (gpt2 and "ln_" in name):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, 0.0, 0.02)

    # ---- forward ------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """Logits for every position of idx (B, T); with targets (B, T), also the mean
        cross-entropy (targets equal to -1 are ignored)."""
        logits = self.run(idx, self._whole_sequences(idx, targets))
        if targets is None:
            return logits
        loss = ops.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of model(idx, targets) (targets equal to -1 ignored) without
        the logits: the head and the loss run fused, a chunk of rows at a time
        (gptext.ops.linear_cross_entropy), so that training never holds the (B, T,
        vocab_size) logits or their gradient. What gptext.train trains on."""
        x = self.trunk(idx, self._whole_sequences(idx, targets))
        return ops.linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-1)

    def _whole_sequences(self, idx: torch.Tensor, targets: torch.Tensor | None) -> Step:
        """The Step of a pass over whole sequences idx (B, T) from position 0, no cache, after
        checking idx and, when given, that targets has its shape."""
        self.check_tokens(idx)
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets has shape {tuple(targets.shape)}; expected {tuple(idx.shape)} like idx")
        B, T = idx.shape
        return Step(positions=torch.arange(T, device=idx.device).expand(B, T))

    def run(self, idx: torch.Tensor, step: Step, cache=None, last_only: bool = False) -> torch.Tensor:
        """The forward pass proper, on already-checked tokens: logits for every position (or
        only the last one), reading and writing `cache` as `step` says."""
        x = self.trunk(idx, step, cache)
        if last_only:
            x = x[:, -1:]
        return ops.linear(x, self.lm_head.weight)

    def trunk(self, idx: torch.Tensor, step: Step, cache=None) -> torch.Tensor:
        """The forward pass up to the head: the final norm's output (B, T, n_embd)."""
        if self.config.arch == "gpt2":
            t = self.transformer
            stream = t.drop(t.wte(idx) + t.wpe(step.positions))
            blocks, final_norm = t.h, t.ln_f
        else:
            m = self.model
            stream = m.embed_tokens(idx)
            step = dataclasses.replace(step, rotary=self.rotary(step.positions))
            blocks, final_norm = m.layers, m.norm
        pending = None
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for block in blocks:
            if recompute:
                stream, pending = torch.utils.checkpoint.checkpoint(block, stream, pending, step, use_reentrant=False)
            else:
                stream, pending = block(stream, pending, step, cache)
        x, _ = final_norm(stream, pending)
        return x

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
        """A model from a local Hugging Face checkpoint directory, GPT-2 or gpt-oss (config.json
        plus model.safetensors, sharded safetensors, or pytorch_model.bin), or from OpenAI's
        original gpt-oss layout (see gptext.weights)."""
        from .weights import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path) -> None:
        """Writes a Hugging Face checkpoint directory of the model's family (config.json +
        model.safetensors)."""
        from .weights import save_pretrained

        save_pretrained(self, path)

    def generate(self, idx, max_new_tokens: int = 50, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | list[int] | None = None, generator=None, **kwargs):
        """Continues prompts; see gptext.generate.generate for every option."""
        from .generate import generate

        return generate(self, idx, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        eos_token_id=eos_token_id, generator=generator, **kwargs)
