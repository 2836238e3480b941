"""The fake-CUDA tier: the project's code paths with every device tensor on (fake) ``cuda:0``.

One spawned process, no CPU compatibility layer, a fake world of 4 ranks (TP=2 × DP=2) on the
``fake`` process-group backend (``copd_megatron.testing.fake_cuda`` says what this checks and what it
cannot). Each scenario below runs a real code path of the project; any tensor it creates on the host
where a device tensor is needed raises ``FakeTensorDeviceMismatchError``, and any tensor handed to a
collective off the runtime device raises ``WrongDeviceError``. Negative controls show both checks
fire. About 20 s on 2 cores (one Megatron import, a tiny model).
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 100


class CharTokenizer:
    """A character tokenizer (ids 3..VOCAB-1): evaluation needs encode/decode, nothing device-related."""

    bos_id, eos_id, pad_id, vocab_size = None, 1, 0, VOCAB

    def encode(self, text: str) -> list[int]:
        return [3 + ord(c) % (VOCAB - 3) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(32 + (int(i) - 3) % 90) for i in ids if int(i) >= 3)

    def apply_chat_template(self, messages):
        return None


def _config():
    from copd_megatron.config import config_from_dict

    return config_from_dict({"schedule": {"mode": "smoke"}, "parallel": {"tp": 2, "micro_batch_size": 2},
                             "model": {"vocab_size": VOCAB}, "precision": {"params_dtype": "bf16"}})  # fmt: skip


def _branch(cfg):
    """The project's model build (provider → chunks); DDP and optimizer are out of this tier's reach."""
    from copd_megatron.distributed.groups import shared_groups
    from copd_megatron.model.build import BranchModel
    from copd_megatron.model.provider import make_provider

    provider = make_provider(cfg.model, cfg.parallel, cfg.precision)
    groups = shared_groups()
    return BranchModel(provider.build_chunks(groups), None, None, provider.tcfg, groups, provider)


def _host_batch(n: int = 3, width: int = 12):
    """An update batch as the step builds it: on the host, with every kind of field."""
    from copd_megatron.data.batch import RAGGED, ROW, TARGET, Batch

    g = torch.Generator().manual_seed(0)
    b = Batch(torch.randint(3, VOCAB, (n, width), generator=g))
    mask = torch.zeros(n, width - 1)
    mask[:, 4:9] = 1.0
    b.set("loss_mask", mask, TARGET)
    b.set("advantages", torch.randn(n, width - 1, generator=g) * mask, TARGET)
    b.set("old_logprobs", -torch.rand(n, width - 1, generator=g), TARGET)
    b.set("opd_weight", torch.tensor([0.0, 1.0, 1.0])[:n], ROW)
    b.set("teacher_topk_ids", torch.randint(0, VOCAB, (n, width - 1, 4), generator=g), TARGET)
    b.set("teacher_topk_vals", torch.randn(n, width - 1, 4, generator=g), TARGET)
    b.set("media", [{} for _ in range(n)], RAGGED)
    return b


def _on(t, kind: str) -> bool:
    return t.device.type == kind


def sc_build(cfg, br, log):
    devs = {str(t.device) for c in br.chunks for t in [*c.parameters(), *c.buffers()]}
    assert devs == {"cuda:0"}, devs


def sc_train_forward(cfg, br, log):
    """Micro-batches of a host batch → policy loss (GRPO + top-k OPD term) → metrics reduced over DP."""
    from copd_megatron.distributed.device import runtime_device
    from copd_megatron.training.policy import make_policy_loss
    from copd_megatron.training.step import _forward_step, lm_loss, reduce_metrics, run_schedule

    opd = cfg.opd.__class__(loss="topk_kl", topk=4)
    loss_fn = make_policy_loss(cfg.loss, opd, temperature=0.7, vocab_size=VOCAB, max_len=8, tp_group=br.groups.tp)
    mbs = _host_batch().micro_batches(2, pad_multiple=16, device=runtime_device())
    assert all(mb.tokens.shape[1] == 16 and _on(mb.fields["advantages"], "cuda") for mb in mbs)
    before = len(log.calls)
    reduced = run_schedule(br, mbs, _forward_step(br, loss_fn, False), forward_only=True)
    totals = reduce_metrics(reduced, br.groups)
    assert {"loss", "entropy", "clip_frac"} <= set(totals) or "loss" in totals, totals
    lm = run_schedule(br, mbs, _forward_step(br, lm_loss, True), forward_only=True)  # smoke's LM loss
    reduce_metrics(lm, br.groups)
    assert any(name == "all_reduce" for name, _, _ in log.calls[before:])


def sc_sft_forward(cfg, br, log):
    """The base-making SFT batches (tools/make_base.py) through the LM loss."""
    from copd_megatron.training.sft import sft_microbatches
    from copd_megatron.training.step import _forward_step, lm_loss, reduce_metrics, run_schedule

    mbs = sft_microbatches(CharTokenizer(), [("12+3=", "15"), ("sort: b a", "a b")] * 2, 2, 0)
    reduce_metrics(run_schedule(br, mbs, _forward_step(br, lm_loss, True), forward_only=True), br.groups)


def sc_score_logprobs_topk(cfg, br, log):
    """Old log-probs and a teacher's top-k / logits: per-token results back on the host, logits on the device."""
    from copd_megatron.training.worker import WorkerSettings, score_batch

    s = WorkerSettings(vocab_size=VOCAB, temperature=1.0, micro_batch_size=2, max_new_tokens=8, loss=cfg.loss,
                       opd=cfg.opd, pad_multiple=16)  # fmt: skip
    batch = _host_batch()
    res = score_batch(br, batch, s, logprobs=True, topk=4, full_logits=True)
    assert res["logprobs"].shape == (3, 11) and _on(res["logprobs"], "cpu")
    assert res["topk_ids"].shape == (3, 11, 4) and _on(res["topk_ids"], "cpu") and _on(res["topk_vals"], "cpu")
    assert all(_on(row, "cuda") for row in res["logits"])
    # The behaviour metric of the step (top-k overlap, KL estimate) on those host results, reduced over DP.
    from copd_megatron.copd.step import dp_mean, dp_sum
    from copd_megatron.losses import ids_overlap

    ov = ids_overlap(res["topk_ids"], res["topk_ids"])
    assert dp_sum([float(ov.sum()), 0.0, 1.0], br.groups) and dp_mean({"a": (1.0, 1.0)}, br.groups)


