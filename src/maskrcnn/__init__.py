"""maskrcnn: Mask R-CNN in pure PyTorch, with torchvision-exact inference, training, evaluation and a CLI.

The public API::

    model = maskrcnn.load_model("maskrcnn_resnet50_fpn_v2")   # a registry name or a path
    results = model.predict(["a.jpg", array], score_threshold=0.5)
"""

from maskrcnn.config import Config, apply_overrides, get_preset, load_config, save_config
from maskrcnn.modeling.mask_rcnn import MaskRCNN
from maskrcnn.predict import Predictor
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
    "load_config",
    "load_model",
    "save_config",
    "save_model",
    "__version__",
]
