"""Plain torch.nn building blocks for hybrid-head language models (no Hydra, Lightning or MLflow here)."""
from .config import ConfigError, ModelConfig
from .layer_plan import LayerPlan, LayerSpec, resolve_layer_plan
from .model import HybridLM
from .presets import PRESET_NAMES, preset

__all__ = ["ConfigError", "ModelConfig", "LayerPlan", "LayerSpec", "resolve_layer_plan", "HybridLM", "PRESET_NAMES",
           "preset"]
