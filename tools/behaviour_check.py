"""Tiny runs of every training script, kept or compared: the no-behaviour-change check of a refactor.

    python tools/behaviour_check.py --output-dir REF            # before the change: runs and keeps
    python tools/behaviour_check.py --output-dir NEW --compare REF   # after: torch.equal on every tensor of
                                                                     # checkpoint-last.pth, the same log.jsonl

Each script runs the tiny settings of tests/test_hardening.py (vit_t16, 32 px, patch 8, synthetic data, CPU,
fp32); MAE-CT, MIM-Refiner and finetune.py start from the MAE run's checkpoint. log.jsonl is compared on every logged value
except wall-clock ones (time, img/s). Prints a table; exits 1 on any difference.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from test_hardening import train_flags  # noqa: E402  (the tests' tiny settings: one source)

SCRIPTS = ("mae", "mae_ct", "mim_refiner", "lut", "conmim", "finetune")
CLOCK_KEYS = ("time", "img_s", "ips", "wall", "seconds", "elapsed")


def flags(name: str, out: Path, init: Path | None) -> list:
    if name == "finetune":  # the mae recipe: RandAugment, erasing, mixup / cutmix, drop path, layer decay
        return ["--init", init, "--data", "synthetic:32:8", "--device", "cpu", "--num-workers", "0", "--epochs", "2",
                "--warmup-epochs", "1", "--batch-size", "8", "--blr", "1e-2", "--output-dir", out]
    return train_flags(name, out, init)


def run(name: str, out: Path, init: Path | None):
    cmd = [sys.executable, str(ROOT / f"{name}.py"), *map(str, flags(name, out, init))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")


def flat(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flat(v, f"{prefix}{k}.")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flat(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), obj


def log_values(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not any(c in k for c in CLOCK_KEYS)} for r in rows]


def compare(new: Path, ref: Path) -> tuple[int, int, str]:
    a = dict(flat(torch.load(new / "checkpoint-last.pth", map_location="cpu", weights_only=True)))
    b = dict(flat(torch.load(ref / "checkpoint-last.pth", map_location="cpu", weights_only=True)))
    diff = [k for k in sorted(set(a) | set(b)) if not k.startswith("args.output_dir") and not k.startswith("args.init")
            and (k not in a or k not in b or (torch.is_tensor(a[k]) and not torch.equal(a[k], b[k]))
                 or (not torch.is_tensor(a[k]) and a[k] != b[k]))]
    n_t = sum(torch.is_tensor(v) for v in a.values())
    same_log = log_values(new / "log.jsonl") == log_values(ref / "log.jsonl")
    return n_t, len(diff), ("same" if same_log else "DIFFERENT") + (f"; first differences: {diff[:3]}" if diff else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", required=True, type=Path)
    ap.add_argument("--compare", type=Path, help="a --output-dir of an earlier invocation")
    ap.add_argument("--scripts", nargs="+", default=SCRIPTS, choices=SCRIPTS, help="a subset (MAE runs first when needed)")
    a = ap.parse_args()
    for name in a.scripts:
        init = a.output_dir / "mae" / "checkpoint-last.pth" if name in ("mae_ct", "mim_refiner", "finetune") else None
        if init is not None and not init.exists():
            run("mae", a.output_dir / "mae", None)
        run(name, a.output_dir / name, init)
    if a.compare is None:
        print(f"kept tiny runs of {', '.join(a.scripts)} in {a.output_dir}")
        return
    print("| script | tensors in checkpoint-last.pth | entries that differ | log.jsonl |\n|---|---|---|---|")
    bad = 0
    for name in a.scripts:
        n_t, n_diff, log = compare(a.output_dir / name, a.compare / name)
        bad += n_diff + (not log.startswith("same"))
        print(f"| {name} | {n_t} | {n_diff} | {log} |")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
