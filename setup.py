"""Builds gptext's compiled ops (gptext._C) with torch.utils.cpp_extension.

CUDA or CPU-only:
  GPTEXT_CUDA=1   build the CUDA kernels (fails with an explanation if that is impossible)
  GPTEXT_CUDA=0   build the CPU implementations only
  unset           CUDA when torch is a CUDA build and a CUDA toolkit (nvcc) is found,
                  whether or not this machine has a GPU; CPU-only otherwise
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0": A100 and H100).
CUDA_HOME points at the toolkit; if unset it is found from the nvcc on PATH, which may be
a wrapper script (the toolkit root is read from `nvcc --dryrun`).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHES = "8.0;9.0"


def fail(paragraph):
    """Stops the build with one readable paragraph instead of a compiler log."""
    sys.stderr.write("\n" + "=" * 78 + "\ngptext build: " + paragraph.strip() + "\n" + "=" * 78 + "\n\n")
    sys.exit(1)


def find_cuda_home():
    """The CUDA toolkit root, or None. Must run before torch.utils.cpp_extension is imported:
    that module fixes its own CUDA_HOME guess (nvcc's grandparent directory) at import."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isdir(os.environ[var]):
            return os.path.realpath(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    try:
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
        match = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
        if match:
            return os.path.realpath(match.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def pip_cuda_include_dirs():
    """Headers that pip's NVIDIA wheels install (cuBLAS, cuSPARSE, ... for CUDA 13 under
    nvidia/cu13/include, for CUDA 12 under nvidia/<library>/include); ATen's CUDA headers
    include them, and a bare toolkit may lack them."""
    dirs = []
    for entry in sys.path:
        base = os.path.join(entry, "nvidia")
        if os.path.isdir(base):
            dirs += sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))
    return list(dict.fromkeys(dirs))


def want_cuda(cuda_home):
    import torch

    forced = os.environ.get("GPTEXT_CUDA")
    if forced not in (None, "", "0", "1"):
        fail(f"GPTEXT_CUDA must be 0 or 1, got {forced!r}.")
    if forced == "0":
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"the installed torch {torch.__version__} is a CPU-only build")
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        problems.append("no CUDA toolkit was found (no nvcc on PATH and CUDA_HOME unset)")
    else:
        version = nvcc_version(cuda_home)
        if version and torch.version.cuda and version[0] != int(torch.version.cuda.split(".")[0]):
            problems.append(
                f"the CUDA toolkit at {cuda_home} is {version[0]}.{version[1]} but torch {torch.__version__} was "
                f"built with CUDA {torch.version.cuda}; their major versions must match")
    if not problems:
        return True
    if forced == "1":
        fail("GPTEXT_CUDA=1 asks for the CUDA kernels, but " + "; and ".join(problems) + ". Install a CUDA build of "
             "torch and the matching CUDA toolkit (set CUDA_HOME to its root), or build the CPU-only extension with "
             "GPTEXT_CUDA=0.")
    print("gptext build: CPU-only extension (" + "; ".join(problems) + "). Set GPTEXT_CUDA=1 to require CUDA.")
    return False


def extensions():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    use_cuda = want_cuda(cuda_home)
    sources = ["csrc/ops.cpp", "csrc/python_module.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: ATen's at::parallel_for is an inline `omp parallel` in OpenMP builds of torch
    # (the pip wheels), so without it the CPU ops would run on one thread; the libgomp.so.1
    # this links against is the one torch has already loaded. It also enables the CPU
    # kernels' `omp simd` loops. -fno-trapping-math lets GCC turn their selects into blends.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    link_flags = ["-fopenmp"]
    if not use_cuda:
        return [CppExtension("gptext._C", sources, extra_compile_args={"cxx": cxx_flags},
                             extra_link_args=link_flags)]

    arches = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHES)
    print(f"gptext build: CUDA kernels for TORCH_CUDA_ARCH_LIST={arches} with the toolkit at {cuda_home}")
    defines = ["-DGPTEXT_WITH_CUDA", f'-DGPTEXT_CUDA_ARCHES="{arches}"']
    sources += ["csrc/cuda_ops.cpp"] + sorted(glob.glob("csrc/kernels/*.cu"))
    return [CUDAExtension(
        "gptext._C",
        sources,
        include_dirs=pip_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx_flags + defines, "nvcc": ["-O3", "-lineinfo"] + defines},
        extra_link_args=link_flags,
    )]


def build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class GptextBuildExt(BuildExtension):
        """Turns a failed compile into one paragraph (the compiler's own output stays above it)."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any build failure gets the same summary
                fail(f"compiling gptext._C failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                     "). The compiler's first error above names the file and line. Common causes: a CUDA toolkit "
                     "whose version does not match torch.version.cuda, a compiler too old for C++20 (torch >= 2.10 "
                     "needs one), or missing Python headers. GPTEXT_CUDA=0 builds the CPU-only extension.")

    return GptextBuildExt


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext_class()})
