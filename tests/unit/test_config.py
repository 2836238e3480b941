"""Config: strict loading, overrides, presets, one-line errors (in-process and through the CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from copd_megatron.config import PRESETS, ConfigError, config_from_dict, load_config, validate

ROOT = Path(__file__).resolve().parents[2]
SMOKE = {"schedule": {"mode": "smoke"}}


def test_overrides_parse_yaml_scalars_and_list_items():
    cfg = config_from_dict(
        {**SMOKE, "branches": [{"name": "a"}, {"name": "b"}]},
        ["parallel.tp=2", "optimizer.lr=1e-6", "model.num_query_groups=null", "branches.1.beta=0.5"],
    )
    assert cfg.parallel.tp == 2 and cfg.optimizer.lr == 1e-6
    assert cfg.model.num_query_groups is None
    assert cfg.branches[1].beta == 0.5 and isinstance(cfg.branches[1].beta, float)


def test_preset_fills_fields_and_explicit_keys_win():
    cfg = config_from_dict({"model": {"preset": "qwen3-8b", "num_layers": 4}})
    assert cfg.model.num_layers == 4  # explicit
    assert cfg.model.hidden_size == 4096 and cfg.model.kv_channels == 128 and cfg.model.qk_layernorm


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["parallel.tp=two"], "parallel.tp: expected int, got 'two'"),
        (["model.num_layer=3"], "model.num_layer: unknown key (did you mean 'num_layers'?)"),
        (["modle.num_layers=3"], "modle: unknown key (did you mean 'model'?)"),
        (["precision.params_dtype=fp64"], "precision.params_dtype: 'fp64' is not allowed; expected one of 'fp32', 'bf16', 'fp16'"),
        (["parallel.sequence_parallel=1"], "parallel.sequence_parallel: expected bool"),
        (["model.preset=gpt5"], "model.preset: unknown preset 'gpt5'"),
        (["optimizer.lr=-1"], "optimizer.lr: must be >= 0"),
        (["parallel.vpp=2"], "parallel.vpp: virtual pipeline stages need parallel.pp > 1"),
        (["branches.0.beta=1"], "branches: has no list items to override"),
        (["parallel.tp"], "expected dotted key=value"),
    ],
)  # fmt: skip
def test_field_errors_are_one_line_and_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict(SMOKE, overrides)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides, world, expected",
    [
        (["parallel.tp=2", "parallel.pp=2"], 6, "world size 6 is not divisible by tp*pp*cp = 4"),
        (["parallel.tp=3"], 3, "parallel.tp: 3 does not divide model.num_attention_heads=4; allowed tp values: [1, 2, 4]"),
        (["parallel.tp=4"], 4, "parallel.tp: 4 does not divide model.num_query_groups=2"),
        (["parallel.pp=3"], 3, "model.num_layers=2 is not divisible by pp=3"),
        (["parallel.pp=2", "parallel.vpp=2"], 2, "model.num_layers=2 is not divisible by pp*vpp=4"),
        (["parallel.dp=3"], 2, "parallel.dp: 3 does not match world size 2"),
        (["parallel.ep=2"], 2, "parallel.ep: expert parallelism needs a MoE model"),
        (["precision.fp8=hybrid"], 1, "precision.fp8: 'hybrid' needs Transformer Engine on a CUDA machine"),
        (["optimizer.name=sgd"], 1, "optimizer.name: 'sgd' is not supported by Megatron's distributed optimizer"),
        (["schedule.mode=copd"], 1, "schedule.mode 'copd' needs at least 2 branches"),
    ],
)  # fmt: skip
def test_layout_errors_before_any_process_group(overrides, world, expected):
    cfg = config_from_dict(SMOKE, overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world, cuda_available=False)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_topology_errors():
    two = {"branches": [{"name": "text"}, {"name": "image"}]}
    with pytest.raises(ConfigError, match=r"schedule.hub: 'video' is not a branch"):
        validate(config_from_dict({**two, "schedule": {"topology": "hub", "hub": "video"}}), 1, cuda_available=False)
    with pytest.raises(ConfigError, match=r"schedule.edges.0: \['text', 'text'\]"):
        validate(config_from_dict({**two, "schedule": {"topology": "edges", "edges": [["text", "text"]]}}), 1,
                 cuda_available=False)  # fmt: skip
    with pytest.raises(ConfigError, match="duplicate branch names"):
        validate(config_from_dict({"branches": [{"name": "a"}, {"name": "a"}]}), 1, cuda_available=False)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fits_a_realistic_cluster_layout(name):
    """Layout dry run: each preset at TP=8 (or the largest TP its KV heads allow), PP dividing layers."""
    cfg = config_from_dict({**SMOKE, "model": {"preset": name}})
    groups = cfg.model.num_query_groups or cfg.model.num_attention_heads
    tp = max(t for t in (1, 2, 4, 8) if groups % t == 0 and cfg.model.num_attention_heads % t == 0)
    pp = 4 if cfg.model.num_layers % 4 == 0 else 2
    cfg = config_from_dict({**SMOKE, "model": {"preset": name}}, [f"parallel.tp={tp}", f"parallel.pp={pp}"])
    layout = validate(cfg, 1024, cuda_available=False)
    assert layout.dp * tp * pp == 1024


def test_every_shipped_yaml_loads():
    files = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "examples").rglob("*.yaml"))
    assert files
    for f in files:
        load_config(f)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layers: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_config(bad)


def test_cli_reports_config_errors_in_one_line_with_exit_code_2(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("schedule:\n  mode: smoke\nparallel:\n  tp: 3\n")
    cases = [
        ([str(cfg)], "parallel.tp: 3 does not divide model.num_attention_heads=4"),
        ([str(cfg), "parallel.tp=1", "model.hiden_size=8"], "model.hiden_size: unknown key"),
        ([str(tmp_path / "missing.yaml")], "config file not found"),
    ]
    for args, expected in cases:
        out = subprocess.run([sys.executable, "-m", "copd_megatron.cli", *args], capture_output=True, text=True,
                             cwd=ROOT, timeout=60)  # fmt: skip
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], out.stderr
    ok = subprocess.run([sys.executable, "-m", "copd_megatron.cli", str(cfg), "parallel.tp=1", "--check"],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert ok.returncode == 0 and "ok for world size 1" in ok.stdout


def test_an_override_mistake_is_blamed_on_the_override_not_the_file():
    for overrides, blamed in ((["foo.bar=1"], "override foo.bar=1: foo: unknown key"),
                              (["model.num_attention_heads=3"], "override model.num_attention_heads=3: model.hidden_size"),
                              (["parallel.tp"], "override parallel.tp: expected dotted key=value")):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            load_config(ROOT / "configs/count_sort_cpu.yaml", overrides)
        assert str(e.value).startswith(blamed), str(e.value)
    bad = ROOT / "configs/count_sort_cpu.yaml"
    with pytest.raises(ConfigError, match=r"^override model.preset=nope: model.preset: unknown preset"):
        load_config(bad, ["model.preset=nope"])


def test_resume_under_another_experiment_config_names_the_key():
    from copd_megatron.config import check_resume, config_hash, experiment_dict

    cfg = load_config(ROOT / "configs/count_sort_cpu.yaml")
    state = {"config_hash": config_hash(cfg), "experiment": experiment_dict(cfg)}
    check_resume(load_config(ROOT / "configs/count_sort_cpu.yaml", ["parallel.tp=2", "run_dir=x", "logging.level=DEBUG"]),
                 state, "ck")  # fmt: skip
    with pytest.raises(ConfigError, match=r"optimizer.lr is 5e-05 there and 0.001 now \(and 1 more\); only parallel"):
        check_resume(load_config(ROOT / "configs/count_sort_cpu.yaml", ["optimizer.lr=1e-3", "branches.1.beta=0.5"]), state, "ck")
    with pytest.raises(ConfigError, match="config hash abc there"):  # a checkpoint that only recorded the hash
        check_resume(cfg, {"config_hash": "abc"}, "ck")


def test_parameter_count_matches_published_sizes():
    from copd_megatron.config.summary import count_parameters, describe_model

    published = {"qwen3-8b": 8_190_735_360, "llama3-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512,
                 "llama3.2-1b": 1_235_814_400, "qwen3-0.6b": 596_049_920}  # fmt: skip
    for preset, n in published.items():
        model = load_config(None, [f"model.preset={preset}", "schedule.mode=smoke"]).model
        assert count_parameters(model) == n, preset
    assert "36 layers, hidden 4096, 32 heads (8 KV groups, head dim 128)" in describe_model(
        load_config(ROOT / "configs/qwen3_8b.yaml").model)


def test_readme_layout_check_of_the_real_size_config():
    """The README's line: the 8B config checks as an 8B model at TP=8 on 64 ranks."""
    env = {**os.environ, "WORLD_SIZE": "64", "RANK": "0"}
    out = subprocess.run([sys.executable, "-m", "copd_megatron.cli", "configs/qwen3_8b.yaml", "--check-layout"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "ok for world size 64 (tp=8 pp=1 cp=1 ep=1 dp=8" in out.stdout
    assert "preset qwen3-8b, 36 layers, hidden 4096, 32 heads" in out.stdout and "8.19B parameters" in out.stdout
