"""Miniature reproduction: the five methods side by side on a laptop-sized problem.

Same tiny ViT (vit_t16, 32 px, patch 8; the smoke test patch 4), the synthetic 10-class dataset (or any ImageFolder via
--data), fixed seeds. Each method is trained by its own script exactly as a user would run it, then
evaluated with eval_knn.py (weighted kNN, k=20, T=0.07, CLS token, every block), with eval_linear.py (MIM-Refiner
App. C.3's DINOv2 grid of linear heads, shortened to LINEAR_EPOCHS epochs on the CPU), with a cheap full-batch
softmax probe on the kNN's frozen features and, in `full`, fine-tuned end to end by finetune.py (FINETUNE: the MAE
recipe with its epochs, warmup and lr scaled to the CPU). Writes into --output-dir:

  table.md           the Markdown table (kNN top-1 @ k=20 on the last block and on the best block, linear probe
                     (eval_linear.py's best head), feature probe, fine-tuning top-1 (last epoch), training CPU and
                     wall time); with several seeds mean +- sample std
  README.md          the same table, kNN per block, each post-hoc method minus its MAE start at the last
                     block and at its head blocks (against twice the seed std), the fine-tuning comparisons, the
                     command and the machine
  per_block_knn.png  kNN accuracy per block for each method (MIM-Refiner Figure 1 in miniature)
  results.json       every number, the commands that produced them and the machine
  seedS/             with several seeds: each seed's runs, logs and evaluations
While a script trains, its end-of-epoch line is printed with the elapsed seconds (its full output goes to
logs/train_METHOD.log). Times: each run's CPU seconds (user + system of its process, from os.wait4) beside its
wall seconds; with seeds sharing the cores the wall time depends on what the other seeds run meanwhile.

Presets: `demo` (make demo: MAE -> MIM-Refiner, seeds 0 1 2, < 10 min on 2 cores; no fine-tuning, which alone
would take longer), `full` (make repro: all methods and baselines, fine-tuning, seeds 0 1 2), `smoke` (the test: the
baselines and MAE, a few steps, fine-tuning of a few steps, seed 0).
`--seeds S1 S2 ...` overrides the preset's seeds, `--seed S` runs one seed into OUTPUT_DIR itself.
Baselines: `raw-pixels`, `random-init` (the absolute-position ViT every script but ConMIM starts from) and
`random-init-rel` (ConMIM's relative-position-bias ViT at its initialisation, ConMIM's fair baseline); both
baselines use the runs' seed, so `--seed 1 --methods random-init-rel conmim` repeats ConMIM's comparison on
another seed.
Re-running is cheap: every script resumes from its finished checkpoint and returns at once.

    python miniature/mini_repro.py --preset full --output-dir results
    python miniature/mini_repro.py --preset demo --seeds 0 1 2 --output-dir runs/demo
"""
import argparse
from concurrent.futures import ThreadPoolExecutor
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# eval_linear.py's 50 epochs (App. C.3) shortened for the CPU; 0: not run (make demo keeps to its 10 minutes)
LINEAR_EPOCHS = {"smoke": 1, "demo": 0, "full": 10}


def tiny(patch: int) -> list:
    return ["--model", "vit_t16", "--img-size", "32", "--patch-size", str(patch)]


# Per preset: data spec, patch size, epochs of the shared MAE start, and each method's extra flags. The MAE
# checkpoint is the common starting point of MAE-CT and MIM-Refiner (both are post-hoc methods);
# LUT and ConMIM train from scratch with the same epoch budget as MAE.
# Patch 8 (16 tokens per 32 px image) rather than the tests' patch 4 (64 tokens): a step costs ~4x less,
# and at patch 4 no method left chance level within the CPU budget (lab/findings.md).
PRESETS = {
    "smoke": dict(data="synthetic:64:40", batch=16, patch=4,
                  methods=["raw-pixels", "random-init", "random-init-rel", "mae"],
                  mae=["--epochs", "1", "--warmup-epochs", "0", "--decoder-dim", "32", "--decoder-depth", "1",
                       "--decoder-heads", "2"], k=[20]),
    "demo": dict(data="synthetic:2000:500", batch=128, patch=8,
                 methods=["raw-pixels", "random-init", "mae", "mim_refiner"], k=[10, 20], seeds=[0, 1, 2]),
    "full": dict(data="synthetic:2000:500", batch=128, patch=8,
                 methods=["raw-pixels", "random-init", "mae", "mae_ct", "mim_refiner", "lut", "lut-official",
                          "random-init-rel", "conmim", "conmim-official", "official-init-rel"],
                 k=[10, 20], seeds=[0, 1, 2]),
}

# Tiny-run flags per method (paper defaults scaled down: heads, queues, decoders, crops), found by the miniature
# experiments in lab/refiner.md and lab/findings.md (summary: docs/miniature.md). EMA/momentum 0.99 instead of the
# papers' 0.9999/0.996: those would leave the evaluated encoder at its starting weights within a few hundred steps.
METHOD_FLAGS = {
    "mae": ["--epochs", "20", "--warmup-epochs", "1", "--blr", "1.5e-3", "--decoder-dim", "128", "--decoder-depth", "2",
            "--decoder-heads", "4", "--vis-images", "0"],
    # blr 4e-3 and layer decay 0.8: in ~100 updates the paper's 0.65 gives the head blocks a summed lr 50-1000x
    # below the paper's run and the encoder stays at its start; top-1 NN (Table 10: random top-20): the heads'
    # NN shares the label only ~30% of the time in this budget, a top-k pick adds more wrong positives;
    # head-blr 1e-2: 2 points more at the head blocks than 2e-3 after the same refinement
    # (measured with lab/refiner_diagnose.py and mini_repro runs: lab/refiner.md)
    "mim_refiner": ["--batch-size", "64", "--head-epochs", "1", "--epochs", "8", "--warmup-epochs", "0.5", "--blr", "4e-3",
                    "--head-blr", "1e-2", "--layer-decay", "0.8", "--queue-size", "512", "--local-crops", "2",
                    "--head-hidden", "256", "--pred-hidden", "512", "--topk", "1", "--ema-momentum", "0.99"],
    "mae_ct": ["--batch-size", "64", "--head-epochs", "1", "--epochs", "6", "--aug", "byol", "--blr", "4e-3",
               "--head-blr", "2e-3", "--head-init-blr", "2e-3", "--encoder-ema", "0.99", "--layer-decay", "0.8",
               "--temperature", "0.2", "--queue-size", "512", "--topk", "1", "--proj-hidden", "256", "--proj-dim", "64",
               "--pred-hidden", "512"],
    # same budget as MAE (epochs, batch, decoder)
    "lut": ["--epochs", "20", "--warmup-epochs", "1", "--blr", "1.5e-3", "--decoder-dim", "128", "--decoder-depth", "2",
            "--decoder-heads", "4", "--head-hidden-dim", "512", "--pred-hidden-dim", "512", "--momentum", "0.99"],
    # mask block 1: at a 4x4 patch grid the paper's 2x2-patch masking cells would leave 4 cells per image.
    # --rel-pos-lr-mult 200: the relative position bias is the only thing that tells the mask tokens apart and
    # must reach O(1) within 300 steps (conmim.py docstring); at the paper's lr it ends at 0.06, loss at log 16
    "conmim": ["--epochs", "20", "--warmup-epochs", "1", "--lr", "5e-4", "--head-hidden-dim", "256", "--head-out-dim", "64",
               "--mask-block", "1", "--rel-pos-lr-mult", "200"],
}


