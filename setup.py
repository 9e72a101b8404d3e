import glob
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    """The kernel sources live in the top-level kernels/ folder (no __init__.py, so it never
    shadows another package named `kernels`); installed copies carry them inside
    emerdiff_fast.kernels."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "emerdiff_fast.kernels":
            modules += [(package, os.path.splitext(os.path.basename(f))[0], f) for f in sorted(glob.glob("kernels/*.py"))]
        return modules


setup(
    name="emerdiff-fast",
    version="0.1.0",
    description="Fast, faithful EmerDiff: pixel-level segmentation from pre-trained Stable Diffusion",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["emerdiff_fast", "emerdiff_fast.*"]),
    cmdclass={"build_py": BuildPy},
    # the trained mini model ships inside the package (a diffusers folder, ~22 MB)
    package_data={"emerdiff_fast.mini": ["model/*.json", "model/*.md", "model/*/*"],
                  "emerdiff_fast": ["class_names/*.txt"]},
    # floors: the oldest versions the whole suite has passed on (the GPU image's torch,
    # triton and transformers); docs/architecture.md lists the tested sets
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "diffusers>=0.42",
        "transformers>=5.17",
        "safetensors",
        "numpy",
        "scipy",
        "Pillow",
        "tqdm",
    ],
    # kernels: Hugging Face's package of that name, which the tests check our kernels/ never shadows
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "scikit-image", "pycocotools", "kernels"]},
    entry_points={"console_scripts": ["emerdiff-fast=emerdiff_fast.cli:main"]},
)
