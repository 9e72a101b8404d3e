"""emerdiff-fast: EmerDiff segmentation from pre-trained Stable Diffusion, fast and faithful."""
import importlib.util as _util
import os as _os
import sys as _sys


def _source_kernels() -> None:
    """setup.py installs the checkout's kernels/ as emerdiff_fast.kernels. Where this package
    is the checkout's own folder and no installer maps it (a checkout first on sys.path
    shadowing an installed copy, as `python -m` from the repository root does on a machine
    with a --target install), load kernels/ under that name from beside the package."""
    if _util.find_spec(__name__ + ".kernels") is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    spec = _util.spec_from_file_location(__name__ + ".kernels", _os.path.join(folder, "__init__.py"),
                                         submodule_search_locations=[folder])
    if spec is None:
        return  # neither installed nor a checkout: the import below names what is missing
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_source_kernels()
from .config import ConfigError, EmerDiffConfig
from .engine import FastOptions
from .images import ImageError
from .loading import ModelLoadError, load_pipeline
from .result import SegmentationResult
from .segmenter import BACKENDS, EmerDiff, recommended_config

__version__ = "0.1.0"
__all__ = ["EmerDiff", "EmerDiffConfig", "FastOptions", "SegmentationResult", "load_pipeline", "recommended_config", "BACKENDS",
           "ConfigError", "ImageError", "ModelLoadError"]
