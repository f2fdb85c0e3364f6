"""Checkpoints: Hugging Face GPT-2 and gpt-oss directories in and out.

A directory holds config.json and the weights as model.safetensors (or shards listed in
model.safetensors.index.json), or as pytorch_model.bin (read with weights_only=True: no
arbitrary unpickling). config.json's model_type picks the family.

GPT-2: Hugging Face stores the linear layers as Conv1D, [in, out]; gptext stores them as
PyTorch Linear, [out, in], and transposes on the way in and out.
gpt-oss: Hugging Face stores each layer's experts stacked as [expert, in, out]; gptext as
[expert, out, in]. OpenAI's released checkpoints hold the expert weights in MXFP4
(``*_blocks``: two 4-bit e2m1 values per byte, 32 to a block; ``*_scales``: one power-of-two
exponent per block, biased by 127), already [expert, out, in]; they are dequantised on load.

OpenAI's own gpt-oss layout (the ``original/`` directory of its releases, what its reference
implementation reads) is read too: a config.json of ModelConfig's fields (num_experts,
experts_per_token, initial_context_length, ...; no model_type), and tensors named
``embedding``, ``block.N.attn.{norm.scale, qkv, sinks, out}``, ``block.N.mlp.{norm.scale,
gate, mlp1_weight, mlp1_bias, mlp2_weight, mlp2_bias}``, ``norm.scale`` and
``unembedding``: q, k and v in one matrix (split on load), experts [expert, out, in] (MXFP4
as ``mlp1_weight.blocks`` / ``.scales``), norms' scales in fp32.

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

__all__ = ["load_pretrained", "load_gpt2", "load_gpt_oss", "load_gpt_oss_original", "save_pretrained", "save_gpt2",
           "save_gpt_oss", "dequantize_mxfp4", "CheckpointError"]

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


def _open(path) -> tuple[Path, dict]:
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory (expected a Hugging Face checkpoint directory)")
    return directory, _read_json(directory / "config.json")


def _read_all(directory: Path) -> dict[str, tuple[torch.Tensor, Path]]:
    """Every tensor of the checkpoint by name, with the file it came from."""
    return {name: (tensor, file) for file in _weight_files(directory) for name, tensor in _read_tensors(file).items()}


def _assign(model: GPT, state: dict, unknown: list, directory: Path, device, shown=lambda name: name) -> GPT:
    """Loads state into a model built on the meta device, reporting missing and unknown
    tensors by name (shown(name): as the checkpoint names them); returns it on `device`, in
    eval mode."""
    expected = {name for name in model.state_dict() if not (model.config.tied_head and name == "lm_head.weight")}
    missing = sorted(set(map(shown, expected - set(state))))
    if missing or unknown:
        raise CheckpointError(f"{directory}: " + "; ".join(
            part for part in (f"missing tensors: {', '.join(missing)}" if missing else "",
                              f"unknown tensors: {', '.join(sorted(unknown))}" if unknown else "") if part))
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tied_head:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the tied parameter
    return model.to(device or "cpu").eval()


def _checked(name: str, tensor: torch.Tensor, want: tuple, file: Path, shown=None) -> torch.Tensor:
    """tensor if it has the shape the config implies, else a CheckpointError naming it.
    shown(shape) gives the shapes in the checkpoint's own layout, for the message."""
    if tuple(tensor.shape) != want:
        shown = shown or (lambda shape: shape)
        raise CheckpointError(f"{file}: {name} has shape {shown(tuple(tensor.shape))}; the config implies "
                              f"{shown(want)}")
    return tensor


def load_pretrained(path, dtype: torch.dtype | None = None, device=None) -> GPT:
    """A GPT from a local Hugging Face checkpoint directory of either family (config.json's
    model_type: "gpt2" or "gpt_oss"), or from OpenAI's original gpt-oss layout (a
    config.json without model_type, with num_experts and experts_per_token), in eval mode.
    dtype defaults to the checkpoint's; device to the CPU."""
    directory, hf = _open(path)
    loaders = {"gpt2": load_gpt2, "gpt_oss": load_gpt_oss}
    if "model_type" not in hf and _is_original_oss(hf):
        return load_gpt_oss_original(directory, dtype=dtype, device=device)
    if hf.get("model_type") not in loaders:
        raise CheckpointError(f"{directory / 'config.json'}: model_type is {hf.get('model_type')!r}; gptext loads "
                              f"{' and '.join(map(repr, loaders))} checkpoints")
    return loaders[hf["model_type"]](directory, dtype=dtype, device=device)


