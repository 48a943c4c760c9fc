"""Hardware catalog: one JSON file per accelerator (or CPU box), every number sourced.

Schema (see docs/planner.md): device memory (as the driver reports it)/bandwidth/dense FLOPs
per dtype, the scale-up link between devices (and the scale-out NIC beyond it), host memory
and bandwidth per node with devices_per_node, host<->device link bandwidth per device,
NVMe per node, $/device-hour. Each number is {"value": x, "source": "..."}; user files
may give plain numbers. Absent optional blocks mean "not described", never a default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import HardwareError, os_error

CATALOG_DIR = Path(__file__).with_name("hardware")
FLOP_DTYPES = ("bf16", "fp8", "fp4")


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    unofficial: bool
    device_memory: int
    device_bandwidth: float
    flops: dict[str, float]
    devices_per_node: int = 1
    host_memory: int = 0           # per node
    host_bandwidth: float = 0.0    # per node
    link_bandwidth: float = 0.0    # host <-> device, per device, per direction
    link: str = "none"
    disk_capacity: int = 0         # per node
    disk_read_bandwidth: float = 0.0
    disk_write_bandwidth: float = 0.0
    price_per_hour: float | None = None
    interconnect_bandwidth: float = 0.0   # device <-> device scale-up link (NVLink, ...), per device, per direction
    domain_size: int = 0                  # devices one scale-up domain joins (0: not described)
    scale_out_bandwidth: float = 0.0      # per device, per direction, beyond the domain (IB / RoCE NIC)
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def host_memory_per_device(self) -> int:
        return self.host_memory // self.devices_per_node

    @property
    def host_read_bandwidth(self) -> float:
        """Bandwidth one device sees reading host memory: its link, capped by its share of DRAM."""
        if self.link_bandwidth <= 0:
            return 0.0
        if self.host_bandwidth <= 0:
            return self.link_bandwidth
        return min(self.link_bandwidth, self.host_bandwidth / self.devices_per_node)

    def device_link(self, devices: int) -> tuple[str, float]:
        """The link one device sends over to the others of a `devices`-wide group, and its
        bandwidth per direction: the scale-up link inside its domain (default domain: one node),
        the NIC beyond it; a card without a scale-up link talks over its host link (PCIe).
        Bandwidth 0: the hardware file does not describe that link."""
        if devices <= (self.domain_size or self.devices_per_node):
            if self.interconnect_bandwidth:
                return "scale-up", self.interconnect_bandwidth
            return "host link", self.link_bandwidth
        return "scale-out", self.scale_out_bandwidth

    @property
    def disk_capacity_per_device(self) -> int:
        return self.disk_capacity // self.devices_per_node

    @property
    def disk_read_per_device(self) -> float:
        return self.disk_read_bandwidth / self.devices_per_node


class _Reader:
    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise HardwareError(f"{where}: expected a JSON object")
        self.data, self.where, self.sources = data, where, {}

    def number(self, path: str, required: bool = True, integer: bool = False, allow_zero: bool = False,
               bounds: tuple[float, float] = (1.0, 1e21)):
        """A positive finite number; `bounds` rejects typos such as 1e-300 B/s or 10**400 bytes
        (default: 1 to 1e21, i.e. up to a zettabyte or a zettaFLOP/s)."""
        node: Any = self.data
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                if required:
                    raise HardwareError(f"{self.where}: missing field '{path}'")
                return None
            node = node[part]
        source = None
        if isinstance(node, dict):
            if "value" not in node:
                raise HardwareError(f"{self.where}: field '{path}' needs a 'value'")
            source = node.get("source")
            node = node["value"]
        if isinstance(node, bool) or not isinstance(node, (int, float)) or node != node or node in (float("inf"), float("-inf")):
            raise HardwareError(f"{self.where}: field '{path}' must be a number, got {node!r}")
        if node < 0 or (node == 0 and not allow_zero):
            raise HardwareError(f"{self.where}: field '{path}' must be positive, got {node!r}")
        if integer and not isinstance(node, int) and not float(node).is_integer():
            raise HardwareError(f"{self.where}: field '{path}' must be a whole number, got {node!r}")
        lo, hi = bounds
        if node and not lo <= node <= hi:
            raise HardwareError(f"{self.where}: field '{path}' = {node!r} is outside the plausible range [{lo:g}, {hi:g}]")
        if source:
            self.sources[path] = str(source)
        return int(node) if integer else float(node)


# Keys a hardware file may hold, per section; anything else is a misspelling and an error.
SCHEMA = {
    "": {"name", "aliases", "description", "unofficial", "device", "interconnect", "host", "disk", "price_per_hour", "notes"},
    "device": {"memory_bytes", "memory_bandwidth", "flops"},
    "interconnect": {"bandwidth", "domain_size", "scale_out_bandwidth"},
    "host": {"devices_per_node", "memory_bytes", "memory_bandwidth", "link_bandwidth", "link"},
    "disk": {"read_bandwidth", "write_bandwidth", "capacity_bytes"},
}


def _check_keys(data: dict, where: str) -> None:
    for section, allowed in SCHEMA.items():
        node = data if not section else data.get(section, {})
        if not isinstance(node, dict):
            raise HardwareError(f"{where}: field '{section}' must be an object")
        for key in node:
            if key not in allowed:
                path = f"{section}.{key}" if section else key
                raise HardwareError(f"{where}: unknown field '{path}' (allowed here: {', '.join(sorted(allowed))})")


def parse_hardware(data: Any, where: str = "hardware") -> Hardware:
    r = _Reader(data, where)
    _check_keys(data, where)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise HardwareError(f"{where}: missing field 'name'")
    flops_node = data.get("device", {}).get("flops", {}) if isinstance(data.get("device"), dict) else {}
    if not isinstance(flops_node, dict):
        raise HardwareError(f"{where}: field 'device.flops' must be an object")
    flops = {}
    for dtype in flops_node:
        if dtype not in FLOP_DTYPES:
            raise HardwareError(f"{where}: unknown dtype 'device.flops.{dtype}' (one of {', '.join(FLOP_DTYPES)})")
        flops[dtype] = r.number(f"device.flops.{dtype}")
    link = data.get("host", {}).get("link", "none") if isinstance(data.get("host"), dict) else "none"
    if not isinstance(link, str):
        raise HardwareError(f"{where}: field 'host.link' must be a string")
    price = r.number("price_per_hour", required=False, bounds=(1e-6, 1e6))
    hw = Hardware(
        name=name, description=str(data.get("description", name)), unofficial=bool(data.get("unofficial", False)),
        device_memory=r.number("device.memory_bytes", integer=True),
        device_bandwidth=r.number("device.memory_bandwidth"),
        flops=flops,
        devices_per_node=r.number("host.devices_per_node", required=False, integer=True, bounds=(1, 1e6)) or 1,
        host_memory=r.number("host.memory_bytes", required=False, integer=True, allow_zero=True) or 0,
        host_bandwidth=r.number("host.memory_bandwidth", required=False) or 0.0,
        link_bandwidth=r.number("host.link_bandwidth", required=False) or 0.0,
        link=link,
        disk_capacity=r.number("disk.capacity_bytes", required=False, integer=True) or 0,
        disk_read_bandwidth=r.number("disk.read_bandwidth", required=False) or 0.0,
        disk_write_bandwidth=r.number("disk.write_bandwidth", required=False) or 0.0,
        price_per_hour=price,
        interconnect_bandwidth=r.number("interconnect.bandwidth", required=False) or 0.0,
        domain_size=r.number("interconnect.domain_size", required=False, integer=True, bounds=(1, 1e6)) or 0,
        scale_out_bandwidth=r.number("interconnect.scale_out_bandwidth", required=False) or 0.0,
        sources=r.sources)
    if hw.host_memory and not hw.link_bandwidth and link != "unified":
        raise HardwareError(f"{where}: field 'host.link_bandwidth' is needed when host.memory_bytes is given")
    if hw.disk_capacity and not hw.disk_read_bandwidth:
        raise HardwareError(f"{where}: field 'disk.read_bandwidth' is needed when disk.capacity_bytes is given")
    return hw


def _catalog_files() -> list[Path]:
    return [p for p in sorted(CATALOG_DIR.glob("*.json")) if not p.name.startswith("_")]


@lru_cache(maxsize=1)
def tier_prices() -> dict[str, float]:
    """$/GB-hour of host DRAM and NVMe (sourced, in hardware/_tier_prices.json)."""
    path = CATALOG_DIR / "_tier_prices.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return {k: float(v["value"]) for k, v in data.items() if isinstance(v, dict) and "value" in v}


@lru_cache(maxsize=1)
def catalog() -> dict[str, Hardware]:
    out = {}
    for path in _catalog_files():
        out[path.stem] = parse_hardware(json.loads(path.read_text()), path.name)
    return out


@lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    names = {}
    for path in _catalog_files():
        data = json.loads(path.read_text())
        for a in (data["name"], *data.get("aliases", ())):
            names[a.lower()] = path.stem
    return names


def load_hardware(name: str) -> Hardware:
    """A catalog entry by name/alias, or a user JSON file with the same schema."""
    key = _aliases().get(name.lower())
    if key:
        return catalog()[key]
    p = Path(name)
    if p.is_file():
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HardwareError(f"{p}: not valid JSON ({e})") from None
        except RecursionError:
            raise HardwareError(f"{p}: JSON nested too deeply") from None
        except OSError as e:
            raise os_error(p, e, HardwareError) from None
        return parse_hardware(data, str(p))
    raise HardwareError(f"unknown hardware '{name}' (one of {', '.join(sorted(catalog()))}, or a JSON file)")
