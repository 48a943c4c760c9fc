"""Benchmark: plan every registry model at four contexts, in a fresh interpreter.

Prints the wall time of the planning loop, the time of one `import tierlm`, and whether
torch was imported (it must not be). The baseline in the same run is the cost of parsing
the configs alone, so the ratio shows what the planner adds on top of reading the specs.

    python benchmarks/bench_plan.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CODE = r"""
import json, sys, time
t0 = time.perf_counter()
import tierlm
from tierlm.plan.memory import cache_bytes, weights
from tierlm.spec import entries, load_spec
t_import = time.perf_counter() - t0
contexts = [4096, 32768, 131072, 1000000]
ids = sorted(entries())
t0 = time.perf_counter()
specs = [load_spec(m) for m in ids]
t_parse = time.perf_counter() - t0
t0 = time.perf_counter()
for s in specs:
    for c in contexts:
        cache_bytes(s, c, 1, "fp8", "bf16")
        weights(s)
t_memory = time.perf_counter() - t0
t0 = time.perf_counter()
plans = [tierlm.plan(m, c, kv_dtype="fp8") for m in ids for c in contexts]
t_full = time.perf_counter() - t0
print(json.dumps({"models": len(ids), "contexts": len(contexts), "plans": len(plans), "import_s": t_import,
                  "parse_s": t_parse, "memory_only_s": t_memory, "full_plan_s": t_full,
                  "torch_imported": "torch" in sys.modules}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    runs = [json.loads(subprocess.run([sys.executable, "-c", CODE], check=True, capture_output=True,
                                      text=True).stdout) for _ in range(args.repeat)]
    best = min(runs, key=lambda r: r["full_plan_s"])
    print(f"models x contexts           : {best['models']} x {best['contexts']} = {best['plans']} plans")
    print(f"import tierlm               : {best['import_s'] * 1e3:8.1f} ms")
    print(f"parse configs (baseline)    : {best['parse_s'] * 1e3:8.1f} ms")
    print(f"bytes only (cache+weights)  : {best['memory_only_s'] * 1e3:8.1f} ms")
    print(f"full plans (+placement, solvers, roofline, cost): {best['full_plan_s'] * 1e3:8.1f} ms "
          f"({best['full_plan_s'] / best['parse_s']:.0f}x parse)")
    print(f"torch imported              : {best['torch_imported']}")
    print(f"verdict                     : {'OK' if best['full_plan_s'] < 1.0 and not best['torch_imported'] else 'SLOW or torch imported'} (target < 1 s, no torch)")


if __name__ == "__main__":
    main()