def load_gpt2(path, dtype: torch.dtype | None = None, device=None) -> GPT:
    """A GPT from a Hugging Face GPT-2 checkpoint directory, in eval mode. dtype defaults to
    the checkpoint's; device to the CPU."""
    directory, hf = _open(path)
    cfg = config_from_hf(hf, directory / "config.json")
    found = {name.removeprefix("transformer."): value for name, value in _read_all(directory).items()}

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
        conv1d = name.endswith(_CONV1D)
        tensor = _checked(name, tensor.t() if conv1d else tensor, tuple(expected[name].shape), file,
                          (lambda shape: shape[::-1]) if conv1d else None)
        state["transformer." + name] = tensor.to(dtype=dtype or tensor.dtype).contiguous()
    return _assign(model, state, unknown, directory, device, lambda name: name.removeprefix("transformer."))


# Hugging Face gpt-oss expert weights, stored [expert, in, out]; gptext's are [expert, out, in].
_EXPERT_MATRICES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# The sixteen values of a 4-bit e2m1 (FP4) code, by code.
_FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """MXFP4 to floats: blocks (..., G, 16) uint8 hold G blocks of 32 e2m1 values, two per
    byte (the low nibble first); scales (..., G) uint8 are each block's power of two, biased
    by 127. Returns (..., G * 32)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise CheckpointError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != 16 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
        raise CheckpointError(f"MXFP4 blocks {tuple(blocks.shape)} must be (..., G, 16) with scales (..., G), "
                              f"got scales {tuple(scales.shape)}")
    table = torch.tensor(_FP4_VALUES, dtype=torch.float32, device=blocks.device)
    pairs = torch.stack((table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]), dim=-1)  # (..., G, 16, 2)
    values = torch.ldexp(pairs.flatten(-2), scales.to(torch.int32)[..., None] - 127)  # (..., G, 32)
    return values.flatten(-2).to(dtype)


def oss_config_from_hf(hf: dict, source: Path) -> GPTConfig:
    """GPTConfig from a Hugging Face gpt-oss config.json, refusing variants gptext doesn't run."""
    if hf.get("model_type") != "gpt_oss":
        raise CheckpointError(f"{source}: model_type is {hf.get('model_type')!r}; expected 'gpt_oss'")
    problems = []
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 150000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    yarn = dict(rope_scaling_factor=1.0)
    if rope_type == "yarn":
        yarn = dict(rope_scaling_factor=float(rope.get("factor", 32.0)),
                    rope_ntk_beta=float(rope.get("beta_fast") or 32.0), rope_ntk_alpha=float(rope.get("beta_slow") or 1.0),
                    rope_initial_context=int(rope.get("original_max_position_embeddings", 4096)))
        if rope.get("truncate", True):
            problems.append("YaRN with a truncated (integer) correction range (gpt-oss's is not truncated)")
        if any(rope.get(key) is not None for key in ("attention_factor", "mscale", "mscale_all_dim")):
            problems.append("YaRN with attention_factor / mscale set (gptext uses 0.1 ln(factor) + 1)")
    elif rope_type != "default":
        problems.append(f"rope_type {rope_type!r} (gptext runs 'yarn' and 'default')")
    layers = hf.get("num_hidden_layers", 36)
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if hf.get("layer_types") not in (None, alternating):
        problems.append("layer_types other than sliding-window attention on even layers, full on odd ones")
    if not isinstance(hf.get("sliding_window", 128), int):
        problems.append(f"sliding_window {hf.get('sliding_window')!r}")
    if not hf.get("attention_bias", True):
        problems.append("attention_bias = false")
    if hf.get("tie_word_embeddings", False):
        problems.append("tie_word_embeddings = true (gpt-oss's head is its own matrix)")
    quantization = hf.get("quantization_config")
    if quantization is not None and quantization.get("quant_method") != "mxfp4":
        problems.append(f"quantization {quantization.get('quant_method')!r} (gptext reads bf16/fp32 and MXFP4)")
    if problems:
        raise CheckpointError(f"{source}: unsupported gpt-oss variant: " + "; ".join(problems))
    try:
        return GPTConfig(arch="gpt-oss", vocab_size=hf.get("vocab_size", 201088),
                         context_length=hf.get("max_position_embeddings", 131072), n_embd=hf.get("hidden_size", 2880),
                         n_layer=layers, n_head=hf.get("num_attention_heads", 64),
                         n_kv_head=hf.get("num_key_value_heads", 8), head_width=hf.get("head_dim", 64),
                         n_experts=hf.get("num_local_experts", hf.get("num_experts", 128)),
                         experts_per_token=hf.get("num_experts_per_tok", 4),
                         expert_width=hf.get("intermediate_size", 2880), swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
                         sliding_window=hf.get("sliding_window", 128), rope_theta=theta,
                         layer_norm_eps=float(hf.get("rms_norm_eps", 1e-5)), **yarn)
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None


