"""Models: `create_model(name, **kwargs)` over a registry of small model functions.

Importing this package registers every model module (segmenter now; the stage-2 classifier adds its own
`@register_model` functions in `classifier.py` and one import line below).

Weights: local files (`load_weights`, a model's `pretrained_weights=<file>`), or the ImageNet weights a pip
package ships (`pretrained_weights="imagenet"`, `imagenet.py`); nothing is ever downloaded.
"""

from . import level, segmenter  # noqa: F401  (register level_gru, seg_*)
from .registry import (LoadReport, create_model, list_models, load_checkpoint, load_weights, read_state_dict,
                       register_model)
from .imagenet import InputNorm, imagenet_input_scaling, imagenet_weights, packaged_encoders
from .level import LevelNet
from .segmenter import Segmenter
from .classifier import AttentionPool, PatientClassifier, VertebraClassifier  # registers cls_gru, cls_patient_gru

__all__ = ["InputNorm", "LevelNet", "LoadReport", "Segmenter", "create_model", "imagenet_input_scaling",
           "imagenet_weights", "list_models", "load_checkpoint", "load_weights", "packaged_encoders", "read_state_dict",
           "register_model"]
