"""gptext's command line: ``python -m gptext <command>`` (or the ``gptext`` script).

  info       what was built (CUDA arches, CPU instruction set) and where it can run
  generate   continue a prompt with a checkpoint (or a preset with random weights)
  chat       talk with a gpt-oss checkpoint in its chat format (harmony)
  train      train or fine-tune a model on text files, writing a checkpoint directory
  profile    one forward pass, op by op: implementation, FLOPs, bytes, time, share of limits
  demo       train a small GPT on a short text with gptext's ops, then generate from it
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import sys
import time

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


class CommandError(Exception):
    """A problem with the command's inputs: reported in one line, without a traceback."""


def cmd_info(args: argparse.Namespace) -> int:
    import gptext

    info = gptext.build_info()
    print(f"gptext {gptext.__version__}")
    print(f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'})")
    if not info["extension"]:
        print(f"compiled kernels: NOT BUILT ({info['extension_error']}); every op runs on the PyTorch reference")
        return 0
    print(f"compiled kernels: CPU ({info['cpu_isa']})"
          + (f", CUDA {info['cuda_runtime'] // 1000}.{info['cuda_runtime'] % 1000 // 10} for TORCH_CUDA_ARCH_LIST="
             f"{info['cuda_arch_list']}" if info["cuda"] else ", no CUDA (CPU-only build)"))
    print(f"GEMM policy: {info['gemm_policy']}")
    print("devices:")
    for dev in info["devices"]:
        where = dev["device"] + (f" {dev['name']} ({dev['capability']})" if "name" in dev else "")
        if dev["kernels"]:
            how = "compiled kernels" + (f" (binary {dev['kernel_binary']})" if dev.get("kernel_binary") else "")
        else:
            how = "PyTorch reference (no compiled kernels for it)"
        print(f"  {where}: {how}")
    return 0


def load_model(name: str, device: str, dtype: str, overrides: dict | None = None, seed: int = 0):
    """A GPT from a checkpoint directory, or a preset (its fields changed by `overrides`)
    with random weights drawn from `seed`."""
    import os

    import torch

    from gptext import GPT, GPTConfig

    torch_dtype = getattr(torch, DTYPES[dtype])
    if os.path.isdir(name):
        if overrides:
            raise CommandError("--set changes a preset's configuration; a checkpoint's is its own")
        return GPT.from_pretrained(name, dtype=torch_dtype, device=device), "checkpoint"
    if name in GPTConfig.presets():
        cfg = GPTConfig.preset(name, **(overrides or {}))
        need, free = 4 * cfg.num_parameters(), free_memory(device)  # built in fp32, then converted
        if free is not None and need > free:
            raise CommandError(f"--model {name}: random weights for its {cfg.num_parameters() / 1e9:.1f}B parameters "
                               f"need {need / 1e9:.0f} GB, and {device} has {free / 1e9:.0f} GB free; load a "
                               f"checkpoint directory instead")
        torch.manual_seed(seed)
        model = GPT(cfg).to(device=device, dtype=torch_dtype).eval()
        return model, "random weights"
    raise CommandError(f"--model {name!r} is neither a checkpoint directory nor a preset "
                       f"({', '.join(GPTConfig.presets())})")


def free_memory(device: str) -> int | None:
    """Bytes free on the device (the CPU: physical memory available), or None if unknown."""
    import os

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def tokenizer_for(model_arg: str, model, command: str = "generate"):
    """The checkpoint directory's own tokenizer.json when it has one, else GPT-2's (shipped)
    for a GPT-2 model."""
    from pathlib import Path

    import gptext

    path = Path(model_arg)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        try:
            return gptext.get_tokenizer(path)
        except ValueError as e:
            raise CommandError(f"{command}: {e}") from None
    if model.config.arch == "gpt2":
        return gptext.get_tokenizer("gpt2")
    raise CommandError(f"{command}: {model_arg} has no tokenizer.json, and a {model.config.arch} model reads another "
                       f"vocabulary than GPT-2's (the one gptext ships): put the checkpoint's tokenizer.json in its "
                       f"directory, or give token ids through the Python API (model.generate)")


def end_tokens(model_arg: str, tok, vocab_size: int) -> list[int] | None:
    """The ids that end a sequence: the checkpoint's generation_config.json eos_token_id (one
    id or a list, as gpt-oss's), else the tokenizer's <|endoftext|>; those within the model's
    vocabulary, or None."""
    import json
    from pathlib import Path

    ids = None
    config = Path(model_arg) / "generation_config.json"
    if config.is_file():
        try:
            settings = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CommandError(f"generate: {config}: not readable JSON ({e})") from None
        if not isinstance(settings, dict):
            raise CommandError(f"generate: {config}: not a JSON object")
        ids = settings.get("eos_token_id")
    if ids is None:
        try:
            ids = tok.encode_single_token("<|endoftext|>")
        except KeyError:
            return None
    ids = [ids] if isinstance(ids, int) else ids
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise CommandError(f"generate: {config}: eos_token_id must be an id or a list of ids, got {ids!r}")
    return [i for i in ids if 0 <= i < vocab_size] or None


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import gptext
    from gptext.generate import stream

    gptext.set_backend(args.backend)
    device = args.device or default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, origin = load_model(args.model, device, dtype)
    tok = tokenizer_for(args.model, model)
    if origin == "random weights":
        print(f"[{args.model} with random weights: expect noise, not text]", file=sys.stderr)
    prompt = tok.encode(args.prompt, allowed_special="all")
    if max(prompt, default=0) >= model.config.vocab_size:
        raise CommandError(f"generate: the tokenizer gives id {max(prompt)}, beyond the model's vocabulary of "
                           f"{model.config.vocab_size}: the checkpoint's tokenizer.json is not this model's")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    eos = None if args.ignore_eos else end_tokens(args.model, tok, model.config.vocab_size)

    start = time.perf_counter()
    steps = stream(model, torch.tensor([prompt], device=device), args.max_new_tokens, args.temperature, args.top_k,
                   args.top_p, eos, generator)  # checks the arguments before anything is printed
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    first = None
    count = 0
    for token in steps:
        token_id = int(token[0])
        count += 1
        if first is None:
            first = time.perf_counter()
        if eos is not None and token_id in eos:
            break
        sys.stdout.write(text.decode(tok.decode_single_token_bytes(token_id)))
        sys.stdout.flush()
    sys.stdout.write(text.decode(b"", final=True) + "\n")
    report_speed(start, first, count, len(prompt), device, dtype)
    return 0


def report_speed(start: float, first: float | None, count: int, prompt: int, device: str, dtype: str) -> None:
    """The summary line on stderr: tokens generated, overall and decoding rates."""
    elapsed = time.perf_counter() - start
    decode_rate = (count - 1) / (time.perf_counter() - first) if count > 1 else 0.0
    print(f"[{count} tokens in {elapsed:.2f} s: {count / elapsed if elapsed else 0:.1f} tokens/s overall, "
          f"{decode_rate:.1f} tokens/s decoding; prompt {prompt} tokens; {device}, {dtype}]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    import datetime

    import torch

    import gptext
    from gptext import chat
    from gptext.generate import stream

    gptext.set_backend(args.backend)
    device = args.device or default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model, origin = load_model(args.model, device, dtype)
    if model.config.arch == "gpt2":
        raise CommandError(f"chat: {args.model} is a GPT-2 model, which has no chat format; the chat format "
                           f"(harmony) is gpt-oss's. Use generate to continue a prompt")
    tok = tokenizer_for(args.model, model, "chat")
    try:
        stops = [chat.special_ids(tok)[t] for t in chat.STOP_TOKENS]
    except ValueError as e:
        raise CommandError(f"chat: {e}") from None
    if origin == "random weights":
        print(f"[{args.model} with random weights: expect noise, not text]", file=sys.stderr)
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    history = [chat.system_message(args.reasoning, date=args.date or datetime.date.today().isoformat())]
    if args.instructions:
        history.append(chat.developer_message(args.instructions))
    interactive = args.message is None
    for line in ([args.message] if not interactive else user_lines()):
        history.append(chat.Message("user", line))
        prompt = chat.encode(tok, history)
        if max(prompt + stops) >= model.config.vocab_size:
            raise CommandError(f"chat: the tokenizer gives id {max(prompt + stops)}, beyond the model's vocabulary of "
                               f"{model.config.vocab_size}: the checkpoint's tokenizer.json is not this model's")
        start, first, count = time.perf_counter(), None, 0
        parser = chat.Parser(tok)
        shown = ShownReply(args.show_reasoning)
        for token in stream(model, torch.tensor([prompt], device=device), args.max_new_tokens, args.temperature,
                            args.top_k, args.top_p, stops, generator):
            count += 1
            first = first or time.perf_counter()
            shown.write(parser, parser.feed(int(token[0])))
            if parser.done:
                break
        reply = parser.finish()
        shown.end(reply, parser.stop)
        report_speed(start, first, count, len(prompt), device, dtype)
        history += reply
    return 0


def user_lines():
    """The user's turns: stdin's non-empty lines, with a prompt on stderr at a terminal."""
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


class ShownReply:
    """Shows a reply as it is sampled: the answer (the final channel, and commentary that
    calls no tool: a preamble meant for the user) on stdout, the reasoning (analysis) on
    stderr when asked for, each reasoning message after an "[analysis]" tag."""

    def __init__(self, show_reasoning: bool):
        self.show_reasoning = show_reasoning
        self.index, self.used = -1, set()

    def write(self, parser, text: str) -> None:
        if not text:
            return
        if parser.channel == "analysis":
            out = sys.stderr if self.show_reasoning else None
        else:
            out = sys.stdout if parser.recipient is None else None
        if out is None:
            return
        if parser.index != self.index:  # a new message: on a line of its own
            self.index = parser.index
            out.write(("\n" if out in self.used else "") + ("[analysis] " if out is sys.stderr else ""))
        self.used.add(out)
        out.write(text)
        out.flush()

    def end(self, reply, stop) -> None:
        for out in (sys.stderr, sys.stdout):
            if out in self.used or out is sys.stdout:
                out.write("\n")
                out.flush()
        if stop == "<|call|>" and reply:
            call = reply[-1]
            print(f"[the model calls {call.recipient} with {call.content!r}: gptext chat runs no tools]",
                  file=sys.stderr)
        elif stop is None:
            print("[the reply stopped at --max-new-tokens before the model ended it]", file=sys.stderr)
        if not reply:
            print("[no message in the reply: the model never finished a message header with <|message|>]",
                  file=sys.stderr)


def cmd_profile(args: argparse.Namespace) -> int:
    import torch

    import gptext
    from gptext import profiling

    gptext.set_backend(args.backend)
    device = torch.device(args.device or default_device())
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    model, origin = load_model(args.model, str(device), dtype)
    if args.tokens < 1 or args.tokens > model.config.context_length:
        raise CommandError(f"--tokens must be in [1, {model.config.context_length}], got {args.tokens}")
    tok = gptext.get_tokenizer("gpt2")
    ids = (tok.encode("Every effort moves you forward, one token at a time, through the whole model.")
           * args.tokens)[: args.tokens]
    idx = torch.tensor([[i % model.config.vocab_size for i in ids]], device=device)
    limits = profiling.device_limits(device, dtypes=(getattr(torch, DTYPES[dtype]),))
    records, total = profiling.profile_forward(model, idx)
    cfg = model.config
    print(f"{args.model} ({origin}): {cfg.n_layer} layers, width {cfg.n_embd}, {cfg.n_head} heads of "
          f"{cfg.head_dim}; {args.tokens} tokens, batch 1, {dtype} on {limits.name}")
    print(f"device limits measured now: copy {limits.copy_gbps:.1f} GB/s, matmul "
          f"{limits.matmul_tflops[DTYPES[dtype]]:.2f} TFLOP/s ({dtype})")
    print(profiling.format_profile(records, total, limits, DTYPES[dtype]))
    return 0


def preset_overrides(settings: list[str]) -> dict:
    """--set KEY=VALUE pairs as GPTConfig fields, each value parsed as its field's type
    ("none" for a field that may be None)."""
    import dataclasses
    import types
    import typing

    from gptext import GPTConfig

    hints = typing.get_type_hints(GPTConfig)
    fields = [f.name for f in dataclasses.fields(GPTConfig)]
    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise CommandError(f"--set {item!r}: expected KEY=VALUE with KEY a GPTConfig field ({', '.join(fields)})")
        hint = hints[key]
        optional = isinstance(hint, types.UnionType) and type(None) in hint.__args__
        kind = next(t for t in hint.__args__ if t is not type(None)) if optional else hint
        try:
            if optional and value.lower() == "none":
                overrides[key] = None
            elif kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                overrides[key] = value.lower() in ("true", "1")
            else:
                overrides[key] = kind(value)
        except ValueError:
            raise CommandError(f"--set {item!r}: {value!r} does not read as {kind.__name__}") from None
    return overrides


# train's settings beyond TrainConfig's fields (whose defaults are TrainConfig's), with their
# defaults. Flags left out of the command line are absent from its arguments (argparse.SUPPRESS),
# so that a resumed run can tell what was given from what was not.
TRAIN_DEFAULTS = {"set": [], "context": None, "val_fraction": 0.1, "dtype": "float32"}
# What a resumed run cannot change: the model, and what decides its data's windows.
FIXED_ON_RESUME = ("model", "set", "context", "val_fraction", "seed", "dtype")
TRAIN_STATE_FILE = "training_state.pt"
# TrainConfig fields added after training.json was first written, which an older one lacks.
ADDED_SETTINGS = ("activation_checkpointing",)


def train_config_defaults() -> dict:
    """TrainConfig's fields that train has a flag for, with their defaults."""
    import dataclasses

    from gptext import train

    return {f.name: f.default for f in dataclasses.fields(train.TrainConfig) if f.name != "betas"}


def saved_run(out) -> tuple[dict, "object"]:
    """The settings (training.json) and the TrainState of the run whose checkpoint is in `out`."""
    import json
    from pathlib import Path

    from gptext import train

    out = Path(out)
    if not (out / TRAIN_STATE_FILE).is_file() or not (out / "training.json").is_file():
        raise CommandError(f"--resume: {out} holds no run to resume (it needs the training.json and "
                           f"{TRAIN_STATE_FILE} that train writes beside the weights)")
    try:
        log = json.loads((out / "training.json").read_text(encoding="utf-8"))
        settings = {key: log[key] for key in ("model", "data", *TRAIN_DEFAULTS)}
        # A setting newer than the run's gptext takes its default (what that run trained with).
        config = log["config"]
        settings.update({key: config.get(key, default) if key in ADDED_SETTINGS else config[key]
                         for key, default in train_config_defaults().items()})
    except (ValueError, KeyError, TypeError) as e:
        raise CommandError(f"--resume: {out / 'training.json'} is malformed ({type(e).__name__}: {e})") from None
    try:
        state = train.TrainState.load(out / TRAIN_STATE_FILE)
    except ValueError as e:
        raise CommandError(f"--resume: {e}") from None
    return settings, state


def autocast_arg(value: str) -> str | None:
    """--autocast's value as TrainConfig.autocast takes it."""
    try:
        return {"bf16": "bfloat16", "bfloat16": "bfloat16", "none": None}[value]
    except KeyError:
        raise argparse.ArgumentTypeError(f"{value!r}: give bf16 or none") from None


def token_file(data_files) -> bool:
    """Whether --data names a token file (then it is the only file), rather than text files."""
    from gptext import train

    if not any(train.is_token_file(path) for path in data_files):
        return False
    if len(data_files) != 1:
        raise CommandError("--data takes text files or one token file (from `python -m gptext tokenize`), "
                           "not a token file among other files")
    return True


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    import gptext
    from gptext import train

    gptext.set_backend(args.backend)
    device = args.device or default_device()
    model, origin = load_model(args.model, device, args.dtype or ("bfloat16" if device.startswith("cuda")
                                                                  else "float32"))
    tok = tokenizer_for(args.model, model, "eval")
    ids = train.read_tokens(args.data[0], tok)[1] if token_file(args.data) else train.tokenize(args.data, tok)
    with train.autocast_region(args.autocast, device):
        result = train.perplexity(model, ids, args.context, args.stride, args.batch_size)
    if args.json:
        print(json.dumps({"model": args.model, "data": args.data, "autocast": args.autocast, **result}))
    else:
        print(f"eval: {args.model} ({origin}) on {len(ids):,} tokens: loss {result['loss']:.4f}, perplexity "
              f"{result['perplexity']:.3f} over {result['tokens']:,} predicted tokens in {result['windows']:,} "
              f"windows of {result['context']} (stride {result['stride']}); {result['seconds']:.1f} s, "
              f"{result['tokens'] / max(result['seconds'], 1e-9):,.0f} tokens/s on {device}")
    return 0


@contextlib.contextmanager
def processes(device: str):
    """(this process's device, its rank, the number of processes): under torchrun
    (WORLD_SIZE > 1) the process group is started for the command (NCCL on CUDA, Gloo on
    the CPU), each process on the GPU of its LOCAL_RANK; else this process alone."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield device, 0, 1
        return
    import torch.distributed as dist

    where = torch.device(device)
    if where.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if where.index is not None:
            raise CommandError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK: "
                               f"give --device cuda")
        if local >= torch.cuda.device_count():
            raise CommandError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} GPU(s)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    elif where.type != "cpu":
        raise CommandError(f"--device {device}: data-parallel training runs on cuda or cpu")
    dist.init_process_group("nccl" if where.type == "cuda" else "gloo")
    try:
        yield device, dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def cmd_train(args: argparse.Namespace) -> int:
    import gptext

    gptext.set_backend(args.backend)
    with processes(args.device or default_device()) as (device, rank, world):
        return run_training(args, device, rank, world)


def run_training(args: argparse.Namespace, device: str, rank: int, world: int) -> int:
    """train's work in process `rank` of `world` (rank 0 alone prints and writes --out)."""
    import dataclasses
    import json
    import os
    import shutil
    from pathlib import Path

    from gptext import train
    from gptext.weights import _atomic_write

    say = print if rank == 0 else (lambda *_, **__: None)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out}: exists and is not a directory")
    defaults = {**TRAIN_DEFAULTS, **train_config_defaults()}
    given = {key: getattr(args, key) for key in defaults if hasattr(args, key)}
    state = None
    if args.resume:
        fixed = [f"--{key.replace('_', '-')}" for key in FIXED_ON_RESUME
                 if key in given or (key == "model" and args.model is not None)]
        if fixed:
            raise CommandError(f"--resume continues the run in {out} with its own {', '.join(fixed)}: leave "
                               f"{'it' if len(fixed) == 1 else 'them'} out")
        settings, state = saved_run(out)
        if settings["warmup"] is None:  # the run's own warmup, not one rescaled to a new --steps
            settings["warmup"] = train.TrainConfig(steps=settings["steps"]).warmup_steps
        settings.update(given)
        source, data_files = str(out), args.data or settings["data"]
    else:
        if args.model is None or args.data is None:
            raise CommandError("train needs --model and --data (or --resume, to continue the run in --out)")
        settings = {**defaults, **given}
        source, data_files = args.model, args.data
    overrides = preset_overrides(settings["set"]) if state is None else None  # a resumed run's model is --out's
    model, origin = load_model(source, device, settings["dtype"], overrides, settings["seed"])
    if state is not None:
        origin = f"resumed at step {state.step}"
    tok = tokenizer_for(source, model, "train")
    context = settings["context"] or model.config.context_length
    if context > model.config.context_length:
        raise CommandError(f"--context {context} is longer than the model's context_length "
                           f"{model.config.context_length}")
    if token_file(data_files):
        data = train.TokenData.from_file(data_files[0], context, settings["val_fraction"], tokenizer=tok)
    else:
        data = train.TokenData(train.tokenize(data_files, tok), context, settings["val_fraction"])
    config = train.TrainConfig(**{key: settings[key] for key in train_config_defaults()})
    record = {"model": settings["model"] if state is not None else args.model, "set": settings["set"],
              "data": [str(Path(p).resolve()) for p in data_files], "context": context,
              "val_fraction": settings["val_fraction"], "dtype": settings["dtype"]}
    cfg = model.config
    say(f"train: {source} ({origin}, {model.num_parameters() / 1e6:.1f}M parameters, {cfg.n_layer} layers, "
        f"width {cfg.n_embd}) on {data.train.size:,} tokens ({data.val.size:,} held out), windows of "
        f"{context}, {config.batch_size * config.accumulate} a step, {config.steps} steps; {device}"
        + (f" and {world - 1} more process{'es' if world > 2 else ''} like it" if world > 1 else "") + ", "
        f"{settings['dtype']}" + (f" under {config.autocast} autocast" if config.autocast else "")
        + (", activation checkpointing" if config.activation_checkpointing else ""))

    def checkpoint(saved: train.TrainState) -> None:
        # The weights first, the state (which names their digest) after them, the settings last:
        # a run stopped between two writes leaves a state that refuses the weights beside it.
        model.save_pretrained(out)
        if os.path.isdir(source) and out.resolve() != Path(source).resolve():
            for name in TOKENIZER_FILES:
                path = Path(source) / name
                if path.is_file():
                    _atomic_write(out / name, lambda tmp, path=path: shutil.copyfile(path, tmp))
        saved.save(out / TRAIN_STATE_FILE)
        log = {**record, "step": saved.step, "config": dataclasses.asdict(config), "history": saved.history}
        _atomic_write(out / "training.json",
                      lambda tmp: Path(tmp).write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8"))
        print(f"wrote {out} (step {saved.step})")

    first = state.step if state is not None else 0
    start = time.perf_counter()
    history = train.train(model, data, config, checkpoint=checkpoint, save_every=args.save_every, resume=state)
    elapsed = time.perf_counter() - start
    steps = [r for r in history if "loss" in r]
    held = [r["val_loss"] for r in history if "val_loss" in r]
    tokens = (config.steps - first) * config.batch_size * config.accumulate * context
    say(f"trained {config.steps - first} steps in {elapsed:.1f} s ({tokens / elapsed:,.0f} tokens/s); training "
        f"loss {steps[0]['loss']:.4f} (step 1) -> {steps[-1]['loss']:.4f}"
        + (f", held-out loss {held[0]:.4f} -> {held[-1]:.4f}" if held else ""))
    return 0


# A checkpoint directory's tokenizer and generation settings, copied beside the trained weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja")


def cmd_tokenize(args: argparse.Namespace) -> int:
    from pathlib import Path

    import gptext
    from gptext import train

    out = Path(args.out)
    if out.is_dir():
        raise CommandError(f"--out {out}: is a directory (give the token file's name)")
    if not out.parent.is_dir():
        raise CommandError(f"--out {out}: no directory {out.parent} to write it into")
    try:
        tok = gptext.get_tokenizer(args.tokenizer)
    except FileNotFoundError:
        raise CommandError(f"--tokenizer {args.tokenizer}: has no tokenizer.json (a GPT-2 checkpoint without one "
                           f"reads GPT-2's vocabulary: --tokenizer gpt2)") from None
    chars = sum(Path(p).stat().st_size for p in args.files if Path(p).is_file())
    start = time.perf_counter()
    header = train.write_tokens(args.files, tok, out)
    elapsed = time.perf_counter() - start
    print(f"tokenize: wrote {out}: {header['count']:,} tokens ({header['dtype']}, largest id {header['max_id']}) "
          f"from {len(args.files)} file{'s' if len(args.files) > 1 else ''} ({chars / 1e6:,.1f} MB) with "
          f"{tok.name!r} in {elapsed:.1f} s ({header['count'] / max(elapsed, 1e-9):,.0f} tokens/s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gptext import demo

    return demo.run(device=args.device or default_device(), steps=args.steps, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptext", description="gptext: a GPT runtime on hand-written CUDA kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what was built and which devices can run it").set_defaults(run=cmd_info)

    gen = commands.add_parser(
        "generate", help="continue a prompt, streaming the text as it is produced",
        description="Continue a prompt with a checkpoint, streaming the continuation to stdout; a summary "
                    "line (tokens, tokens/s) goes to stderr. The text is tokenized with the checkpoint's own "
                    "tokenizer.json when its directory has one (byte-level BPE: GPT-2's, gpt-oss's), else "
                    "with GPT-2's vocabulary, which gptext ships.")
    gen.add_argument("--model", required=True,
                     help="Hugging Face GPT-2 or gpt-oss checkpoint directory (or OpenAI's original gpt-oss "
                          "layout), or a preset name (random weights)")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate at most (default 50)")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy (default 1)")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of probability >= p")
    gen.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    gen.add_argument("--backend", choices=["auto", "kernels", "reference"], default="auto",
                     help="gptext's compiled kernels or the PyTorch reference (default auto)")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="keep going past the end-of-sequence tokens (the checkpoint's generation_config.json "
                          "eos_token_id, else <|endoftext|>)")
    gen.set_defaults(run=cmd_generate)

    talk = commands.add_parser(
        "chat", help="talk with a gpt-oss checkpoint in its chat format (harmony)",
        description="Send a message (--message) or each line of stdin in turn to a gpt-oss checkpoint, in the "
                    "harmony chat format it was trained on, keeping the conversation as it goes. The answer "
                    "streams to stdout; the model's reasoning (its analysis channel) is not shown unless "
                    "--show-reasoning sends it to stderr. The checkpoint's tokenizer.json (o200k_harmony) must "
                    "be in its directory. Tool calls end the turn with a note: no tools are run.")
    talk.add_argument("--model", required=True, help="gpt-oss checkpoint directory (Hugging Face or OpenAI's layout)")
    talk.add_argument("--message", default=None, help="one message; without it, each line of stdin is one turn")
    talk.add_argument("--instructions", default=None,
                      help="the developer message's instructions (what other formats call the system prompt)")
    talk.add_argument("--reasoning", choices=["low", "medium", "high"], default="medium",
                      help="the reasoning effort the system message asks for (default medium)")
    talk.add_argument("--date", default=None, help="the current date the system message gives (default today)")
    talk.add_argument("--show-reasoning", action="store_true", help="stream the model's reasoning to stderr")
    talk.add_argument("--max-new-tokens", type=int, default=1024,
                      help="tokens to generate per turn at most, reasoning included (default 1024)")
    talk.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy (default 1)")
    talk.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    talk.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of probability >= p")
    talk.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    talk.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    talk.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                      help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    talk.add_argument("--backend", choices=["auto", "kernels", "reference"], default="auto",
                      help="gptext's compiled kernels or the PyTorch reference (default auto)")
    talk.set_defaults(run=cmd_chat)

    prof = commands.add_parser(
        "profile", help="one forward pass, op by op, against the device's measured limits",
        description="Run one forward pass and print a table per op: which implementation ran (wmma, cublas, cpu, "
                    "reference), FLOPs, bytes moved, time, and the share of the device's copy bandwidth or matmul "
                    "throughput measured in the same run.")
    prof.add_argument("--model", default="gpt2-124m", help="preset (random weights) or checkpoint directory")
    prof.add_argument("--tokens", type=int, default=10, help="sequence length of the pass (default 10)")
    prof.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    prof.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                      help="default: bfloat16 on CUDA, float32 on CPU")
    prof.add_argument("--backend", choices=["auto", "kernels", "reference"], default="auto")
    prof.set_defaults(run=cmd_profile)

    fit = commands.add_parser(
        "train", help="train or fine-tune a model on text files, writing a checkpoint directory",
        description="Train a model on the text of one or more UTF-8 files (joined with <|endoftext|>), "
                    "tokenized with the checkpoint's tokenizer.json or GPT-2's: AdamW, a linear warmup then a "
                    "cosine decay of the learning rate, gradients clipped and accumulated, the loss on the "
                    "text's last --val-fraction measured every --eval-every steps. Starts from a checkpoint "
                    "(fine-tuning) or a preset's random weights (--set changes the preset). Writes a Hugging "
                    "Face checkpoint (config.json, model.safetensors, the source's tokenizer files), "
                    f"{TRAIN_STATE_FILE} (the optimizer's moments and the random state) and training.json "
                    "(settings, history) into --out, atomically, every --save-every steps and at the end. "
                    "--resume continues the run in --out from its last save, exactly as if it had not stopped, "
                    "with its saved settings; --steps may raise its total (the schedule stretches to it), "
                    "and the other optimizer flags change it from there. Under torchrun it trains data "
                    "parallel, one process per GPU (or CPU processes with --device cpu): the --accumulate "
                    "micro-batches of a step (a multiple of the process count) are shared among them.")
    hide = argparse.SUPPRESS  # left out: the default, or on --resume the saved run's setting
    fit.add_argument("--model", default=None,
                     help="checkpoint directory (GPT-2 or gpt-oss) or a preset name (not with --resume)")
    fit.add_argument("--data", default=None, nargs="+",
                     help="UTF-8 text files to train on, or one token file from `tokenize` (with --resume: "
                          "default, the run's own)")
    fit.add_argument("--out", required=True, help="directory to write the trained checkpoint into")
    fit.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    fit.add_argument("--set", action="append", default=hide, metavar="KEY=VALUE",
                     help="a preset's GPTConfig field, e.g. --set n_layer=4 (repeatable; presets only)")
    fit.add_argument("--steps", type=int, default=hide, help="optimizer steps in all (default 1000)")
    fit.add_argument("--batch-size", type=int, default=hide, help="windows per micro-batch (default 8)")
    fit.add_argument("--accumulate", type=int, default=hide, help="micro-batches per step (default 1)")
    fit.add_argument("--context", type=int, default=hide, help="window length in tokens (default: the model's)")
    fit.add_argument("--lr", type=float, default=hide, help="peak learning rate (default 3e-4)")
    fit.add_argument("--min-lr", type=float, default=hide, help="learning rate at the last step (default lr / 10)")
    fit.add_argument("--warmup", type=int, default=hide, help="warmup steps (default: steps / 10, at most 100)")
    fit.add_argument("--weight-decay", type=float, default=hide, help="AdamW's, on matrices only (default 0.1)")
    fit.add_argument("--grad-clip", type=float, default=hide, help="largest gradient norm; 0: no clipping (default 1)")
    fit.add_argument("--val-fraction", type=float, default=hide, help="share of the text held out (default 0.1)")
    fit.add_argument("--eval-every", type=int, default=hide, help="held-out loss every N steps; 0: never (default 100)")
    fit.add_argument("--eval-batches", type=int, default=hide, help="held-out batches per evaluation (default 8)")
    fit.add_argument("--log-every", type=int, default=hide, help="a log line every N steps (default 10)")
    fit.add_argument("--save-every", type=int, default=0, help="also write --out every N steps (default: at the end)")
    fit.add_argument("--seed", type=int, default=hide, help="seed of the batches and of a preset's weights (default 0)")
    fit.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    fit.add_argument("--dtype", choices=sorted(DTYPES), default=hide,
                     help="weights, gradients and optimizer state (default float32; bfloat16 keeps no float32 copy)")
    fit.add_argument("--autocast", type=autocast_arg, default=hide, metavar="{bf16,none}",
                     help="bf16: mixed precision, the forward passes under torch.autocast in bfloat16 with float32 "
                          "weights, gradients and optimizer state (default none)")
    fit.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=hide,
                     help="keep only each block's inputs and recompute the block in the backward pass: less "
                          "memory, one more forward pass of the blocks, the same steps (default off)")
    fit.add_argument("--backend", choices=["auto", "kernels", "reference"], default="auto",
                     help="gptext's compiled kernels or the PyTorch reference (default auto)")
    fit.set_defaults(run=cmd_train)

    ev = commands.add_parser(
        "eval", help="a model's loss and perplexity on text files or a token file",
        description="The mean next-token loss and perplexity of a model on UTF-8 text files (joined with "
                    "<|endoftext|>, tokenized as train does) or one token file: every token but the first "
                    "predicted once, through windows of --context tokens starting every --stride tokens, each "
                    "token scored in the first window that predicts it.")
    ev.add_argument("--model", required=True, help="checkpoint directory (GPT-2 or gpt-oss) or a preset name")
    ev.add_argument("--data", required=True, nargs="+", help="UTF-8 text files, or one token file from `tokenize`")
    ev.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's)")
    ev.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: context / 2)")
    ev.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    ev.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ev.add_argument("--backend", choices=["auto", "kernels", "reference"], default="auto",
                    help="gptext's compiled kernels or the PyTorch reference (default auto)")
    ev.add_argument("--autocast", type=autocast_arg, default=None, metavar="{bf16,none}",
                    help="bf16: the forward passes under torch.autocast in bfloat16 (default none)")
    ev.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ev.set_defaults(run=cmd_eval)

    tokenize = commands.add_parser(
        "tokenize", help="encode text files once into a token file that train reads in place",
        description="Encode UTF-8 text files (joined with <|endoftext|>) into a token file: a header (count, "
                    "digest, tokenizer) and the tokens as uint16 or uint32, written atomically without holding the "
                    "text's tokens in memory. train --data FILE reads it memory-mapped, so a corpus larger than "
                    "memory trains, and checks that it was made with the model's tokenizer.")
    tokenize.add_argument("files", nargs="+", help="UTF-8 text files")
    tokenize.add_argument("--out", required=True, help="the token file to write")
    tokenize.add_argument("--tokenizer", default="gpt2",
                          help="gpt2 (shipped), or a checkpoint directory or tokenizer.json (default gpt2)")
    tokenize.set_defaults(run=cmd_tokenize)

    demo = commands.add_parser(
        "demo", help="train a small GPT on a short text with gptext's ops, then generate from it",
        description="Train a small GPT (random start) on the Zen of Python with gptext's ops and autograd, then "
                    "generate from it with the KV cache, reporting loss and tokens/s. Runs offline.")
    demo.add_argument("--device", default=None, help="default: cuda if available")
    demo.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (CommandError, ValueError, TypeError, OSError) as error:
        print(f"gptext {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
