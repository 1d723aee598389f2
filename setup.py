"""ViMDet: a Vision Mamba (Vim) object detector as a Detectron2 plugin."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version() -> str:
    for line in (HERE / "vimdet" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip('"')
    raise RuntimeError("vimdet/__init__.py has no __version__")


setup(
    name="vimdet",
    version=read_version(),
    description="Vision Mamba backbones with a simple feature pyramid and Cascade R-CNN, "
    "as a Detectron2 plugin",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vimdet", "vimdet.*"]),
    # detectron2 itself is not on PyPI: install it from source, or run tools/install_detectron2.py.
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "fvcore",
        "iopath",
        "pycocotools>=2.0.2",
        "opencv-python-headless",
        "numpy",
        "Pillow",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        # The CUDA selective scan; compiles CUDA code at install, so GPU machines only.
        "cuda": ["mamba-ssm>=2.2"],
        "dev": ["pytest", "ruff"],
    },
)
