"""Text generation with a KV cache.

A generation call runs one prefill pass over the prompts, which fills a preallocated KV
cache (no growth by concatenation), then one decode step per new token, each attending over
the cache. On CUDA the decode step is captured once as a CUDA graph (static tensors, the
cache length fixed at prompt + max_new_tokens, slots not yet written masked out) and
replayed; elsewhere it runs eagerly over exactly the slots written so far.

Prompts of different lengths are left-padded: each sequence keeps its own position ids
(starting at 0 at its first real token) and its padding slots are masked out of attention,
so a batched prompt gives the same tokens as that prompt alone.

The context window is a hard limit: prompt + max_new_tokens must fit in
config.context_length (GPT-2's learned position embeddings stop there; gpt-oss's RoPE was
scaled to it), else ValueError.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from . import ops
from .model import GPT, MoE, Step

__all__ = ["KVCache", "generate", "sample_next", "stream"]


class KVCache:
    """Keys and values of every layer for `batch` sequences of up to `max_len` tokens."""

    def __init__(self, model: GPT, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        cfg = model.config
        shape = (cfg.n_layer, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Stores new keys and values (B, H, T, D) at cache slots `slots` (T,)."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)

    def read(self, layer: int, kv_len: int):
        """Keys and values of slots [0, kv_len): views, no copy."""
        return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V): greedy when temperature is 0, else sampled from
    softmax(logits / temperature) restricted to the top_k tokens and to the smallest set
    whose probability reaches top_p."""
    if temperature == 0:
        # max's indices: the first maximum, as argmax gives, in half argmax's time on a CPU
        # (1x50257: 49 against 100 us in fp32, 59 against 215 us in bf16).
        return logits.max(-1).indices
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        mass_before = probs.cumsum(-1) - probs  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = ops.softmax(logits)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_options(model, max_new_tokens, temperature, top_k, top_p, eos_token_id):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    for eos in eos_ids(eos_token_id) or ():
        if isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < model.config.vocab_size:
            raise ValueError(f"eos_token_id {eos!r} is not a token id of a vocabulary of {model.config.vocab_size}")


def eos_ids(eos_token_id) -> tuple | None:
    """eos_token_id as a tuple of ids (one id, or several: any of them ends a sequence), or
    None for no end-of-sequence token."""
    if eos_token_id is None:
        return None
    if isinstance(eos_token_id, (list, tuple)):
        if not eos_token_id:
            raise ValueError("eos_token_id is an empty list; pass None for no end-of-sequence token")
        return tuple(eos_token_id)
    return (eos_token_id,)


def _prompts(model: GPT, idx, attention_mask, device):
    """(tokens (B, T) left-padded, pad (B,) padding count per row, kind of input)."""
    if isinstance(idx, torch.Tensor):
        kind = "tensor" if idx.dim() == 2 else "vector"
        tokens = idx if idx.dim() == 2 else idx.unsqueeze(0)
        if tokens.device != device:
            raise ValueError(f"idx is on {tokens.device} but the model is on {device}")
        model.check_tokens(tokens)
        if attention_mask is None:
            pad = torch.zeros(tokens.shape[0], dtype=torch.long, device=device)
        else:
            mask = attention_mask if attention_mask.dim() == 2 else attention_mask.unsqueeze(0)
            if mask.shape != tokens.shape:
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(tokens.shape)}")
            mask = mask.to(device=device, dtype=torch.long)
            pad = (mask == 0).sum(1)
            left_padded = torch.arange(tokens.shape[1], device=device)[None, :] >= pad[:, None]
            if not torch.equal(mask.bool(), left_padded):
                raise ValueError("attention_mask must be left padding: zeros, then ones, in every row")
    else:
        seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in idx]
        if not seqs:
            raise ValueError("no prompts given")
        kind = "list"
        width = max(len(s) for s in seqs)
        tokens = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            tokens[row, width - len(s):] = s
        tokens = tokens.to(device)
        pad = torch.tensor([width - len(s) for s in seqs], device=device)
        model.check_tokens(tokens)
    if tokens.shape[1] == 0 or bool((pad >= tokens.shape[1]).any()):
        raise ValueError("every prompt needs at least one token")
    return tokens, pad, kind


