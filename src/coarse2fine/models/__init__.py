"""Building blocks: VGG (METHODS.md §1), Network-in-Network (METHODS.md §2.4) and any timm model, as Backbones."""

from coarse2fine.models.base import Backbone, StageInfo
from coarse2fine.models.factory import (
    create_model,
    default_input_size,
    list_models,
    load_pretrained_file,
    model_summary,
    register_model,
    unregister_model,
)
from coarse2fine.models.nin import NIN
from coarse2fine.models.pretrained import pretrained_normalization
from coarse2fine.models.timm_backbone import TimmBackbone
from coarse2fine.models.utils import reset_last_layer
from coarse2fine.models.vgg import VGG, DenseVGG, init_from_shallower, init_weights

__all__ = [
    "NIN",
    "VGG",
    "Backbone",
    "DenseVGG",
    "StageInfo",
    "TimmBackbone",
    "create_model",
    "default_input_size",
    "init_from_shallower",
    "init_weights",
    "list_models",
    "load_pretrained_file",
    "model_summary",
    "pretrained_normalization",
    "register_model",
    "reset_last_layer",
    "unregister_model",
]