def load_gpt_oss(path, dtype: torch.dtype | None = None, device=None) -> GPT:
    """A GPT from a Hugging Face gpt-oss checkpoint directory (bf16/fp32 or MXFP4 experts),
    in eval mode. dtype defaults to the checkpoint's (that of its embedding); device to the
    CPU."""
    directory, hf = _open(path)
    cfg = oss_config_from_hf(hf, directory / "config.json")
    found = _read_all(directory)
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    embedding = found.get("model.embed_tokens.weight")
    dtype = dtype or (embedding[0].dtype if embedding is not None else torch.bfloat16)
    state, unknown = {}, []
    for name, (tensor, file) in found.items():
        if name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in found:
            continue  # read with its blocks
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            if base not in expected or not base.endswith(_EXPERT_MATRICES) or base + "_scales" not in found:
                unknown.append(name)
                continue
            tensor = dequantize_mxfp4(tensor, found[base + "_scales"][0], torch.float32)
            state[base] = _checked(base, tensor, expected[base], file).to(dtype)
            continue
        if name not in expected:
            unknown.append(name)
            continue
        if name.endswith(_EXPERT_MATRICES):
            tensor = _checked(name, tensor.transpose(1, 2), expected[name], file,
                              lambda shape: (shape[0], shape[2], shape[1]) if len(shape) == 3 else shape)
        else:
            tensor = _checked(name, tensor, expected[name], file)
        state[name] = tensor.to(dtype).contiguous()
    return _assign(model, state, unknown, directory, device)


# OpenAI's config.json fields (gpt_oss.torch.model.ModelConfig) that identify the layout.
_ORIGINAL_OSS_KEYS = ("num_experts", "experts_per_token", "initial_context_length")


def _is_original_oss(config: dict) -> bool:
    return all(key in config for key in _ORIGINAL_OSS_KEYS)


