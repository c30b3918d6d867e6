"""Models: `create_model(name, **kwargs)` over a registry of small model functions.

Importing this package registers every model module (segmenter now; the stage-2 classifier adds its own
`@register_model` functions in `classifier.py` and one import line below).
"""

from . import segmenter  # noqa: F401  (registers seg_*)
from .registry import (LoadReport, create_model, list_models, load_checkpoint, load_weights, read_state_dict,
                       register_model)
from .segmenter import Segmenter

__all__ = ["LoadReport", "Segmenter", "create_model", "list_models", "load_checkpoint", "load_weights",
           "read_state_dict", "register_model"]
