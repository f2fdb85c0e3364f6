"""The demo behind ``python -m gptext demo``: a small GPT, trained from scratch on a short
text (the Zen of Python, which ships with every Python) by gptext.train on gptext's ops and
autograd, then asked to continue its first words with the KV cache. Offline; well under a
minute on a CPU.

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
from . import train
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
    data = train.TokenData(torch.tensor([local[t] for t in text_ids]), context=64, val_fraction=0.0)
    cfg = GPTConfig(vocab_size=len(vocab), context_length=64, n_embd=128, n_layer=4, n_head=4)
    model = GPT(cfg).to(device)
    print(f"demo: a {model.num_parameters() / 1e6:.2f}M-parameter GPT ({cfg.n_layer} layers, width {cfg.n_embd}, "
          f"{cfg.vocab_size}-token vocabulary) learns the Zen of Python ({data.train.size} tokens) on {device}")

    schedule = train.TrainConfig(steps=steps, batch_size=16, lr=2e-3, warmup=0, weight_decay=0.0, eval_every=0,
                                 log_every=50, seed=seed)
    start = time.perf_counter()
    train.train(model, data, schedule, log=lambda line: print("  " + line))
    elapsed = time.perf_counter() - start
    print(f"trained {steps} steps in {elapsed:.1f} s ({steps * schedule.batch_size * data.context / elapsed:,.0f} "
          f"tokens/s)")

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
