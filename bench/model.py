"""The model sections: prefill, training-step and decode tokens/s of a GPT-2 and a gpt-oss
model for gptext on its kernels, gptext on its reference, and Hugging Face transformers, all
on the same random weights.

gptext builds the model (seeded, on the device, in the section's dtype), saves it as a
Hugging Face checkpoint of its family, and transformers loads that directory
(AutoModelForCausalLM: GPT2LMHeadModel or GptOssForCausalLM), so the three compute with
identical weights. Before
any timing, the logits of one batch are compared: gptext's kernels against its reference
and against transformers (relative RMS error within the dtype's tolerance); a mismatch
makes every row WRONG, with no speed-up claimed.

The reference runs on its own copy of the model: gptext keeps one captured CUDA decode
graph per model, so two backends sharing a model would recapture it on every switch.

Decode is timed in rounds that visit every competitor in turn (each round: generate(N),
then generate(1), per competitor), so that the machine's slow drifts (other tenants of a
virtual machine, clocks) fall on every competitor alike instead of on whichever ran
during them.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

import gptext
from gptext import GPT, GPTConfig, profiling

from . import metrics, results, tables
from .plan import ModelCase, ModelPlan

# Relative RMS error of gptext's logits against the reference's and transformers'. Measured
# on gpt2-124m with random weights: ~1e-6 in fp32, ~1.5e-3 in fp16, ~1.3e-2 in bf16.
LOGITS_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
CHECK_SHAPE = (2, 32)

METHODS = {
    "prefill": "tokens/s = batch x tokens / median seconds of one forward pass over them, logits at every "
               "position (transformers with use_cache=False). Repeats run in rounds over the competitors, "
               "interleaved",
    "train": "tokens/s = batch x tokens / median seconds of one training step's forward and backward pass over "
             "them: the mean next-token loss at every position (transformers: its logits' cross-entropy in float32, "
             "as its own causal-LM loss takes it), then its gradients into every weight (freed before each step; "
             "no optimizer step). tokens = batch x (tokens - 1) predicted positions. Repeats run in "
             "rounds over the competitors, interleaved; the first step's losses must agree within the logits' "
             "tolerance",
    "decode": "tokens/s = (new_tokens - 1) x batch / (median seconds of generate(new_tokens) - median seconds of "
              "generate(1)): both calls run the same prefill and sample one token from its logits, so the "
              "difference is new_tokens - 1 decode steps. Greedy; each library's default decode path (gptext: a "
              "CUDA graph of the step on CUDA (gpt-oss's too, at any batch), eager steps elsewhere; "
              "transformers: generate with its own KV cache). Repeats run in rounds over the competitors, "
              "interleaved",
}


@dataclass
class ModelCompetitor:
    name: str
    forward: Callable          # idx -> logits (B, T, vocab)
    generate: Callable         # (idx, new_tokens) -> tokens (B, T + new_tokens)
    reason: str = ""           # why it can't run, when it can't
    train: Callable | None = None  # (idx, targets) -> loss, its gradients left in the weights


def _on_backend(name: str, fn: Callable) -> Callable:
    def call(*args):
        with gptext.backend(name):
            return fn(*args)
    return call


def _training_step(module: torch.nn.Module, loss_of: Callable) -> Callable:
    """(idx, targets) -> loss: one forward and backward pass of `module`, grad mode on, its
    gradients freed first."""
    def step(idx, targets):
        module.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = loss_of(idx, targets)
            loss.backward()
        return loss.detach()
    return step


def _gptext_competitor(name: str, backend: str, model: GPT) -> ModelCompetitor:
    return ModelCompetitor(name, _on_backend(backend, model),
                           _on_backend(backend, lambda idx, n: model.generate(idx, max_new_tokens=n, temperature=0)),
                           train=_on_backend(backend, _training_step(model, model.loss)))


def _hf_competitor(checkpoint: str, device: torch.device, dtype: torch.dtype) -> tuple[ModelCompetitor, dict]:
    """transformers' model of the checkpoint, and what it runs (class, attention)."""
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device=device).eval()
    except Exception as error:  # noqa: BLE001 - transformers missing or failing: its rows say why
        return ModelCompetitor("hf", None, None, f"transformers unavailable: {results.reason(error)}"), {}
    runs = {"class": type(hf).__name__, "attention": getattr(hf.config, "_attn_implementation", None)}

    def generate(idx, n):
        return hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n, do_sample=False,
                           pad_token_id=0, eos_token_id=None)

    def hf_loss(idx, targets):  # as transformers' own causal-LM loss: the logits in float32
        logits = hf(idx, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return ModelCompetitor("hf", lambda idx: hf(idx, use_cache=False).logits, generate,
                           train=_training_step(hf, hf_loss)), runs


def build(plan: ModelPlan, device: torch.device) -> tuple[dict, list[ModelCompetitor]]:
    """(setup record, competitors: gptext, reference, hf)."""
    torch.manual_seed(0)
    cfg = GPTConfig.preset(plan.preset, **plan.config_overrides)
    dtype = metrics.DTYPES[plan.dtype]
    with torch.device(device):  # initialised where it runs: a GPU draws billions of weights in moments
        model = GPT(cfg).eval()
    model = model.to(dtype)
    with tempfile.TemporaryDirectory(prefix="gptext-bench-") as checkpoint:
        model.save_pretrained(checkpoint)
        hf, hf_runs = _hf_competitor(checkpoint, device, dtype)
    field = [_gptext_competitor("gptext", "kernels", model),
             _gptext_competitor("reference", "reference", copy.deepcopy(model)), hf]
    setup = {"name": plan.handle, "preset": plan.preset, "overrides": dict(plan.config_overrides),
             "config": dataclasses.asdict(cfg), "parameters": model.num_parameters(), "dtype": plan.dtype,
             "weights": f"random (seed 0) in {plan.dtype}, saved by gptext as a Hugging Face {cfg.arch} checkpoint "
             "that transformers loaded: identical in every competitor", "hf": hf_runs, "methods": METHODS,
             "timing": {"prefill": vars(plan.timing), "train": vars(plan.timing), "decode": vars(plan.decode_timing)}}
    return setup, field


def _tokens(batch: int, length: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


@torch.no_grad()
def check(field: list[ModelCompetitor], plan: ModelPlan, vocab: int, device: torch.device) -> dict:
    """Logits of one batch: gptext against the reference and against transformers."""
    idx = _tokens(*CHECK_SHAPE, vocab, device, seed=1)
    tolerance = LOGITS_TOLERANCE[plan.dtype]
    record = {"input": "x".join(map(str, CHECK_SHAPE)), "tolerance": tolerance, "metric": "relative RMS error"}
    try:
        logits = field[0].forward(idx)
    except Exception as error:  # noqa: BLE001 - reported as the section's failure
        return {**record, "status": "error", "reason": results.reason(error)}
    worst = 0.0
    for other in field[1:]:
        if other.forward is None:
            continue
        try:
            error = metrics.relative_rms_error(logits, other.forward(idx))
        except Exception as failure:  # noqa: BLE001 - the competitor's own rows will fail the same way
            record[f"{other.name}_error"] = results.reason(failure)
            continue
        record[f"vs_{other.name}"] = error
        worst = max(worst, error)
    record["status"] = "ok" if worst <= tolerance else "WRONG"
    return record


def _prefill_rounds(field: list[ModelCompetitor], case: ModelCase, idx, device, plan: ModelPlan) -> dict:
    """{competitor name: prefill entry, or the exception it raised}. One forward pass per
    competitor first (a failing one is left out), then the others timed together in
    alternating rounds (Timing.measure_together), as the kernel cases are: timed one after
    another, each would get whatever spell of a shared machine fell on its turn."""
    live, outcome = [], {}
    for competitor in field:
        if competitor.forward is None:
            continue
        try:
            competitor.forward(idx)
            live.append(competitor)
        except Exception as error:  # noqa: BLE001 - reported in the competitor's row
            outcome[competitor.name] = error
    try:
        times = plan.timing.measure_together([lambda c=c: c.forward(idx) for c in live], device)
    except Exception as error:  # noqa: BLE001 - reported in every timed competitor's row
        times = [error] * len(live)
    for competitor, time in zip(live, times):
        outcome[competitor.name] = time if isinstance(time, Exception) else {
            "time": time, "tokens_per_s": case.batch * case.tokens / time["median"]}
    return outcome


def _train_rounds(field: list[ModelCompetitor], case: ModelCase, idx, device, plan: ModelPlan) -> dict:
    """{competitor name: train entry, or the exception it raised}: as _prefill_rounds, over
    training steps. Each competitor predicts idx[:, 1:] from idx[:, :-1]; a loss that
    differs from gptext's beyond the logits' tolerance fails that competitor's row."""
    live, outcome, losses, calls = [], {}, {}, {}
    inputs, targets = idx[:, :-1], idx[:, 1:]
    for competitor in field:
        if competitor.train is None:
            continue
        call = lambda c=competitor: c.train(inputs, targets)  # noqa: E731
        try:
            losses[competitor.name] = float(call())
            live.append(competitor)
            calls[competitor.name] = call
        except Exception as error:  # noqa: BLE001 - reported in the competitor's row
            outcome[competitor.name] = error
    tolerance = LOGITS_TOLERANCE[plan.dtype]
    if "gptext" in losses:
        for name, loss in losses.items():
            if abs(loss - losses["gptext"]) > tolerance * abs(losses["gptext"]):
                live = [c for c in live if c.name != name]
                outcome[name] = RuntimeError(f"its loss {loss:.6g} differs from gptext's {losses['gptext']:.6g} "
                                             f"by more than {tolerance:g} (relative)")
    try:
        times = plan.timing.measure_together([calls[c.name] for c in live], device)
    except Exception as error:  # noqa: BLE001 - reported in every timed competitor's row
        times = [error] * len(live)
    for competitor, time in zip(live, times):
        outcome[competitor.name] = time if isinstance(time, Exception) else {
            "time": time, "tokens_per_s": case.batch * (case.tokens - 1) / time["median"],
            "loss": losses[competitor.name]}
    return outcome


def _timed(fn, device) -> float:
    profiling.synchronize(device)
    start = time.perf_counter()
    fn()
    profiling.synchronize(device)
    return time.perf_counter() - start


def _decode_rounds(field: list[ModelCompetitor], case: ModelCase, idx, device, plan: ModelPlan) -> dict:
    """{competitor name: decode entry, or the exception it raised}. A generate(2) per
    competitor first runs the decode step once at this batch size, so that first-use work
    (lazy initialisation, allocations, the GEMM policy's measurements, gptext's CUDA graph
    capture) stays out of the rounds."""
    timing = plan.decode_timing
    live, outcome, samples, last = [], {}, {}, {}
    for competitor in field:
        if competitor.forward is None:
            continue
        try:
            competitor.generate(idx, 2)
            for _ in range(timing.warmup):
                competitor.generate(idx, case.new_tokens)
            live.append(competitor)
            samples[competitor.name] = ([], [])
        except Exception as error:  # noqa: BLE001 - reported in the competitor's row
            outcome[competitor.name] = error
    for _ in range(max(3, timing.repeats)):
        for competitor in list(live):
            try:
                times_n, times_1 = samples[competitor.name]
                times_n.append(_timed(lambda: last.__setitem__(competitor.name, competitor.generate(
                    idx, case.new_tokens)), device))
                times_1.append(_timed(lambda: competitor.generate(idx, 1), device))
            except Exception as error:  # noqa: BLE001 - reported in the competitor's row
                outcome[competitor.name] = error
                live.remove(competitor)
    want = case.tokens + case.new_tokens
    for competitor in live:
        if last[competitor.name].shape[1] != want:
            outcome[competitor.name] = RuntimeError(
                f"generate returned {last[competitor.name].shape[1]} tokens per row, not {want}")
            continue
        time_n, time_1 = (profiling.Measurement.of(s) for s in samples[competitor.name])
        as_dict = lambda m: {"median": m.median, "p10": m.p10, "p90": m.p90, "samples": m.samples}  # noqa: E731
        outcome[competitor.name] = {
            "time": as_dict(time_n), "time_1": as_dict(time_1),
            "tokens_per_s": metrics.decode_rate(case.new_tokens, case.batch, time_n.median, time_1.median),
            "generated": last[competitor.name][:, case.tokens:]}
    return outcome


def _agreement(a: torch.Tensor, b: torch.Tensor) -> int:
    """Leading generated tokens on which two greedy decodes agree in every row. Random
    weights give near-ties, so rounding alone can part them: information, not a gate."""
    same = (a.cpu() == b.cpu()).all(0).tolist()
    return same.index(False) if False in same else len(same)


@torch.no_grad()
def run_case(case: ModelCase, field: list[ModelCompetitor], plan: ModelPlan, vocab: int, device: torch.device,
             gate: dict, on_entry: Callable[[dict, dict], None] = lambda record, entry: None) -> dict:
    record = {"phase": case.phase, "label": case.label, "batch": case.batch, "tokens": case.tokens,
              "new_tokens": case.new_tokens, "dtype": plan.dtype, "method": METHODS[case.phase], "results": []}
    idx = _tokens(case.batch, case.tokens, vocab, device, seed=2)
    rounds = {"decode": _decode_rounds, "train": _train_rounds}.get(case.phase, _prefill_rounds)(
        field, case, idx, device, plan)
    generated = {}
    for competitor in field:
        entry = {"competitor": competitor.name, "status": "ok"}
        if competitor.forward is None:
            entry.update(status="unavailable", reason=competitor.reason)
        else:
            try:
                outcome = rounds[competitor.name]
                if isinstance(outcome, Exception):
                    raise outcome
                entry.update(outcome)
                if "generated" in entry:
                    generated[competitor.name] = entry.pop("generated")
            except Exception as error:  # noqa: BLE001 - reported in the row; gptext's failure fails the run
                entry.update(status="error" if competitor.name == "gptext" else "unavailable",
                             reason=results.reason(error))
        record["results"].append(entry)
        on_entry(record, entry)
    if "gptext" in generated:
        record["agrees_with"] = {name: _agreement(generated["gptext"], tokens)
                                 for name, tokens in generated.items() if name != "gptext"}
    _finish(record, gate)
    return record


def _finish(record: dict, gate: dict) -> None:
    headline = record["results"][0]
    if gate["status"] != "ok":
        record["status"] = gate["status"]
    else:
        record["status"] = "ok" if headline["status"] == "ok" else "error"
    entries = record["results"] if record["status"] == "ok" else []
    speedups = {r["competitor"]: metrics.speedup_over(entries, r, tables.speedup_key(record)) for r in entries}
    record["speedup"] = {name: x for name, x in speedups.items() if x is not None}


def run(plan: ModelPlan, device: torch.device, on_entry: Callable[[dict, dict], None] = lambda record, entry: None,
        on_update: Callable[[dict], None] = lambda section: None) -> dict:
    """One model's section, {"setup", "check", "rows"}; on_update(section) after the check
    and after each row, on_entry(row record, entry) as each competitor finishes. The
    competitors' models are freed when it returns."""
    setup, field = build(plan, device)
    vocab = setup["config"]["vocab_size"]
    section = {"setup": setup, "check": check(field, plan, vocab, device), "rows": []}
    on_update(section)
    for case in plan.cases:
        section["rows"].append(run_case(case, field, plan, vocab, device, section["check"], on_entry))
        on_update(section)
    return section