# The official code's rows (miniature/official_miniature.py): the official model and loss with the same flags as our
# row, from a local checkout (--official-lut / --official-conmim); `official-init-rel` is the official ConMIM
# model's own initialisation (BEiT init, layer scale), its fair baseline. Without a checkout the rows are left out.
OFFICIAL = {"lut-official": "lut", "conmim-official": "conmim"}
OFFICIAL_REPOS = {"lut": "https://github.com/naver-ai/lut", "conmim": "https://github.com/TencentARC/ConMIM"}
# (method, its baseline) pairs of the README's comparison table: LUT against MAE from the same budget (the paper's
# linear-probe claim), ConMIM against its own start, and each official row beside ours
COMPARE = [("lut", "mae"), ("lut-official", "mae"), ("lut-official", "lut"), ("conmim", "random-init-rel"),
           ("conmim-official", "official-init-rel"), ("conmim-official", "conmim")]
# The fine-tuning comparisons of the README: (method, its number, baseline, the baseline's number). Numbers:
# "finetune" = finetune.py's last-epoch top-1 with the method's first encoder of FINETUNE_ENCODERS,
# "finetune:NAME" with encoder NAME, "linear_grid" = eval_linear.py's probe (of "model": ConMIM's online encoder).
FT_COMPARE = [
    # pre-training against supervised training from scratch with the same recipe (MAE Sec. 4, Table 3)
    ("mae", "finetune", "random-init", "finetune"),
    # fine-tuning against the linear probe of the same encoder (MAE Table 3 vs its linear probing)
    *[(m, "finetune", m, "linear_grid") for m in ("random-init", "mae", "mae_ct", "mim_refiner", "lut",
                                                   "random-init-rel")],
    ("conmim", "finetune:online", "conmim", "linear_grid"),
    # LUT against MAE (LUT Table 1: ViT-B 84.2 vs 83.6); ConMIM against scratch and against its own start
    ("lut", "finetune", "mae", "finetune"),
    ("conmim", "finetune", "random-init", "finetune"),
    ("conmim", "finetune", "random-init-rel", "finetune"),
    ("conmim", "finetune:online", "random-init-rel", "finetune"),
]


def with_flag(flags: list, name: str, value: str) -> list:
    """A copy of `flags` with the value after `name` replaced."""
    i = flags.index(name)
    return flags[:i + 1] + [value] + flags[i + 2:]


# `make demo` runs 3 seeds in 10 minutes on 2 cores: MIM-Refiner refines 4 epochs instead of 8
PRESETS["demo"]["mim_refiner"] = with_flag(METHOD_FLAGS["mim_refiner"], "--epochs", "4")

# Fine-tuning (finetune.py, run as a user would on each method's checkpoint): the MAE recipe (facebookresearch/mae
# FINETUNE.md; finetune.py has no ViT-T row and takes the ViT-B one: layer decay 0.65, drop path 0.1, RandAugment
# (9, 0.5), random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1, weight decay 0.05, average pooling)
# with only the budget scaled to the CPU: all 2,000 train images at batch 128 (15 updates per epoch), 10 epochs
# instead of 100 (150 updates, ~150 CPU seconds a run: 24 runs in ~31 minutes on 2 cores), warmup 1 epoch (the
# recipe's 5 of 100 epochs would be half of this run) and blr 8e-3 instead of 5e-4 (lr 4e-3 at batch 128): of blr
# 5e-4, 2e-3 and 8e-3, 8e-3 fine-tuned both MAE's start and the random init best in 150 updates (docs/miniature.md).
# RandAugment's magnitude is clipped at 9 instead of 10 (mmax9): results/ was made so, before finetune.py gave
# timm's PosterizeIncreasing at magnitude 10 (0 bits kept, which Pillow >= 13 refuses) the black image older Pillow
# gave; the clip changes the draws above 9 of N(9, 0.5), about 2 %.
FT_RAND_AUG = "rand-m9-mstd0.5-inc1-mmax9"
FINETUNE_FLAGS = {
    "smoke": ["--recipe", "mae", "--epochs", "1", "--warmup-epochs", "0", "--rand-aug", FT_RAND_AUG],
    "full": ["--recipe", "mae", "--epochs", "10", "--warmup-epochs", "1", "--blr", "8e-3", "--rand-aug", FT_RAND_AUG],
}
# The encoders fine-tuned, per preset: scratch (random-init: `finetune.py --init none --model vit_t16`), ConMIM's
# fair baseline (random-init-rel, its relative-position-bias ViT at initialisation), MAE and the methods built on it,
# LUT and ConMIM. Not the official rows: their kNN and linear probes already compare them with ours.
FINETUNE_METHODS = {"smoke": ["random-init", "random-init-rel", "mae"],
                    "full": ["random-init", "mae", "mae_ct", "mim_refiner", "lut", "random-init-rel", "conmim"]}
