"""`POST /v1/plan`: `tierlm plan --json` over HTTP, from the same `tierlm.plan`.

A model is a registry id or alias, the name of the model this server serves, or a config.json
object (`{"model_type": ..., ...}`); hardware is a catalog name. Paths on the server's disk are
refused: a remote client must not make the server read its files.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import TierlmError, did_you_mean
from .protocol import PlanRequest


def plan_json(req: PlanRequest, served: dict[str, Path] | None = None) -> dict:
    """{"plans": [...]}: one plan per model x context, as `tierlm plan --json` prints."""
    from ..plan.hardware import _aliases, catalog
    from ..plan.planner import Options, plan
    from ..spec.config import parse_config
    from ..spec.registry import load_spec, resolve, suggest
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
            raise TierlmError(f"unknown model {m!r}: not a registry id or alias, nor the served model's name."
                              f"{did_you_mean(suggest(m))} Give a registry id or alias (GET /v1/plan/models "
                              "lists them), the served model's name, or a config.json object")
    return {"plans": [plan(s, c, opts).data for s in specs for c in contexts]}


def models_json(served: dict[str, Path] | None = None) -> dict:
    """GET /v1/plan/models: the registry (ids, aliases, model types), and the served model's name."""
    from ..spec.registry import entries
    data = [{"id": e.id, "aliases": list(e.aliases), "model_type": e.config.get("model_type"),
             "max_position": e.config.get("max_position_embeddings"), "served": False}
            for e in entries().values()]
    data += [{"id": name, "aliases": [], "model_type": None, "max_position": None, "served": True}
             for name in (served or {})]
    return {"object": "list", "data": data}


def hardware_json() -> dict:
    """GET /v1/plan/hardware: the hardware catalog (names `hardware` accepts), as `tierlm hardware --json`."""
    from ..plan.hardware import catalog
    from ..plan.planner import DEFAULT_HARDWARE
    data = [{"name": key, "label": h.name, "description": h.description, "memory_bytes": h.device_memory,
             "bandwidth": h.device_bandwidth, "flops": h.flops, "devices_per_node": h.devices_per_node,
             "price_per_hour": h.price_per_hour, "unofficial": h.unofficial} for key, h in catalog().items()]
    return {"object": "list", "data": data, "default": DEFAULT_HARDWARE}


def options_json() -> dict:
    """GET /v1/plan/options: the values each option of POST /v1/plan takes, and its defaults."""
    from ..plan.layouts import CACHE_DTYPES, LAYOUTS, STATE_DTYPES
    from ..plan.memory import COMPONENTS, WEIGHT_DTYPES
    from ..plan.planner import MAX_DEVICES
    defaults = {k: f.default for k, f in PlanRequest.model_fields.items() if k != "models"}
    return {"kv_dtypes": list(CACHE_DTYPES), "indexer_dtypes": list(CACHE_DTYPES), "state_dtypes": list(STATE_DTYPES),
            "layouts": list(LAYOUTS), "weight_dtypes": list(WEIGHT_DTYPES), "weight_components": list(COMPONENTS),
            "max_devices": MAX_DEVICES, "max_models": _max_models(), "defaults": defaults}


def _max_models() -> int | None:
    return next((m.max_length for m in PlanRequest.model_fields["models"].metadata
                 if getattr(m, "max_length", None) is not None), None)
