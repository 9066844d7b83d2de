"""Packaging for saefast.

The Triton kernels live in the top-level folder ``kernels/`` and are installed as
``saefast.kernels``; nothing installs a top-level module called ``kernels``.
torch and triton are not pinned: saefast runs on whatever version the machine has
(CI: torch 2.13 CPU + triton 3.9; GPU machines: torch 2.11 + triton 3.6).
"""
from setuptools import find_packages, setup

packages = find_packages(include=["saefast", "saefast.*"]) + ["saefast.kernels"]

setup(
    name="saefast",
    version="0.1.0",
    description="Triton kernels and a trainer for sparse autoencoders on transformer activations",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"saefast": "saefast", "saefast.kernels": "kernels"},
    package_data={"saefast": ["csrc/*.cpp"]},
    install_requires=[
        "torch",
        "triton; platform_system == 'Linux'",
        "numpy",
        "safetensors",
        "datasets",
        "transformer-lens",
        "tqdm",
        "pyyaml",
        "tensorboard",
        "matplotlib",
        # builds saefast/csrc (the CPU kernels) on first use; without it the PyTorch path runs
        "ninja",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["saefast=saefast.cli:main"]},
)