def _engine(br, tok):
    from copd_megatron.rollout.megatron_engine import MegatronEngine

    return MegatronEngine(br.chunks[0], VOCAB, tok.pad_id, tok.decode, provider=br.provider, groups=br.groups)


def sc_rollout(cfg, br, log):
    """Prefill + KV-cached decode (sampled and greedy, stop ids and strings); the rollout ends on the host."""
    from copd_megatron.rollout.types import GenerationRequest, SamplingParams

    tok = CharTokenizer()
    eng = _engine(br, tok)
    reqs = [GenerationRequest(tok.encode(p), seed=i) for i, p in enumerate(["12+3=", "sort: b a", "7"])]
    before = len(log.calls)
    for params in (SamplingParams(max_new_tokens=4, temperature=0.8, top_p=0.9, top_k=5, stop_token_ids=(1,)),
                   SamplingParams(max_new_tokens=3, greedy=True, stop_strings=("\n",))):  # fmt: skip
        out = eng.generate(reqs, params)
        assert all(_on(t, "cpu") for t in (out.tokens, out.logprobs, out.response_mask, out.response_lens))
    assert any(name == "broadcast" for name, _, _ in log.calls[before:])  # TP rank 0's sample to the TP group


def sc_evaluate(cfg, br, log):
    """Held-out evaluation (greedy + sampled) with counts reduced over the data-parallel group."""
    from copd_megatron.data.prompts import PromptSample
    from copd_megatron.rollout.evaluate import evaluate

    tok = CharTokenizer()
    items = [PromptSample(f"{i}+1=", str(i + 1), "arith") for i in range(4)]
    table = evaluate(_engine(br, tok), tok, {"arith": (items, lambda c, s: float(c.strip() == s.answer))},
                     max_new_tokens=3, stop=["\n"], samples=2, groups=br.groups)  # fmt: skip
    assert set(table["arith"]) == {"pass@1", "mean@2", "n"}


