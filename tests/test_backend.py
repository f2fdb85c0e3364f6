"""Backend selection, fallbacks, build information."""

import os
import warnings

import pytest
import torch

import gptext
from gptext import ops

from conftest import DEVICES


def test_set_backend_and_context_manager():
    assert gptext.get_backend() == "auto"
    with gptext.backend("reference"):
        assert gptext.get_backend() == "reference"
        with gptext.backend("kernels"):
            assert gptext.get_backend() == "kernels"
        assert gptext.get_backend() == "reference"
    assert gptext.get_backend() == "auto"
    gptext.set_backend("reference")
    assert gptext.get_backend() == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        gptext.set_backend("fast")
    with pytest.raises(ValueError):
        with gptext.backend("gpu"):
            pass


def test_context_manager_restores_after_error():
    with pytest.raises(RuntimeError):
        with gptext.backend("reference"):
            raise RuntimeError("boom")
    assert gptext.get_backend() == "auto"


def test_backends_agree():
    x = torch.randn(4, 33)
    with gptext.backend("reference"):
        ref = gptext.ops.softmax(x)
    with gptext.backend("kernels"):
        ker = gptext.ops.softmax(x)
    torch.testing.assert_close(ker, ref)


def test_auto_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(ops, "_warned", set())
    x = torch.randn(3, 5, dtype=torch.float64)  # the kernels take fp32/bf16/fp16 only
    with pytest.warns(RuntimeWarning, match="float64"):
        y = gptext.ops.softmax(x)
    torch.testing.assert_close(y, torch.softmax(x, -1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason does not warn twice
        gptext.ops.softmax(x)
        gptext.ops.layernorm(x, torch.ones(5, dtype=torch.float64))


def test_kernels_backend_refuses_what_it_cannot_serve():
    with gptext.backend("kernels"), pytest.raises(RuntimeError, match="backend 'kernels'.*float64"):
        gptext.ops.softmax(torch.randn(3, 5, dtype=torch.float64))


def test_missing_extension_is_explained(monkeypatch):
    monkeypatch.setattr(ops, "_EXTENSION_ERROR", "ImportError: no module gptext._C")
    monkeypatch.setattr(ops, "_try_softmax", ops._declined)  # as the import sets it without gptext._C
    monkeypatch.setattr(ops, "_warned", set())
    assert not gptext.kernels_available("cpu")
    with gptext.backend("kernels"), pytest.raises(RuntimeError, match="gptext._C is not available"):
        gptext.ops.softmax(torch.randn(2, 2))
    with pytest.warns(RuntimeWarning, match="not available"):
        gptext.ops.softmax(torch.randn(2, 2))


def test_kernels_available():
    assert gptext.kernels_available("cpu")
    assert gptext.kernels_available(torch.device("cpu"))
    assert gptext.kernels_available("cuda") == (torch.cuda.is_available() and gptext.build_info()["cuda"])
    assert not gptext.kernels_available("mps")


def test_build_info():
    info = gptext.build_info()
    assert info["extension"] and info["extension_error"] is None
    assert info["torch"] == torch.__version__
    assert info["cpu_isa"] in ("avx512", "avx2", "baseline")
    assert info["cpu_isa_supported"] in ("avx512", "avx2", "baseline")
    assert info["cpu_bf16_gemm"] == "fp32" or info["cpu_isa"] == "avx512"
    assert info["cpu_f16_gemm"] == "fp32" or info["cpu_isa"] == "avx512"
    assert info["cpu_stream_bytes"] > 0
    if os.cpu_count() and "GPTEXT_CPU_STREAM_BYTES" not in os.environ:
        # A VM is shown its socket's whole L3: the threshold is capped at 16 MB per processor.
        assert info["cpu_stream_bytes"] <= os.cpu_count() * (16 << 20)
    assert info["cpu_gemm_column_block"] >= 0
    assert info["devices"][0] == {"device": "cpu", "kernels": True}
    if info["cuda"]:
        assert info["cuda_arch_list"] and info["cuda_runtime"] > 0
    assert gptext.__version__.count(".") == 2


def test_gemm_policy_from_environment(tmp_path):
    import subprocess
    import sys

    code = "import gptext; print(gptext.gemm_policy())"
    out = subprocess.run([sys.executable, "-c", code], env={"GPTEXT_GEMM": "cublas", "PATH": ""},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cublas"


@pytest.mark.parametrize("setting,expected", [("12345", 12345), ("lots", None), ("-1", None)])
def test_cpu_stream_threshold_from_environment(setting, expected):
    # GPTEXT_CPU_STREAM_BYTES replaces the last-level cache size as the traffic from which
    # the CPU kernels stream their outputs; a value that is not a positive integer is ignored.
    import subprocess
    import sys

    code = "import gptext; print(gptext.build_info()['cpu_stream_bytes'])"
    out = subprocess.run([sys.executable, "-c", code], env={"GPTEXT_CPU_STREAM_BYTES": setting, "PATH": ""},
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) == (expected or gptext.build_info()["cpu_stream_bytes"])


@pytest.mark.parametrize("setting,expected", [("512", 512), ("0", 0), ("wide", None), ("-4", None)])
def test_cpu_gemm_column_block_from_environment(setting, expected):
    # GPTEXT_CPU_GEMM_BLOCK replaces the output columns a block of the CPU's ATen GEMM (0:
    # one call for the whole product); a value that is not a non-negative integer is
    # ignored. Either way the product is the same.
    import subprocess
    import sys

    code = ("import gptext, torch; x = torch.randn(20, 7); w = torch.randn(1100, 7); "
            "assert torch.allclose(gptext.ops.linear(x, w, activation='gelu'), "
            "gptext.reference.linear(x, w, None, 'gelu', None), rtol=1e-5, atol=1e-5); "
            "print(gptext.build_info()['cpu_gemm_column_block'])")
    out = subprocess.run([sys.executable, "-c", code], env={"GPTEXT_CPU_GEMM_BLOCK": setting, "PATH": ""},
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) == (expected if expected is not None else 1024)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512", "sse9"])
def test_cpu_isa_from_environment(isa):
    # GPTEXT_CPU_ISA picks a narrower CPU build (never a wider one than the processor has);
    # an unknown name leaves the widest. `make test` runs the op tests again under each.
    import subprocess
    import sys

    code = "import json, gptext; info = gptext.build_info(); print(info['cpu_isa'], info['cpu_isa_supported'])"
    out = subprocess.run([sys.executable, "-c", code], env={"GPTEXT_CPU_ISA": isa, "PATH": ""},
                         capture_output=True, text=True, check=True)
    active, supported = out.stdout.split()
    order = ["baseline", "avx2", "avx512"]
    assert supported == gptext.build_info()["cpu_isa_supported"]
    expected = supported if isa not in order else order[min(order.index(isa), order.index(supported))]
    assert active == expected


@pytest.mark.parametrize("device", DEVICES)
def test_calls_without_grad_skip_autograd_and_agree(device):
    # Nothing needs a gradient: the op runs below autograd (no graph node) and gives the
    # same values as the autograd path; with a leaf that requires grad, the graph is built
    # and the gradient reaches the leaf.
    x = torch.randn(3, 16, device=device)
    w, b = torch.randn(16, device=device), torch.randn(16, device=device)
    plain = gptext.ops.layernorm_residual(x, x, w, b)
    assert all(t.grad_fn is None and not t.requires_grad for t in plain)
    leaf = x.clone().requires_grad_(True)
    graphed = gptext.ops.layernorm_residual(leaf, x, w, b)
    assert all(t.grad_fn is not None for t in graphed)
    for got, want in zip(plain, graphed):
        torch.testing.assert_close(got, want.detach())
    graphed[0].sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == leaf.shape
    with torch.no_grad():
        assert gptext.ops.softmax(leaf).grad_fn is None
    weight = torch.nn.Parameter(torch.randn(4, 16, device=device))  # requires grad: the autograd path
    assert gptext.ops.linear(x, weight).grad_fn is not None


def test_direct_calls_keep_the_dispatchers_meaning():
    # ops.py calls the compiled ops through gptext._C._call_<op>, which goes through the
    # dispatcher: the profiler records the op, a dispatch mode sees it, fake tensors get a
    # fake result (the fake implementation), and a bad argument is a TypeError.
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(4, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        gptext.ops.softmax(x)
    assert "gptext::softmax" in {event.name for event in prof.events()}

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with Seen() as seen:
        out = gptext.ops.layernorm(x, torch.ones(8), None)
    assert "gptext.layernorm.default" in seen.ops
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (8,)))

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(2, 3, 5, 16))
        result = gptext.ops.attention(fake, fake, fake)
    assert type(result).__name__ == "FakeTensor" and result.shape == (2, 3, 5, 16)

    with pytest.raises(TypeError, match="takes 5 arguments"):
        gptext._C._call_softmax(x, -1)
    with pytest.raises(TypeError, match="argument 1 must be a Tensor"):
        gptext._C._call_softmax([1.0], -1, 1.0, False, 0)
    with pytest.raises(TypeError, match="argument 4 must be a bool"):
        gptext._C._call_softmax(x, -1, 1.0, 1, 0)
    with pytest.raises(TypeError):
        gptext._C._call_linear(x, torch.randn(3, 8), None, 7, None)


def test_cpu_calls_skip_the_python_checks_and_errors_keep_their_words(monkeypatch):
    # A valid CPU call goes straight to the entry point, whose C++ checks stand in for the
    # Python ones; an argument they reject (here a non-bool `causal`) sends the call through
    # the Python checks and conversions, with the same result; a bad one raises there.
    x = torch.randn(2, 8)
    checked = []
    check = ops._check_tensor
    monkeypatch.setattr(ops, "_check_tensor", lambda op, name, *rest: (checked.append(name), check(op, name, *rest)))
    w = torch.randn(8)
    gptext.ops.softmax(x, causal=True)
    gptext.ops.layernorm(x, w)
    gptext.ops.layernorm_residual(x, x, w, w)
    gptext.ops.linear(x, torch.randn(3, 8), activation="gelu")
    gptext.ops.ffn(x, torch.randn(16, 8), None, torch.randn(8, 16), None)
    gptext.ops.attention(*(torch.randn(1, 2, 4, 8) for _ in range(3)), window=2)
    assert checked == []
    torch.testing.assert_close(gptext.ops.softmax(x, causal=1, scale=2), gptext.ops.softmax(x, causal=True, scale=2.0))
    assert checked == ["x"]
    with pytest.raises(ValueError, match=r"gptext\.ops\.softmax: scale must be a positive finite number"):
        gptext.ops.softmax(x, scale=-1.0)
    with pytest.raises(TypeError, match=r"gptext\.ops\.layernorm: weight must be a torch\.Tensor"):
        gptext.ops.layernorm(x, [1.0] * 8)
    with pytest.raises(ValueError, match=r"gptext\.ops\.linear: residual is on meta"):
        gptext.ops.linear(x, torch.randn(3, 8), residual=torch.empty(2, 3, device="meta"))


def test_try_entry_points_serve_or_decline():
    # gptext._C._try_<op> serves a valid call on a plain CPU tensor of a kernel dtype, and
    # returns None (never raises) for anything else: the public op then takes its checked
    # path. The direct path is off on the reference backend and while profiling records.
    x, w = torch.randn(2, 8), torch.randn(8)
    torch.testing.assert_close(gptext._C._try_softmax(x, -1, 1.0, False, 0), torch.softmax(x, -1))
    assert gptext._C._direct()
    declined = {
        "int64 tensor": (torch.ones(2, 8, dtype=torch.int64), -1, 1.0, False, 0),
        "float64 tensor": (x.double(), -1, 1.0, False, 0),
        "meta tensor": (torch.empty(2, 8, device="meta"), -1, 1.0, False, 0),
        "not a tensor": ([1.0], -1, 1.0, False, 0),
        "too few arguments": (x, -1),
        "a bool that is not a bool": (x, -1, 1.0, 1, 0),
        "a float dim": (x, 0.5, 1.0, False, 0),
        "dim out of range (IndexError)": (x, 2, 1.0, False, 0),
        "a negative scale (ValueError)": (x, -1, -1.0, False, 0),
    }
    for why, args in declined.items():
        assert gptext._C._try_softmax(*args) is None, why
    assert gptext._C._try_linear(x, torch.randn(3, 7), None, "none", None) is None  # K mismatch
    assert gptext._C._try_attention(torch.randn(1, 3, 4, 8), *(torch.randn(1, 2, 4, 8) for _ in range(2)),
                                    True, 0, None, 0.5, None, None) is None  # 3 heads over 2 kv heads

    class Tagged(torch.Tensor):
        pass

    assert gptext._C._try_layernorm(x.as_subclass(Tagged), w, None, 1e-5) is None
    assert gptext._C._try_layernorm(torch.nn.Parameter(x), w, None, 1e-5) is not None
    with gptext.backend("reference"):
        assert not gptext._C._direct() and gptext._C._try_layernorm(x, w, None, 1e-5) is None
    assert gptext._C._direct()
    from gptext import profiling

    with profiling.record_ops("cpu") as records:
        assert not gptext._C._direct()
        gptext.ops.softmax(x)
    assert gptext._C._direct() and [r.op for r in records] == ["softmax"]