# Which encoders of a file (finetune.py --encoder); the first is the table's column. ConMIM: its default, the
# momentum teacher (as the official README fine-tunes), and the online encoder, which kNN and eval_linear.py
# evaluate: after 300 updates at momentum 0.996-1 the teacher still holds much of its initialisation.
FINETUNE_ENCODERS = {"conmim": [("teacher", []), ("online", ["--encoder", "model"])]}

PAPER_NUMBERS = {  # ImageNet-1K, for orientation only (different scale entirely)
    "mae": "MAE L/16 kNN 60.6 (MIM-Refiner Tab. 2)",
    "mim_refiner": "MAE-Refined L/16 kNN 81.5; D2V2-Refined H/14 kNN 82.3 (MIM-Refiner Tab. 2)",
}


def run(cmd, log_path, env=None, label=None) -> tuple[float, float]:
    """Run `cmd`, all its output into `log_path`; with `label`, also print the child's per-epoch lines
    ("epoch N ... done, loss ...") with the seconds since the start, so a long training shows it is alive.
    Returns (wall seconds, CPU seconds: user + system of the child and of the processes it waited for)."""
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        for raw in p.stdout:  # tqdm redraws with \r: the log keeps everything, the console the epoch lines
            log.write(raw.decode(errors="replace"))
            for line in raw.decode(errors="replace").split("\r"):
                m = EPOCH_LINE.search(line) if label else None  # may follow an unterminated tqdm bar
                if m:
                    print(f"   [{label}] {line[m.start():].strip().split('; saved')[0]} ({time.time() - t0:.0f} s)",
                          flush=True)
        # wait4 on this pid, not p.wait() with a getrusage(RUSAGE_CHILDREN) delta: the seeds' threads end children
        # at the same time, and a process-wide delta would count another seed's child in this one
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        tail = Path(log_path).read_text()[-3000:]
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return time.time() - t0, usage.ru_utime + usage.ru_stime


def timed_run(cmd, run_dir: Path, log_path, env=None, label=None) -> tuple[float, float | None]:
    """run() for a resumable script writing into `run_dir`: (wall, CPU) seconds of the run that did the work.
    Re-running resumes finished runs at once; the times the work took when it ran are stored beside its checkpoint
    and returned instead of the no-op's. A run killed half-way and resumed counts its remainder only; a time
    stored by an older harness without the CPU seconds gives None for them."""
    stamp = run_dir / "mini_repro_train_seconds.txt"
    done_before = stamp.exists() and (run_dir / "checkpoint-last.pth").exists()
    secs, cpu = run(cmd, log_path, env=env, label=label)
    if done_before:
        stored = stamp.read_text().split()
        return float(stored[0]), float(stored[1]) if len(stored) > 1 else None
    stamp.write_text(f"{secs:.1f} {cpu:.1f}\n")
    return secs, cpu


IN_PROCESS = threading.RLock()  # seeds run in parallel threads; in-process torch work (global RNG) one at a time
# every script's end-of-epoch line (common.Logger.print); finetune.py's: "epoch N: train loss ...; val top-1 ..."
EPOCH_LINE = re.compile(r"epoch \d+(/\d+:| [^|]*done|: train loss)")


def train(method, preset, out: Path, mae_ckpt, seed: int, label: str = ""):
    """Train `method` with its script; returns (checkpoint path or None, wall seconds, CPU seconds, command)."""
    py = sys.executable
    common_flags = tiny(preset["patch"]) + ["--data", preset["data"], "--batch-size", str(preset["batch"]), "--num-workers", "0",
                           "--device", "cpu", "--seed", str(seed)]
    if method in ("raw-pixels", "random-init"):
        return None, 0.0, 0.0, []
    if method == "random-init-rel":  # ConMIM's own starting point (same seed, same call): its fair baseline
        import common
        path = out / "runs" / method / "checkpoint-last.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        with IN_PROCESS:  # the global RNG: one seed's baseline at a time
            common.seed_everything(seed)
            enc = common.create_vit("vit_t16", img_size=32, patch_size=preset["patch"], rel_pos_bias=True)
        common.save_checkpoint(str(path), {"model": enc.state_dict()})
        return path, 0.0, 0.0, []
    if method == "official-init-rel":  # written by the conmim-official run
        return out / "runs" / "conmim-official" / "checkpoint-init.pth", 0.0, 0.0, []
    script = OFFICIAL.get(method, method)
    flags = preset.get(script) or METHOD_FLAGS[script]
    run_dir = out / "runs" / method
    cmd = [py, f"{method}.py", *common_flags, "--output-dir", run_dir, *flags]
    if method in OFFICIAL:
        cmd = [py, "miniature/official_miniature.py", script, "--repo", preset["official"][script], "--output-dir",
               run_dir, "--", *common_flags, *flags]
    if method in ("mae_ct", "mim_refiner"):
        cmd += ["--init", mae_ckpt]
    secs, cpu = timed_run(cmd, run_dir, out / "logs" / f"train_{method}.log", env=preset.get("env"),
                          label=method + label)
    return run_dir / "checkpoint-last.pth", secs, cpu, cmd


def finetune(method, ckpt, preset, out: Path, seed: int, label: str = "") -> dict:
    """Fine-tune `method`'s encoder(s) with finetune.py (FINETUNE_FLAGS; `--init none --model vit_t16` for
    random-init), each as its own run; per encoder name {top1_last, top1_best, epoch_last, epoch_best, seconds,
    cpu_seconds, cmd, protocol} from finetune.py's --output-json (protocol: the values it resolved and ran with)."""
    res = {}
    for name, extra in FINETUNE_ENCODERS.get(method, [("", [])]):
        tag = method + (f"-{name}" if name else "")
        run_dir, js = out / "finetune" / tag, out / "evals" / f"{tag}_finetune.json"
        cmd = [sys.executable, "finetune.py", *tiny(preset["patch"]), "--data", preset["data"], "--batch-size",
               str(preset["batch"]), "--num-workers", "0", "--device", "cpu", "--seed", str(seed),
               "--init", "none" if ckpt is None else ckpt, *extra, *preset["finetune_flags"], "--output-dir", run_dir,
               "--output-json", js]
        secs, cpu = timed_run(cmd, run_dir, out / "logs" / f"finetune_{tag}.log", env=preset.get("env"),
                              label=f"finetune {tag}{label}")
        r = json.loads(js.read_text())
        res[name] = dict(top1_last=r["top1_last"], top1_best=r["top1_best"], epoch_last=r["epoch_last"],
                         epoch_best=r["epoch_best"], seconds=secs, cpu_seconds=cpu, cmd=" ".join(map(str, cmd)),
                         protocol=r["protocol"])
    return res


