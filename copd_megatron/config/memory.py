"""Per-GPU memory estimate of a run, per phase, from the config alone (``copd-train --check``).

Closed-form, for planning a launch: what one GPU of the busiest pipeline stage holds at the peak
of each phase. Bytes per parameter follow Megatron-Core's mixed-precision layout:

    weights      P_r · w            w = 2 (bf16 / fp16) or 4 (fp32) bytes; P_r = a rank's parameters
    gradients    P_r · g            g = 4 with precision.grad_reduce_in_fp32 (the DDP main-grad buffer), else w
    optimizer    P_r · (4·[w<4] + 8) / d    fp32 master copy (only for 16-bit weights) + Adam's two
                                    moments, sharded over the branch's d data-parallel ranks by the
                                    distributed optimizer (d = 1 without it)

``P_r`` is the largest stage's share over ``tp``: its ``L/pp`` decoder layers, the input embedding
and the vision tower on the first stage (a tied output layer is one tensor at pp = 1), the output
layer on the last. Colocated branches all keep weights and gradients on every GPU (gradient
buffers and weights of idle branches leave it with ``memory.offload_weights``: the peak then holds
the branch that works and, in Phase II, the teacher that scores it); Adam state is on the GPU for
every branch, or for the working one only with ``memory.offload_optimizer``.

Phase terms (``s`` = model.seq_length, ``b`` = micro-batch, ``h`` hidden, ``L`` layers, ``g`` KV
groups, ``d_h`` head dim, ``V`` padded vocabulary):

* generate (Megatron engine): the KV cache of all of a rank's rollouts at once,
  ``n · s · 2 · (L/pp) · ⌈g/tp⌉ · d_h · 2`` bytes with ``n = prompts_per_step / d · group_size``
  (bf16 cache); vLLM instead takes ``rollout.vllm.gpu_memory_utilization`` of the device;
* update: activations of the 1F1B schedule without recomputation, about ``s·b·h·(10 + 24/tp)``
  bytes per layer (Megatron's estimate with fused attention, no quadratic term) for ``L`` layers'
  worth of micro-batches in flight, plus fp32 logits and their gradient ``2·4·s·b·V/tp``; the ViT
  adds the same per-layer term over its patches (at most ``m²`` per prompt token);
* score (old log-probs; in Phase II also the teacher scoring the student's rollouts): one
  micro-batch's fp32 logits ``4·s·b·V/tp`` on top of the resident state.

The estimate ignores allocator fragmentation, communication buffers and CUDA context (a few GiB):
leave 10-15 % of the device free. It is no substitute for ``tests/gpu`` measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from copd_megatron.config.layout import Layout, padded_vocab_size
from copd_megatron.config.schema import Config

GiB = 1024**3


@dataclass
class PhaseMemory:
    """Bytes one GPU holds at the peak of a phase, by kind."""

    phase: str
    weights: float
    gradients: float
    optimizer: float
    transient: float  # KV cache, activations or logits of the phase
    note: str

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.transient


def rank_parameters(cfg: Config, layout: Layout) -> tuple[float, float]:
    """(parameters of one branch on the busiest rank, of which the vision tower)."""
    from copd_megatron.config.summary import count_parameters, vision_parameters

    m = cfg.model
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by)
    emb = vocab * m.hidden_size
    vision = vision_parameters(m)
    lm = count_parameters(m)
    layers = lm - emb * (1 if m.tie_embeddings else 2) - m.hidden_size  # decoder layers only
    per_stage = layers / layout.pp
    if layout.pp == 1:
        stage = per_stage + lm - layers + vision
    else:
        stage = max(per_stage + emb + vision, per_stage + emb + m.hidden_size)
    return stage / layout.tp, vision / layout.tp


def estimate_memory(cfg: Config, layout: Layout) -> list[PhaseMemory]:
    """The per-phase peaks of one GPU (module docstring)."""
    from copd_megatron.config.validate import model_branch_count

    m, par, ro = cfg.model, cfg.parallel, cfg.rollout
    branches = model_branch_count(cfg)
    here = branches if par.placement == "colocated" else 1  # branches whose weights live on this GPU
    branch_dp = layout.dp // branches if par.placement == "disjoint" and branches > 1 else layout.dp
    p, p_vis = rank_parameters(cfg, layout)
    w = 4 if cfg.precision.params_dtype == "fp32" else 2
    g = 4 if cfg.precision.grad_reduce_in_fp32 else w
    shard = branch_dp if par.use_distributed_optimizer else 1
    adam = p * ((4 if w < 4 else 0) + 8) / shard
    opt_resident = 1 if cfg.memory.offload_optimizer else here

    def resident(working: int) -> tuple[float, float, float]:
        n = min(here, working) if cfg.memory.offload_weights else here
        return n * p * w, n * p * g, opt_resident * adam

    s, b, h = m.seq_length, par.micro_batch_size, m.hidden_size
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by)
    head = m.kv_channels or h // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    logits = 4 * s * b * vocab / layout.tp
    act = s * b * h * (10 + 24 / layout.tp) * m.num_layers + 2 * logits
    if m.vision is not None and p_vis:
        v = m.vision
        merge = (v.spatial_merge_size or 1) ** 2
        act += merge * s * b * v.hidden_size * (10 + 24 / layout.tp) * v.num_layers
    seqs = ro.prompts_per_step / max(branch_dp, 1) * ro.group_size
    if ro.engine == "megatron":
        kv = seqs * s * 2 * (m.num_layers / layout.pp) * -(-groups // layout.tp) * head * 2
        gen_note = f"KV cache of {seqs:g} rollouts x {s} tokens"
    else:
        kv = 0.0
        gen_note = f"plus vLLM's rollout.vllm.gpu_memory_utilization={ro.vllm.gpu_memory_utilization:g} of the device"
    two = 2 if branches > 1 else 1
    return [
        PhaseMemory("generate", *resident(1), kv, gen_note),
        PhaseMemory("score", *resident(two), logits, "one micro-batch of fp32 logits (old log-probs, teacher)"),
        PhaseMemory("update", *resident(1), act, f"activations of micro-batches of {b}x{s} tokens, no recompute"),
    ]


def memory_lines(cfg: Config, layout: Layout) -> list[str]:
    """The table ``copd-train --check`` prints."""
    rows = estimate_memory(cfg, layout)
    out = ["memory per GPU (estimate, GiB; module copd_megatron/config/memory.py says what is counted):",
           "| phase | weights | gradients | optimizer | phase buffers | total | buffers |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        out.append(f"| {r.phase} | {r.weights / GiB:.1f} | {r.gradients / GiB:.1f} | {r.optimizer / GiB:.1f} | "
                   f"{r.transient / GiB:.1f} | {r.total / GiB:.1f} | {r.note} |")  # fmt: skip
    return out
