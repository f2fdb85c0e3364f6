"""The bench/ suite: its arithmetic, the correctness gate, the results file, the README
generator, and tiny real runs of both sections and of gpu_suite.sh (CPU only; nothing
here asserts how fast anything is)."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gptext
from bench import kernels, metrics, model, report, results, suite, tables
from bench.plan import Case, ModelCase, ModelPlan, Timing, kernel_cases, model_plans

REPO = Path(__file__).resolve().parent.parent


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None

TINY_RUN = ["--device", "cpu", "--ops", "softmax", "--shapes", "16384x128", "--dtypes", "fp32", "--no-model",
            "--max-seconds", "0.01", "--repeats", "3"]


# ---- arithmetic --------------------------------------------------------------------------

def test_tolerance_widens_with_gemm_depth():
    assert metrics.tolerance("float32") == (1e-4, 1e-4)
    assert metrics.tolerance("bfloat16", k=512) == (3e-2, 3e-2)  # below GEMM_K_FREE: unchanged
    assert metrics.tolerance("float16", k=4096) == pytest.approx((8e-3, 8e-3))  # sqrt(4096 / 1024) = 2


def test_error_ratio():
    expected = torch.tensor([1.0, -1.0, 0.0, 0.0])  # rms 1/sqrt(2)
    assert metrics.error_ratio(expected.clone(), expected, 1e-2, 1e-2) == 0.0
    # the worst element: 1e-2 off where |expected| = 0, against atol * rms alone
    off = expected + torch.tensor([0.0, 0.0, 1e-2, 0.0])
    assert metrics.error_ratio(off, expected, 1e-2, 1e-2) == pytest.approx(math.sqrt(2), rel=1e-5)
    assert metrics.error_ratio((expected, expected), (expected, off), 1e-2, 1e-2) > 1  # every output counts
    assert metrics.error_ratio(expected[:3], expected, 1, 1) == math.inf
    nan = expected.clone()
    nan[0] = math.nan
    assert metrics.error_ratio(nan, expected, 1, 1) == math.inf
    assert metrics.error_ratio(nan, nan.clone(), 1e-9, 1e-9) == 0.0


def test_error_ratio_row_rms():
    # One large row and one small one: a whole-output RMS holds the small row to the large
    # row's scale; row_rms holds each row to its own.
    expected = torch.tensor([[100.0, -100.0], [0.01, -0.01]])
    off = expected + torch.tensor([[0.0, 0.0], [0.02, 0.0]])
    assert metrics.error_ratio(off, expected, 0.0, 1e-3) < 1
    assert metrics.error_ratio(off, expected, 0.0, 1e-3, row_rms=True) == pytest.approx(2000, rel=1e-4)
    assert metrics.error_ratio(expected.clone(), expected, 0.0, 1e-3, row_rms=True) == 0.0


def test_op_costs():
    def cost(op, shape, dtype, epilogue=""):
        return kernels.OP_SPECS[op].cost(Case(op, "t", shape, dtype, epilogue))

    assert cost("softmax", (4, 8), "float32") == (160.0, 256.0)  # read x, write y
    assert cost("layernorm_residual", (2, 3), "bfloat16")[1] == (4 * 6 + 2 * 3) * 2  # x, r, out, sum; w, b
    # x 2x3, W 5x3, bias 5, residual 2x5, out 2x5, in fp16
    assert cost("linear", (2, 3, 5), "float16", "+b+res") == (60.0, (6 + 15 + 5 + 10 + 10) * 2.0)
    assert cost("linear", (2, 3, 5), "float16")[1] == (6 + 15 + 10) * 2.0
    # x 2x4, W_fc 16x4, b_fc 16, W_proj 4x16, b_proj 4, out 2x4
    assert cost("ffn", (2, 4), "float32") == (4.0 * 2 * 16 * 4, (8 + 64 + 16 + 64 + 4 + 8) * 4.0)


def test_rates_fractions_and_speedups():
    assert metrics.rates(2e12, 1e9, 0.5) == {"tflops": 4.0, "gbps": 2.0}
    f = metrics.limit_fractions(2e12, 1e9, 1.0, copy_gbps=10.0, matmul_tflops=4.0)
    assert f == {"memory": 0.1, "compute": 0.5, "roofline": 0.5, "bound": "compute"}
    memory_only = metrics.limit_fractions(2e12, 1e9, 1.0, copy_gbps=10.0, matmul_tflops=None)
    assert memory_only["bound"] == "memory" and memory_only["roofline"] == 0.1 and memory_only["compute"] is None
    assert metrics.speedup(3.0, 1.5) == 2.0 and metrics.speedup(10.0, 20.0, higher_is_better=True) == 2.0
    assert metrics.speedup(None, 1.0) is None
    assert metrics.decode_rate(128, 2, 3.0, 0.46) == pytest.approx(127 * 2 / 2.54)
    assert metrics.decode_rate(128, 1, 1.0, 1.5) is None  # noise: no rate rather than a wrong one


def test_speedup_pairs_the_rounds_of_interleaved_timings():
    # Round by round the competitor takes twice gptext's time while the machine's speed
    # swings: the paired median is 2.0, whatever the medians say (set apart here, 8x, to
    # tell the two answers apart).
    gptext_t = {"median": 1.0, "samples": [1.0, 1.0, 4.0, 4.0, 1.0], "interleaved": True}
    other_t = {"median": 8.0, "samples": [2.0, 2.0, 8.0, 8.0, 2.0], "interleaved": True}
    entries = [{"competitor": "gptext", "status": "ok", "time": gptext_t},
               {"competitor": "eager", "status": "ok", "time": other_t}]
    assert metrics.speedup_over(entries, entries[1]) == 2.0
    # Not timed in the same rounds (or of different lengths): the ratio of the medians.
    alone = dict(other_t, interleaved=False)
    unpaired = {**entries[1], "time": alone}
    assert metrics.speedup_over([entries[0], unpaired], unpaired) == 8.0
    short = {**entries[1], "time": dict(other_t, samples=[2.0])}
    assert metrics.speedup_over([entries[0], short], short) == 8.0
    assert metrics.paired_speedup(None, gptext_t) is None


def test_dtype_names():
    assert metrics.parse_dtype("BF16") == "bfloat16" and metrics.parse_dtype("float32") == "float32"
    with pytest.raises(ValueError):
        metrics.parse_dtype("int8")


def test_plan_selects_cases():
    quick = kernel_cases("cpu", "quick")
    assert {c.dtype for c in quick} == {"float32", "bfloat16"} and len(quick) == 40
    assert [c.label for c in quick if c.op == "attention" and c.dtype == "float32"] == [
        "1x12/12x128x128x64 causal", "1x12/12x1x1024x64 causal"]
    full = kernel_cases("cuda", "full")
    assert not [c for c in full if c.op.startswith("attention") and c.dtype == "float32"]  # CUDA fp32: reference
    sweep = [c for c in full if c.family == "sweep"]
    assert sweep and {c.dtype for c in sweep} == {"bfloat16"}  # sweeps: the first dtype only
    assert {c.dtype for c in full} == {"bfloat16", "float16", "float32"}
    picked = kernel_cases("cpu", "quick", ops=("linear",), dtypes=("float32",), shape_filters=("->50257",))
    assert [c.label for c in picked] == ["1x768->50257"]


# ---- the correctness gate ----------------------------------------------------------------

def _limits():
    return {"copy_gbps": 10.0, "matmul_tflops": {"float32": 1.0}}


def test_wrong_gptext_is_never_a_win():
    case = Case("softmax", "t", (8, 16), "float32")
    fast_and_wrong = kernels.Competitor("gptext", lambda x: gptext.reference.softmax(x) * 1.01, checked=True)
    eager = kernels.Competitor("eager", lambda x: torch.softmax(x, -1), checked=False)
    record = kernels.run_case(case, torch.device("cpu"), Timing(0, 3, 0.0), _limits(), field=[fast_and_wrong, eager])
    wrong, timed = record["results"]
    assert wrong["status"] == "WRONG" and "time" not in wrong and wrong["error_ratio"] > 1
    assert timed["status"] == "ok" and "time" in timed
    assert record["status"] == "WRONG" and record["speedup"] == {}
    lines = [tables.kernel_line(record, entry) for entry in record["results"]]
    assert "WRONG" in lines[0] and lines[1].split()[-1] == "-"  # eager timed, but no speed-up claimed
    document = {"ops": [record], "models": []}
    assert results.failures(document) == [f"WRONG: softmax 8x16 float32 gptext: {wrong['reason']}"]


def test_gptext_case_passes_on_the_kernels():
    case = Case("linear", "t", (3, 64, 40), "bfloat16", "+b+gelu")
    record = kernels.run_case(case, torch.device("cpu"), Timing(0, 3, 0.0), _limits(), with_compile=False)
    assert [r["competitor"] for r in record["results"]] == ["gptext", "eager", "reference"]
    assert record["status"] == "ok" and record["implementation"] == "cpu"
    assert set(record["speedup"]) == {"eager", "reference"}
    assert 0 <= record["results"][0]["error_ratio"] <= 1


def test_the_command_fails_when_gptext_is_wrong(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gptext.ops, "softmax", lambda x, *a, **k: gptext.reference.softmax(x).flip(-1))
    assert suite.main([*TINY_RUN, "--out", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "WRONG" in out and "FAILURES (1)" in out
    document = results.load(tmp_path / "results.json")
    assert document["complete"] and document["ops"][0]["status"] == "WRONG" and len(document["failures"]) == 1


def test_a_case_that_cannot_run_fails_the_run(tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(kernels, "make_inputs", out_of_memory)
    assert suite.main([*TINY_RUN, "--out", str(tmp_path)]) == 1
    document = results.load(tmp_path / "results.json")
    assert document["ops"] == [] and document["failures"] == ["error: softmax 16384x128 float32: RuntimeError: "
                                                              "out of memory"]


# ---- a real run and its results file -------------------------------------------------------

def test_tiny_run_writes_results_and_plots(tmp_path, capsys):
    assert suite.main([*TINY_RUN, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "torch.compile: left out" in printed and "16384x128" in printed
    document = results.load(tmp_path / "results.json")
    meta = document["meta"]
    assert document["complete"] and meta["mode"] == "quick" and meta["device"]["type"] == "cpu"
    assert meta["date"].endswith("Z") and meta["build_info"]["extension"] and meta["commit"]["sha"]
    assert "--shapes 16384x128" in meta["command"]
    case = document["ops"][0]
    assert case["status"] == "ok" and [r["competitor"] for r in case["results"]] == ["gptext", "eager", "reference"]
    assert len(case["results"][0]["time"]["samples"]) == 3 and case["results"][0]["gbps"] > 0
    plotted = {p.name for p in tmp_path.glob("*.png")}
    assert plotted == ({"speedup.png", "roofline.png"} if _has("matplotlib") else set())
    # the report prints the same rows the run printed
    assert report.main([str(tmp_path / "results.json")]) == 0
    reprinted = capsys.readouterr().out
    assert tables.kernel_line(case, case["results"][1], "1/1") in reprinted


def test_results_round_trip(tmp_path):
    document = _document("cpu", "Test CPU", "2026-01-02T03:04:05Z")
    document["ops"][0]["results"][0]["error_ratio"] = math.inf  # JSON has no inf: stored as null
    results.save(document, tmp_path / "r.json")
    loaded = results.load(tmp_path / "r.json")
    assert loaded["ops"][0]["results"][0]["error_ratio"] is None
    assert loaded["models"][0]["rows"][0]["speedup"] == document["models"][0]["rows"][0]["speedup"]
    del loaded["meta"]["commit"]
    with pytest.raises(ValueError, match="commit"):
        results.validate(loaded)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json"):
        results.load(tmp_path / "bad.json")


def test_results_of_the_first_schema_are_read(tmp_path):
    # gptext-bench/1 held one model section under "model": load() gives it as "models"
    new = _document("cpu", "Test CPU", "2026-01-02T03:04:05Z")
    old = {k: v for k, v in new.items() if k != "models"}
    old.update(schema="gptext-bench/1", model=new["models"][0])
    results.save(old, tmp_path / "old.json")
    loaded = results.load(tmp_path / "old.json")
    assert loaded["schema"] == results.SCHEMA and loaded["models"] == new["models"] and "model" not in loaded
    results.save({**old, "model": None}, tmp_path / "none.json")
    assert results.load(tmp_path / "none.json")["models"] == []
    with pytest.raises(ValueError, match="schema"):
        results.validate({**new, "schema": "gptext-bench/0"})


def test_commit_source(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTEXT_COMMIT", "abc123")
    assert results.commit(tmp_path) == {"sha": "abc123", "source": "GPTEXT_COMMIT", "dirty": None}
    monkeypatch.delenv("GPTEXT_COMMIT")
    assert results.commit(tmp_path)["sha"] == "unknown"


# ---- the model section ---------------------------------------------------------------------

def test_model_dtype_option():
    # --model-dtype runs the model section in another dtype (a CPU's default is fp32).
    settings = suite.settings_from(suite.parse_args(["--device", "cpu", "--ops", "none", "--model-dtype", "bf16"]))
    assert settings.model_dtype == "bfloat16" and settings.ops == []
    assert suite.settings_from(suite.parse_args(["--device", "cpu"])).model_dtype is None
    with pytest.raises(suite.UsageError, match="--model-dtype"):
        suite.settings_from(suite.parse_args(["--device", "cpu", "--model-dtype", "int4"]))


def test_models_option_and_plans():
    # every device and mode runs a GPT-2 and a gpt-oss section; --models picks among them
    for key in (("cpu", "quick"), ("cpu", "full"), ("cuda", "quick"), ("cuda", "full")):
        plans = model_plans(*key)
        assert [p.handle for p in plans] == ["gpt2", "gpt-oss"]
        oss = gptext.GPTConfig.preset(plans[1].preset, **plans[1].config_overrides)
        assert oss.arch == "gpt-oss" and oss.vocab_size == 201088 and oss.kv_heads < oss.n_head
    assert [p.handle for p in model_plans("cpu", "quick", ["gpt-oss"])] == ["gpt-oss"]
    parse = lambda *a: suite.settings_from(suite.parse_args(["--device", "cpu", *a]))  # noqa: E731
    assert parse().models == ["gpt2", "gpt-oss"]
    assert parse("--models", "gpt-oss").models == ["gpt-oss"]
    assert parse("--no-model").models == [] and parse("--models", "none").models == []
    with pytest.raises(suite.UsageError, match="--models: unknown llama"):
        parse("--models", "gpt2,llama")


def test_model_section_on_a_tiny_gpt():
    pytest.importorskip("transformers")
    plan = ModelPlan("gpt2-124m", "float32", (ModelCase("prefill", 1, 8), ModelCase("decode", 2, 8, 4)),
                     Timing(0, 3, 0.0), Timing(0, 3, 0.0),
                     config_overrides={"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 100,
                                       "context_length": 32})
    section = model.run(plan, torch.device("cpu"))
    assert section["check"]["status"] == "ok" and section["check"]["vs_hf"] < 1e-4
    prefill, decode = section["rows"]
    for row in section["rows"]:
        assert [r["competitor"] for r in row["results"]] == ["gptext", "reference", "hf"]
        assert all(r["status"] == "ok" for r in row["results"]), row
        assert row["status"] == "ok" and set(row["speedup"]) <= {"hf", "reference"}
    assert prefill["results"][0]["tokens_per_s"] == pytest.approx(8 / prefill["results"][0]["time"]["median"])
    # the prefill competitors were timed in the same rounds, and their speed-ups pair those rounds
    times = [r["time"] for r in prefill["results"]]
    assert all(t["interleaved"] and len(t["samples"]) == len(times[0]["samples"]) for t in times)
    assert prefill["speedup"]["hf"] == pytest.approx(metrics.paired_speedup(times[2], times[0]))
    assert "time_1" in decode["results"][0] and "new_tokens - 1" in decode["method"]
    assert set(decode["agrees_with"]) == {"reference", "hf"}
    assert section["setup"]["hf"]["class"] == "GPT2LMHeadModel" and section["setup"]["name"] == "gpt2-124m"


def test_model_section_on_a_tiny_gpt_oss(tmp_path, capsys):
    # the gpt-oss section, through the whole command: transformers runs GptOssForCausalLM on
    # the checkpoint gptext saved, and the logits gate compares all three
    pytest.importorskip("transformers")
    tiny = ModelPlan("gpt-oss-20b", "float32", (ModelCase("prefill", 1, 12), ModelCase("decode", 1, 6, 3)),
                     Timing(0, 3, 0.0), Timing(0, 3, 0.0), name="gpt-oss",
                     config_overrides={"n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": 2, "head_width": 8,
                                       "n_experts": 4, "experts_per_token": 2, "expert_width": 16,
                                       "vocab_size": 300, "context_length": 64, "sliding_window": 4})
    plans = {("cpu", "quick"): (tiny,)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(suite, "model_plans", lambda device, mode, names: plans[device, mode])
        assert suite.main(["--device", "cpu", "--dtypes", "fp32", "--ops", "none", "--models", "gpt-oss",
                           "--out", str(tmp_path)]) == 0
    document = results.load(tmp_path / "results.json")
    (section,) = document["models"]
    assert section["setup"]["hf"]["class"] == "GptOssForCausalLM" and section["setup"]["overrides"]["n_layer"] == 2
    assert section["check"]["status"] == "ok" and section["check"]["vs_hf"] < 1e-4
    assert [row["status"] for row in section["rows"]] == ["ok", "ok"]
    assert all(r["status"] == "ok" for row in section["rows"] for r in row["results"])
    printed = capsys.readouterr().out
    assert "gpt-oss-20b with n_layer=2" in printed and "GptOssForCausalLM" in printed


# ---- the README --------------------------------------------------------------------------

def _document(device_type, name, date, status="ok"):
    """A results document as the suite writes it, with one kernel case and one model row."""
    gptext_entry = {"competitor": "gptext", "status": status, "implementation": "cpu", "error_ratio": 0.1}
    if status == "ok":
        gptext_entry["time"] = {"median": 1e-3, "p10": 1e-3, "p90": 1e-3, "samples": [1e-3]}
        gptext_entry["gbps"], gptext_entry["tflops"] = 8.0, 0.0
        gptext_entry["fraction"] = metrics.limit_fractions(0, 8e6, 1e-3, 10.0, None)
    else:
        gptext_entry["reason"] = "differs"
    eager = {"competitor": "eager", "status": "ok", "time": {"median": 2.5e-3, "p10": 2e-3, "p90": 3e-3,
                                                             "samples": [2.5e-3]}}
    case = {"op": "softmax", "family": "rows", "label": "4096x1024", "shape": [4096, 1024], "dtype": "float32",
            "epilogue": "", "bound": "memory", "flops": 0.0, "bytes": 8e6, "results": [gptext_entry, eager]}
    kernels.finish_case(case)
    row = {"phase": "decode", "label": "1x(128+128)", "batch": 1, "tokens": 128, "new_tokens": 128,
           "dtype": "float32", "method": model.METHODS["decode"], "status": "ok", "speedup": {"hf": 1.6},
           "results": [{"competitor": "gptext", "status": "ok", "tokens_per_s": 48.0},
                       {"competitor": "reference", "status": "ok", "tokens_per_s": 10.0},
                       {"competitor": "hf", "status": "ok", "tokens_per_s": 30.0}]}
    document = {
        "schema": results.SCHEMA, "complete": True, "notes": [], "failures": [],
        "meta": {"date": date, "mode": "quick", "command": "python -m bench",
                 "device": {"type": device_type, "name": name, "driver": "580.1" if device_type == "cuda" else None},
                 "versions": {"torch": "2.14.1", "cuda": "13.0", "gptext": "0.1.0", "transformers": None},
                 "build_info": {}, "commit": {"sha": "0123456789abcdef", "source": "git", "dirty": False},
                 "settings": {}},
        "limits": {"device": device_type, "name": name, "copy_gbps": 10.0, "matmul_tflops": {"float32": 1.0}},
        "ops": [case],
        "models": [{"setup": {"name": "gpt2", "preset": "gpt2-124m", "overrides": {}, "dtype": "float32",
                              "parameters": 124e6},
                    "check": {"status": "ok", "tolerance": 1e-4, "input": "2x32"}, "rows": [row]}],
    }
    document["failures"] = results.failures(document)
    results.validate(document)
    return document


@pytest.fixture
def readme(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("# Title\n\nIntro.\n\n<!-- bench:begin -->\nstale\n<!-- bench:end -->\n\nAfter.\n")
    return path


def _write(tmp_path, name, document):
    path = tmp_path / "results" / name
    results.save(document, path)
    return path


def test_readme_with_cpu_results_only(tmp_path, readme):
    cpu = _write(tmp_path, "cpu.json", _document("cpu", "Test CPU (2 threads)", "2026-01-02T03:04:05Z"))
    assert report.main(["--readme", str(readme), str(cpu)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nIntro.\n\n<!-- bench:begin -->\n")
    assert text.endswith("<!-- bench:end -->\n\nAfter.\n")
    assert "stale" not in text and "No GPU results have been committed yet" in text
    assert "**Kernels on Test CPU (2 threads), 2026-01-02**" in text
    assert "**Model on Test CPU (2 threads), 2026-01-02**" in text
    assert "| softmax | 4096x1024 | fp32 | 1.000 ms (cpu) | 2.50x | 80.0% mem |" in text
    assert "| decode | 1x(128+128) | 48.0 | 30.0 | 10.0 | 1.60x | - |" in text
    before = readme.read_text()
    assert report.main(["--readme", str(readme), str(cpu)]) == 0
    assert readme.read_text() == before  # idempotent


def test_readme_groups_gpus_first_and_marks_failures(tmp_path, readme):
    files = [_write(tmp_path, "cpu.json", _document("cpu", "Test CPU", "2026-01-02T03:04:05Z")),
             _write(tmp_path, "old.json", _document("cuda", "Test GPU", "2026-01-01T00:00:00Z")),
             _write(tmp_path, "new.json", _document("cuda", "Test GPU", "2026-02-01T00:00:00Z", status="WRONG"))]
    assert report.main(["--readme", str(readme), *map(str, files)]) == 0
    text = readme.read_text()
    assert "No GPU results" not in text
    assert text.index("### GPU: Test GPU") < text.index("### CPU: Test CPU")
    assert text.count("### GPU: Test GPU") == 1  # one heading per device
    assert text.index("Kernels on Test GPU, 2026-02-01") < text.index("Kernels on Test GPU, 2026-01-01")
    assert "driver 580.1" in text and "**WRONG**" in text and "Failures in this run (1)" in text


def test_readme_needs_its_markers(tmp_path, capsys):
    plain = tmp_path / "README.md"
    plain.write_text("# No markers\n")
    assert report.main(["--readme", str(plain)]) == 2
    assert "bench:begin" in capsys.readouterr().err and plain.read_text() == "# No markers\n"
    twice = tmp_path / "TWICE.md"
    twice.write_text("<!-- bench:end -->\n<!-- bench:begin -->\n")
    assert report.main(["--readme", str(twice)]) == 2


def test_readme_without_any_results(readme):
    readme.write_text(report.replace_section(readme.read_text(), report.readme_section([])))
    assert "No benchmark results have been committed yet" in readme.read_text()


# ---- gpu_suite.sh --------------------------------------------------------------------------

def test_gpu_suite_records_every_step(tmp_path):
    # SUITE_STEPS=none runs nothing, here or on a GPU host, and still records every step
    env = {**os.environ, "SUITE_STEPS": "none", "SUITE_BUDGET": "60", "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(REPO / "bench" / "gpu_suite.sh"), str(tmp_path / "out"), "feedbeef"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert summary["commit"] == "feedbeef" and summary["date"].endswith("Z") and summary["bench_json"] is None
    steps = {s["step"]: s for s in summary["steps"]}
    assert list(steps) == ["build", "pytest_cuda", "ctest", "tiles", "bench", "memcheck", "racecheck", "ncu",
                           "bench_oss", "pytest_all"]
    assert summary["bench_oss_json"] is None
    assert {s["status"] for s in steps.values()} <= {"skipped", "unavailable"}
    assert steps["bench"]["note"] == "not in SUITE_STEPS"
    if not summary["device"]["gpu"]:
        assert steps["build"]["note"] == "no GPU on this host"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_suite.json", "suite.log"]


def test_one_case_driver(capsys):
    from bench import one
    assert one.main(["softmax", "16x1024", "fp32", "--device", "cpu", "--calls", "2"]) == 0
    out = capsys.readouterr().out
    assert "softmax 16x1024 float32 (gptext) on cpu: 2 calls" in out
    assert one.main(["layernorm_residual", "8x768", "bf16", "--device", "cpu", "--impl", "eager", "--calls", "1"]) == 0
    assert one.main(["softmax", "3x3", "fp32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no softmax case labelled '3x3'" in err and "16x1024" in err
    assert one.main(["softmax", "16x1024", "int8", "--device", "cpu"]) == 2
