"""tierlm: plan, run and tier large language models on cheap memory.

`import tierlm` stays light (no torch): the planner is usable anywhere.
"""

__version__ = "0.1.0"

from .errors import ConfigError, HardwareError, TierlmError  # noqa: E402
from .plan import Options, Plan, plan  # noqa: E402
from .spec import ModelSpec, load_spec, parse_config  # noqa: E402

__all__ = ["LLM", "ConfigError", "HardwareError", "ModelSpec", "Options", "Plan", "SamplingParams", "TierlmError",
           "load_spec", "parse_config", "plan"]


def __getattr__(name: str):
    """`tierlm.LLM` and `tierlm.SamplingParams` import the engine (and torch) on first use."""
    if name in ("LLM", "SamplingParams"):
        from . import runtime
        return getattr(runtime, name)
    raise AttributeError(f"module 'tierlm' has no attribute {name!r}")
