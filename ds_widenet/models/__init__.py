"""WideNet, ViT and ViT-MoE on DeepSpeed's MoE layer."""
from .base import ModelOutput, VisionBackbone
from .presets import PRESETS, build_model, count_params, get_preset
from .routing import DeepSpeedGate, PaperGate, RouteKey, RoutingStats
from .vit import ViT
from .widenet import WideNet

__all__ = ["ModelOutput", "VisionBackbone", "PRESETS", "build_model", "count_params", "get_preset",
           "DeepSpeedGate", "PaperGate", "RouteKey", "RoutingStats", "ViT", "WideNet"]
