"""Hugging Face safetensors ⇄ Megatron torch_dist checkpoints (the work behind ``copd-convert``).

Import builds the model once, at TP=1/PP=1, in a single process (gloo on CPU) and saves it
with ``dist_checkpointing``, which reshards on load: the checkpoint loads at any TP/PP
layout. Export reads a checkpoint saved at any layout (by the trainer, ``copd-merge``, ...)
straight from its torch_dist files, without building a model. The tensor mapping itself is
``checkpoint/hf.py`` (pure functions).

Memory (B = the weights' size in the checkpoint's dtype):

* HF → Megatron, ≈ 1·B: the safetensors files are memory-mapped and read one tensor at a
  time; each mapped tensor (one fused QKV or gate/up at most) is copied into the model's
  parameter and dropped. The model is built without random initialisation. The one copy is
  what ``dist_checkpointing.save`` needs: it writes a whole state dict in one call.
* Megatron → HF, ≈ one decoder layer + one output shard: :class:`TorchDistReader` reads one
  layer's slice of every stacked ``[L, ...]`` tensor at a time (only the stored shards that
  overlap it), HF tensors are produced one at a time and buffered up to ``max_shard_bytes``
  before a safetensors shard is written (one file if it fits, else
  ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).

Files written next to the torch_dist shards on import: ``copd_meta.yaml`` (architecture and
dtype, read by every tool), ``model.yaml`` (a config fragment: the ``model:`` section and
``checkpoint.base``) and ``hf_config.json`` (the source config.json, reused as the template
when that directory is exported, so token ids and other non-architectural fields survive).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from copd_megatron.checkpoint.hf import (
    hf_config_from_model,
    checkpoint_names,
    hf_shapes,
    hf_to_mcore_iter,
    mcore_shapes,
    mcore_to_hf_iter,
    model_fields_from_hf,
)
from copd_megatron.config.schema import ConfigError, ModelConfig

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
HF_CONFIG_COPY = "hf_config.json"
MODEL_FRAGMENT = "model.yaml"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------- HF files


class HFCheckpointReader:
    """Lazy access to the tensors of an HF safetensors checkpoint (one file or sharded)."""

    def __init__(self, hf_dir: Path) -> None:
        from safetensors import safe_open

        self.dir, self._open, self._handles = hf_dir, safe_open, {}
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: hf_dir / f for name, f in weight_map.items()}
        else:
            self.files = {}
            for f in sorted(hf_dir.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    self.files.update({name: f for name in h.keys()})  # noqa: SIM118 (safe_open is no dict)
        if not self.files:
            has_bin = any(hf_dir.glob("*.bin"))
            hint = "; *.bin weights are not supported: re-save with safe_serialization=True" if has_bin else ""
            raise ConfigError(f"{hf_dir}: no *.safetensors weights{hint}")

    def names(self) -> set[str]:
        return set(self.files)

    def _handle(self, name: str):
        if name not in self.files:
            raise ConfigError(f"{self.dir}: tensor {name} is missing (config.json implies it)")
        f = self.files[name]
        if f not in self._handles:
            self._handles[f] = self._open(str(f), framework="pt")
        return self._handles[f]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)


class ShardedSafetensorsWriter:
    """Write tensors as they come into safetensors shards of at most ``max_shard_bytes``."""

    def __init__(self, out: Path, max_shard_bytes: int, dtype: torch.dtype) -> None:
        self.out, self.max, self.dtype = out, max_shard_bytes, dtype
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = self.total = 0
        self.shards: list[list[str]] = []  # tensor names per written shard

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().to(self.dtype).contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger tensor (a split QKV, the trimmed vocab): save only its bytes
        if self.buffer and self.buffered + t.nbytes > self.max:
            self._flush()
        self.buffer[name], self.buffered, self.total = t, self.buffered + t.nbytes, self.total + t.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.buffer, str(self.out / f".shard-{len(self.shards):05d}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def close(self) -> list[Path]:
        """Name the shards the way transformers expects; write the index when there are several."""
        if self.buffer:
            self._flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.out / f".shard-{i:05d}.tmp").rename(self.out / name)
        if n > 1:
            weight_map = {t: names[i] for i, shard in enumerate(self.shards) for t in shard}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return [self.out / n for n in names]


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir}: config.json is missing")
    return json.loads(path.read_text())


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy whichever tokenizer / generation files exist in ``src``; returns their names."""
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copy(src / name, dst / name)
    return copied


# ----------------------------------------------------------------------------- the model