def evaluate(method, ckpt, preset, out: Path, seed: int):
    """kNN per block (CLS, k from the preset, T 0.07) and features for the linear probe."""
    js = out / "evals" / f"{method}.json"
    feats = out / "evals" / f"{method}_features.pth"
    cmd = [sys.executable, "eval_knn.py", *tiny(preset["patch"]), "--data", preset["data"], "--num-workers", "0", "--device", "cpu",
           "--k", *map(str, preset["k"]), "--output-json", js, "--save-features", feats]
    if method == "raw-pixels":
        with IN_PROCESS:
            return raw_pixel_knn(preset, js, feats), cmd[:1]
    cmd += ["--checkpoint", "none" if ckpt is None else ckpt, "--blocks", "all"]
    if method == "random-init":
        cmd += ["--seed", str(seed)]
    run(cmd, out / "logs" / f"eval_{method}.log", env=preset.get("env"))
    res = json.loads(js.read_text())
    with IN_PROCESS:  # linear_probe seeds the global RNG
        res["linear_probe"] = linear_probe(torch.load(feats, weights_only=True))
    if not preset["linear_epochs"]:
        res["linear_grid"] = None
        return res, cmd
    lin = out / "evals" / f"{method}_linear.json"
    lcmd = [sys.executable, "eval_linear.py", *tiny(preset["patch"]), "--data", preset["data"],
            "--num-workers", "0", "--device", "cpu", "--checkpoint", "none" if ckpt is None else ckpt,
            "--protocol", "dinov2", "--epochs", str(preset["linear_epochs"]), "--batch-size", str(preset["batch"]),
            "--output-json", lin, *(["--seed", str(seed)] if method == "random-init" else [])]
    run(lcmd, out / "logs" / f"linear_{method}.log", env=preset.get("env"))
    best = json.loads(lin.read_text())["best"]
    res["linear_grid"], res["linear_grid_head"] = best["top1"], best["name"]
    return res, cmd + ["&&"] + lcmd


def raw_pixel_knn(preset, js, feats):
    """kNN on the flattened normalised 32x32 pixels of the evaluation transform (the floor)."""
    import common
    from eval_knn import knn_classify
    tf = common.eval_transform(32)
    data = {}
    for split in ("train", "val"):
        ds = common.build_dataset(preset["data"], split, tf, img_size=32, require_labels=True)
        xs, ys = zip(*[ds[i] for i in range(len(ds))])
        data[split] = (torch.stack(xs).flatten(1), torch.tensor(ys))
    nc = int(data["train"][1].max()) + 1
    f = lambda x: torch.nn.functional.normalize(x, dim=1)  # noqa: E731
    acc = knn_classify(f(data["train"][0]), data["train"][1], f(data["val"][0]), data["val"][1], preset["k"], 0.07, nc, 256)
    res = {"top1": {str(k): v for k, v in acc["top1"].items()}}
    res["linear_probe"] = linear_probe({"train_features": data["train"][0], "train_labels": data["train"][1],
                                        "val_features": data["val"][0], "val_labels": data["val"][1]})
    res["linear_grid"] = None  # no encoder to probe
    Path(js).write_text(json.dumps(res, indent=2))
    return res


def linear_probe(f, epochs=100, lr=0.05):
    """Full-batch softmax regression on standardised frozen features (AdamW, 100 steps): cheap and
    deterministic; top-1 % on val. A probe, not the MAE paper's LARS protocol."""
    torch.manual_seed(0)
    xtr, ytr = f["train_features"].float(), f["train_labels"].long()
    xva, yva = f["val_features"].float(), f["val_labels"].long()
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    nc = int(ytr.max()) + 1
    lin = torch.nn.Linear(xtr.shape[1], nc)
    opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * (lin(xva).argmax(1) == yva).float().mean().item()


