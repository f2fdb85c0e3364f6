"""The demo behind ``python -m gptext demo``: a small GPT, trained from scratch on a short
text (the Zen of Python, which ships with every Python) with gptext's ops and autograd,
then asked to continue its first words with the KV cache. Offline; well under a minute on
a CPU.

The text is tokenized with GPT-2's tokenizer, and the model's vocabulary is just the GPT-2
tokens that occur in it (about 130), so that the embedding is small and training quick.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import time

import torch

from .config import GPTConfig
from .model import GPT
from .tokenizer import get_tokenizer


def corpus() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
        import this
    return codecs.decode(this.s, "rot13")


def run(device: str = "cpu", steps: int = 200, seed: int = 0, prompt: str = "Beautiful is") -> int:
    torch.manual_seed(seed)
    device = torch.device(device)
    tok = get_tokenizer("gpt2")
    text_ids = tok.encode(corpus())
    vocab = sorted(set(text_ids))  # model token i is GPT-2 token vocab[i]
    local = {gpt2_id: i for i, gpt2_id in enumerate(vocab)}
    data = torch.tensor([local[t] for t in text_ids], device=device)
    cfg = GPTConfig(vocab_size=len(vocab), context_length=64, n_embd=128, n_layer=4, n_head=4)
    model = GPT(cfg).to(device)
    print(f"demo: a {model.num_parameters() / 1e6:.2f}M-parameter GPT ({cfg.n_layer} layers, width {cfg.n_embd}, "
          f"{cfg.vocab_size}-token vocabulary) learns the Zen of Python ({len(data)} tokens) on {device}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    batch, window = 16, cfg.context_length
    offsets_rng = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        offsets = torch.randint(0, len(data) - window - 1, (batch,), generator=offsets_rng).tolist()
        chunk = torch.stack([data[o:o + window + 1] for o in offsets])
        _, loss = model(chunk[:, :-1], chunk[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % 50 == 0 or step == steps:
            print(f"  step {step:4d}  loss {loss.item():.3f}")
    elapsed = time.perf_counter() - start
    print(f"trained {steps} steps in {elapsed:.1f} s ({steps * batch * window / elapsed:,.0f} tokens/s)")

    model.eval()
    ids = torch.tensor([[local[t] for t in tok.encode(prompt)]], device=device)
    new_tokens = cfg.context_length - ids.shape[1]
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, temperature=0)
    elapsed = time.perf_counter() - start
    print(f"greedy continuation of {prompt!r} ({new_tokens} tokens, {new_tokens / elapsed:.0f} tokens/s with the KV "
          f"cache):")
    print("  " + tok.decode([vocab[i] for i in out[0].tolist()]).replace("\n", "\n  "))
    return 0
