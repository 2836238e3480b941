"""Download exactly the wheels ``tools/gpu_check.sh`` installs, for a GPU machine without network.

Run on any machine with network access (pip reaches PyPI), from the repository root:

    python3 tools/fetch_gpu_wheels.py                    # the core set, ~3 MB, into .wheels/gpu
    python3 tools/fetch_gpu_wheels.py --with-te          # + Transformer Engine (~280 MB, see below)

then copy ``.wheels/gpu`` (git-ignored) to the same place in the GPU machine's checkout and run
``make gpu-check`` there. Wheels are fetched for CPython 3.12 on manylinux x86-64 whatever the
machine running this script is (``pip download --platform ... --python-version 3.12``).

The target machine is assumed to have Python 3.12, PyTorch with CUDA (2.11 and later are fine:
megatron-core 0.19.2 needs ``torch>=2.6``, ``numpy`` and ``packaging>=24.2``, all present in a
CUDA PyTorch image), transformers, sentencepiece, safetensors, pyyaml, psutil, pytest and
pytest-timeout. The core set adds what such an image lacks:

* ``megatron-core==0.19.2`` (a cp312 wheel: hence Python 3.12);
* ``math-verify`` and its two pure-Python dependencies (the project's math verifier).

``--with-te`` adds Transformer Engine 2.20.2 for CUDA 13 (``transformer-engine``,
``transformer-engine-cu13``: the 276 MB core library) and the source archive of its PyTorch
extension (``transformer_engine_torch``: PyPI ships no wheel of it, it is compiled against the
installed torch on the GPU machine, which needs nvcc, cmake, ninja and pybind11, and several
minutes). Without it the GPU check runs everything else and its report says TE was absent.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

CORE = ["megatron-core==0.19.2", "math-verify==0.9.0", "latex2sympy2_extended==1.11.0", "antlr4-python3-runtime==4.13.2"]
TE_WHEELS = ["transformer-engine==2.20.2", "transformer-engine-cu13==2.20.2",
             # what transformer-engine-cu13 needs beyond a CUDA PyTorch image
             "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types", "typing-inspection", "typing-extensions",
             "importlib-metadata"]  # fmt: skip
TE_SOURCE = ["transformer-engine-torch==2.20.2"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]  # fmt: skip


def download_command(specs: list[str], out: Path, *, source: bool = False) -> list[str]:
    """The ``pip download`` command for ``specs`` (wheels for CPython 3.12 on x86-64, or sdists)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(out)]
    if source:
        return cmd + ["--no-binary=:all:", *specs]
    cmd += ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    return cmd + specs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(".wheels/gpu"), help="wheel folder (default: .wheels/gpu)")
    p.add_argument("--with-te", action="store_true", help="also Transformer Engine (~280 MB; see the module doc)")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the pip commands, download nothing")
    args = p.parse_args(argv)
    cmds = [download_command(CORE, args.out)]
    if args.with_te:
        cmds += [download_command(TE_WHEELS, args.out), download_command(TE_SOURCE, args.out, source=True)]
    for cmd in cmds:
        print(" ".join(cmd))
        if not args.print_only:
            args.out.mkdir(parents=True, exist_ok=True)
            if subprocess.run(cmd).returncode != 0:
                print(f"fetch_gpu_wheels: error: pip download failed for {cmd[-1]}", file=sys.stderr)
                return 1
    if not args.print_only:
        files = sorted(f.name for f in args.out.iterdir() if f.is_file())
        print(f"{args.out}: {len(files)} files, {sum(f.stat().st_size for f in args.out.iterdir()) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