def plot(summary, path, k: str):
    """kNN per block for each method: the seed mean, shaded +- one std when there are several seeds."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: `pip install matplotlib` to get the per-block plot")
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, d in summary.items():
        pb = d.get("per_block")
        if not pb:
            continue
        blocks = sorted(pb)
        mu = [pb[b]["mean"] for b in blocks]
        sd = [pb[b]["std"] for b in blocks]
        line, = ax.plot([b + 1 for b in blocks], mu, marker="o", label=m)
        if any(sd):
            ax.fill_between([b + 1 for b in blocks], [x - y for x, y in zip(mu, sd)], [x + y for x, y in zip(mu, sd)],
                            color=line.get_color(), alpha=0.2)
    ax.set_xlabel("block")
    ax.set_ylabel(f"kNN top-1 (%), k={k}")
    ax.set_title("kNN accuracy of the CLS token per block (cf. MIM-Refiner Fig. 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run_seed(methods, preset, out: Path, seed: int, label: str = "") -> tuple[dict, float]:
    """Train and evaluate `methods` with one seed into `out`; returns (results per method, total seconds as
    if everything had run in this invocation)."""
    for d in ("logs", "evals", "runs"):
        (out / d).mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    results, mae_ckpt = {}, None
    reused = 0.0  # seconds of training and fine-tuning runs that finished in an earlier invocation
    for m in methods:
        print(f"== {m}{label}: training", flush=True)
        t_train = time.time()
        ckpt, secs, cpu, cmd = train(m, preset, out, mae_ckpt, seed, label)
        reused += max(secs - (time.time() - t_train), 0.0)
        if m == "mae":
            mae_ckpt = ckpt
        cpu_txt = "" if cpu is None else f", {cpu:.0f} CPU s"
        print(f"== {m}{label}: evaluating ({secs:.0f} s of training{cpu_txt})", flush=True)
        res, ecmd = evaluate(m, ckpt, preset, out, seed)
        results[m] = {"train_seconds": secs, "train_cpu_seconds": cpu, "train_cmd": " ".join(map(str, cmd)),
                      "eval_cmd": " ".join(map(str, ecmd)), "eval": res}
        if ckpt is not None and m in ("mae_ct", "mim_refiner"):
            results[m]["head_blocks"] = torch.load(ckpt, map_location="cpu", weights_only=True).get("head_blocks")
        k = "20" if "20" in res["top1"] else next(iter(res["top1"]))
        grid = "-" if res["linear_grid"] is None else f"{res['linear_grid']:.1f}"
        print(f"   kNN top-1 @k={k}: {res['top1'][k]:.1f}   linear probe: {grid}   feature probe: "
              f"{res['linear_probe']:.1f}", flush=True)
        if m in preset.get("finetune_methods", []):
            print(f"== {m}{label}: fine-tuning", flush=True)
            t_ft = time.time()
            ft = results[m]["finetune"] = finetune(m, ckpt, preset, out, seed, label)
            reused += max(sum(r["seconds"] for r in ft.values()) - (time.time() - t_ft), 0.0)
            print("   fine-tuned top-1 (last epoch): " + ", ".join(
                f"{name or m}: {r['top1_last']:.1f}" for name, r in ft.items()), flush=True)
    return results, time.time() - t_start + reused


def mean_std(values: list) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mu = sum(values) / n
    return mu, (sum((v - mu) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


def summarize(per_seed: dict, k: str) -> dict:
    """Per method over the seeds: last-block kNN, linear probe, per-block kNN and train time, each
    {"values", "mean", "std"}."""
    seeds = list(per_seed)
    out = {}
    for m in per_seed[seeds[0]]:
        rs = [per_seed[s][m] for s in seeds]
        agg = lambda vs: dict(zip(("mean", "std"), mean_std(vs)), values=vs)  # noqa: E731
        cpu = [r.get("train_cpu_seconds") for r in rs]
        d = {"knn": agg([r["eval"]["top1"][k] for r in rs]), "linear_probe": agg([r["eval"]["linear_probe"] for r in rs]),
             "linear_grid": agg([r["eval"]["linear_grid"] for r in rs]) if rs[0]["eval"].get("linear_grid") is not None
             else None,
             "train_seconds": agg([r["train_seconds"] for r in rs]),
             "train_cpu_seconds": agg(cpu) if None not in cpu else None}
        if rs[0].get("finetune"):
            d["finetune"] = {}
            for name in rs[0]["finetune"]:
                fts = [r["finetune"][name] for r in rs]
                cpu = [f["cpu_seconds"] for f in fts]
                d["finetune"][name] = {"top1": agg([f["top1_last"] for f in fts]),
                                       "top1_best": agg([f["top1_best"] for f in fts]),
                                       "epoch_best": [f["epoch_best"] for f in fts],
                                       "epoch_last": fts[0]["epoch_last"], "seconds": agg([f["seconds"] for f in fts]),
                                       "cpu_seconds": agg(cpu) if None not in cpu else None,
                                       "protocol": fts[0].get("protocol")}
        pb = rs[0]["eval"].get("per_block")
        if pb:
            blocks = sorted(int(b) for b in pb if b.lstrip("-").isdigit())
            d["per_block"] = {b: agg([r["eval"]["per_block"][str(b)]["top1"][k] for r in rs]) for b in blocks}
        if rs[0].get("head_blocks"):
            d["head_blocks"] = rs[0]["head_blocks"]
        out[m] = d
    return out


def lifts(summary: dict, start: str = "mae") -> dict:
    """A post-hoc method vs its start (MAE), at the last block and at every block with a head: the difference
    of the seed means, the larger of the two seed stds, and whether the difference exceeds twice that."""
    out = {}
    if start not in summary:
        return out
    for m, d in summary.items():
        if "head_blocks" not in d or "per_block" not in d:
            continue
        last = max(d["per_block"])
        rows = {}
        for b in sorted(set(d["head_blocks"]) | {last}):
            a, s = d["per_block"][b], summary[start]["per_block"][b]
            paired = [x - y for x, y in zip(a["values"], s["values"])]
            std = max(a["std"], s["std"])
            rows[b] = dict(delta=a["mean"] - s["mean"], std=std, paired=paired,
                           above_2std=len(paired) > 1 and a["mean"] - s["mean"] > 2 * std)
        out[m] = rows
    return out


def difference(a: dict, b: dict) -> dict:
    """a minus b (each {"values", "mean", "std"} over the same seeds): the difference of the seed means, the larger
    seed std, the per-seed differences and whether the difference exceeds twice that std (either sign)."""
    paired = [x - y for x, y in zip(a["values"], b["values"])]
    std = max(a["std"], b["std"])
    delta = a["mean"] - b["mean"]
    return dict(delta=delta, std=std, paired=paired, beyond_2std=len(paired) > 1 and abs(delta) > 2 * std)


def compare(summary: dict) -> list:
    """COMPARE pairs present in `summary`: per metric (last-block kNN, eval_linear.py's probe) difference()."""
    rows = []
    for m, base in COMPARE:
        if m not in summary or base not in summary:
            continue
        r = dict(method=m, baseline=base)
        for metric in ("knn", "linear_grid"):
            a, b = summary[m].get(metric), summary[base].get(metric)
            if a and b:
                r[metric] = difference(a, b)
        rows.append(r)
    return rows


def number(summary: dict, method: str, name: str):
    """The {"values", "mean", "std"} of one of FT_COMPARE's numbers, or None where it was not measured."""
    d = summary.get(method) or {}
    if not name.startswith("finetune"):
        return d.get(name)
    ft = d.get("finetune") or {}
    enc = name.partition(":")[2] or next(iter(ft), None)
    return (ft.get(enc) or {}).get("top1")


def ft_compare(summary: dict) -> list:
    """FT_COMPARE rows present in `summary`: {method, number, baseline, baseline_number, **difference()}."""
    rows = []
    for m, a_name, base, b_name in FT_COMPARE:
        a, b = number(summary, m, a_name), number(summary, base, b_name)
        if a and b:
            rows.append(dict(method=m, number=a_name, baseline=base, baseline_number=b_name, **difference(a, b)))
    return rows


def number_label(summary: dict, method: str, name: str) -> str:
    """A README label: `mae fine-tuned`, `conmim fine-tuned (teacher)`, `mae linear probe`."""
    if name == "linear_grid":
        return f"{method} linear probe" + (" (online encoder)" if method in FINETUNE_ENCODERS else "")
    enc = name.partition(":")[2] or next(iter(summary[method]["finetune"]))
    who = "scratch" if method == "random-init" else method
    return f"{who} fine-tuned" + (f" ({enc})" if enc else "")


def verdict(r: dict, n: int) -> str:
    if n < 2:
        return "- (one seed)"
    if not r["beyond_2std"]:
        return "no"
    return "yes, above" if r["delta"] > 0 else "yes, below"


def compare_lines(rows: list, n: int, k: str) -> list:
    names = {"knn": f"kNN (k={k}, last block)", "linear_grid": "linear probe"}
    L = ["| method | baseline | " + " | ".join(f"{v}: difference (std; per seed; beyond 2 std)" for v in names.values())
         + " |", "|---|---|---|---|"]
    for r in rows:
        cells = []
        for metric in names:
            d = r.get(metric)
            if d is None:
                cells.append("-")
                continue
            verdict = ("yes" if d["beyond_2std"] else "no") if n > 1 else "one seed"
            cells.append(f"{d['delta']:+.1f} ({d['std']:.1f}; {', '.join(f'{v:+.1f}' for v in d['paired'])}; {verdict})")
        L.append(f"| {r['method']} | {r['baseline']} | " + " | ".join(cells) + " |")
    return L


def pm(d: dict, n: int) -> str:
    return f"{d['mean']:.1f} +- {d['std']:.1f}" if n > 1 else f"{d['mean']:.1f}"


def secs(d: dict | None) -> str:
    """Seconds (the seed mean) for the tables; '-' where an older invocation did not store them."""
    return "-" if d is None else f"{d['mean']:.0f} s"


def machine_desc() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({platform.machine()}), {os.cpu_count()} cores, torch {torch.__version__}, {platform.system()}"


def main_table(summary: dict, k: str, n: int) -> list:
    """The results table (Markdown lines): per method the last-block kNN, the best block, the linear probe, the
    fine-tuning (finetune.py's default encoder, last epoch; where a method was fine-tuned), the training CPU and
    wall time, each as mean +- std over the n seeds (the times: the mean)."""
    with_ft = any(d.get("finetune") for d in summary.values())
    lines = [f"| method | kNN top-1 (k={k}), last block | best block: kNN top-1 | linear probe top-1 (eval_linear.py) | "
             f"feature probe top-1 | " + ("fine-tuning top-1 (finetune.py, last epoch) | " if with_ft else "")
             + "train CPU time | train wall time |", "|---|---|---|---|---|" + "---|" * (2 + with_ft)]
    for m, d in summary.items():
        pb = d.get("per_block")
        best = "-"
        if pb:
            b = max(pb, key=lambda b: pb[b]["mean"])
            best = f"{pm(pb[b], n)} (block {b + 1})"
        grid = pm(d["linear_grid"], n) if d.get("linear_grid") else "-"
        ft = number(summary, m, "finetune")
        lines.append(f"| {m} | {pm(d['knn'], n)} | {best} | {grid} | {pm(d['linear_probe'], n)} | "
                     + (f"{pm(ft, n) if ft else '-'} | " if with_ft else "")
                     + f"{secs(d.get('train_cpu_seconds'))} | {secs(d['train_seconds'])} |")
    return lines


def finetune_lines(summary: dict, preset: dict, n: int) -> list:
    """The README's fine-tuning section: the recipe, every fine-tuned encoder (last and best epoch, CPU time), the
    FT_COMPARE differences and the verdicts, all from `summary`."""
    fts = {m: d["finetune"] for m, d in summary.items() if d.get("finetune")}
    if not fts:
        return []
    flags = " ".join(preset["finetune_flags"])
    first = next(iter(next(iter(fts.values())).values()))
    epochs = first["epoch_last"] + 1
    proto = first.get("protocol") or {}
    values = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in proto.items()
                       if k not in ("recipe_line", "init", "weights", "seed", "labelled") and v is not None)
    L = ["", "## Fine-tuning", "",
         f"finetune.py on each checkpoint, as a user would run it: `finetune.py --init CHECKPOINT {flags}` with the "
         f"data, batch {preset['batch']}, seed and model flags of the table (the scratch row: `--init none --model "
         f"vit_t16`): the MAE recipe with its budget scaled to the CPU (why each value: docs/miniature.md). "
         + (f"The values finetune.py ran with (its --output-json): {values}. " if values else "")
         + "The column is the val top-1 after the last epoch; the best epoch's (the maximum over epochs on val, which "
           "the official scripts report) is beside it."
         + (" ConMIM: finetune.py's default encoder is the momentum teacher (the official README fine-tunes it), "
            "which after 300 updates at momentum 0.996 -> 1 still holds about half of its initialisation; the online "
            "encoder (the one kNN and eval_linear.py read) is the extra row." if "conmim" in fts else ""),
         "", "| encoder | fine-tuning top-1, last epoch | best epoch's top-1 | best epoch per seed (1-based, of "
         f"{epochs}) | CPU time per run | wall time per run |", "|---|---|---|---|---|---|"]
    for m, per_enc in fts.items():
        for enc, d in per_enc.items():
            who = ("random-init (scratch)" if m == "random-init" else m) + (f", {enc}" if enc else "")
            L.append(f"| {who} | {pm(d['top1'], n)} | {pm(d['top1_best'], n)} | "
                     f"{', '.join(str(e + 1) for e in d['epoch_best'])} | {secs(d['cpu_seconds'])} | "
                     f"{secs(d['seconds'])} |")
    rows = ft_compare(summary)
    if not rows:
        return L
    L += ["", "Differences (top-1 points; std = the larger of the two seed stds; 'yes' = the difference of the seed "
          "means is more than twice that std):", "",
          "| number | against | difference | std | per seed | more than 2 std |", "|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {number_label(summary, r['method'], r['number'])} | "
                 f"{number_label(summary, r['baseline'], r['baseline_number'])} | {r['delta']:+.1f} | {r['std']:.1f} | "
                 f"{', '.join(f'{v:+.1f}' for v in r['paired'])} | {verdict(r, n)} |")
    if n < 2:
        return L
    by = {(r["method"], r["number"], r["baseline"], r["baseline_number"]): r for r in rows}

    def said(key, what, claim=False):
        """One verdict line: a claim (`what` = "A above B") answered yes / no, a measurement (`what` = "A against
        B") as above, below or within 2 std."""
        r = by.get(key)
        if r is None:
            return None
        above = r["beyond_2std"] and r["delta"] > 0
        v = ("yes" if above else "no") if claim else (
            "within 2 std" if not r["beyond_2std"] else f"{'above' if above else 'below'} by more than 2 std")
        return (f"- {what}{' by more than 2 std' if claim else ''}: **{v}** ({r['delta']:+.1f} points; 2 std = "
                f"{2 * r['std']:.1f}; per seed {', '.join(f'{x:+.1f}' for x in r['paired'])})")
    L += ["", "Verdicts (written from the numbers above):", ""]
    L += filter(None, [said(("mae", "finetune", "random-init", "finetune"),
                            "fine-tuning from MAE above fine-tuning from scratch", claim=True)])
    above = [r for r in rows if r["baseline_number"] == "linear_grid"]
    if above:
        ok = [r["method"] for r in above if r["beyond_2std"] and r["delta"] > 0]
        not_ok = [r["method"] for r in above if r["method"] not in ok]
        L.append("- fine-tuning above the linear probe of the same encoder by more than 2 std: "
                 + (f"**yes** for {', '.join(ok)}" if ok else "**for none**")
                 + (f"; **no** for {', '.join(not_ok)}" if not_ok else "")
                 + " (" + ", ".join(f"{r['method']} {r['delta']:+.1f}" for r in above) + ")")
    L += filter(None, [
        said(("lut", "finetune", "mae", "finetune"), "LUT against MAE (the paper: ViT-B 84.2 against 83.6)"),
        said(("conmim", "finetune", "random-init", "finetune"), "ConMIM (teacher) against scratch"),
        said(("conmim", "finetune", "random-init-rel", "finetune"),
             "ConMIM (teacher) against its own start (random-init-rel fine-tuned)"),
        said(("conmim", "finetune:online", "random-init-rel", "finetune"),
             "ConMIM (online encoder) against its own start")])
    return L


