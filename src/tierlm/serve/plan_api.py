"""`POST /v1/plan`: `tierlm plan --json` over HTTP, from the same `tierlm.plan`.

A model is a registry id or alias, the name of the model this server serves, or a config.json
object (`{"model_type": ..., ...}`); hardware is a catalog name. Paths on the server's disk are
refused: a remote client must not make the server read its files.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TierlmError
from .protocol import PlanRequest


def plan_json(req: PlanRequest, served: dict[str, Path] | None = None) -> dict:
    """{"plans": [...]}: one plan per model x context, as `tierlm plan --json` prints."""
    from ..plan.hardware import _aliases, catalog
    from ..plan.planner import Options, plan
    from ..spec.config import parse_config
    from ..spec.registry import load_spec, resolve
    from ..units import parse_count, parse_count_list

    contexts: list[int] = []
    for c in (req.context if isinstance(req.context, list) else [req.context]):
        if isinstance(c, int):
            contexts.append(c)
        else:
            contexts += parse_count_list(c) if "," in c else [parse_count(c)]
    if not contexts:
        raise TierlmError("context: empty list")
    if req.hardware.lower() not in _aliases():
        raise TierlmError(f"unknown hardware {req.hardware!r} (one of {', '.join(sorted(catalog()))})")
    opts = Options(batch=req.batch, kv_dtype=req.kv_dtype, indexer_dtype=req.indexer_dtype,
                   state_dtype=req.state_dtype, mtp=req.mtp, layout=req.layout, hardware=req.hardware,
                   devices=req.devices, weight_dtypes=req.weight_dtypes or None, gpu_util=req.gpu_util)
    opts.check()
    specs = []
    for m in req.models:
        if isinstance(m, dict):
            name = m.get("_name_or_path") if isinstance(m.get("_name_or_path"), str) else "custom"
            specs.append(parse_config(m, name, req.allow_unknown_fields))
        elif resolve(m) is not None:
            specs.append(load_spec(m, req.allow_unknown_fields))
        elif served and m in served:
            specs.append(load_spec(str(served[m]), req.allow_unknown_fields))
        else:
            raise TierlmError(f"unknown model {m!r}: give a registry id or alias (see `tierlm models`), "
                              "the served model's name, or a config.json object")
    return {"plans": [plan(s, c, opts).data for s in specs for c in contexts]}
