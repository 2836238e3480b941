"""Imports flow one way: config → distributed → model → {losses, rewards} → {checkpoint, rollout} → training → copd → trainer.

A lower layer importing a higher one fails this test (module-level and function-level imports).
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "copd_megatron"
# Rank of each subpackage; a module may import only packages of equal or lower rank.
RANK = {
    "utils": 0, "config": 1, "distributed": 2, "testing": 2, "data": 2, "model": 3, "losses": 3,
    "rewards": 3, "checkpoint": 4, "rollout": 4, "training": 5, "copd": 6, "trainer": 7, "preflight": 7, "cli": 8, "eval_cli": 8,
}  # fmt: skip
# Where an import must stay lazy-free: only model/specs.py may import transformer_engine,
# only rollout/vllm_engine.py may import vllm.
EXCLUSIVE = {"transformer_engine": {"model/specs.py"}, "vllm": {"rollout/vllm_engine.py"}}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG).parts
    return rel[0].removesuffix(".py")


def test_no_upward_imports_and_exclusive_gpu_imports():
    problems = []
    for path in PKG.rglob("*.py"):
        if path.name == "__init__.py" and path.parent == PKG:
            continue
        layer = _layer(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                rel = str(path.relative_to(PKG))
                if top in EXCLUSIVE and rel not in EXCLUSIVE[top]:
                    problems.append(f"{rel} imports {top} (only {sorted(EXCLUSIVE[top])} may)")
                if top == "copd_megatron" and len(name.split(".")) > 1:
                    target = name.split(".")[1]
                    if RANK.get(target, 0) > RANK.get(layer, 99):
                        problems.append(f"{rel} ({layer}) imports {name} (a higher layer)")
    assert not problems, "\n".join(problems)
