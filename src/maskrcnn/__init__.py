"""maskrcnn: Mask R-CNN in pure PyTorch, with torchvision-exact inference, training, evaluation and a CLI.

The public API::

    model = maskrcnn.load_model("maskrcnn_resnet50_fpn_v2")   # a registry name or a path
    results = model.predict(["a.jpg", array], score_threshold=0.5)
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # torch reads this once, at its first allocation: large CPU tensors then sit in 2 MB-aligned buffers advised
    # for transparent huge pages, which cuts the page faults of the big feature maps (R50-FPN inference at
    # 800x1216 on 2 cores: ~10% faster, ~100 MB more peak RSS; bench/README.md). THP_MEM_ALLOC_ENABLE=0 opts out.
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from maskrcnn.config import Config, apply_overrides, get_preset, load_config, save_config
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.predict import Predictor
from maskrcnn.runtime import keep_freed_memory
from maskrcnn.structures import Result
from maskrcnn.weights import load_model, save_model

__version__ = "0.1.0"

__all__ = [
    "Config",
    "MaskRCNN",
    "Predictor",
    "Result",
    "apply_overrides",
    "get_preset",
    "keep_freed_memory",
    "load_config",
    "load_model",
    "save_config",
    "save_model",
    "__version__",
]
