"""``copd-convert``: Hugging Face ⇄ Megatron torch_dist checkpoints (Llama-3, Qwen2/2.5, Qwen3).

    copd-convert hf-to-mcore --hf-dir ./Qwen3-8B --out ckpt/qwen3-8b          # then load at any TP/PP
    copd-convert mcore-to-hf --mcore-dir runs/x/merged --arch Qwen3ForCausalLM \\
        --tokenizer-dir ./Qwen3-8B --out hf/merged

The conversion runs in one process at TP=1/PP=1; dist_checkpointing reshards when the
checkpoint is loaded at another layout (and reads any layout on export). The built-in mappings
(``checkpoint/hf.py``) hold one full copy of the weights in CPU memory; ``--backend bridge``
uses Megatron-Bridge (more families, streaming) when it is installed. Output: safetensors +
``config.json`` (+ tokenizer files copied from ``--tokenizer-dir``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from copd_megatron.checkpoint.hf import ARCHITECTURES, hf_config_from_model, hf_to_mcore, mcore_to_hf, model_config_from_hf
from copd_megatron.config.schema import ConfigError, ParallelConfig, PrecisionConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", "vocab.json", "merges.txt")  # fmt: skip


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{hf_dir}: no *.safetensors files")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _build(model_cfg):
    from copd_megatron.model.build import build_model_chunks

    model_cfg.transformer_impl = "local"  # the built-in mappings name local-spec parameters
    (chunk,) = build_model_chunks(model_cfg, ParallelConfig(), PrecisionConfig(params_dtype="fp32"))
    return chunk


def hf_to_mcore_dir(hf_dir: Path, out: Path) -> None:
    from copd_megatron.checkpoint.dist_ckpt import save_model
    from copd_megatron.config.load import config_from_dict

    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    fields = model_config_from_hf(hf_cfg, str(hf_dir / "config.json"))
    model_cfg = config_from_dict({"model": fields, "schedule": {"mode": "smoke"}}).model
    chunk = _build(model_cfg)
    state = {k: v.float() for k, v in hf_to_mcore(read_hf_weights(hf_dir), model_cfg).items()}
    missing, unexpected = chunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ConfigError(f"{hf_dir}: weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    save_model([chunk], out, model_cfg, "fp32")


def mcore_to_hf_dir(mcore_dir: Path, out: Path, arch: str, tokenizer_dir: Path | None) -> None:
    from safetensors.torch import save_file

    from copd_megatron.checkpoint.dist_ckpt import load_model, read_meta

    model_cfg, _ = read_meta(mcore_dir)
    hf_cfg = hf_config_from_model(model_cfg, arch)
    chunk = _build(model_cfg)
    load_model([chunk], mcore_dir)
    state = {k: v for k, v in chunk.state_dict().items() if isinstance(v, torch.Tensor) and "_extra_state" not in k}
    out.mkdir(parents=True, exist_ok=True)
    save_file(mcore_to_hf(state, model_cfg), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    for name in TOKENIZER_FILES if tokenizer_dir else ():
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="copd-convert", description="Hugging Face <-> Megatron torch_dist checkpoints.")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("hf-to-mcore")
    a.add_argument("--hf-dir", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("mcore-to-hf")
    b.add_argument("--mcore-dir", type=Path, required=True)
    b.add_argument("--arch", required=True, choices=ARCHITECTURES)
    b.add_argument("--tokenizer-dir", type=Path)
    b.add_argument("--out", type=Path, required=True)
    for s in (a, b):
        s.add_argument("--backend", choices=["builtin", "bridge"], default="builtin")
    return p


def main(argv: list[str] | None = None) -> int:
    from copd_megatron.config.layout import Layout
    from copd_megatron.distributed.init import destroy_distributed, init_distributed, init_model_parallel, read_dist_env, set_seed
    from copd_megatron.utils.logging import setup_logging

    import torch.distributed as dist

    args = _parser().parse_args(argv)
    try:
        if args.backend == "bridge":
            try:
                import megatron.bridge  # noqa: F401
            except ImportError:
                raise ConfigError("--backend bridge: Megatron-Bridge is not installed (pip install megatron-bridge)") from None
            raise ConfigError("--backend bridge: not wired yet in this version; use --backend builtin")
        src = args.hf_dir if args.cmd == "hf-to-mcore" else args.mcore_dir
        if not src.is_dir():
            raise ConfigError(f"{src}: directory not found")
        if args.cmd == "hf-to-mcore" and not (src / "config.json").is_file():
            raise ConfigError(f"{src}: config.json is missing")
    except ConfigError as e:
        print(f"copd-convert: error: {e}", file=sys.stderr)
        return 2
    env = read_dist_env()
    setup_logging("WARNING", env.rank)
    owns = not dist.is_initialized()
    init_distributed(env)
    try:
        init_model_parallel(Layout(env.world_size, 1, 1, 1, 1, env.world_size, None))
        set_seed(0)
        if args.cmd == "hf-to-mcore":
            hf_to_mcore_dir(args.hf_dir, args.out)
        else:
            mcore_to_hf_dir(args.mcore_dir, args.out, args.arch, args.tokenizer_dir)
    except ConfigError as e:
        print(f"copd-convert: error: {e}", file=sys.stderr)
        return 2
    finally:
        if owns:
            destroy_distributed()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
