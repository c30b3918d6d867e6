"""Models: `create_model(name, **kwargs)` over a registry of small model functions.

Importing this package registers every model module (segmenter now; the stage-2 classifier adds its own
`@register_model` functions in `classifier.py` and one import line below).
"""

from . import level, segmenter  # noqa: F401  (register level_gru, seg_*)
from .registry import (LoadReport, create_model, list_models, load_checkpoint, load_weights, read_state_dict,
                       register_model)
from .level import LevelNet
from .segmenter import Segmenter
from .classifier import AttentionPool, PatientClassifier, VertebraClassifier  # registers cls_gru, cls_patient_gru

__all__ = ["LevelNet", "LoadReport", "Segmenter", "create_model", "list_models", "load_checkpoint", "load_weights",
           "read_state_dict", "register_model"]
