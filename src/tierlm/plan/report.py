"""Human output of plans: a rich comparison table (GiB and GB side by side) and --explain."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..units import fmt_bytes
from .planner import Plan


def _money(x):
    return "n/a" if x is None else f"${x:,.4f}" if x < 1 else f"${x:,.2f}"


def _ctx(x):
    return "never" if x is None else f"{x:,}"


def _reload(r: dict) -> str:
    """Break-even context of one tier; n/a when the hardware has no such tier."""
    return "n/a" if "note" in r else f"{_ctx(r['break_even_context'])} tok"


def _hardware(d: dict) -> str:
    """'8 x h200, TP8' or '8 x h800, DP8 + EP8' (attention data-parallel, experts expert-parallel)."""
    h = d["hardware"]
    how = f"DP{h['devices']} + EP{h['expert_parallel']}" if h["parallelism"] == "dp-attention" else f"TP{h['devices']}"
    return f"{h['devices']} x {h['name']}, {how}"


def comparison_table(plans: list[Plan], full_ids: bool = False) -> Table:
    """One column per plan, headed by the model's name (its full id or path with `full_ids`)."""
    t = Table(title="tierlm plan", show_lines=False, title_justify="left")
    t.add_column("", style="bold")
    for p in plans:
        d = p.data
        name = d["model"] if full_ids else d["model"].split("/")[-1]
        t.add_column(f"{name}\n@ {d['context']:,} tok x {d['batch']}", justify="right")
    rows = [
        ("KV cache total", lambda d: fmt_bytes(d["kv_cache"]["total_bytes"])),
        ("  attention KV", lambda d: fmt_bytes(d["kv_cache"]["kv_bytes"])),
        ("  indexer keys", lambda d: fmt_bytes(d["kv_cache"]["indexer_bytes"])),
        ("  fixed state", lambda d: fmt_bytes(d["kv_cache"]["state_bytes"])),
        ("  bytes / token", lambda d: f"{d['kv_cache']['bytes_per_token']:,} B"),
        ("  read / decode step", lambda d: fmt_bytes(d["kv_cache"]["read_bytes_per_step"])),
        ("weights", lambda d: fmt_bytes(d["weights"]["total_bytes"])),
        ("  params total / active", lambda d: f"{d['weights']['total_params'] / 1e9:,.1f}B / {d['weights']['active_params'] / 1e9:,.1f}B"),
        *([("  vision tower (not read per token)", lambda d: fmt_bytes(d["weights"]["components"]["vision_tower"]["bytes"])
             if "vision_tower" in d["weights"]["components"] else "-")]
          if any("vision_tower" in p.data["weights"]["components"] for p in plans) else []),
        ("hardware", _hardware),
        ("  per device: weights + KV", lambda d: fmt_bytes(d["weights"]["per_device_bytes"] + d["kv_cache"]["per_device_bytes"])),
        ("  fits on device", lambda d: "yes" if d["placement"]["fits_on_device"] else ("spills to host/disk" if d["placement"]["fits"] else "NO")),
        ("  spilled per device", lambda d: fmt_bytes(sum(r["host"] + r["disk"] for r in d["placement"]["items"].values()))),
        ("  max context on device", lambda d: f"{d['limits']['max_context_on_device']:,}"),
        ("  min devices (all on device)", lambda d: _ctx(d["limits"]["min_devices"])),
        ("decode tok/s (all sequences)", lambda d: "does not fit" if "error" in d["decode"] else f"{d['decode']['tokens_per_s']:,.1f} ({d['decode']['bound']}-bound)"),
        ("prefill time", lambda d: "n/a" if d["prefill"]["t_s"] is None else f"{d['prefill']['t_s']:,.2f} s"),
        ("reload beats recompute from", lambda d: " / ".join(f"{t} {_reload(d['reload_vs_recompute'][t])}" for t in ("host", "disk"))),
        ("$/Mtok output / input", lambda d: f"{_money(d['cost'].get('output_per_mtok'))} / {_money(d['cost'].get('input_per_mtok'))}"),
    ]
    for label, fn in rows:
        t.add_row(label, *[fn(p.data) for p in plans])
    return t


def print_table(table: Table, console: Console | None = None) -> None:
    """On a terminal, the table fits the window. Piped or redirected, it prints at its natural
    width, so no id, path or URL is wrapped or cut to an ellipsis."""
    console = console or Console()
    if console.is_terminal:
        console.print(table)
        return
    width = console.width
    console.width = max(width, console.measure(table, options=console.options.update_width(1 << 16)).maximum)
    try:
        console.print(table)
    finally:
        console.width = width


def print_plans(plans: list[Plan], explain: bool, console: Console | None = None) -> None:
    console = console or Console()
    print_table(comparison_table(plans, full_ids=not console.is_terminal), console)
    for p in plans:
        for note in p.data["notes"]:
            console.print(f"[yellow]note[/yellow] {p.data['model']}: {note}", highlight=False)
    console.print("[dim]GiB = 2^30 bytes, GB = 10^9 bytes. Layout: "
                  f"{plans[0].data['layout']} (see docs/planner.md).[/dim]")
    if explain:
        for p in plans:
            console.rule(f"{p.data['model']} @ {p.data['context']:,} tokens")
            for title, text in p.explain:
                console.print(f"[bold]{title}[/bold]: ", end="", highlight=False)
                console.print(text, markup=False, highlight=False)