def oss_config_from_original(config: dict, source: Path) -> GPTConfig:
    """GPTConfig from the config.json of OpenAI's original gpt-oss layout. Its context is
    what YaRN scales the training context to: initial_context_length x rope_scaling_factor."""
    known = {"num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size", "intermediate_size",
             "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads", "sliding_window",
             "initial_context_length", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha", "rope_ntk_beta"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise CheckpointError(f"{source}: unknown fields for OpenAI's gpt-oss config: {', '.join(unknown)}")
    initial = config.get("initial_context_length", 4096)
    factor = float(config.get("rope_scaling_factor", 32.0))
    try:
        return GPTConfig(arch="gpt-oss", vocab_size=config.get("vocab_size", 201088),
                         context_length=int(initial * max(factor, 1.0)), n_embd=config.get("hidden_size", 2880),
                         n_layer=config.get("num_hidden_layers", 36), n_head=config.get("num_attention_heads", 64),
                         n_kv_head=config.get("num_key_value_heads", 8), head_width=config.get("head_dim", 64),
                         n_experts=config.get("num_experts", 128), experts_per_token=config.get("experts_per_token", 4),
                         expert_width=config.get("intermediate_size", 2880),
                         swiglu_limit=float(config.get("swiglu_limit", 7.0)),
                         sliding_window=config.get("sliding_window", 128),
                         rope_theta=float(config.get("rope_theta", 150000.0)), rope_scaling_factor=factor,
                         rope_ntk_alpha=float(config.get("rope_ntk_alpha", 1.0)),
                         rope_ntk_beta=float(config.get("rope_ntk_beta", 32.0)), rope_initial_context=initial)
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{source}: {error}") from None


def _original_names(layers: int) -> dict[str, str | tuple[str, str, str]]:
    """OpenAI's tensor names -> gptext's: one name, or for the fused q/k/v weight and bias
    the three tensors (q, k, v) it splits into."""
    names = {"embedding.weight": "model.embed_tokens.weight", "norm.scale": "model.norm.weight",
             "unembedding.weight": "lm_head.weight"}
    for i in range(layers):
        ours = f"model.layers.{i}"
        names |= {f"block.{i}.attn.norm.scale": f"{ours}.input_layernorm.weight",
                  f"block.{i}.attn.sinks": f"{ours}.self_attn.sinks",
                  f"block.{i}.attn.out.weight": f"{ours}.self_attn.o_proj.weight",
                  f"block.{i}.attn.out.bias": f"{ours}.self_attn.o_proj.bias",
                  f"block.{i}.mlp.norm.scale": f"{ours}.post_attention_layernorm.weight",
                  f"block.{i}.mlp.gate.weight": f"{ours}.mlp.router.weight",
                  f"block.{i}.mlp.gate.bias": f"{ours}.mlp.router.bias",
                  f"block.{i}.mlp.mlp1_weight": f"{ours}.mlp.experts.gate_up_proj",
                  f"block.{i}.mlp.mlp1_bias": f"{ours}.mlp.experts.gate_up_proj_bias",
                  f"block.{i}.mlp.mlp2_weight": f"{ours}.mlp.experts.down_proj",
                  f"block.{i}.mlp.mlp2_bias": f"{ours}.mlp.experts.down_proj_bias"}
        for kind in ("weight", "bias"):
            names[f"block.{i}.attn.qkv.{kind}"] = tuple(f"{ours}.self_attn.{p}_proj.{kind}" for p in "qkv")
    return names


def _original_weight_files(directory: Path) -> list[Path]:
    """model.safetensors or a shard index where there is one, else every *.safetensors
    file in the directory (as OpenAI's loader reads it)."""
    try:
        return _weight_files(directory)
    except CheckpointError:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise
        return files


def load_gpt_oss_original(path, dtype: torch.dtype | None = None, device=None) -> GPT:
    """A GPT from OpenAI's original gpt-oss checkpoint layout (see the module's docstring),
    in eval mode. dtype defaults to the checkpoint's (that of its embedding); device to the
    CPU."""
    directory, config = _open(path)
    cfg = oss_config_from_original(config, directory / "config.json")
    found = {name: (tensor, file) for file in _original_weight_files(directory)
             for name, tensor in _read_tensors(file).items()}
    with torch.device("meta"):
        model = GPT(cfg)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    names = _original_names(cfg.n_layer)
    embedding = found.get("embedding.weight")
    dtype = dtype or (embedding[0].dtype if embedding is not None else torch.bfloat16)
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    state, unknown = {}, []
    for name, (tensor, file) in found.items():
        if name.endswith(".scales") and name.removesuffix(".scales") + ".blocks" in found:
            continue  # read with its blocks
        if name.endswith(".blocks") and name.removesuffix(".blocks") + ".scales" in found:
            base = name.removesuffix(".blocks")
            if base not in names or not base.endswith(("mlp1_weight", "mlp2_weight")):
                unknown.append(name)
                continue
            tensor, name = dequantize_mxfp4(tensor, found[base + ".scales"][0], torch.float32), base
        target = names.get(name)
        if target is None:
            unknown.append(name)
            continue
        if isinstance(target, tuple):  # q, k and v stacked along the output features
            tensor = _checked(name, tensor, (q + 2 * kv, *expected[target[0]][1:]), file)
            for ours, part in zip(target, tensor.split((q, kv, kv))):
                state[ours] = part.to(dtype).contiguous()
            continue
        state[target] = _checked(name, tensor, expected[target], file).to(dtype).contiguous()
    theirs = {ours: name for name, target in names.items()
              for ours in (target if isinstance(target, tuple) else (target,))}
    return _assign(model, state, unknown, directory, device, lambda ours: theirs.get(ours, ours))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(target: Path, write) -> None:
    """write(temp_path) then rename over target: readers never see a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_checkpoint(path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """model.safetensors and config.json into the directory `path`, each written atomically."""
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


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
    _write_checkpoint(path, tensors, hf_config(model.config, model.transformer.wte.weight.dtype))


def oss_hf_config(cfg: GPTConfig, dtype: torch.dtype) -> dict:
    """config.json for Hugging Face's GptOssForCausalLM."""
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor > 1.0:
        rope.update(rope_type="yarn", factor=cfg.rope_scaling_factor, beta_fast=cfg.rope_ntk_beta,
                    beta_slow=cfg.rope_ntk_alpha, truncate=False, original_max_position_embeddings=cfg.rope_initial_context)
    return {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.context_length, "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
        "intermediate_size": cfg.expert_width, "swiglu_limit": cfg.swiglu_limit, "sliding_window": cfg.sliding_window,
        "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(cfg.n_layer)],
        "rms_norm_eps": cfg.layer_norm_eps, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "attention_bias": True, "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def save_gpt_oss(model: GPT, path) -> None:
    """Writes config.json and model.safetensors in Hugging Face's gpt-oss layout (experts
    [expert, in, out]; a model without q/k/v bias gets zero biases)."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.transpose(1, 2) if name.endswith(_EXPERT_MATRICES) else tensor
        tensors[name] = tensor.detach().to("cpu").contiguous()
    if not model.config.qkv_bias:
        for layer in range(model.config.n_layer):
            for proj in ("q_proj", "k_proj", "v_proj"):
                weight = tensors[f"model.layers.{layer}.self_attn.{proj}.weight"]
                tensors[f"model.layers.{layer}.self_attn.{proj}.bias"] = weight.new_zeros(weight.shape[0])
    _write_checkpoint(path, tensors, oss_hf_config(model.config, model.model.embed_tokens.weight.dtype))


def save_pretrained(model: GPT, path) -> None:
    """Writes a Hugging Face checkpoint directory of the model's family."""
    (save_gpt2 if model.config.arch == "gpt2" else save_gpt_oss)(model, path)
