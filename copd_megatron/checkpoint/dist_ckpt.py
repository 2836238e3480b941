"""Model weights through ``megatron.core.dist_checkpointing`` (torch_dist format).

A checkpoint written at one TP/PP layout loads at any other: every rank saves and loads
only its shards, described by the model's ``sharded_state_dict()``. This module holds the
model-weight path used by training and tests; run state, optimizer state, atomic ``latest``
pointers and retention build on it (see the checkpoint issue).

Scripts that save must guard their entry point with ``if __name__ == "__main__"``: the async
writer starts a multiprocessing manager.
"""

from __future__ import annotations

from pathlib import Path

from copd_megatron.config.schema import ConfigError


def _sharded_state_dict(chunks: list) -> dict:
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    # Virtual pipeline chunks are saved under model0, model1, ... (Megatron-LM's convention).
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(chunks: list, ckpt_dir: str | Path) -> None:
    """Save unwrapped ``GPTModel`` chunks (all ranks call this collectively)."""
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(chunks), str(ckpt_dir))


def load_model(chunks: list, ckpt_dir: str | Path) -> None:
    """Load weights saved at any layout into this rank's chunks (collective, strict)."""
    from megatron.core import dist_checkpointing

    if not Path(ckpt_dir, "metadata.json").is_file():
        raise ConfigError(f"{ckpt_dir}: not a torch_dist checkpoint (metadata.json is missing)")
    state = dist_checkpointing.load(_sharded_state_dict(chunks), str(ckpt_dir))
    if len(chunks) == 1:
        chunks[0].load_state_dict(state, strict=True)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"model{i}"], strict=True)
