"""Training a GPT on a stream of tokens: next-token prediction with AdamW, the learning rate
warmed up linearly then decayed on a cosine, gradients clipped by their global norm and
accumulated over micro-batches, the loss on held-out tokens measured as it goes.

    from gptext import GPT, train
    model = GPT.from_pretrained("gpt2")                       # or GPT(GPTConfig(...))
    data = train.TokenData(train.tokenize(["notes.txt"], tok), context=256)
    history = train.train(model, data, train.TrainConfig(steps=500, batch_size=8))
    model.save_pretrained("gpt2-notes")

A corpus too large for memory is encoded once into a token file (write_tokens: the tokens
as uint16 or uint32 behind a JSON header), which TokenData.from_file reads memory-mapped.

The model's forward and backward run on gptext's ops (kernels or reference, whichever the
backend picks), so this is also how the ops' gradients are exercised end to end. Batches
are windows of `context + 1` tokens at random offsets of the training split (a seeded
generator: the same config draws the same batches); the held-out split is the stream's
last `val_fraction`, evaluated on fixed, evenly spaced windows so that its loss is
comparable from one evaluation to the next.

Several processes can share a run (data parallelism: `torchrun --nproc_per_node=N -m gptext
train ...`, or `train` called in every process of an initialized torch.distributed group):
each takes its share of a step's micro-batches, their gradients are summed across the
processes before the update, and every process applies the same update to its own copy of
the weights. A step's windows are drawn as one process would draw them, so a run takes the
same steps however many processes share it; only the sums' order differs.

A run can stop and continue: `checkpoint` receives a TrainState (the optimizer's moments,
the batch sampler's and dropout's random state, the history, fingerprints of the data and
of the weights), which `TrainState.save` writes beside the model's checkpoint; passing it
back loaded (`train(..., resume=TrainState.load(path))`, the model loaded from that
checkpoint) continues the run exactly where it stopped: the same batches and the same
updates, as if it had never stopped, when the config is unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .model import GPT


@dataclass
class TrainConfig:
    """steps: optimizer steps; batch_size: windows per micro-batch; accumulate: micro-batches
    per step (a step sees batch_size x accumulate windows), shared among the processes of a
    data-parallel run (accumulate a multiple of their number); lr: the peak learning rate,
    reached after `warmup` steps (default: a tenth of the steps, at most 100) and decayed on
    a cosine to min_lr (default lr / 10) at the last step; weight_decay applies to matrices and
    embeddings only (not to biases, norm weights or sinks); grad_clip: the largest global
    gradient norm (0: none); eval_every / eval_batches: held-out loss every so many steps
    over so many fixed batches (0: never); log_every: a log line every so many steps;
    autocast: "bfloat16" runs the forward passes (training and held-out) under torch.autocast
    in bf16, the weights, gradients and AdamW's state staying float32 (mixed precision),
    None computes in the weights' dtype; activation_checkpointing: keep only each block's
    inputs in the forward pass and recompute the block in the backward pass (GPT's
    activation_checkpointing, set for the run): less memory for one more forward pass of
    the blocks, the same steps bit for bit."""

    steps: int = 1000
    batch_size: int = 8
    accumulate: int = 1
    lr: float = 3e-4
    min_lr: float | None = None
    warmup: int | None = None
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 0
    autocast: str | None = None
    activation_checkpointing: bool = False

    def __post_init__(self):
        for name in ("steps", "batch_size", "accumulate"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "eval_batches", "log_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.warmup is not None and not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must be in [0, steps={self.steps}], got {self.warmup}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.autocast not in (None, "bfloat16"):
            raise ValueError(f"autocast must be None or 'bfloat16', got {self.autocast!r} (float16 would need a "
                             f"loss scaler)")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be 0 or more, got {self.weight_decay}, {self.grad_clip}")

    @property
    def warmup_steps(self) -> int:
        return min(100, self.steps // 10) if self.warmup is None else self.warmup

    def learning_rate(self, step: int) -> float:
        """The learning rate of step `step` (0-based): linear warmup to lr over warmup_steps
        (step 0 takes lr / warmup_steps), then a cosine from lr down to min_lr at the last step."""
        warmup, low = self.warmup_steps, self.lr / 10 if self.min_lr is None else self.min_lr
        if step < warmup:
            return self.lr * (step + 1) / warmup
        decay = self.steps - 1 - warmup
        progress = (step - warmup) / decay if decay > 0 else 0.0  # a lone step after warmup takes lr
        return low + (self.lr - low) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ---- data: text files, token files, training windows -----------------------------------

TOKEN_FILE_FORMAT = "gptext.tokens/1"
_TOKEN_MAGIC = b"GPTXTOK1"
_TOKEN_ALIGN = 64  # the tokens start on a 64-byte boundary
_CHUNK_CHARS = 1 << 20  # text encoded about a million characters at a time


def _cut(text: str, lo: int = 0) -> int:
    """The last place in `text`, after the newline at lo or later, where a tokenizer that
    splits_at_line_starts always splits (a newline after a printable non-space ASCII
    character, before an ASCII letter or digit), or 0 if there is none."""
    end = len(text) - 1
    while True:
        i = text.rfind("\n", max(lo, 1), end)
        if i < 1:
            return 0
        before, after = text[i - 1], text[i + 1]
        if "!" <= before <= "~" and after.isascii() and after.isalnum():
            return i + 1
        end = i


def _text_pieces(path: Path, split: bool, chunk_chars: int):
    """The text of the UTF-8 file at `path` (newlines as Python's text mode reads them) in
    pieces of about chunk_chars cut where `_cut` says, or whole when not `split`."""
    try:
        with open(path, encoding="utf-8") as f:
            carry = ""
            while True:
                chunk = f.read(chunk_chars)
                if not chunk:
                    break
                # Only the new text can hold a cut: the carried text had none (a long line).
                carry, searched = carry + chunk, len(carry)
                cut = _cut(carry, max(searched - 1, 0)) if split else 0
                if cut:
                    yield carry[:cut]
                    carry = carry[cut:]
            if carry:
                yield carry
    except FileNotFoundError:
        raise FileNotFoundError(f"training data {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"training data {path}: a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"training data {path}: not UTF-8 text ({e})") from None


def encode_files(paths, tok, chunk_chars: int = _CHUNK_CHARS, threads: int | None = None):
    """The UTF-8 text files at `paths` encoded with tiktoken encoding `tok` as plain text
    (special-token strings in them are text, not control tokens), joined with <|endoftext|>
    where the encoding has it: yields uint32 numpy arrays whose concatenation is the
    stream. A file is read about chunk_chars characters at a time and its pieces encoded
    on `threads` threads (default: the processor's cores) when the tokenizer splits at line
    starts (tokenizer.splits_at_line_starts: GPT-2's, cl100k's and o200k's patterns), which
    gives the tokens of the whole file; under any other pattern each file is encoded whole."""
    import numpy as np

    from .tokenizer import splits_at_line_starts

    paths = [Path(p) for p in paths]
    for path in paths:  # before any work: a misspelt name should not cost the files before it
        if not path.exists():
            raise FileNotFoundError(f"training data {path}: no such file")
    try:
        separator = np.array([tok.encode_single_token("<|endoftext|>")], dtype=np.uint32)
    except KeyError:
        separator = None
    split, threads = splits_at_line_starts(tok), threads or os.cpu_count() or 1

    def encoded(batch):
        return [np.array(ids, dtype=np.uint32) for ids in tok.encode_ordinary_batch(batch, num_threads=threads)]

    for i, path in enumerate(paths):
        if i and separator is not None:
            yield separator
        batch = []
        for piece in _text_pieces(path, split, chunk_chars):
            batch.append(piece)
            if len(batch) == threads:
                yield from encoded(batch)
                batch = []
        if batch:
            yield from encoded(batch)


def tokenize(paths, tok) -> torch.Tensor:
    """The UTF-8 text files at `paths`, encoded with tiktoken encoding `tok` as plain text
    (special-token strings in them are text, not control tokens), joined with <|endoftext|>
    where the encoding has it: a 1-d int64 tensor (in memory; write_tokens writes the same
    stream to a file that TokenData reads in place)."""
    import numpy as np

    parts = list(encode_files(paths, tok))
    return torch.from_numpy(np.concatenate(parts).astype(np.int64)) if parts else torch.zeros(0, dtype=torch.long)


def write_tokens(paths, tok, out, chunk_chars: int = _CHUNK_CHARS) -> dict:
    """Encodes the text files at `paths` as tokenize does and writes the stream to the token
    file `out` (atomically), without holding it in memory: a header (a JSON dict: format,
    dtype, count, max_id, the sha256 of the tokens as little-endian uint32, the tokenizer's
    name, n_vocab and tokenizer.digest, the sources), then the tokens as little-endian
    uint16 (a vocabulary of up to 65536 ids) or uint32, from a 64-byte boundary (the file
    starts with 8 magic bytes and the header's length, a little-endian uint64). Returns
    the header. TokenData.from_file reads it in place."""
    import json

    import numpy as np

    from .tokenizer import digest as tokenizer_digest
    from .weights import _atomic_write

    out, paths = Path(out), [Path(p) for p in paths]
    dtype = np.dtype("<u2") if tok.n_vocab <= 1 << 16 else np.dtype("<u4")
    header = {"format": TOKEN_FILE_FORMAT, "dtype": "uint16" if dtype.itemsize == 2 else "uint32",
              "count": 0, "max_id": -1, "sha256": "", "tokenizer": {"name": tok.name, "n_vocab": tok.n_vocab,
                                                                    "sha256": tokenizer_digest(tok)},
              "sources": [str(p.resolve()) for p in paths]}
    # Room for the header once its count, largest id and digest are known (no wider than these).
    widest = {**header, "count": 10 ** 20, "max_id": 1 << 32, "sha256": "0" * 64}
    room = _token_offset(len(json.dumps(widest).encode("utf-8")))

    def write(tmp):
        stream, count, largest = hashlib.sha256(), 0, -1
        with open(tmp, "wb") as f:
            f.seek(room)
            for ids in encode_files(paths, tok, chunk_chars):
                if ids.size:
                    stream.update(ids.astype("<u4").tobytes())
                    count, largest = count + ids.size, max(largest, int(ids.max()))
                    ids.astype(dtype).tofile(f)
            header.update(count=count, max_id=largest, sha256=stream.hexdigest())
            text = json.dumps(header).encode("utf-8")
            space = room - len(_TOKEN_MAGIC) - 8  # the header, padded with spaces up to the tokens
            f.seek(0)
            f.write(_TOKEN_MAGIC + space.to_bytes(8, "little") + text.ljust(space))
            f.flush()
            os.fsync(f.fileno())

    _atomic_write(out, write)
    return header


def _token_offset(header_bytes: int) -> int:
    """Where a token file's tokens start after a header of header_bytes."""
    return -(-(len(_TOKEN_MAGIC) + 8 + header_bytes) // _TOKEN_ALIGN) * _TOKEN_ALIGN


def is_token_file(path) -> bool:
    """Whether `path` is a file that starts as write_tokens's do."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_TOKEN_MAGIC)) == _TOKEN_MAGIC
    except OSError:
        return False


def read_tokens(path, tokenizer=None):
    """(header, tokens) of the token file at `path` (write_tokens's): the tokens a read-only
    numpy memmap (uint16 or uint32), nothing read yet. ValueError, naming the file, for a
    file that is not one, has a malformed header, or is cut short, and with `tokenizer` (a
    tiktoken Encoding) for one written with another tokenizer."""
    import json

    import numpy as np

    from .tokenizer import digest as tokenizer_digest

    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic, length = f.read(len(_TOKEN_MAGIC)), int.from_bytes(f.read(8), "little")
            if magic != _TOKEN_MAGIC:
                raise ValueError(f"token file {path}: not a gptext token file (write one with "
                                 f"`python -m gptext tokenize` or train.write_tokens)")
            if not 0 < length < 1 << 24:
                raise ValueError(f"token file {path}: malformed header (length {length})")
            header = json.loads(f.read(length).decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"token file {path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"token file {path}: malformed header ({e})") from None
    fields = {"format": str, "dtype": str, "count": int, "max_id": int, "sha256": str, "tokenizer": dict}
    if not isinstance(header, dict) or any(not isinstance(header.get(k), t) for k, t in fields.items()):
        raise ValueError(f"token file {path}: malformed header (it needs {', '.join(fields)})")
    if header["format"] != TOKEN_FILE_FORMAT or header["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"token file {path}: format {header['format']!r} with dtype {header['dtype']!r} is not "
                         f"{TOKEN_FILE_FORMAT!r} with uint16 or uint32")
    if tokenizer is not None and header["tokenizer"].get("sha256") != tokenizer_digest(tokenizer):
        made = header["tokenizer"]
        raise ValueError(f"token file {path} was written with tokenizer {made.get('name')!r} "
                         f"({made.get('n_vocab')} ids), and this model's is {tokenizer.name!r} "
                         f"({tokenizer.n_vocab} ids): tokenize the text again with this model's tokenizer")
    dtype = np.dtype("<u2" if header["dtype"] == "uint16" else "<u4")
    offset, count = _token_offset(length), header["count"]
    size = path.stat().st_size
    if size != offset + count * dtype.itemsize:
        raise ValueError(f"token file {path}: {size} bytes where its header's {count:,} {header['dtype']} tokens "
                         f"make {offset + count * dtype.itemsize}: the file is "
                         + ("cut short" if size < offset + count * dtype.itemsize else "longer than its header says"))
    if count == 0:
        return header, np.zeros(0, dtype=dtype)
    return header, np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


def _stream_digest(*parts) -> str:
    """The sha256 of a token stream, given as consecutive parts, as little-endian uint32 (a
    token file's header's)."""
    import numpy as np

    h = hashlib.sha256()
    for ids in parts:
        for start in range(0, len(ids), 1 << 24):
            h.update(np.ascontiguousarray(ids[start:start + (1 << 24)]).astype("<u4").tobytes())
    return h.hexdigest()


def _token_array(ids):
    """ids as a 1-d numpy array of token ids, read in place: a 1-d int64/int32 tensor (on the
    CPU) or integer numpy array (a memory map included); ValueError for anything else."""
    import numpy as np

    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype not in (torch.long, torch.int):
            raise ValueError("ids must be a 1-d tensor of token ids (int64 or int32)")
        return ids.detach().cpu().numpy()
    if not (isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu"):
        raise ValueError("ids must be a 1-d tensor or numpy array of token ids (integers)")
    return ids


class TokenData:
    """A token stream split into training and held-out parts, served as (inputs, targets)
    windows of `context` tokens, the targets the inputs shifted by one. ids: a 1-d tensor or
    numpy array of token ids (an array, a memory map included, is read in place);
    TokenData.from_file reads a token file. `train` and `val` are the two parts (numpy
    arrays), the held-out one the stream's last `val_fraction`."""

    def __init__(self, ids, context: int, val_fraction: float = 0.1, *, _digest: str | None = None,
                 _max_id: int | None = None):
        ids = _token_array(ids)
        if context < 1:
            raise ValueError(f"context must be at least 1, got {context}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if _max_id is None and ids.size:
            low, _max_id = int(ids.min()), int(ids.max())
            if low < 0:
                raise ValueError(f"token ids must not be negative, got {low}")
            if _max_id >= 1 << 32:
                raise ValueError(f"token ids must be below 2**32, got {_max_id}")
        self.context, self._max_id, self._digest = context, -1 if _max_id is None else _max_id, _digest
        held_out = math.ceil(ids.size * val_fraction) if val_fraction else 0
        if val_fraction and held_out < context + 1:
            held_out = context + 1  # at least one whole window
        self.train, self.val = ids[:ids.size - held_out], ids[ids.size - held_out:]
        if self.train.size < context + 1:
            raise ValueError(f"{ids.size} tokens are too few for windows of {context} (+1) tokens"
                             + (f" with {held_out} held out for evaluation" if held_out else "")
                             + ": give more text, a shorter context or a smaller val_fraction")

    @classmethod
    def from_file(cls, path, context: int, val_fraction: float = 0.1, tokenizer=None) -> "TokenData":
        """The tokens of the token file at `path` (write_tokens's), read in place: memory-mapped,
        its largest id and digest taken from its header. With `tokenizer` (a tiktoken
        Encoding), a file written with another tokenizer raises ValueError."""
        header, ids = read_tokens(path, tokenizer)
        try:
            return cls(ids, context, val_fraction, _digest=header["sha256"], _max_id=header["max_id"])
        except ValueError as e:
            raise ValueError(f"token file {path}: {e}") from None

    def __len__(self) -> int:
        return self.train.size + self.val.size

    def max_id(self) -> int:
        return self._max_id

    def fingerprint(self) -> str:
        """A digest of the windows' source (the token stream, its split and context): equal
        for the same data however it was given, different for any other."""
        if self._digest is None:
            self._digest = _stream_digest(self.train, self.val)
        return hashlib.sha256(f"{self.context} {self.train.size} {self.val.size} {self._digest}".encode()).hexdigest()

    def _windows(self, part, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        chunk = torch.from_numpy(part[offsets.numpy()[:, None] + np.arange(self.context + 1)].astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]

    def sample(self, windows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`windows` random training windows: (inputs, targets), each (windows, context), int64."""
        offsets = torch.randint(0, self.train.size - self.context, (windows,), generator=generator)
        return self._windows(self.train, offsets)

    def held_out(self, batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Up to batches x batch_size evenly spaced held-out windows, in batches (none if
        nothing is held out)."""
        room = self.val.size - self.context
        if room < 1 or batches < 1:
            return []
        count = min(batches * batch_size, room)
        inputs, targets = self._windows(self.val, torch.linspace(0, room - 1, count).long())
        return list(zip(inputs.split(batch_size), targets.split(batch_size)))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's groups: matrices and embeddings (2-d and wider) decayed, vectors (biases, norm
    weights, attention sinks) not. A tied parameter appears once."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def weights_digest(model: torch.nn.Module) -> str:
    """A digest of the model's weights (names, dtypes, shapes, bytes): the same wherever they
    live, different after any update."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


TRAIN_STATE_FORMAT = "gptext.TrainState/2"  # 2: TokenData.fingerprint of the stream's uint32 digest


@dataclass
class TrainState:
    """Where a run stands after `step` steps: with the model's weights at that step, enough to
    continue it exactly. optimizer: AdamW's state_dict; generator: the batch sampler's state;
    rng: torch's global generators (dropout), "cpu" and, training on CUDA, "cuda" (with
    several processes, rank r > 0's as "cpu/r" and "cuda/r"); data and weights:
    TokenData.fingerprint() and weights_digest(model) at that step, checked on resume so that
    a state meets only its own data and weights."""

    step: int
    history: list[dict]
    optimizer: dict
    generator: torch.Tensor
    data: str
    weights: str
    rng: dict[str, torch.Tensor] = field(default_factory=dict)

    _FIELDS = ("step", "history", "optimizer", "generator", "data", "weights", "rng")

    def save(self, path) -> None:
        """Writes the state to `path` atomically (torch.save of tensors and plain containers:
        TrainState.load reads it back without unpickling code)."""
        from .weights import _atomic_write

        record = {"format": TRAIN_STATE_FORMAT, **{name: getattr(self, name) for name in self._FIELDS}}
        _atomic_write(Path(path), lambda tmp: torch.save(record, tmp))

    @classmethod
    def load(cls, path) -> "TrainState":
        """The state TrainState.save wrote to `path` (read with weights_only=True)."""
        path = Path(path)
        try:
            record = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"training state {path}: no such file") from None
        except Exception as e:  # truncated, not a torch file, or holding more than tensors and containers
            raise ValueError(f"training state {path}: unreadable ({type(e).__name__}: {e})") from None
        if isinstance(record, dict) and record.get("format") == "gptext.TrainState/1":
            raise ValueError(f"training state {path}: written by an earlier gptext, whose fingerprint of the data "
                             f"this one no longer computes: the run cannot be resumed")
        if not isinstance(record, dict) or record.get("format") != TRAIN_STATE_FORMAT:
            raise ValueError(f"training state {path}: not a gptext training state")
        missing = [name for name in cls._FIELDS if name not in record]
        if missing:
            raise ValueError(f"training state {path}: malformed, missing {', '.join(missing)}")
        state = cls(**{name: record[name] for name in cls._FIELDS})
        if not (isinstance(state.step, int) and state.step >= 1 and isinstance(state.history, list)
                and isinstance(state.optimizer, dict) and isinstance(state.generator, torch.Tensor)
                and isinstance(state.rng, dict)):
            raise ValueError(f"training state {path}: malformed (a field of the wrong type)")
        return state


def autocast_region(autocast: str | None, device):
    """The context a forward pass runs in: torch.autocast in dtype `autocast` ("bfloat16",
    TrainConfig.autocast's values) on device's type, or none for None."""
    if autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, autocast))


@torch.no_grad()
def evaluate(model: GPT, batches, device, precision=None) -> float:
    """The mean loss over the given (inputs, targets) batches, in eval mode (no dropout),
    each forward pass in the `precision` context (a torch.autocast) when one is given."""
    total, count = _loss_sum(model, batches, device, precision)
    return total / count


@torch.no_grad()
def _loss_sum(model: GPT, batches, device, precision=None) -> tuple[float, int]:
    """evaluate's sum of the windows' losses and their number (0, 0 for no batches)."""
    was_training = model.training
    model.eval()
    try:
        total = count = 0
        for x, y in batches:
            with precision if precision is not None else contextlib.nullcontext():
                loss = model.loss(x.to(device), y.to(device))
            total, count = total + float(loss) * x.shape[0], count + x.shape[0]
        return total, count
    finally:
        model.train(was_training)


# ---- data parallelism: the processes of a torch.distributed group ----------------------

_BUCKET_BYTES = 32 << 20  # gradients summed across processes this many bytes at a time


@dataclass(frozen=True)
class Ranks:
    """The processes that share a run: torch.distributed's default group when one is
    initialized (torchrun), else this process alone (rank 0 of 1)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def same(self, value, what: str) -> None:
        """Raises ValueError in every process unless all of them hold an equal `value`."""
        values = self.gather(value)
        if any(v != values[0] for v in values):
            raise ValueError(f"the {self.size} processes of the run were given different {what}: "
                             f"every process must train on the same")

    def broadcast_weights(self, model: torch.nn.Module) -> None:
        """Every process's weights (and buffers) made rank 0's."""
        import torch.distributed as dist

        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)

    def sum_(self, tensors) -> None:
        """Sums the tensors across the processes, in place: those of one dtype flattened
        into buckets of about _BUCKET_BYTES, one all-reduce each."""
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            start = 0
            while start < len(group):
                end, size = start, 0
                while end < len(group) and (end == start or size + group[end].nbytes <= _BUCKET_BYTES):
                    size, end = size + group[end].nbytes, end + 1
                bucket = group[start:end]
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.all_reduce(flat)
                for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                    t.copy_(part.view_as(t))
                start = end

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def gather(self, value) -> list:
        """Every process's `value`, in rank order."""
        import torch.distributed as dist

        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values


class _OverlappedSum:
    """Sums the parameters' gradients across the processes while the backward pass still runs.

    The parameters fall into buckets in the reverse of their order in the model (about the
    order backward completes their gradients), one dtype and about `bucket_bytes` a bucket.
    During an armed backward pass a hook sees each gradient accumulated; a bucket whose
    gradients are all in starts its all-reduce there and then, in the background. Buckets
    start strictly in index order, so every process issues the same collectives in the same
    order whatever its autograd did first. `finish()`, after the backward, starts the buckets
    still waiting (parameters that got no gradient count as zeros), waits for every sum and
    writes it back into the gradients. Unarmed backward passes (the micro-batches before a
    step's last) are left alone: their gradients accumulate locally."""

    def __init__(self, parameters, bucket_bytes: int = _BUCKET_BYTES):
        unique = {id(p): p for p in parameters if p.requires_grad}
        self.buckets: list[list[torch.nn.Parameter]] = []
        size = 0
        for p in reversed(list(unique.values())):
            bucket = self.buckets[-1] if self.buckets else None
            if bucket is None or bucket[0].dtype != p.dtype or size + p.nbytes > bucket_bytes:
                self.buckets.append([p])
                size = p.nbytes
            else:
                bucket.append(p)
                size += p.nbytes
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self._armed = False
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in unique.values()]

    def arm(self) -> None:
        """The next backward pass completes the step's gradients: sum them as they come."""
        self._armed = True
        self._left = [len(bucket) for bucket in self.buckets]
        self._seen: set[int] = set()
        self._next = 0  # the first bucket not started
        self._pending: list[tuple[int, torch.Tensor, object]] = []

    def _ready(self, p: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        if id(p) in self._seen:  # a second accumulation would miss the sum already under way
            raise RuntimeError("a parameter's gradient was accumulated twice in one backward pass; "
                               "its sum across processes had already started")
        self._seen.add(id(p))
        b = self._bucket_of[id(p)]
        self._left[b] -= 1
        while self._next < len(self.buckets) and self._left[self._next] == 0:
            self._start(self._next)

    def _start(self, b: int) -> None:
        import torch.distributed as dist

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.buckets[b]])
        self._pending.append((b, flat, dist.all_reduce(flat, async_op=True)))
        self._next = b + 1

    def finish(self) -> None:
        """After the armed backward: every bucket summed and written back into the gradients."""
        if not self._armed:
            raise RuntimeError("finish() without arm()")
        try:
            while self._next < len(self.buckets):
                self._start(self._next)
            for b, flat, work in self._pending:
                work.wait()
                for p, part in zip(self.buckets[b], flat.split([p.numel() for p in self.buckets[b]])):
                    if p.grad is not None:
                        p.grad.copy_(part.view_as(p))
                    elif part.any():  # another process's gradient reached it
                        p.grad = part.view_as(p).clone()
        finally:
            self._armed, self._pending = False, []

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _rng_key(kind: str, rank: int) -> str:
    """Where a TrainState's rng keeps process `rank`'s generator of `kind` ("cpu", "cuda")."""
    return kind if rank == 0 else f"{kind}/{rank}"


def windows(tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows that score a stream of `tokens` tokens once each: (begin, end, first) with
    inputs ids[begin:end], targets ids[begin + 1:end + 1], and only the targets from index
    `first` on scored (the earlier ones were scored by the window before). Windows of
    `context` tokens (or of all but the last token, in a shorter stream) start every `stride`
    tokens, the last one moved back to end at the stream's end, so that every token after
    the first `context` is predicted from at least context - stride tokens before it."""
    if context < 1 or not 1 <= stride <= context:
        raise ValueError(f"need context >= 1 and 1 <= stride <= context, got context {context}, stride {stride}")
    spans, done, begin = [], 0, 0  # targets 1..done are scored
    while done < tokens - 1:
        end = min(begin + context, tokens - 1)
        spans.append((max(0, end - context), end, done + 1))
        done, begin = end, begin + stride
    return spans


@torch.no_grad()
def perplexity(model: GPT, ids, context: int | None = None, stride: int | None = None, batch_size: int = 4) -> dict:
    """The mean next-token loss of `model` over the token stream `ids` (a 1-d tensor or numpy
    array: tokenize's, a token file's) and its exponential, the perplexity: every token but
    the first predicted once, through windows of `context` tokens (default: the model's
    context_length) that start every `stride` tokens (default: context / 2), each token
    scored in the first window that predicts it (see `windows`), `batch_size` windows a
    forward pass, in eval mode. Returns {"loss", "perplexity", "tokens" (scored),
    "windows", "context", "stride", "seconds"}."""
    import numpy as np

    ids = _token_array(ids)
    if ids.size < 2:
        raise ValueError(f"{ids.size} token(s): perplexity needs at least two, one to predict from and one to predict")
    context = model.config.context_length if context is None else context
    if context > model.config.context_length:
        raise ValueError(f"context {context} is longer than the model's context_length {model.config.context_length}")
    stride = max(1, context // 2) if stride is None else stride
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    spans = windows(ids.size, context, stride)
    device, was_training = next(model.parameters()).device, model.training
    model.eval()
    total, scored, start = 0.0, 0, time.perf_counter()
    try:
        for first in range(0, len(spans), batch_size):  # the windows are all one length
            batch = spans[first:first + batch_size]
            chunk = np.stack([ids[b:e + 1] for b, e, _ in batch]).astype(np.int64)
            low, high = int(chunk.min()), int(chunk.max())
            if low < 0 or high >= model.config.vocab_size:
                raise ValueError(f"the tokens hold id {low if low < 0 else high}, outside the model's vocabulary "
                                 f"of {model.config.vocab_size}: they were tokenized for another model")
            x, y = torch.from_numpy(chunk[:, :-1]), torch.from_numpy(chunk[:, 1:]).clone()
            for row, (b, _, keep) in enumerate(batch):
                y[row, :keep - b - 1] = -1  # targets the window before scored
            count = int((y >= 0).sum())
            loss = model.loss(x.to(device), y.to(device))
            total, scored = total + float(loss) * count, scored + count
    finally:
        model.train(was_training)
    mean = total / scored
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": scored, "windows": len(spans),
            "context": context, "stride": stride, "seconds": time.perf_counter() - start}


def train(model: GPT, data: TokenData, config: TrainConfig, log: Callable[[str], None] | None = print,
          checkpoint: Callable[[TrainState], None] | None = None, save_every: int = 0,
          resume: TrainState | None = None) -> list[dict]:
    """Trains `model` in place up to step config.steps on data's training windows. Returns the
    history: one dict a step (step, loss, lr, grad_norm, tokens_per_s; val_loss where the
    held-out loss was measured), after {"step": 0, "val_loss": ...} before training when
    anything is held out. `checkpoint(state)` is called every `save_every` steps and after
    the last, with the TrainState of that step (save it beside the model's weights to resume
    later). `resume`: a state saved by an earlier run, the model holding the weights it was
    saved with; training continues from its step (the schedule is config's, so a resumed
    run whose config is unchanged takes exactly the steps the uninterrupted run would have).
    A loss that is not finite stops training with FloatingPointError.

    In every process of an initialized torch.distributed group (one per device, the model on
    it), the processes share each step: process r runs the r-th of its accumulate / N equal
    shares of the step's micro-batches, the gradients and losses are summed across them
    (all-reduce, the gradients' started bucket by bucket while the last micro-batch's backward
    pass still runs) and every process takes the same update. The weights start as rank 0's; the
    data and config must be the same in every process. The held-out batches are shared
    too; only rank 0 logs and calls `checkpoint`, whose TrainState then holds every
    process's random state (dropout draws its own stream in each)."""
    ranks = Ranks.current()
    if config.accumulate % ranks.size:
        raise ValueError(f"accumulate={config.accumulate} micro-batches a step cannot be shared equally among "
                         f"{ranks.size} processes: make it a multiple of {ranks.size}")
    if data.context > model.config.context_length:
        raise ValueError(f"context {data.context} is longer than the model's context_length "
                         f"{model.config.context_length}")
    largest = data.max_id()
    if largest >= model.config.vocab_size:
        raise ValueError(f"the data holds token id {largest}, beyond the model's vocabulary of "
                         f"{model.config.vocab_size}: it was tokenized for another model")
    device = next(model.parameters()).device
    if config.autocast is not None:
        wide = {p.dtype for p in model.parameters()} - {torch.float32}
        if wide:
            raise ValueError(f"autocast={config.autocast!r} keeps float32 weights and runs the products in "
                             f"{config.autocast}; the model's are {', '.join(map(str, sorted(wide, key=str)))}: "
                             f"load it in float32")
    say = log if log is not None and ranks.rank == 0 else (lambda line: None)
    fingerprint = data.fingerprint()
    if ranks.size > 1:
        ranks.same((fingerprint, repr(config)), "data or training settings")
        ranks.broadcast_weights(model)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.learning_rate(0),
                                  betas=config.betas)
    held_out = data.held_out(config.eval_batches, config.batch_size) if config.eval_every else []

    def held_out_loss() -> float:
        total, count = _loss_sum(model, held_out[ranks.rank::ranks.size], device,
                                 autocast_region(config.autocast, device))
        if ranks.size > 1:
            sums = torch.tensor([total, count], dtype=torch.float64, device=device)
            ranks.sum_([sums])
            total, count = sums.tolist()
        return total / count

    history: list[dict] = []
    first = 1
    if resume is not None:
        history = _resume(resume, model, fingerprint, config, optimizer, generator, device, ranks.rank)
        first = resume.step + 1
        say(f"resumed at step {resume.step} of {config.steps}")
    else:
        if ranks.rank:  # dropout's own stream in each process
            torch.manual_seed(torch.initial_seed() + ranks.rank)
        if held_out:
            history.append({"step": 0, "val_loss": held_out_loss()})
            say(f"step {0:6d}  val loss {history[0]['val_loss']:.4f}")

    def state(step: int) -> TrainState | None:
        """The run's state after `step` in rank 0 (None in the others, which send it their
        random state)."""
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        every = ranks.gather(rng) if ranks.size > 1 else [rng]
        if ranks.rank:
            return None
        rng = {_rng_key(kind, rank): value for rank, states in enumerate(every) for kind, value in states.items()}
        return TrainState(step=step, history=list(history), optimizer=optimizer.state_dict(),
                          generator=generator.get_state(), data=fingerprint, weights=weights_digest(model),
                          rng=rng)

    share = config.accumulate // ranks.size * config.batch_size  # windows of a step per process
    tokens_per_step = config.batch_size * config.accumulate * data.context
    model.train()
    recompute = model.activation_checkpointing
    model.activation_checkpointing = config.activation_checkpointing
    overlap = _OverlappedSum(model.parameters()) if ranks.size > 1 else None
    try:
        clock = time.perf_counter()
        for step in range(first, config.steps + 1):
            lr = config.learning_rate(step - 1)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # One draw of every window of the step, split into micro-batches: a step is the same
            # however it is accumulated.
            inputs, targets = data.sample(config.batch_size * config.accumulate, generator)
            mine = slice(ranks.rank * share, (ranks.rank + 1) * share)
            loss_sum = torch.zeros((), device=device)
            micro = list(zip(inputs[mine].split(config.batch_size), targets[mine].split(config.batch_size)))
            for i, (x, y) in enumerate(micro):
                with autocast_region(config.autocast, device):
                    loss = model.loss(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
                if overlap is not None and i == len(micro) - 1:
                    overlap.arm()  # this backward completes the gradients: sum them as they come
                (loss / config.accumulate).backward()
                loss_sum += loss.detach()
            if overlap is not None:
                overlap.finish()
                ranks.sum_([loss_sum])
            if config.grad_clip:
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip))
            else:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                norm = float(torch.nn.utils.get_total_norm(grads))
            step_loss = float(loss_sum) / config.accumulate
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"the training loss is {step_loss} at step {step}: lower the learning rate "
                                         f"(now {lr:.3g}) or check the data and the model's weights")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": norm,
                      "tokens_per_s": tokens_per_step / (now - clock)}
            clock = now
            if held_out and (step % config.eval_every == 0 or step == config.steps):
                record["val_loss"] = held_out_loss()
                clock = time.perf_counter()  # the evaluation's time is not the step's
            history.append(record)
            if config.log_every and (step % config.log_every == 0 or step == 1 or step == config.steps):
                say(f"step {step:6d}  loss {step_loss:.4f}  lr {lr:.3g}  grad norm {norm:.3g}  "
                    f"{record['tokens_per_s']:,.0f} tokens/s"
                    + (f"  val loss {record['val_loss']:.4f}" if "val_loss" in record else ""))
            elif "val_loss" in record:
                say(f"step {step:6d}  val loss {record['val_loss']:.4f}")
            if (save_every and step % save_every == 0) or step == config.steps:
                if checkpoint is not None or ranks.size > 1:  # every process sends rank 0 its part
                    saved = state(step)
                    if checkpoint is not None and saved is not None:
                        checkpoint(saved)
        if ranks.size > 1:
            ranks.barrier()  # rank 0's last checkpoint written before any process goes on
    finally:
        if overlap is not None:
            overlap.close()
        model.activation_checkpointing = recompute
        model.eval()
    return history


def _resume(resume: TrainState, model: GPT, fingerprint: str, config: TrainConfig, optimizer, generator,
            device, rank: int = 0) -> list[dict]:
    """Restores a saved run into a fresh optimizer and generator after checking that it meets
    its own data and weights; returns its history. Process `rank` takes its own random state,
    or, where the run had fewer processes, rank 0's reseeded (a stream of its own)."""
    if resume.step >= config.steps:
        raise ValueError(f"the run to resume is at step {resume.step}, and config.steps is {config.steps}: "
                         f"nothing is left to train (raise steps to go on)")
    if resume.data != fingerprint:
        raise ValueError("the data differs from the data the run to resume was trained on (other text, "
                         "tokenizer, context or held-out share): its batches would not continue")
    if resume.weights != weights_digest(model):
        raise ValueError(f"the model's weights are not those the run to resume saved at step {resume.step}: "
                         f"load the checkpoint written with that state (in the dtype it was trained in)")
    # load_state_dict brings back the saved groups' hyperparameters too; the fresh optimizer's
    # (the config's) rule from here, as they would in a run that had not stopped (lr is set every step).
    fresh = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(resume.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"the saved optimizer state does not fit this model's parameters ({e})") from None
    for group, settings in zip(optimizer.param_groups, fresh):
        group.update(settings)
    try:
        generator.set_state(resume.generator)
        saved = _rng_key("cpu", rank) in resume.rng
        torch.set_rng_state(resume.rng[_rng_key("cpu", rank if saved else 0)])
        cuda = _rng_key("cuda", rank if saved else 0)
        if device.type == "cuda" and cuda in resume.rng:
            torch.cuda.set_rng_state(resume.rng[cuda], device)
        if not saved:
            torch.manual_seed(torch.initial_seed() + rank)
    except (KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"the saved random state is malformed ({e})") from None
    return list(resume.history)
