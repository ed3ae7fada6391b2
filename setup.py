"""sap_fast: Scaled Activation Projection as a PyTorch extension.

Install without build isolation so pip uses the torch already installed:
    pip install torch==2.13.0        # CPU; on a GPU machine use its own torch
    pip install --no-build-isolation -e .
The native build (CMake, C++/CUDA kernels) is added by the native-extension work; until then
the package is pure Python and every stage runs on the portable torch path.
"""
from setuptools import find_packages, setup

setup(
    name="sap_fast",
    version="0.1.0",
    description="Scaled Activation Projection: one-shot correction of models trained on noisy labels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sap_fast", "sap_fast.*"]),
    python_requires=">=3.10",
    # torch is not pinned: the README installs the right build first (CPU 2.13 here, the GPU
    # machine's own build there); a range it satisfies makes pip fetch nothing more.
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        "demo": ["scikit-learn"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn"],
        "plot": ["matplotlib"],
    },
)