def cpu_line(summary: dict, n: int) -> list:
    """One README line: the CPU time of all training and fine-tuning runs, summed over methods and seeds."""
    parts = {"training": [d.get("train_cpu_seconds") for d in summary.values()],
             "fine-tuning": [f["cpu_seconds"] for d in summary.values() for f in (d.get("finetune") or {}).values()]}
    txt = [f"{what} {sum(x['mean'] for x in v) * n / 60:.1f} min" for what, v in parts.items() if v and None not in v]
    return [f"- CPU time (user + system) of the runs, all seeds: {', '.join(txt)}"] if txt else []


def write_readme(out: Path, command: str, preset_name: str, preset: dict, seeds: list, summary: dict, lift: dict,
                 per_seed_total: dict, total: float, jobs: int, k: str, machine: str, plotted: bool):
    n = len(seeds)
    L = [f"# Miniature reproduction: preset `{preset_name}`", "",
         "Written by `miniature/mini_repro.py` from the run it describes (do not edit by hand).", "",
         f"- command: `{command}`", f"- machine: {machine}",
         f"- data `{preset['data']}`, vit_t16 at 32 px / patch {preset['patch']}; seeds {', '.join(map(str, seeds))}"
         + (f" (mean +- sample std over the {n} seeds)" if n > 1 else ""),
         f"- wall time: {total / 60:.1f} min in all, {jobs} seed(s) at a time (per seed, with the training and "
         "fine-tuning runs reused from an earlier invocation counted: "
         + ", ".join(f"seed {s}: {t:.0f} s" for s, t in per_seed_total.items()) + ")",
         *cpu_line(summary, n), "",
         *main_table(summary, k, n), "",
         "kNN: eval_knn.py, weighted vote, T 0.07, [CLS] after the final norm. Linear probe: "
         + (f"eval_linear.py --protocol dinov2 (MIM-Refiner App. C.3's grid of 52 heads, RandomResizedCrop + flip), "
            f"the best head on val, {preset['linear_epochs']} epochs instead of 50 on the CPU"
            if preset["linear_epochs"] else "not run in this preset (`--preset full` runs eval_linear.py)")
         + ". Feature probe: a full-batch softmax regression on the standardised last-block [CLS] features of the kNN "
           "(100 AdamW steps, no augmentation)."
         + (" Fine-tuning: finetune.py, below." if any(d.get("finetune") for d in summary.values()) else "")
         + " Train CPU time: user + system "
           "seconds of the training process (os.wait4), the cost to compare between methods; train wall time: "
           + (f"with {jobs} seeds sharing {os.cpu_count()} cores, it depends on what the other seeds ran meanwhile."
              if jobs > 1 else "one run at a time.")]
    blocks = next((sorted(d["per_block"]) for d in summary.values() if "per_block" in d), [])
    if blocks:
        L += ["", f"kNN top-1 (k={k}) per block (1-based, as in the plot):", "",
              "| method | " + " | ".join(str(b + 1) for b in blocks) + " |", "|---|" + "---|" * len(blocks)]
        for m, d in summary.items():
            if "per_block" in d:
                L.append(f"| {m} | " + " | ".join(pm(d["per_block"][b], n) for b in blocks) + " |")
    for m, rows in lift.items():
        L += ["", f"{m} minus its MAE start (kNN top-1, k={k}; heads on blocks "
              f"{', '.join(str(b + 1) for b in summary[m]['head_blocks'])}; std = the larger of the two seed stds):", "",
              "| block | difference of the means | std | per seed | more than 2 std |", "|---|---|---|---|---|"]
        for b, r in rows.items():
            verdict = ("yes" if r["above_2std"] else "no") if n > 1 else "- (one seed)"
            L.append(f"| {b + 1} | {r['delta']:+.1f} | {r['std']:.1f} | {', '.join(f'{v:+.1f}' for v in r['paired'])} | "
                     f"{verdict} |")
    rows = compare(summary)
    if rows:
        L += ["", "LUT against MAE from the same budget (the paper claims +2 points of linear probing over MAE, Sec. 1), "
              "ConMIM against its own start, and the official code's rows (miniature/official_miniature.py: the "
              "official model and loss with the same data and schedule) beside ours; std = the larger of the two "
              "seed stds:", "", *compare_lines(rows, n, k)]
    L += finetune_lines(summary, preset, n)
    for note in preset.get("notes", []):
        L += ["", note]
    if plotted:
        L += ["", "![kNN per block](per_block_knn.png)"]
    (out / "README.md").write_text("\n".join(L) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--output-dir", default="results")
    ap.add_argument("--data", default=None, help="override the preset's data (synthetic[:N[:M]] or an ImageFolder root)")
    ap.add_argument("--methods", nargs="+", default=None, help="subset of the preset's methods")
    ap.add_argument("--seed", type=int, default=None, help="one seed for every training run and both random-init "
                    "baselines (the data stay the same); default: the preset's seeds")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds: each into OUTPUT_DIR/seedS, "
                    "then mean +- std over them in OUTPUT_DIR (table.md, README.md, results.json, plot)")
    ap.add_argument("--jobs", type=int, default=None, help="seeds trained at the same time, each child process with "
                    "cores // jobs threads; default: all seeds at once (tiny models use 1 thread best); "
                    "thread counts change floating-point order, hence the last digits")
    ap.add_argument("--official-lut", default=None, help="a checkout of naver-ai/lut: adds the row lut-official "
                    "(the official model and loss on the same miniature; miniature/official_miniature.py)")
    ap.add_argument("--official-conmim", default=None, help="a checkout of TencentARC/ConMIM: adds the rows "
                    "conmim-official and official-init-rel (its initialisation)")
    a = ap.parse_args(argv)
    if a.seed is not None and a.seeds is not None:
        raise SystemExit("error: pass --seed S or --seeds S1 S2 ..., not both")
    preset = dict(PRESETS[a.preset], linear_epochs=LINEAR_EPOCHS[a.preset],
                  finetune_flags=FINETUNE_FLAGS.get(a.preset), finetune_methods=FINETUNE_METHODS.get(a.preset, []))
    seeds = [a.seed] if a.seed is not None else (a.seeds or preset.get("seeds", [0]))
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds {seeds} names a seed twice")
    if a.data:
        preset["data"] = a.data
    methods = list(a.methods or preset["methods"])
    preset["official"], preset["notes"] = {}, []
    for script, path in (("lut", a.official_lut), ("conmim", a.official_conmim)):
        rows = [m for m in methods if OFFICIAL.get(m) == script or (script == "conmim" and m == "official-init-rel")]
        if path and Path(path).is_dir():
            preset["official"][script] = str(Path(path).resolve())
            continue
        if a.methods and rows:
            raise SystemExit(f"error: {' '.join(rows)} need(s) --official-{script} PATH, a checkout of {OFFICIAL_REPOS[script]}")
        if rows:
            methods = [m for m in methods if m not in rows]
            note = (f"Rows {', '.join(rows)} left out: no checkout of {OFFICIAL_REPOS[script]} at "
                    f"{path or '(none given)'} (`git clone {OFFICIAL_REPOS[script]} PATH`, then --official-{script} PATH).")
            preset["notes"].append(note)
            print(note, flush=True)
    if any(m in methods for m in ("mae_ct", "mim_refiner")) and "mae" not in methods:
        methods = ["mae"] + methods
    out = Path(a.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = max(1, min(a.jobs or len(seeds), len(seeds)))
    if len(seeds) > 1:
        preset["env"] = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
        torch.set_num_threads(1)  # the parent's own work (raw pixels, linear probes) beside the children
    t0 = time.time()
    with ThreadPoolExecutor(jobs) as pool:
        futures = {s: pool.submit(run_seed, methods, preset, out if len(seeds) == 1 else out / f"seed{s}", s,
                                  "" if len(seeds) == 1 else f" (seed {s})") for s in seeds}
        per_seed = {s: f.result()[0] for s, f in futures.items()}
        totals = {s: f.result()[1] for s, f in futures.items()}
    wall = time.time() - t0

    k = "20" if 20 in preset["k"] else str(preset["k"][0])
    machine = machine_desc()
    n = len(seeds)
    summary = summarize(per_seed, k)
    lines = main_table(summary, k, n)
    seed_txt = f"seed {seeds[0]}" if n == 1 else f"seeds {', '.join(map(str, seeds))} (mean +- std)"
    total = totals[seeds[0]] if n == 1 else wall  # one seed: as if its reused runs had run now
    lines += ["", f"Data `{preset['data']}`, vit_t16 at 32 px / patch {preset['patch']}, {seed_txt}; "
                  f"{total / 60:.1f} min in all on {machine}" + ("" if n == 1 else f", {jobs} seeds at a time") + "."]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    plotted = plot(summary, out / "per_block_knn.png", k)
    lift = lifts(summary)
    command = " ".join(["python", "miniature/mini_repro.py", *(sys.argv[1:] if argv is None else map(str, argv))])
    write_readme(out, command, a.preset, preset, seeds, summary, lift, totals, total, jobs, k, machine, plotted)
    res = {"preset": a.preset, "data": preset["data"], "seeds": seeds, "machine": machine, "command": command,
           "total_seconds": total, "seed_seconds": totals, "jobs": jobs, "summary": summary, "lift_over_mae": lift,
           "comparisons": compare(summary), "finetune_flags": preset["finetune_flags"],
           "finetune_comparisons": ft_compare(summary)}
    if n == 1:
        res.update(seed=seeds[0], results=per_seed[seeds[0]])
    else:
        res["per_seed"] = per_seed
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    print("\n" + table)
    for m, rows in lift.items():
        print(f"{m} - mae (kNN k={k}): " + ", ".join(
            f"block {b + 1}: {r['delta']:+.1f} (std {r['std']:.1f}{', > 2 std' if r['above_2std'] else ''})"
            for b, r in rows.items()))
    print(f"\nwritten: {out / 'table.md'}, {out / 'README.md'}, {out / 'results.json'}"
          + (f", {out / 'per_block_knn.png'}" if plotted else ""))


if __name__ == "__main__":
    main()
