"""Built-in model registry: one JSON file per model, keyed by its Hugging Face repo id.

Each file holds the model's config.json verbatim plus where and when it was read, so a
planner number can always be traced back to its source.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError, did_you_mean
from .config import load_config_file, parse_config
from .model import ModelSpec

REGISTRY_DIR = Path(__file__).with_name("registry")


@dataclass(frozen=True)
class RegistryEntry:
    id: str
    aliases: tuple[str, ...]
    source: dict
    published: dict | None
    config: dict
    path: Path


@lru_cache(maxsize=1)
def entries() -> dict[str, RegistryEntry]:
    out: dict[str, RegistryEntry] = {}
    for path in sorted(REGISTRY_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        e = RegistryEntry(data["id"], tuple(data.get("aliases", ())), data["source"],
                          data.get("published"), data["config"], path)
        out[e.id] = e
    return out


@lru_cache(maxsize=1)
def _names() -> dict[str, str]:
    names: dict[str, str] = {}
    for e in entries().values():
        for key in (e.id, *e.aliases):
            names[key.lower()] = e.id
    return names


def resolve(name: str) -> RegistryEntry | None:
    """Registry entry for a repo id or alias (case-insensitive), else None."""
    key = _names().get(name.lower())
    return entries()[key] if key else None


def suggest(name: str, n: int = 3) -> list[str]:
    """Registry ids and aliases that look like `name` (case-insensitive), best first."""
    spelled = {key.lower(): key for e in entries().values() for key in (e.id, *e.aliases)}
    return [spelled[k] for k in difflib.get_close_matches(name.lower(), spelled, n=n, cutoff=0.6)]


def load_spec(model: str | os.PathLike, allow_unknown: bool = False) -> ModelSpec:
    """ModelSpec for a registry id/alias or a path to a config.json / checkpoint directory."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str):
        raise ConfigError(f"model must be a registry id, an alias or a path, got {model!r}")
    entry = resolve(model)
    if entry is not None:
        return parse_config(entry.config, entry.id, allow_unknown)
    path = Path(model)
    if path.exists():
        return parse_config(load_config_file(path), str(path), allow_unknown)
    raise ConfigError(f"unknown model '{model}': not a registry id or alias, and no such file or directory."
                      f"{did_you_mean(suggest(model))} "
                      "tierlm never downloads anything: pass the path to a config.json, or to a directory "
                      "holding one (`tierlm models` lists the registry)")
