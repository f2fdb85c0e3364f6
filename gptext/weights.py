"""Checkpoints: Hugging Face GPT-2 directories in and out.

A directory holds config.json and the weights as model.safetensors (or shards listed in
model.safetensors.index.json), or as pytorch_model.bin (read with weights_only=True: no
arbitrary unpickling). Hugging Face's GPT-2 stores its linear layers as Conv1D, [in, out];
gptext stores them as PyTorch Linear, [out, in], and transposes on the way in and out.
Every tensor's shape is checked, and missing or unknown tensors are reported by name.
Saving writes each file to a temporary name and renames it into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from .config import GPTConfig
from .model import GPT

__all__ = ["load_gpt2", "save_gpt2", "CheckpointError"]

# Hugging Face GPT-2 activation names that are GPT-2's tanh-form GELU.
_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Linear layers HF stores as Conv1D ([in, out]); suffixes of their weight names.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older HF checkpoints carry (the causal mask); not weights.
_IGNORED = (".attn.bias", ".attn.masked_bias")


class CheckpointError(ValueError):
    """A checkpoint directory that can't be loaded: names the file and the problem."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint directory needs config.json)") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None


def config_from_hf(hf: dict, source: Path) -> GPTConfig:
    """GPTConfig from a Hugging Face GPT-2 config.json, refusing variants gptext doesn't run."""
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(f"{source}: model_type is {hf.get('model_type')!r}; gptext loads 'gpt2' checkpoints")
    problems = []
    if hf.get("activation_function", "gelu_new") not in _TANH_GELU:
        problems.append(f"activation_function {hf['activation_function']!r} (gptext's MLP uses tanh GELU)")
    n_embd = hf.get("n_embd", 768)
    if hf.get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner {hf['n_inner']} (gptext's MLP is 4 x n_embd = {4 * n_embd})")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        problems.append("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn")
    if not hf.get("scale_attn_weights", True):
        problems.append("scale_attn_weights = false")
    if not hf.get("tie_word_embeddings", True):
        problems.append("tie_word_embeddings = false (gptext ties the head to the token embedding)")
    if problems:
        raise CheckpointError(f"{source}: unsupported GPT-2 variant: " + "; ".join(problems))
    try:
        return GPTConfig(vocab_size=hf.get("vocab_size", 50257), context_length=hf.get("n_positions", 1024),
                         n_embd=n_embd, n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
                         dropout=float(hf.get("resid_pdrop", 0.0)), qkv_bias=True,
                         layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)))
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weights file, on the CPU."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as error:  # noqa: BLE001 - truncated or corrupt files raise many kinds of error
        raise CheckpointError(f"{path}: cannot read the weights ({type(error).__name__}: {error})") from None


def _weight_files(directory: Path) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (directory / single).exists():
            return [directory / single]
        if (directory / index_name).exists():
            weight_map = _read_json(directory / index_name).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{directory / index_name}: no weight_map")
            return [directory / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{directory}: no model.safetensors, pytorch_model.bin or shard index found")


def load_gpt2(path, dtype: torch.dtype | None = None, device=None) -> GPT:
    """A GPT from a Hugging Face GPT-2 checkpoint directory, in eval mode. dtype defaults to
    the checkpoint's; device to the CPU."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a Hugging Face checkpoint directory)")
    cfg = config_from_hf(_read_json(directory / "config.json"), directory / "config.json")

    found: dict[str, tuple[torch.Tensor, Path]] = {}
    for file in _weight_files(directory):
        for name, tensor in _read_tensors(file).items():
            found[name.removeprefix("transformer.")] = (tensor, file)

    with torch.device("meta"):
        model = GPT(cfg)
    expected = {name.removeprefix("transformer."): p for name, p in model.state_dict().items()
                if name != "lm_head.weight"}
    state, unknown = {}, []
    for name, (tensor, file) in found.items():
        if name.endswith(_IGNORED):
            continue
        if name == "lm_head.weight":
            wte = found.get("wte.weight")
            if wte is None or tensor.shape != wte[0].shape or not torch.equal(tensor, wte[0]):
                raise CheckpointError(f"{file}: lm_head.weight differs from wte.weight; gptext needs the tied head")
            continue
        if name not in expected:
            unknown.append(name)
            continue
        if name.endswith(_CONV1D):
            tensor = tensor.t()
        want = tuple(expected[name].shape)
        if tuple(tensor.shape) != want:
            shown = tuple(tensor.t().shape) if name.endswith(_CONV1D) else tuple(tensor.shape)
            raise CheckpointError(f"{file}: {name} has shape {shown}; the config implies "
                                  f"{want[::-1] if name.endswith(_CONV1D) else want}")
        state["transformer." + name] = tensor.to(dtype=dtype or tensor.dtype).contiguous()
    missing = sorted(set(expected) - {n.removeprefix("transformer.") for n in state})
    if missing or unknown:
        raise CheckpointError(f"{directory}: " + "; ".join(
            part for part in (f"missing tensors: {', '.join(missing)}" if missing else "",
                              f"unknown tensors: {', '.join(sorted(unknown))}" if unknown else "") if part))

    model.load_state_dict(state, strict=False, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied parameter
    return model.to(device or "cpu").eval()


def _atomic_write(target: Path, write) -> None:
    """write(temp_path) then rename over target: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def hf_config(cfg: GPTConfig, dtype: torch.dtype) -> dict:
    """config.json for Hugging Face's GPT2LMHeadModel."""
    eos = 50256 if cfg.vocab_size > 50256 else cfg.vocab_size - 1
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_ctx": cfg.context_length,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": cfg.layer_norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02, "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_gpt2(model: GPT, path) -> None:
    """Writes config.json and model.safetensors in Hugging Face's GPT-2 layout (the tied head
    is left out, as Hugging Face does; a model without q/k/v bias gets a zero bias)."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        short = name.removeprefix("transformer.")
        tensors[short] = (tensor.t() if short.endswith(_CONV1D) else tensor).detach().to("cpu").contiguous()
    if not model.config.qkv_bias:
        for layer in range(model.config.n_layer):
            weight = tensors[f"h.{layer}.attn.c_attn.weight"]
            tensors[f"h.{layer}.attn.c_attn.bias"] = weight.new_zeros(weight.shape[1])
    dtype = model.transformer.wte.weight.dtype
    _atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json",
                  lambda tmp: Path(tmp).write_text(json.dumps(hf_config(model.config, dtype), indent=2) + "\n"))
