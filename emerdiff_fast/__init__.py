"""emerdiff-fast: EmerDiff segmentation from pre-trained Stable Diffusion, fast and faithful."""
from .config import ConfigError, EmerDiffConfig
from .engine import FastOptions
from .images import ImageError
from .loading import ModelLoadError, load_pipeline
from .result import SegmentationResult
from .segmenter import BACKENDS, EmerDiff, recommended_config

__version__ = "0.1.0"
__all__ = ["EmerDiff", "EmerDiffConfig", "FastOptions", "SegmentationResult", "load_pipeline", "recommended_config", "BACKENDS",
           "ConfigError", "ImageError", "ModelLoadError"]
