"""Shared test helpers: run a script as a user would (plain or under torchrun with gloo), write a tiny
ImageFolder, write an official-MAE-style encoder checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tiny models and tensors: one thread is fastest (thread wake-ups cost more than they save) and robust
# when other jobs share the 2 CI cores. ONE_THREAD is for subprocess env, `one_thread` for in-process tests.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The tiny configuration every end-to-end test uses (see README "Tests").
TINY = ["--model", "vit_t16", "--img-size", "32", "--patch-size", "4", "--num-workers", "0", "--device", "cpu"]


def run_script(script, *args, nproc=1, check=True, timeout=600, env=None):
    """Run `script` (a repo-root file name) with `args`; under torchrun (gloo, CPU) when nproc > 1.
    Returns the CompletedProcess (stdout+stderr captured as text)."""
    args = [str(a) for a in args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / script), *args]
    else:
        cmd = [sys.executable, str(ROOT / script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed with {p.returncode}\nSTDOUT:\n{p.stdout[-4000:]}\n"
                             f"STDERR:\n{p.stderr[-4000:]}")
    return p


def run_inprocess(capsys, module, *argv):
    """A script's entry point (common.run_main) in this process; returns (exit code, stdout, stderr)."""
    import signal
    import common
    capsys.readouterr()
    old, sys.argv = sys.argv, [module.__name__ + ".py", *[str(a) for a in argv]]
    handlers = {s: signal.getsignal(s) for s in common.STOP_SIGNALS}  # the run installs its own (RunControl)
    code = 0
    try:
        common.run_main(module.main, module.Args)
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = old
        for s, h in handlers.items():
            signal.signal(s, h)
    out, err = capsys.readouterr()
    return code, out, err

def write_image_folder(root: Path, classes=("a", "b", "c"), per_class=8, size=40, splits=("train", "val"), seed=0):
    """A tiny labelled ImageFolder (ROOT/train/<cls>/*.png, ROOT/val/<cls>/*.png). Class c is a
    distinct flat colour plus noise, so the kNN answer is known (100%)."""
    rng = np.random.default_rng(seed)
    palette = [(230, 30, 30), (30, 200, 30), (30, 30, 230), (220, 220, 30), (200, 30, 200), (30, 200, 200)]
    for split in splits:
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = np.clip(np.array(palette[ci % len(palette)])[None, None] + rng.normal(0, 12, (size, size, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.png")
    return root


def write_mae_release_checkpoint(path: Path, model_name="vit_t16", img_size=32, patch_size=4, with_decoder=False, seed=0):
    """An encoder checkpoint in the official MAE release layout: {"model": timm-named encoder keys}
    (optionally with decoder_* keys and mask_token, as the *_full.pth / visualize files)."""
    import common
    torch.manual_seed(seed)
    enc = common.create_vit(model_name, img_size=img_size, patch_size=patch_size)
    sd = dict(enc.state_dict())
    if with_decoder:
        sd["mask_token"] = torch.zeros(1, 1, 16)
        sd["decoder_embed.weight"] = torch.zeros(16, enc.dim)
    torch.save({"model": sd}, path)
    return enc


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def tensors(obj, prefix=""):
    """Flatten a checkpoint (nested dicts/lists) into {key path: tensor} (weights, queues, optimizer moments)."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    out = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "imgs")
