"""``copd-convert``: Hugging Face ⇄ Megatron torch_dist checkpoints (Llama-3, Qwen2/2.5, Qwen3).

    copd-convert hf-to-mcore --hf-dir ./Qwen3-8B --out ckpt/qwen3-8b
        # → torch_dist shards + copd_meta.yaml + model.yaml (config fragment); loads at any TP/PP
    copd-convert mcore-to-hf --mcore-dir runs/x/merged --tokenizer-dir ./Qwen3-8B --out hf/merged
        # → model*.safetensors (+ index) + config.json + tokenizer files

Runs in one process (never under torchrun/srun) on CPU by default; ``--device cuda`` builds
the model on the GPU instead (it must then fit in one GPU's memory). Details, memory use and
the mapping: ``docs/conversion.md``, ``checkpoint/convert.py``, ``checkpoint/hf.py``.

Backends: ``builtin`` (ours, the families above); ``bridge`` (Megatron-Bridge, more families,
its own checkpoint layout; optional, imported lazily); ``auto`` = builtin for our families,
bridge for other architectures when it is installed. User mistakes (missing directory or
file, unsupported architecture or feature, shape mismatch) print one line and exit with 2.

``--out`` is written into a hidden sibling and renamed into place when complete; a
non-empty ``--out`` is replaced (as a whole) only with ``--force``, and never when it is,
contains or lies inside the source or ``--tokenizer-dir``. ``--mcore-dir`` may be any
checkpoint the project writes, a trainer branch checkpoint included (its optimizer state is
not exported).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from copd_megatron.config.schema import ConfigError
from copd_megatron.utils.cli import OneLineParser

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``5GB`` → 5·10⁹ bytes (``GiB`` = 2³⁰, as in transformers' ``max_shard_size``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size: {text!r} is not a size like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="copd-convert", description="Convert checkpoints between Hugging Face safetensors and "
                      "Megatron torch_dist (Llama-3, Qwen2/2.5, Qwen3 dense; more through Megatron-Bridge).")  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors directory -> torch_dist checkpoint")
    a.add_argument("--hf-dir", type=Path, required=True, help="HF model directory (config.json + *.safetensors)")
    a.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this (TP must divide the padded size)")  # fmt: skip
    b = sub.add_parser("mcore-to-hf", help="torch_dist checkpoint (any TP/PP) -> HF safetensors directory")
    b.add_argument("--mcore-dir", type=Path, required=True, help="torch_dist checkpoint directory")
    b.add_argument("--model-config", type=Path,
                   help="YAML with the model section, for checkpoints without copd_meta.yaml")  # fmt: skip
    b.add_argument("--arch", choices=["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"],
                   help="HF architecture (default: Qwen3 if qk_layernorm, Qwen2 if add_qkv_bias, else Llama)",
                   )  # fmt: skip
    b.add_argument("--hf-config", type=Path,
                   help="config.json to take non-architectural fields from (default: <mcore-dir>/hf_config.json, "
                   "else <tokenizer-dir>/config.json)")  # fmt: skip
    b.add_argument("--tokenizer-dir", type=Path, help="copy tokenizer / generation_config files from here")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    for s in (a, b):
        s.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
        s.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                       help="dtype of the written weights (auto: the source's)")  # fmt: skip
        s.add_argument("--backend", choices=["auto", "builtin", "bridge"], default="auto")
        s.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="where the model is built (cpu hides the GPUs from this process)")  # fmt: skip
        s.add_argument("--force", action="store_true", help="replace a non-empty --out (never the source)")
    return p


def _check_dirs(args: argparse.Namespace) -> None:
    from copd_megatron.utils.outputs import check_output

    src = args.hf_dir if args.cmd == "hf-to-mcore" else args.mcore_dir
    if not src.is_dir():
        raise ConfigError(f"{src}: directory not found")
    inputs = [src] + [getattr(args, k, None) for k in ("tokenizer_dir", "hf_config", "model_config")]
    check_output(args.out, inputs, force=args.force)


def _backend(args: argparse.Namespace) -> str:
    """builtin or bridge; ``auto`` picks bridge only for what the builtin mappings cannot read."""
    from copd_megatron.checkpoint.convert import bridge_available, read_hf_config
    from copd_megatron.checkpoint.hf import ARCHITECTURES

    if args.backend != "auto":
        return args.backend
    if args.cmd == "hf-to-mcore":
        arch = (read_hf_config(args.hf_dir).get("architectures") or [None])[0]
        return "bridge" if arch not in ARCHITECTURES and bridge_available() else "builtin"
    ours = (args.mcore_dir / "copd_meta.yaml").is_file() or args.model_config is not None
    return "bridge" if not ours and bridge_available() else "builtin"


def run(args: argparse.Namespace) -> str:
    """Do the conversion into a staging directory renamed to ``--out`` at the end; returns a summary."""
    from copd_megatron.utils.outputs import staged_dir

    backend = _backend(args)
    if args.cmd == "mcore-to-hf" and backend == "bridge" and args.tokenizer_dir is None:
        raise ConfigError("--backend bridge: pass --tokenizer-dir, the HF directory of the model's family")
    max_shard_bytes = parse_size(args.max_shard_size) if args.cmd == "mcore-to-hf" else 0
    with staged_dir(args.out) as stage:
        return _convert(args, backend, stage, max_shard_bytes)


def _convert(args: argparse.Namespace, backend: str, stage: Path, max_shard_bytes: int) -> str:
    from copd_megatron.checkpoint import convert

    if args.cmd == "hf-to-mcore" and backend == "bridge":
        convert.import_hf_bridge(args.hf_dir, stage)
        return f"wrote {args.out} (Megatron-Bridge layout)"
    if args.cmd == "hf-to-mcore":
        m = convert.import_hf(args.hf_dir, stage, params_dtype=args.dtype,
                              make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, final_dir=args.out)  # fmt: skip
        return f"wrote {args.out} ({m.num_layers} layers, vocab {m.vocab_size}); config: {args.out / 'model.yaml'}"
    if backend == "bridge":
        convert.export_hf_bridge(args.mcore_dir, stage, args.tokenizer_dir)
        return f"wrote {args.out} (Megatron-Bridge)"
    model = convert.load_model_config_yaml(args.model_config) if args.model_config else None
    files = convert.export_hf(args.mcore_dir, stage, model=model, arch=args.arch, hf_config=args.hf_config,
                              tokenizer_dir=args.tokenizer_dir, dtype=args.dtype, max_shard_bytes=max_shard_bytes)  # fmt: skip
    return f"wrote {args.out} ({len(files)} safetensors file{'s' * (len(files) > 1)} + config.json)"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "cpu" and argv is None and not _cuda_initialised():
        # Conversion gains nothing from a GPU and a large model would not fit on one: hide
        # them before anything initialises CUDA, so the CPU (gloo) path is taken. Only when
        # run as a program: a Python caller (argv given) owns its process's devices.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from copd_megatron.utils.logging import setup_logging

    setup_logging("WARNING")
    try:
        _check_dirs(args)
        summary = run(args)
    except ConfigError as e:
        print(f"copd-convert: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # safetensors missing: a setup problem, not a bug
        print(f"copd-convert: error: {e} (pip install 'copd_megatron[hf]')", file=sys.stderr)
        return 2
    print(summary)
    return 0


def _cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