def sc_flags_and_broadcasts(cfg, br, log):
    """PreemptionFlag's cross-rank test and the broadcast helpers move host tensors through the device."""
    from types import SimpleNamespace

    from copd_megatron.checkpoint.manager import PreemptionFlag
    from copd_megatron.distributed.comm import broadcast_tree

    before = len(log.calls)
    assert PreemptionFlag.should_stop(SimpleNamespace(received=None)) is False
    tree = broadcast_tree({"ids": torch.arange(6).view(2, 3), "n": 2}, 0, br.groups.dp)
    assert _on(tree["ids"], "cpu")  # arrives on the kind it left from
    assert {dev for _, _, dev in log.calls[before:]} == {"cuda:0"}


def sc_negative_host_microbatch(cfg, br, log):
    """Control: a micro-batch left on the host must fail in the model's forward."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    from copd_megatron.training.forward import forward_collect

    mbs = _host_batch().micro_batches(2)  # no device=: stays on the host
    with pytest.raises(FakeTensorDeviceMismatchError):
        forward_collect(br, mbs, lambda logits, mb: {"x": logits.sum(-1)})


def sc_negative_host_collective(cfg, br, log):
    """Control: an all-reduce of a host tensor (what the metric reductions used to do) must fail."""
    import torch.distributed as dist

    from copd_megatron.testing.fake_cuda import WrongDeviceError

    with pytest.raises(WrongDeviceError, match="all_reduce"):
        dist.all_reduce(torch.zeros(3, dtype=torch.float64), group=br.groups.dp)


SCENARIOS = [sc_build, sc_train_forward, sc_sft_forward, sc_score_logprobs_topk, sc_rollout, sc_evaluate, sc_flags_and_broadcasts,
             sc_negative_host_microbatch, sc_negative_host_collective]  # fmt: skip


def run_tier() -> dict[str, str]:
    """Every scenario in one fake world; name → 'ok' or the scenario's traceback."""
    import traceback

    from copd_megatron.testing.fake_cuda import fake_cuda_world

    out = {}
    with fake_cuda_world(tp=2, dp=2) as log:
        cfg = _config()
        br = _branch(cfg)
        for sc in SCENARIOS:
            try:
                sc(cfg, br, log)
                out[sc.__name__] = "ok"
            except BaseException:  # noqa: BLE001 - reported per scenario
                out[sc.__name__] = traceback.format_exc()
    return out


@pytest.fixture(scope="module")
def tier() -> dict[str, str]:
    from copd_megatron.testing.fake_cuda import run_isolated

    return run_isolated(run_tier, timeout=300)


@pytest.mark.parametrize("name", [sc.__name__ for sc in SCENARIOS])
def test_fake_cuda_scenario(tier: dict[str, str], name: str) -> None:
    assert tier[name] == "ok", tier[name]


def test_collective_check_names_the_collective_and_passes_device_tensors() -> None:
    """The check itself, without a world: a wrapper that sees the tensors of every collective."""
    import torch.distributed as dist

    from copd_megatron.testing.fake_cuda import WrongDeviceError, collective_device_check

    seen = []
    real = dist.all_reduce
    try:
        dist.all_reduce = lambda t, *a, **k: seen.append(t)  # no process group needed
        with collective_device_check(torch.device("meta")) as log:
            dist.all_reduce(torch.empty(2, device="meta"))
            with pytest.raises(WrongDeviceError, match=r"all_reduce: tensor \(3,\) torch.float32 is on cpu"):
                dist.all_reduce(torch.zeros(3))
    finally:
        dist.all_reduce = real
    assert len(seen) == 1 and log.calls[0] == ("all_reduce", (2,), "meta")
