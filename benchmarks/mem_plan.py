"""The measured memory table of docs/memory.md: every method at its paper settings on 4 x 40 GB and 4 x 80 GB,
through each script's own `--plan GPUSxGB` (one training step on fake tensors, memplan.py).

    python benchmarks/mem_plan.py                    # the whole table (big models: ~1 min per measurement on CPU)
    python benchmarks/mem_plan.py --only mim_refiner:vit_h14

Each (method, model) is measured once per number k of checkpointed blocks; the two capacities reuse those
measurements (the per-GPU batch is the same: the paper batch over 4 GPUs).
"""
import argparse
import contextlib
import importlib
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import memplan  # noqa: E402

CONFIGS = [("mae", "vit_l16"), ("mae", "vit_h14"), ("mae_ct", "vit_l16"), ("mae_ct", "vit_h14"),
           ("mim_refiner", "vit_l16"), ("mim_refiner", "vit_h14"), ("mim_refiner", "vit_2b14"),
           ("lut", "vit_b16"), ("lut", "vit_l16"), ("conmim", "vit_b16"), ("conmim", "vit_l16")]
CAPACITIES = ("4x40", "4x80")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", default=None, help="method:model pairs, e.g. mim_refiner:vit_h14")
    a = ap.parse_args()
    configs = [c for c in CONFIGS if a.only is None or f"{c[0]}:{c[1]}" in a.only]
    print("| method | model | GPUs x GB | plan (per GPU) | checkpointed | DDP/FSDP | measured need, GiB | fits | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    real_step_memory, real_plan_memory = memplan.step_memory, memplan.plan_memory
    for method, model in configs:
        mod = importlib.import_module(method)
        cache = {}
        plans = []

        def step_memory(build, k, **kw):  # one measurement per k for both capacities
            if k not in cache:
                cache[k] = real_step_memory(build, k, **kw)
            return cache[k]

        def plan_memory(*args, **kw):
            plans.append(real_plan_memory(*args, **kw))
            return plans[-1]
        memplan.step_memory, memplan.plan_memory = step_memory, plan_memory
        try:
            for cap in CAPACITIES:
                t0 = time.time()
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    mod.main(common.parse_args(mod.Args, ["--model", model, "--plan", cap]))
                p = plans[-1]
                what = p.what.split(", ", 1)[1].replace(" per GPU", "")
                print(f"| {method} | {model} | {cap} | {what} | {p.checkpointed} of {p.n_blocks} | "
                      f"{'FSDP' if p.fsdp else 'DDP'} | {p.need / 2**30:.1f} | {'yes' if p.fits else 'no: ' + p.fix} | "
                      f"{time.time() - t0:.0f} |", flush=True)
        finally:
            memplan.step_memory, memplan.plan_memory = real_step_memory, real_plan_memory


if __name__ == "__main__":
    main()
