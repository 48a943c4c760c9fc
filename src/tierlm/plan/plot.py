"""--plot: cache bytes vs context for several models (PNG or SVG via matplotlib)."""

from __future__ import annotations

from pathlib import Path

from ..errors import TierlmError
from ..spec.model import ModelSpec
from ..units import GiB
from . import memory


def context_grid(max_position: int, points: int = 48) -> list[int]:
    lo, hi = 1024, max(max_position, 2048)
    return sorted({int(lo * (hi / lo) ** (i / (points - 1))) for i in range(points)})


def plot_memory(specs: list[ModelSpec], path: str, kv_dtype: str, indexer_dtype: str, batch: int,
                mtp: bool, layout: str) -> None:
    suffix = Path(path).suffix.lower()
    if suffix not in (".png", ".svg"):
        raise TierlmError(f"--plot: file must end in .png or .svg, got {path!r}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TierlmError("--plot needs matplotlib: pip install 'tierlm[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    top = max(s.max_position for s in specs)
    for s in specs:
        xs = [c for c in context_grid(top) if c <= s.max_position]
        ys = [memory.cache_total(memory.cache_bytes(s, c, batch, kv_dtype, indexer_dtype, mtp, layout)) / GiB
              for c in xs]
        ax.plot(xs, ys, label=s.name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(f"cache (GiB), batch {batch}, KV {kv_dtype}, indexer {indexer_dtype}")
    ax.set_title(f"tierlm: cache bytes vs context ({layout} layout)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    try:
        fig.savefig(path)
    except OSError as e:
        raise TierlmError(f"--plot: cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(fig)
