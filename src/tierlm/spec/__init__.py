"""Model specs: config.json -> ModelSpec -> per-layer cache and parameter specs."""

from .cache import CacheStream, layer_cache_streams
from .config import FAMILIES, load_config_file, parse_config
from .model import LayerSpec, ModelSpec
from .params import ParamGroup, param_groups
from .registry import entries, load_spec, resolve

__all__ = ["CacheStream", "FAMILIES", "LayerSpec", "ModelSpec", "ParamGroup", "entries",
           "layer_cache_streams", "load_config_file", "load_spec", "param_groups", "parse_config",
           "resolve"]