@contextlib.contextmanager
def single_process_world() -> Iterator[None]:
    """A world of one (reusing an existing one-process group) with TP=1/PP=1 Megatron groups."""
    import torch.distributed as dist

    from copd_megatron.config.layout import Layout
    from copd_megatron.distributed.init import (
        DistEnv,
        destroy_distributed,
        init_distributed,
        init_model_parallel,
        set_seed,
    )

    owns = not dist.is_initialized()
    if owns:  # never read torchrun/Slurm variables: a stray SLURM_NTASKS would make us wait for peers
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        init_distributed(DistEnv(0, 1, 0, "127.0.0.1", port, "single"))
    try:
        if dist.get_world_size() != 1:
            raise ConfigError("copd-convert runs in one process; launch it without torchrun/srun")
        init_model_parallel(Layout(1, 1, 1, 1, 1, 1, None))
        set_seed(0)  # Megatron's RNG tracker must exist to build a model, even one that is then overwritten
        yield
    finally:
        if owns:
            destroy_distributed()


def build_full_model(m: ModelConfig, params_dtype: str):
    """The whole model (TP=1/PP=1, local spec) with uninitialised weights, to be overwritten."""
    from copd_megatron.config.schema import ParallelConfig, PrecisionConfig
    from copd_megatron.model.build import build_model_chunks, transformer_config

    # torch_dist keys are the same for the local and the TE spec (Megatron maps the local
    # spec's norms to TE's fused names on save), so building local reads and writes both.
    m = dataclasses.replace(m, transformer_impl="local")
    parallel, precision = ParallelConfig(), PrecisionConfig(params_dtype=params_dtype)
    config = transformer_config(m, parallel, precision)
    config.perform_initialization = False  # every weight is overwritten: skip the random init
    (chunk,) = build_model_chunks(m, parallel, precision, config)
    return chunk


def _model_config(fields: dict, source: str) -> ModelConfig:
    from copd_megatron.config.load import config_from_dict

    return config_from_dict({"model": fields, "schedule": {"mode": "smoke"}}, source=source).model


def load_model_config_yaml(path: Path) -> ModelConfig:
    """The ``model:`` section of a run config or fragment (a bare section is accepted too)."""
    if not path.is_file():
        raise ConfigError(f"--model-config: {path} not found")
    tree = yaml.safe_load(path.read_text()) or {}
    return _model_config(tree.get("model", tree), str(path))


# ----------------------------------------------------------------------------- HF → Megatron


def _check_hf_names(reader: HFCheckpointReader, m: ModelConfig) -> None:
    """Refuse tensors the config does not explain (a silently dropped weight is a wrong model)."""
    extra = sorted(n for n in reader.names() - set(hf_shapes(m)) if not n.endswith("rotary_emb.inv_freq"))
    if m.tie_embeddings and "lm_head.weight" in extra:
        # Some tied checkpoints store the shared matrix twice; accept it only if it is the same.
        if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise ConfigError(f"{reader.dir}: tie_word_embeddings=true but lm_head.weight differs from embed_tokens")
        extra.remove("lm_head.weight")
    if extra:
        raise ConfigError(f"{reader.dir}: {len(extra)} tensors the config does not explain, e.g. {extra[0]}")


def _import_dtype(requested: str, hf_cfg: dict, reader: HFCheckpointReader) -> str:
    if requested != "auto":
        return requested
    named = hf_cfg.get("torch_dtype") or hf_cfg.get("dtype")
    if named in _HF_DTYPES:
        return _HF_DTYPES[named]
    return _NAMES.get(reader.get("model.embed_tokens.weight").dtype, "fp32")


def import_hf(
    hf_dir: Path, out: Path, *, params_dtype: str = "auto", make_vocab_size_divisible_by: int = 128,
    final_dir: Path | None = None,
) -> ModelConfig:
    """Convert an HF Llama-3 / Qwen2 / Qwen3 directory to a torch_dist checkpoint in ``out``
    (``final_dir``: where ``out`` will be renamed to, named in ``model.yaml``; default ``out``)."""
    from copd_megatron.checkpoint.dist_ckpt import save_model

    hf_cfg = read_hf_config(hf_dir)
    fields = model_fields_from_hf(hf_cfg, str(hf_dir / "config.json"), make_vocab_size_divisible_by)
    m = _model_config(fields, str(hf_dir / "config.json"))
    reader = HFCheckpointReader(hf_dir)
    _check_hf_names(reader, m)
    dtype = _import_dtype(params_dtype, hf_cfg, reader)
    with single_process_world():
        chunk = build_full_model(m, dtype)
        params = dict(chunk.named_parameters())
        filled: set[str] = set()
        with torch.no_grad():
            for name, t in hf_to_mcore_iter(reader.get, m):
                if name not in params or params[name].shape != t.shape:
                    got = tuple(params[name].shape) if name in params else "absent"
                    raise ConfigError(f"{hf_dir}: {name} maps to shape {tuple(t.shape)}, the model has {got}")
                params[name].copy_(t)
                filled.add(name)
        if set(params) - filled:
            raise ConfigError(f"{hf_dir}: no HF tensor for {min(set(params) - filled)}")
        out.mkdir(parents=True, exist_ok=True)
        save_model([chunk], out, m, dtype)
    (out / HF_CONFIG_COPY).write_text(json.dumps(hf_cfg, indent=2))
    fragment = {"model": dataclasses.asdict(m), "checkpoint": {"base": str(final_dir or out)}}
    header = f"# copd-convert hf-to-mcore --hf-dir {hf_dir}: paste into a run config (or merge the sections)\n"
    (out / MODEL_FRAGMENT).write_text(header + yaml.safe_dump(fragment, sort_keys=False))
    return m


