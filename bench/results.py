"""The results file: one JSON document per run, rewritten after every case so that a run
cut short (a timeout on a GPU host) still leaves what it measured, with complete=false.

    schema    "gptext-bench/2" (load() also reads /1, whose single "model" section it
              turns into a one-element "models")
    complete  true once the run finished
    meta      date (ISO 8601 UTC), mode, command, device {type, name, driver, capability,
              threads}, versions {python, torch, cuda, gptext, transformers}, build_info
              (gptext.build_info()), commit {sha, source, dirty}, settings {ops, dtypes,
              compile, gemm_policy, tf32, timing}
    limits    DeviceLimits.as_dict(): device, name, copy_gbps, matmul_tflops {dtype: TFLOP/s}
    notes     lines the run printed about what it left out, and why
    ops       one record per case: op, family, label, shape, dtype, epilogue, bound,
              flops, bytes, tolerance {rtol, atol}, status (ok | WRONG | error),
              implementation, speedup {competitor: x}, results [per competitor:
              competitor, status (ok | WRONG | error | unavailable | n/a | skipped),
              reason, error_ratio, compile_seconds, time {median, p10, p90, samples} (s),
              tflops, gbps, fraction {memory, compute, roofline, bound}]
    models    one section per model run (GPT-2, gpt-oss): {setup {name, preset, overrides,
              config, parameters, dtype, hf, ...}, check {status, tolerance, vs_reference,
              vs_hf}, rows [per case: phase, label, batch, tokens, new_tokens, dtype, method,
              status, speedup, agrees_with, results [competitor, status, reason, time,
              time_1, tokens_per_s]]}
    errors    exceptions that stopped a whole case or section, one line each
    seconds   how long the limits, kernels and models took
    failures  one line per WRONG or failed gptext row and per error (the run's exit status
              is 1 if any)

Non-finite floats are stored as null (JSON has no inf).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import subprocess
from pathlib import Path

import torch

from . import metrics

SCHEMA = "gptext-bench/2"
REPO = Path(__file__).resolve().parent.parent

META_KEYS = ("date", "mode", "command", "device", "versions", "build_info", "commit", "settings")
CASE_KEYS = ("op", "label", "dtype", "status", "results", "speedup")
MODEL_ROW_KEYS = ("phase", "label", "batch", "dtype", "status", "results", "speedup", "method")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _run(*command: str, cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit(root: Path = REPO) -> dict:
    """The commit measured: $GPTEXT_COMMIT when set (bench/gpu_suite.sh sets it: a GPU host's
    copy of the tree may have no .git, or one that is not the tree's), else git's HEAD when
    root is itself a git work tree (not merely inside one), else unknown."""
    if os.environ.get("GPTEXT_COMMIT"):
        return {"sha": os.environ["GPTEXT_COMMIT"], "source": "GPTEXT_COMMIT", "dirty": None}
    toplevel = _run("git", "rev-parse", "--show-toplevel", cwd=root)
    if toplevel and Path(toplevel).resolve() == root.resolve():
        sha = _run("git", "rev-parse", "HEAD", cwd=root)
        if sha:
            status = _run("git", "status", "--porcelain", "--untracked-files=no", cwd=root)
            return {"sha": sha, "source": "git", "dirty": bool(status) if status is not None else None}
    return {"sha": "unknown", "source": "unknown", "dirty": None}


def device_record(device: torch.device, name: str) -> dict:
    record = {"type": device.type, "name": name, "driver": None, "capability": None,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        record["capability"] = f"sm_{major}{minor}"
        smi = _run("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        record["driver"] = smi.splitlines()[0].strip() if smi else None
    return record


def versions() -> dict:
    import gptext

    try:
        import transformers

        hf = transformers.__version__
    except ImportError:
        hf = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gptext": gptext.__version__, "transformers": hf}


def meta(mode: str, argv: list[str], device: torch.device, device_name: str, settings: dict) -> dict:
    import gptext

    return {"date": utc_now(), "mode": mode, "command": shlex.join(["python", "-m", "bench", *argv]),
            "device": device_record(device, device_name), "versions": versions(),
            "build_info": gptext.build_info(), "commit": commit(), "settings": settings}


def reason(error: BaseException) -> str:
    """An exception as a row's reason: its type and the first line of its message."""
    lines = f"{type(error).__name__}: {error}".strip().splitlines()
    return lines[0][:200]


def _finite(value):
    """The document with every non-finite float replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def save(document: dict, path: Path) -> None:
    """Writes the document atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(document), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def validate(document) -> None:
    """ValueError naming the first thing missing from a results document."""
    def need(mapping, keys, where):
        if not isinstance(mapping, dict):
            raise ValueError(f"{where} must be an object")
        missing = [k for k in keys if k not in mapping]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")

    need(document, ("schema", "complete", "meta", "limits", "ops", "models", "failures"), "the results file")
    if document["schema"] != SCHEMA:
        raise ValueError(f"schema is {document['schema']!r}; this reader knows {SCHEMA!r}")
    need(document["meta"], META_KEYS, "meta")
    need(document["meta"]["device"], ("type", "name"), "meta.device")
    need(document["limits"], ("name", "copy_gbps", "matmul_tflops"), "limits")
    if not isinstance(document["ops"], list):
        raise ValueError("ops must be a list")
    for i, case in enumerate(document["ops"]):
        need(case, CASE_KEYS, f"ops[{i}]")
    if not isinstance(document["models"], list):
        raise ValueError("models must be a list")
    for j, section in enumerate(document["models"]):
        need(section, ("setup", "check", "rows"), f"models[{j}]")
        for i, row in enumerate(section["rows"]):
            need(row, MODEL_ROW_KEYS, f"models[{j}].rows[{i}]")


def upgrade(document) -> dict:
    """A document of an older schema in the current one (as a copy); others unchanged."""
    if isinstance(document, dict) and document.get("schema") == "gptext-bench/1" and "model" in document:
        model = document["model"]
        document = {k: v for k, v in document.items() if k != "model"}
        document.update(schema=SCHEMA, models=[] if model is None else [model])
    return document


def load(path) -> dict:
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: cannot read ({error})") from None
    try:
        document = upgrade(document)
        validate(document)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return document


def failures(document: dict) -> list[str]:
    """A line per failed gptext row (WRONG: differs from the reference; error: raised) and
    per case or section that could not run at all."""
    lines = [f"error: {line}" for line in document.get("errors", [])]
    for case in document["ops"]:
        for r in case["results"]:
            if r["status"] in metrics.FAILED:
                lines.append(f"{r['status']}: {case['op']} {case['label']} {case['dtype']} {r['competitor']}: "
                             f"{r.get('reason', '')}")
    for model in document.get("models", []):
        name = section_name(model["setup"])
        if model["check"]["status"] != "ok":
            lines.append(f"{model['check']['status']}: model {name} logits check: "
                         f"{model['check'].get('reason') or check_text(model['check'])}")
        for row in model["rows"]:
            for r in row["results"]:
                if r["competitor"] == "gptext" and r["status"] == "error":
                    lines.append(f"error: model {name} {row['phase']} {row['label']}: {r.get('reason', '')}")
    return lines


def section_name(setup: dict) -> str:
    """A model section's handle (schema /1 sections have none: their preset)."""
    return setup.get("name") or setup["preset"]


def check_text(check: dict) -> str:
    measured = ", ".join(f"{k.removeprefix('vs_')} {v:.3g}" for k, v in check.items()
                         if k.startswith("vs_") and v is not None)
    return f"relative RMS error {measured} (tolerance {check['tolerance']:g})"
