from setuptools import setup

setup(
    name="emerdiff-fast",
    version="0.1.0",
    description="Fast, faithful EmerDiff: pixel-level segmentation from pre-trained Stable Diffusion",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ lives at the top of the repo but installs as emerdiff_fast.kernels, so no
    # top-level `kernels` package lands in site-packages.
    packages=["emerdiff_fast", "emerdiff_fast.kernels", "emerdiff_fast.hyperfeatures", "emerdiff_fast.mini"],
    package_dir={"emerdiff_fast": "emerdiff_fast", "emerdiff_fast.kernels": "kernels",
                 "emerdiff_fast.hyperfeatures": "emerdiff_fast/hyperfeatures", "emerdiff_fast.mini": "emerdiff_fast/mini"},
    # the trained mini model ships inside the package (a diffusers folder, ~22 MB)
    package_data={"emerdiff_fast.mini": ["model/*.json", "model/*.md", "model/*/*"],
                  "emerdiff_fast": ["class_names/*.txt"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "diffusers>=0.30",
        "transformers>=4.40",
        "safetensors",
        "numpy",
        "scipy",
        "Pillow",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-xdist", "scikit-image", "pycocotools"]},
    entry_points={"console_scripts": ["emerdiff-fast=emerdiff_fast.cli:main"]},
)
