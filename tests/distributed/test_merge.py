"""copd-merge: shard-local merging through dist_checkpointing equals merging the full tensors."""

from __future__ import annotations

import torch
import torch.distributed as dist

from copd_megatron.checkpoint.merge import merge_tensor
from copd_megatron.testing import run_distributed


def _perturb(model, base: dict, seed: int) -> None:
    """Set every parameter to its ``base`` value plus seeded N(0, 0.05²) noise (a fake fine-tune)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(base[name] + 0.05 * torch.randn_like(p))


def _save_models(root: str, tp: int, num_layers: int = 2) -> None:
    """Base + three branches (base + noise), saved at TP=``tp``."""
    from copd_megatron.checkpoint.dist_ckpt import save_model
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": {"preset": "tiny", "num_layers": num_layers},
                            "parallel": {"tp": tp}, "precision": {"params_dtype": "fp32"}})  # fmt: skip
    init_model_parallel(validate(cfg, dist.get_world_size()))
    set_seed(0)
    (model,) = build_model_chunks(cfg.model, cfg.parallel, cfg.precision)
    save_model([model], f"{root}/base", cfg.model, "fp32")
    base = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for i in range(3):
        _perturb(model, base, seed=100 + i)
        save_model([model], f"{root}/b{i}", cfg.model, "fp32")


def _merge_all(runs: list[list[str]], plain_dirs: list[str]) -> list[dict]:
    """Several merges in one world (start-up costs seconds), then the full tensors of ``plain_dirs``."""
    from megatron.core import dist_checkpointing

    from copd_megatron.checkpoint.merge_cli import main

    for args in runs:
        assert main(args) == 0
    return [dist_checkpointing.load_plain_tensors(d) for d in plain_dirs]


def test_merge_matches_full_tensor_merge_at_any_layout(tmp_path):
    root = str(tmp_path)
    run_distributed(_save_models, 2, args=(root, 2), timeout=120)  # branches saved at TP=2
    inputs = [f"{root}/b{i}" for i in range(3)]
    runs = {1: [["--inputs", *inputs, "--out", f"{root}/avg"]], 2: []}
    for method, extra in (("ties", ["--density", "0.3"]), ("dare", ["--drop-p", "0.5", "--seed", "3"])):
        args = ["--inputs", *inputs, "--base", f"{root}/base", "--method", method, *extra]
        runs[2].append(args + ["--out", f"{root}/{method}2", "--tp", "2"])
        runs[1].append(args + ["--out", f"{root}/{method}1"])
    # TIES and DARE at TP=2, then everything at TP=1 (the average from TP=2 inputs: another layout).
    run_distributed(_merge_all, 2, args=(runs[2], []), timeout=180)
    outs = ["avg", "ties2", "ties1", "dare2", "dare1"]
    plain = run_distributed(_merge_all, 1, args=(runs[1], [f"{root}/base", *inputs] + [f"{root}/{o}" for o in outs]),
                            timeout=180)[0]  # fmt: skip
    base, branches = plain[0], plain[1:4]
    avg, ties2, ties1, dare2, dare1 = plain[4:]
    keys = [k for k, v in avg.items() if isinstance(v, torch.Tensor)]
    assert "decoder.layers.mlp.linear_fc1.weight" in keys
    for key in keys:
        full = [b[key] for b in branches]
        torch.testing.assert_close(avg[key], sum(full) / 3, rtol=1e-6, atol=1e-6, msg=key)
        # The same method at TP=2 and TP=1 gives the same tensors (layout-independent masks/thresholds).
        torch.testing.assert_close(ties2[key], ties1[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(dare2[key], dare1[key], rtol=0, atol=0, msg=key)
    # Stacked layer tensors ([L, ...]) merge per layer, like the model's per-layer parameters.
    key = "decoder.layers.self_attention.linear_qkv.weight"
    for layer in range(2):
        ref = merge_tensor([b[key][layer] for b in branches], "ties", base=base[key][layer], density=0.3)
        torch.testing.assert_close(ties1[key][layer], ref, msg="TIES vs the whole-tensor reference")
    assert not torch.equal(dare1[key], avg[key])


def _save_two_architectures(a: str, b: str) -> None:
    from megatron.core import parallel_state as ps

    _save_models(a, 1, 2)
    ps.destroy_model_parallel()
    _save_models(b, 1, 4)


def test_merge_refuses_bad_inputs_with_one_line_errors(tmp_path, capsys):
    import shutil

    from copd_megatron.checkpoint.merge_cli import main

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_distributed(_save_two_architectures, 1, args=(a, b), timeout=120)
    assert main(["--inputs", f"{a}/b0", f"{b}/b0", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "architecture differs" in err and "model.num_layers is 4, not 2" in err
    assert main(["--inputs", f"{a}/b0", f"{a}/b1", "--method", "ties", "--out", str(tmp_path / "m")]) == 2
    assert "--method ties: needs --base" in capsys.readouterr().err
    assert main(["--inputs", f"{a}/b0", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    assert "--inputs: " in (err := capsys.readouterr().err) and "nope does not exist" in err


    # A partial checkpoint directory: the missing file is named.
    for missing in ("metadata.json", "copd_meta.yaml"):
        broken = tmp_path / f"broken_{missing}"
        shutil.copytree(f"{a}/b1", broken)
        (broken / missing).unlink()
        assert main(["--inputs", f"{a}/b0", str(broken), "--out", str(tmp_path / "m")]) == 2
        assert missing in capsys.readouterr().err


def _trainer_branches_and_base(root: str) -> dict:
    """A weights-only base (make_base's format) and two branches saved the trainer's way (weights
    + Adam state + scheduler), as `copd-merge --base` meets them after `schedule.mode=expert`;
    then TIES-merge them through the CLI and return the full tensors of base, branches, result."""
    from pathlib import Path

    from megatron.core import dist_checkpointing

    from copd_megatron.checkpoint.dist_ckpt import save_model
    from copd_megatron.checkpoint.manager import _materialise_optimizer_state, save_branch
    from copd_megatron.checkpoint.merge_cli import main
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_branch

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": {"preset": "tiny", "num_layers": 2},
                            "precision": {"params_dtype": "fp32"}, "optimizer": {"name": "adam"}})  # fmt: skip
    init_model_parallel(validate(cfg, dist.get_world_size()))
    set_seed(0)
    branch = build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, 10)
    model = branch.chunks[0].module
    save_model([model], f"{root}/base", cfg.model, "fp32")
    _materialise_optimizer_state(branch.optimizer)  # the Adam state a trained branch has
    base = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for i in range(2):
        _perturb(model, base, seed=10 + i)
        save_branch(branch, Path(f"{root}/t{i}"), cfg.model, "fp32")
    args = ["--inputs", f"{root}/t0", f"{root}/t1", "--base", f"{root}/base", "--method", "ties", "--density", "0.5"]
    assert main([*args, "--out", f"{root}/ties"]) == 0
    out = {d: dist_checkpointing.load_plain_tensors(f"{root}/{d}") for d in ("base", "t0", "t1", "ties")}
    out["opt_keys"] = [k for k in out["t0"] if k.startswith("optimizer.")]
    return out


def test_merge_reads_trainer_branch_checkpoints_against_a_weights_only_base(tmp_path):
    """Branch checkpoints carry optimizer state that a base does not: the merge compares and
    reads the weights only (this combination is the Param-Merge baseline of the testbed)."""
    out = run_distributed(_trainer_branches_and_base, 1, args=(str(tmp_path),), timeout=180)[0]
    assert out["opt_keys"], "the trainer's branch checkpoint should hold optimizer state"
    base, ties = out["base"], out["ties"]
    assert set(ties) == set(base) and not any(k.startswith("optimizer.") for k in ties)
    # The CLI's result is TIES of the weights as the model holds them: stacked [L, ...] tensors per
    # layer, SwiGLU's fused fc1 as its gate and up halves (the HF gate_proj / up_proj).
    for k in base:
        layers = range(base[k].shape[0]) if k.startswith("decoder.layers.") else [slice(None)]
        halves = 2 if k.endswith("mlp.linear_fc1.weight") else 1
        for i in layers:
            for h in range(halves):
                t0, t1, b, got = (x[k][i].chunk(halves)[h] for x in (out["t0"], out["t1"], base, ties))
                ref = merge_tensor([t0, t1], "ties", base=b, density=0.5)
                torch.testing.assert_close(got, ref, rtol=0, atol=1e-6, msg=k)
    assert any(not torch.equal(base[k], ties[k]) for k in base)
