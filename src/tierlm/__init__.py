"""tierlm: plan, run and tier large language models on cheap memory.

`import tierlm` stays light (no torch): the planner is usable anywhere.
"""

__version__ = "0.1.0"

from .errors import ConfigError, HardwareError, TierlmError  # noqa: E402
from .plan import Options, Plan, plan  # noqa: E402
from .spec import ModelSpec, load_spec, parse_config  # noqa: E402

__all__ = ["ConfigError", "HardwareError", "ModelSpec", "Options", "Plan", "TierlmError", "load_spec",
           "parse_config", "plan"]
