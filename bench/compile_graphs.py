"""Graphs torch.compile(fullgraph=True) makes across a schedule: the stock model and the
parallelized one side by side, per family and per way a pipeline hands the timestep.

    python bench/compile_graphs.py          # tiny UNet3D and Wan, 4 steps across phase_t

The schedule, the models and the timestep forms are ``tests/test_compile.py``'s (which
asserts, per step, that the parallelized model compiles no more graphs than the stock one):
this prints the counts that test compares, after each step, with torch's own counter
(``torch._dynamo.utils.counters["stats"]["unique_graphs"]``), Dynamo's tracing without code
generation (``backend="eager"``). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
from harness import environment, out_path, print_table, write_json  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="unet3d,wan")
    ap.add_argument("--out", default=out_path("compile_graphs.json"))
    args = ap.parse_args(argv)
    import test_compile as tc                 # the test's schedule, models and forms
    rows = []
    for family in args.families.split(","):
        for form in tc.FORMS[family]:
            stock = tc._compiled_schedule(family, form, False)[0]
            ours, _, got, eager = tc._compiled_schedule(family, form, True)
            err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, eager))
            rows.append(dict(family=family, timestep=form, stock=stock, ours=ours,
                             max_rel_diff_vs_eager=err))
            print(f"{family} {form}: stock {stock}, ours {ours}", flush=True)
    print()
    print_table((("family", 8), ("timestep", 12), ("graphs per step: stock", 24),
                 ("parallelized", 14), ("vs eager", 10)),
                [(r["family"], r["timestep"], " ".join(map(str, r["stock"])),
                  " ".join(map(str, r["ours"])), f"{r['max_rel_diff_vs_eager']:.1e}")
                 for r in rows])
    print(f"schedule {tc.SCHEDULE}, phase_t 500")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_json(args.out, dict(benchmark="compile_graphs", schedule=list(tc.SCHEDULE),
                              environment=environment("cpu", cpu_model=True), rows=rows))
    return 0 if all(r["ours"] == r["stock"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
