"""fused_tau: kernels/ is installed as the subpackage fused_tau.kernels (never a top-level `kernels`)."""
import re
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
TRITON = "triton>=3.0; platform_system == 'Linux'"
version = re.search(r'__version__ = "([^"]+)"', (here / "fused_tau" / "version.py").read_text()).group(1)

setup(
    name="fused_tau",
    version=version,
    description="Triton kernels for temperature softmax, cross-entropy, InfoNCE and distillation",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fused_tau", "fused_tau.kernels"],
    package_dir={"fused_tau": "fused_tau", "fused_tau.kernels": "kernels"},
    package_data={"fused_tau": ["py.typed"]},
    # Triton runs the kernels on CUDA tensors, and CUDA builds of torch on Linux already require it; the
    # torch path (CPU, MPS) and the CLI need none.  `pip install fused_tau[triton]` adds it elsewhere.
    install_requires=["torch>=2.1"],
    extras_require={
        "triton": [TRITON],
        # CI runs the kernels on CPU tensors under the Triton interpreter
        "test": [TRITON, "pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "expecttest", "pytest-benchmark>=4", "numpy", "matplotlib>=3.5",
                 "tqdm>=4", "build>=1"],
        "bench": ["pytest-benchmark>=4", "numpy"],
        "plot": ["matplotlib>=3.5", "tqdm>=4"],
    },
    entry_points={"console_scripts": ["fused-tau = fused_tau.cli:main"]},
    license="Apache-2.0",
    license_files=["LICENSE"],
)