class _EagerDecoder:
    """Decode steps run directly, attending over exactly the slots written so far."""

    def __init__(self, model: GPT, cache: KVCache, pad: torch.Tensor):
        self.model, self.cache, self.pad = model, cache, pad
        self.kv_starts = pad if bool(pad.any()) else None

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        step = Step(positions=(pos - self.pad).clamp(min=0)[:, None], slots=torch.tensor([pos], device=tokens.device),
                    kv_len=pos + 1, kv_starts=self.kv_starts)
        return self.model.run(tokens[:, None], step, self.cache, last_only=True)


class _GraphDecoder:
    """The decode step captured once as a CUDA graph and replayed. Shapes are static: the
    step attends over all max_len slots, told by kv_lens how many are written."""

    def __init__(self, model: GPT, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.cache = KVCache(model, batch, max_len, dtype, device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.pad = torch.zeros(batch, dtype=torch.long, device=device)
        self.graph = None
        self.logits = None

    def _body(self) -> torch.Tensor:
        batch = self.tokens.shape[0]
        step = Step(positions=(self.pos - self.pad).clamp(min=0)[:, None], slots=self.pos, kv_len=self.cache.max_len,
                    kv_starts=self.pad, kv_lens=(self.pos + 1).expand(batch))
        return self.model.run(self.tokens, step, self.cache, last_only=True)

    def _capture(self) -> None:
        # The warm-up writes slot max_len - 1, which no prompt occupies and which the last
        # decode step rewrites before anything reads it.
        self.pos.fill_(self.cache.max_len - 1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # first-use work (GEMM policy measurements, allocations) stays out
                self._body()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._body()

    def reset(self, pad: torch.Tensor) -> None:
        self.pad.copy_(pad)

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        if self.graph is None:
            self._capture()
        self.tokens.copy_(tokens[:, None])
        self.pos.fill_(pos)
        self.graph.replay()
        return self.logits


def _graph_decoder(model: GPT, batch: int, max_len: int, dtype, device) -> _GraphDecoder:
    """The model's captured decoder for this shape, reused across calls (one is kept). The
    backend and GEMM policy are part of the key: a graph replays the kernels it captured."""
    key = (batch, max_len, dtype, device, ops.get_backend(), ops.gemm_policy())
    held = getattr(model, "_gptext_graph_decoder", None)
    if held is None or held[0] != key:
        model._gptext_graph_decoder = None  # free the old cache before allocating a new one
        model._gptext_graph_decoder = (key, _GraphDecoder(model, batch, max_len, dtype, device))
    return model._gptext_graph_decoder[1]


def stream(model: GPT, idx, max_new_tokens: int = 50, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
           generator: torch.Generator | None = None,
           attention_mask: torch.Tensor | None = None, cuda_graph: bool | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every sequence, (B,) LongTensor, one decode step at a time.
    Arguments as for generate() (checked here, before the first step); sequences that have
    emitted eos_token_id keep yielding it, and the stream ends when all have (or after
    max_new_tokens)."""
    tokens, pad, _ = _prepare(model, idx, attention_mask, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                              cuda_graph)
    return _steps(model, tokens, pad, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator, cuda_graph)


def _prepare(model, idx, attention_mask, max_new_tokens, temperature, top_k, top_p, eos_token_id, cuda_graph):
    _check_options(model, max_new_tokens, temperature, top_k, top_p, eos_token_id)
    weight = model.lm_head.weight
    if cuda_graph and not weight.is_cuda:
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    tokens, pad, kind = _prompts(model, idx, attention_mask, weight.device)
    gap = _graph_gap(model, tokens.shape[0])
    if cuda_graph and gap:
        raise ValueError(f"cuda_graph=True: {gap}; leave cuda_graph unset to decode eagerly")
    total = tokens.shape[1] + max_new_tokens
    if total > model.config.context_length:
        raise ValueError(f"prompt ({tokens.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"the model's context_length ({model.config.context_length}); shorten the prompt or "
                         f"generate fewer tokens")
    return tokens, pad, kind


def _graph_gap(model: GPT, batch: int) -> str | None:
    """Why the model's decode step for `batch` sequences can't be captured as a CUDA graph,
    or None. A gpt-oss step can while its routes take the expert_linear path (MoE), which
    reads nothing back from the device."""
    cfg = model.config
    routes = batch * cfg.experts_per_token
    if cfg.arch != "gpt2" and MoE.groups_on_host(routes, model.lm_head.weight):
        return (f"a decode step of {batch} sequences sends {routes} routes to the experts, more than the "
                f"{MoE.ROUTED_MAX_ROUTES} that the reference backend runs without reading the routing back "
                f"to the host")
    return None


# Inference mode, not just no_grad: the compiled ops then skip their Python autograd layer
# (about 9 us a call, a millisecond per decoded token on a CPU). What generate() returns is
# built outside it, so it is an ordinary tensor.
@torch.inference_mode()
def _steps(model, tokens, pad, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator, cuda_graph):
    if max_new_tokens == 0:
        return
    weight = model.lm_head.weight
    # Under torch.autocast the projections' keys and values come in the region's dtype.
    dtype = ops._autocast_dtype(weight) or weight.dtype
    batch, prompt_len = tokens.shape
    total = prompt_len + max_new_tokens
    if cuda_graph is None:
        cuda_graph = weight.is_cuda and _graph_gap(model, batch) is None
    if max_new_tokens == 1:
        decoder = None  # the prefill alone gives the one token: no cache, and the held graph stays
    elif cuda_graph:
        decoder = _graph_decoder(model, batch, total, dtype, weight.device)
        decoder.reset(pad)
    else:
        decoder = _EagerDecoder(model, KVCache(model, batch, total, dtype, weight.device), pad)

    # Prefill: every prompt token at once, keys and values into slots [0, prompt_len).
    slots = torch.arange(prompt_len, device=tokens.device)
    step = Step(positions=(slots[None, :] - pad[:, None]).clamp(min=0), slots=slots, kv_len=prompt_len,
                kv_starts=pad if bool(pad.any()) else None)
    logits = model.run(tokens, step, decoder.cache if decoder is not None else None, last_only=True)

    eos = eos_ids(eos_token_id)
    ends = torch.tensor(eos, device=tokens.device) if eos else None
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    for i in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        if ends is not None:
            nxt = torch.where(finished, torch.full_like(nxt, eos[0]), nxt)  # finished rows repeat the first
            finished |= torch.isin(nxt, ends)
        yield nxt
        if i + 1 == max_new_tokens or (ends is not None and bool(finished.all())):
            return
        logits = decoder.step(nxt, prompt_len + i)


def generate(model: GPT, idx, max_new_tokens: int = 50, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             generator: torch.Generator | None = None,
             attention_mask: torch.Tensor | None = None, cuda_graph: bool | None = None):
    """Continues each prompt by up to max_new_tokens tokens.

    idx:             LongTensor (B, T) of prompts (optionally left-padded, with
                     attention_mask (B, T) of 1 for real tokens and 0 for padding), a 1-D
                     tensor (one prompt), or a list of token-id sequences of any lengths.
    temperature:     0 is greedy; otherwise logits are divided by it before sampling.
    top_k, top_p:    restrict sampling to the k most likely tokens / the smallest set with
                     probability >= p.
    eos_token_id:    a sequence stops after emitting it (or any of a list of ids, as
                     gpt-oss's generation_config.json gives); generation ends when all have.
    generator:       a torch.Generator on the model's device, for reproducible sampling.
    cuda_graph:      replay the decode step as a CUDA graph (default: on when on CUDA, and
                     for a gpt-oss model on the compiled kernels, or on the reference
                     backend while batch x experts_per_token is at most
                     MoE.ROUTED_MAX_ROUTES; past that it decodes eagerly).

    Returns, for a (B, T) tensor, a LongTensor (B, T + steps) whose finished rows are padded
    with eos_token_id (the first of a list); for a 1-D tensor, a 1-D tensor; for a list, a
    list of 1-D tensors, each its prompt plus the tokens generated for it (up to and
    including EOS).
    """
    tokens, pad, kind = _prepare(model, idx, attention_mask, max_new_tokens, temperature, top_k, top_p, eos_token_id,
                                 cuda_graph)
    steps = list(_steps(model, tokens, pad, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator,
                        cuda_graph))
    new = torch.stack(steps, 1) if steps else tokens.new_zeros(tokens.shape[0], 0)
    out = torch.cat([tokens, new], 1)
    if kind == "vector":
        return out[0]
    if kind == "tensor":
        return out
    sequences = []
    ends = torch.tensor(eos_ids(eos_token_id), device=new.device) if eos_token_id is not None else None
    for row in range(out.shape[0]):
        generated = new[row]
        if ends is not None:
            hits = torch.isin(generated, ends).nonzero()
            if len(hits):
                generated = generated[: int(hits[0]) + 1]
        sequences.append(torch.cat([tokens[row, int(pad[row]):], generated]))
    return sequences