# ----------------------------------------------------------------------------- Megatron → HF


def _template(mcore_dir: Path, hf_config: Path | None, tokenizer_dir: Path | None) -> dict | None:
    """The config.json whose non-architectural fields the export keeps (first that exists):
    ``--hf-config``, the ``hf_config.json`` saved on import, ``<tokenizer-dir>/config.json``."""
    if hf_config is not None:
        if not hf_config.is_file():
            raise ConfigError(f"--hf-config: {hf_config} not found")
        return json.loads(hf_config.read_text())
    for path in (mcore_dir / HF_CONFIG_COPY, tokenizer_dir / "config.json" if tokenizer_dir else None):
        if path is not None and path.is_file():
            return json.loads(path.read_text())
    return None


def _export_dtype(requested: str, template: dict | None, saved: torch.dtype) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    named = (template or {}).get("torch_dtype") or (template or {}).get("dtype")
    return DTYPES[_HF_DTYPES[named]] if named in _HF_DTYPES else saved


_LAYER = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")


class TorchDistReader:
    """Full tensors of a torch_dist checkpoint (saved at any TP/PP layout), read on demand, one
    decoder layer at a time, without building the model.

    Megatron stores the decoder's weights stacked over layers (``decoder.layers.<name>`` of
    global shape ``[L, ...]``; older or heterogeneous checkpoints use ``decoder.layers.<i>.<name>``).
    Asking for any tensor of layer ``i`` reads that layer's slice of every stacked tensor in one
    :func:`~copd_megatron.checkpoint.dist_ckpt.read_chunks` call, which reassembles it from
    whatever shards were saved; the previous layer is dropped. Resident at a time: one layer, or
    the embedding / output layer. Every tensor is checked (present, global shape) before
    anything is read, and ``.metadata`` is read once.
    """

    def __init__(self, ckpt_dir: Path, m: ModelConfig) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from copd_megatron.checkpoint.dist_ckpt import verify_files

        self.metadata = verify_files(ckpt_dir)
        self.dir, self.layers = ckpt_dir, m.num_layers
        saved = {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self.where: dict[str, tuple[str, int | None, tuple[int, ...], torch.dtype]] = {}
        self.groups: dict[str, list[str]] = {}  # read together: one decoder layer, or one tensor
        for name, shape in mcore_shapes(m).items():
            self.where[name] = self._locate(name, shape, saved)
            self.groups.setdefault(self._group_of(name), []).append(name)
        # A trainer checkpoint adds optimizer.* state; any other tensor the config does not
        # explain (Qwen3's QK-norm exported with a Llama config, say) would be silently dropped.
        explained = {key for key, *_ in self.where.values()}
        extra = sorted(k for k in saved if k not in explained and not k.startswith("optimizer."))
        if extra:
            raise ConfigError(f"{ckpt_dir}: {len(extra)} checkpoint tensors the model config does not explain, "
                              f"e.g. {extra[0]!r} (wrong --model-config or copd_meta.yaml?)")  # fmt: skip
        self._group: str | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self.reads: list[int] = []  # bytes requested by each read (for the log and the tests)

    def _locate(self, name: str, shape: tuple[int, ...], saved: dict) -> tuple:
        """(checkpoint key, layer index or None, shape to read, dtype), or a one-line error."""
        candidates = []
        for key in checkpoint_names(name):
            candidates.append((key, None, shape))  # per-layer key, or a tensor outside the decoder layers
            layer = _LAYER.match(key)
            if layer:  # the stacked form: one tensor [L, ...] for all layers
                candidates.append((f"decoder.layers.{layer[2]}", int(layer[1]), (self.layers, *shape)))
        for key, index, want in candidates:
            if key in saved:
                got = tuple(saved[key].size)
                if got != want:
                    raise ConfigError(f"{self.dir}: tensor {key!r} has shape {got} but the model config implies {want}"
                                      " (another architecture, or the wrong --model-config)")  # fmt: skip
                return key, index, shape, saved[key].properties.dtype
        raise ConfigError(f"{self.dir}: tensor {candidates[0][0]!r} is not in the checkpoint "
                          "(another architecture, or not a model checkpoint)")  # fmt: skip

    @staticmethod
    def _group_of(name: str) -> str:
        layer = _LAYER.match(name)
        return f"layer {layer[1]}" if layer else name

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise ConfigError(f"{self.dir}: no tensor {name} in this model")
        group = self._group_of(name)
        if group != self._group:
            self._cache = {}  # drop the previous layer before reading the next
            self._cache = self._read(self.groups[group])
            self._group = group
        return self._cache[name]

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from copd_megatron.checkpoint.dist_ckpt import read_chunks

        out, requests = {}, {}
        for name in names:
            key, index, shape, dtype = self.where[name]
            if index is None:
                out[name] = torch.empty(shape, dtype=dtype)
                requests[key] = ((0,) * len(shape), out[name])
            else:  # layer `index` of the stacked [L, ...] tensor
                buffer = torch.empty((1, *shape), dtype=dtype)
                requests[key] = ((index,) + (0,) * len(shape), buffer)
                out[name] = buffer[0]
        read_chunks(self.dir, self.metadata, requests)
        self.reads.append(sum(t.nbytes for t in out.values()))
        return out


def export_hf(
    mcore_dir: Path, out: Path, *, model: ModelConfig | None = None, arch: str | None = None,
    hf_config: Path | None = None, tokenizer_dir: Path | None = None, dtype: str = "auto",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:  # fmt: skip
    """Write ``out``: safetensors (sharded above ``max_shard_bytes``), config.json, tokenizer files."""
    from copd_megatron.checkpoint.dist_ckpt import read_meta

    m = model or read_meta(mcore_dir)[0]
    template = _template(mcore_dir, hf_config, tokenizer_dir)
    cfg = hf_config_from_model(m, arch, template)  # before the heavy work: config errors come first
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise ConfigError(f"--tokenizer-dir: {tokenizer_dir} is not a directory")
    reader = TorchDistReader(mcore_dir, m)  # checks every tensor before anything is read or written
    saved = reader.where["embedding.word_embeddings.weight"][3]
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardedSafetensorsWriter(out, max_shard_bytes, _export_dtype(dtype, template, saved))
    for name, t in mcore_to_hf_iter(reader.get, m):  # one layer resident at a time
        writer.add(name, t)
    files = writer.close()
    logger.info("read %d tensors in %d calls, largest %.1f MB", len(reader.where), len(reader.reads),
                max(reader.reads) / 2**20)  # fmt: skip
    cfg["torch_dtype" if "dtype" not in cfg else "dtype"] = str(writer.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer_dir is not None:
        copied = copy_tokenizer_files(tokenizer_dir, out)
        if not copied:
            logger.warning("%s: no tokenizer files found (%s)", tokenizer_dir, ", ".join(TOKENIZER_FILES))
    return files


# ----------------------------------------------------------------------------- Megatron-Bridge


def bridge_available() -> bool:
    """Whether Megatron-Bridge can be imported (checked without importing its GPU stack)."""
    import importlib.util
    import sys

    if "megatron.bridge" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("megatron.bridge") is not None
    except (ImportError, ValueError):
        return False


def _bridge():
    try:
        from megatron.bridge import AutoBridge
    except ImportError:
        raise ConfigError(
            "--backend bridge: Megatron-Bridge is not installed (pip install megatron-bridge; it needs the GPU stack)"
        ) from None
    return AutoBridge


def import_hf_bridge(hf_dir: Path, out: Path) -> None:
    """HF → Megatron through Megatron-Bridge (its checkpoint layout: ``out/iter_0000000``)."""
    _bridge().import_ckpt(str(hf_dir), str(out))


def export_hf_bridge(mcore_dir: Path, out: Path, hf_reference: Path) -> None:
    """Megatron → HF through Megatron-Bridge, for a checkpoint Bridge wrote; ``hf_reference``
    is an HF directory with the model's config.json (and tokenizer)."""
    _bridge().from_hf_pretrained(str(hf_reference)).export_ckpt(str(mcore_dir), str(out))

