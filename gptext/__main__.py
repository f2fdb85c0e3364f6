"""gptext's command line: ``python -m gptext <command>`` (or the ``gptext`` script).

  info       what was built (CUDA arches, CPU instruction set) and where it can run
"""

from __future__ import annotations

import argparse
import sys


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gptext", description="gptext: a GPT runtime on hand-written CUDA kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="what was built and which devices can run it").set_defaults(run=cmd_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
