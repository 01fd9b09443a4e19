"""Weighted k-NN evaluation of frozen ViT features (DINO protocol), with low-shot and per-block sweeps.

Protocol papers
  - DINO, Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", arXiv:2104.14294,
    Sec. 4.1 + official eval_knn.py: k in {10, 20, 100, 200}, T = 0.07, CLS token after the final
    LayerNorm, L2-normalised, resize 256 / center-crop 224 (bicubic; floor(S * 256 / 224) at other sizes S,
    as facebookresearch/mae and timm), no augmentation.
  - Weighted k-NN vote from Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination", arXiv:1805.01978, Sec. 3.4 (T = 0.07).
  - MIM-Refiner, Alkin et al., arXiv:2402.10093: App. C.4 (k-NN with k = 10 "following DINO"), Fig. 3b
    (k-NN accuracy per block: MAE's best representation sits in the middle blocks), Table 2 (1/2/5-shot).
    Official src/metrics/knn.py standardises the features with the train mean/std before the
    L2 normalisation and evaluates the EMA encoder's last-block CLS *without* the final LayerNorm.

Equations (one val image q, train bank {(t_i, y_i)}):
  optional standardisation   x <- (x - mu_train) / (sigma_train + 1e-6)      (MIM-Refiner knn.py)
  cosine similarity          s_i = <q, t_i> / (|q| |t_i|)
  neighbours                 N_k(q) = indices of the k largest s_i
  vote                       score_c = sum_{i in N_k(q)} exp(s_i / T) [y_i = c]   (Wu et al. Eq. 7-8)
  prediction                 argmax_c score_c (top-1); top-5 = the 5 classes with the largest score > 0.

Features: `--pool cls` takes the CLS token, `--pool avg` the mean over the patch tokens (CLS excluded,
MIM-Refiner `mean_patch`). `--block N` (0-based, negatives count from the end) takes the raw
residual-stream output of block N. The last block's output gets the final LayerNorm unless
`--no-final-norm`, so `--block -1` equals the default feature. Post-norm models (data2vec 2.0) have no
final norm; there the flag changes nothing.

Launch (ImageNet-1K, ROOT/train and ROOT/val ImageFolders, 8 GPUs):
  DINO protocol (default):
    torchrun --nproc_per_node=8 eval_knn.py --checkpoint CKPT --data /imagenet --img-size 224 \
        --batch-size 1024 --output-json knn.json
  MIM-Refiner protocol (EMA weights, no final LN, standardised, k = 10):
    torchrun --nproc_per_node=8 eval_knn.py --checkpoint CKPT --ema --no-final-norm --standardize \
        --k 10 --data /imagenet --img-size 224 --output-json knn_refiner.json
  Low-shot (1/2/5 images per class, 3 seeds each):
    torchrun --nproc_per_node=8 eval_knn.py --checkpoint CKPT --data /imagenet --shots 1 2 5 --shot-seeds 3
  Per-block sweep (MIM-Refiner Fig. 3b; every block in one pass, PNG next to the JSON):
    torchrun --nproc_per_node=8 eval_knn.py --checkpoint CKPT --data /imagenet --blocks all \
        --half-features --output-json blocks.json
  The training scripts' k-NN monitor (k = 20 on a seeded fraction F of train, --knn-subset F --seed S):
    python eval_knn.py --checkpoint CKPT --data ROOT --k 20 --block B --train-subset F --seed S
  Tiny CPU run:
    python eval_knn.py --checkpoint runs/mae/checkpoint-last.pth --data synthetic:2000:500 \
        --num-workers 0 --device cpu

Checkpoints: ours (`encoder_config` gives the architecture, `--ema` picks "model_ema"), official MAE
`{"model": ...}`, MAE-CT / MIM-Refiner `{"state_dict": ...}` (pos_embed without CLS row, or
`pos_embed.embed` (1, H, W, D) + `cls_tokens.tokens`), data2vec 2.0 fairseq files, raw state dicts, or
`none` (random initialisation, a baseline). Without `--model` the architecture is inferred from the file.

Deviations from DINO's eval_knn.py, each deliberate:
  - the val set is sharded too (DINO has every rank extract all of it); features and dataset indices are
    all-gathered and written into the bank with index_copy_, so the DistributedSampler's padded
    duplicates are dropped and any dataset size works with any world size;
  - the number of classes comes from the data (DINO silently assumes 1000);
  - chunking by `--chunk-size` val rows (DINO's N/100 chunks crash for < 100 val images); all k come
    from one top-max(k) (as DINOv2), k is clipped to the train size;
  - weights exp((s_i - max_j s_j) / T): the common per-image factor exp(-max s / T) leaves the vote
    unchanged and avoids overflow for small T;
  - top-5 counts only classes that received votes (DINO may count a zero-vote class when fewer than 5
    classes are among the neighbours), and is reported only with more than 5 classes;
  - bf16 autocast on CUDA (MIM-Refiner also extracts in bf16; DINO in fp32); optional fp16 bank.
Deviation from MIM-Refiner: its low-shot numbers (Table 2) come from a cyanure logistic regression on the
MSN 1/2/5-shot splits (eval_frozen.py --few-shot / --split-file); here low-shot is the same k-NN vote on n
random images per class,
and the default keeps DINO's final LayerNorm (MIM-Refiner: `--no-final-norm --standardize --k 10`).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.nn.functional as F

import common
from common import (UserError, WithIndex, autocast, build_dataset, build_loader, describe_vit, eval_transform,
                    init_distributed, progress, run_main, all_gather_nograd, eval_resize)


@dataclass
class Args(common.Flags):
    checkpoint: str = ""
    """Encoder weights: our checkpoint, official MAE / MAE-CT / MIM-Refiner / data2vec 2.0 file, a raw
    state dict, or `none` for a randomly initialised encoder (baseline; needs --model). Required."""
    model: Optional[str] = None
    """ViT preset (vit_t16, vit_s16, vit_b16, vit_l16, vit_h14, vit_h16, vit_2b14). Default: inferred from
    the checkpoint ("encoder_config", else the weights' shapes)."""
    img_size: Optional[common.PosInt] = None
    """Evaluation crop size. Default: the checkpoint's training resolution, else 224 (DINO eval_knn).
    Another size interpolates pos_embed bicubically (MAE interpolate_pos_embed)."""
    patch_size: Optional[common.PosInt] = None
    """Patch size. Default: the checkpoint's, else the preset's."""
    data: str = "data/imagenet"
    """ROOT with ROOT/train and ROOT/val ImageFolders (one subfolder per class), or
    synthetic[:N_TRAIN[:N_VAL]] (synthetic.py, rendered at --img-size); paper: ImageNet-1K."""
    k: list[common.PosInt] = field(default_factory=lambda: [10, 20, 100, 200])
    """Numbers of neighbours (DINO eval_knn --nb_knn 10 20 100 200; MIM-Refiner App. C.4 reports k=10).
    k larger than the train set is clipped to it."""
    temperature: common.PosFloat = 0.07
    """T in the vote weight exp(s/T) (DINO eval_knn; Wu et al. 2018 Sec. 3.4; MIM-Refiner knn.py)."""
    pool: Literal["cls", "avg"] = "cls"
    """cls: the CLS token (DINO, MIM-Refiner); avg: mean over patch tokens, CLS excluded (MIM-Refiner
    mean_patch, CrossMAE heads)."""
    block: Optional[int] = None
    """Evaluate the output of this block (0-based; -1 = last) instead of the final one; raw residual
    stream, the final LayerNorm only on the last block (see --final-norm). Default: last block."""
    blocks: list[str] = field(default_factory=list)
    """Per-block sweep (MIM-Refiner Fig. 3b): `all` or a list of block indices, evaluated from one pass
    over the data; prints a table, saves a PNG and writes every number to the JSON. Default: none."""
    final_norm: bool = True
    """Apply the final LayerNorm to the last block's features (DINO: CLS after the final norm). MIM-Refiner's
    paper numbers use --no-final-norm (official knn: use_next_norm=False; README note)."""
    standardize: bool = False
    """Standardise every feature dim with the train-set mean/std (+1e-6) before L2 normalisation
    (MIM-Refiner src/metrics/knn.py, batch_normalize=True). DINO: off."""
    ema: bool = False
    """Use the EMA/momentum encoder ("model_ema", or "model" when the checkpoint marks it as EMA).
    MIM-Refiner and MAE-CT evaluate their EMA encoder; DINO the teacher."""
    batch_size: common.PosInt = 256
    """GLOBAL extraction batch, split over processes (DINO: 128 per GPU). No effect on results."""
    num_workers: common.NonNegInt = 8
    """DataLoader workers per process (DINO eval_knn: 10)."""
    chunk_size: common.PosInt = 256
    """Val rows per similarity chunk: memory is chunk_size x N_train floats (DINO: N_val/100 rows)."""
    save_features: Optional[str] = None
    """Write {train_features, train_labels, val_features, val_labels} (pooled features of the evaluated
    block before any normalisation, dataset/ImageFolder order) to this file (DINO --dump_features)."""
    half_features: bool = False
    """Keep the feature banks in fp16 (halves memory; ImageNet-1K ViT-H: 3.3 GB instead of 6.6 GB per
    block). Standardisation statistics and vote weights stay fp32."""
    shots: list[common.PosInt] = field(default_factory=list)
    """Low-shot: for each n, k-NN with only n labelled train images per class (MIM-Refiner Table 2 uses
    1 2 5). Default: off."""
    shot_seeds: common.PosInt = 3
    """Random subsets per n (MIM-Refiner/MSN: 3 splits); mean and std are reported. Seed s in
    [seed, seed+shot_seeds) gives nested subsets across n."""
    output_json: Optional[str] = None
    """Write {protocol, top1, top5, per_block, low_shot} (accuracies in percent) to this file."""
    plot: Optional[str] = None
    """PNG for the per-block sweep. Default: OUTPUT_JSON with .png suffix, else knn_per_block.png."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (CUDA if visible), cpu or cuda."""
    seed: int = 0
    """Seed of the random init (--checkpoint none), the synthetic data, the low-shot subsets and --train-subset."""
    train_subset: common.PosUnit = 1.0
    """Fraction of the train split used as the k-NN bank, drawn with --seed (knn_bank_indices); the
    training scripts' monitor uses --knn-subset with their --seed, so the same values reproduce its number."""


# ----------------------------------------------------------------------------------------------
# Feature preparation (pure functions; tests import them)
# ----------------------------------------------------------------------------------------------
def standardize_stats(train_f: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dim train mean and unbiased std (+1e-6) as MIM-Refiner knn.py, accumulated in fp64 by chunks."""
    n = train_f.shape[0]
    s = torch.zeros(train_f.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for c in train_f.split(chunk):
        c = c.to(torch.float64).cpu()
        s += c.sum(0)
        s2 += (c * c).sum(0)
    mean = s / n
    var = (s2 - n * mean * mean) / max(n - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float() + 1e-6


def prepare_features(x: torch.Tensor, mean, std, device, dtype, chunk: int = 65536) -> torch.Tensor:
    """(x - mean) / std (if standardising), then L2-normalise, chunk by chunk into a new tensor of
    `dtype` on `device` (the raw bank stays untouched for --save-features)."""
    out = torch.empty(x.shape, dtype=dtype, device=device)
    for i in range(0, x.shape[0], chunk):
        c = x[i:i + chunk].to(device).float()
        if mean is not None:
            c = (c - mean.to(device)) / std.to(device)
        out[i:i + chunk] = F.normalize(c, dim=1).to(dtype)
    return out


def low_shot_indices(labels: torch.Tensor, n: int, seed: int, num_classes: int, class_names=None) -> torch.Tensor:
    """Exactly n train indices per class, drawn without replacement by a generator seeded with `seed`
    (a function of labels and seed only: same subset for any world size; nested across n)."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        perm = torch.randperm(len(idx), generator=g)
        if len(idx) < n:
            name = class_names[c] if class_names else c
            raise UserError(f"--shots {n}: class {name!r} has only {len(idx)} train image(s); "
                            f"use a smaller --shots value or add images")
        picked.append(idx[perm[:n]])
    return torch.cat(picked).sort().values


# ----------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------
def build_encoder(args: Args):
    """Returns (encoder, weights description). The architecture comes from --model or the checkpoint."""
    return common.encoder_from_checkpoint(args.checkpoint, args.model, args.img_size, args.patch_size, ema=args.ema,
                                          seed=args.seed)


def resolve_block(b: int, depth: int) -> int:
    if not -depth <= b < depth:
        raise UserError(f"block {b} does not exist in a {depth}-block encoder; use 0..{depth - 1} or -1..-{depth}")
    return b % depth


def sweep_blocks(spec: list[str], depth: int) -> list[int]:
    if not spec:
        return []
    if [s.lower() for s in spec] == ["all"]:
        return list(range(depth))
    try:
        return sorted({resolve_block(int(s), depth) for s in spec})
    except ValueError:
        raise UserError(f"--blocks {' '.join(spec)}: expected `all` or block indices, e.g. --blocks 6 8 11") from None


def dataset_labels(ds) -> torch.Tensor:
    return torch.as_tensor(list(ds.targets), dtype=torch.long)


def pool_tokens(x: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, 1+N, D) -> (B, D): CLS token, or mean over patch tokens (CLS excluded)."""
    return x[:, 0] if pool == "cls" else x[:, 1:].mean(dim=1)


@torch.no_grad()
def extract_features(encoder, dataset, blocks: list[int], dist_info, *, batch_size: int, num_workers: int,
                     pool: str, final_norm: bool = True, dtype=torch.float32, desc: str = "features"):
    """Pooled features of every block in `blocks` from ONE pass over `dataset`, `batch_size` images per step over all
    ranks; the last block's after the final norm if `final_norm`, the others' raw.

    Every rank runs its DistributedSampler(shuffle=False) shard; features, labels and dataset indices
    are all-gathered each batch and written with index_copy_ into the bank on rank 0, so the samples the
    sampler pads in (to make shards equal) are simply written twice. Returns ({block: (N, D)}, labels (N,))
    on rank 0, (None, None) elsewhere."""
    depth, device = encoder.depth, dist_info.device
    # the last block's output after the final LN is forward_features' main output; others are raw
    from_main = {b: b == depth - 1 and (final_norm or encoder.post_norm) for b in blocks}
    raw = [b for b in blocks if not from_main[b]]
    per_rank = max(1, math.ceil(batch_size / dist_info.world_size))
    loader = build_loader(WithIndex(dataset), per_rank, dist_info, shuffle=False, drop_last=False,
                          num_workers=num_workers)
    n = len(dataset)
    banks = labels = filled = None
    if dist_info.is_main:
        banks = {b: torch.zeros(n, encoder.dim, dtype=dtype) for b in blocks}
        labels = torch.full((n,), -1, dtype=torch.long)
        filled = torch.zeros(n, dtype=torch.bool)
    for img, y, idx in progress(loader, dist_info, desc=desc):
        img = img.to(device, non_blocking=True)
        with autocast(device):
            out = encoder.forward_features(img, return_blocks=raw or None)
        final, outs = (out, []) if not raw else out
        feats = [pool_tokens(final if from_main[b] else outs[raw.index(b)], pool).float() for b in blocks]
        f = all_gather_nograd(torch.cat(feats, dim=1))  # (W*B, len(blocks)*D)
        meta = all_gather_nograd(torch.stack([idx, y], dim=1).to(device))  # (W*B, 2): index, label
        if dist_info.is_main:
            f, meta = f.cpu(), meta.cpu()
            for i, b in enumerate(blocks):
                banks[b].index_copy_(0, meta[:, 0], f[:, i * encoder.dim:(i + 1) * encoder.dim].to(dtype))
            labels.index_copy_(0, meta[:, 0], meta[:, 1])
            filled[meta[:, 0]] = True
    if dist_info.is_main:
        assert bool(filled.all()), "feature bank has holes"  # every dataset index was extracted
        if bool((labels < 0).any()):
            raise UserError("the evaluation data has unlabelled images; k-NN needs ROOT/train/<class>/ and ROOT/val/<class>/")
    return banks, labels


# ----------------------------------------------------------------------------------------------
# The vote (DINO), and the training scripts' k-NN monitor (common.knn_monitor builds it)
# ----------------------------------------------------------------------------------------------
# The monitor is a cheap collapse / too-high-lr alarm (MIM-Refiner App. E; the official MIM-Refiner and MAE-CT code
# run a k-NN on 10% of ImageNet every epoch): eval_knn.py's protocol at one k (`eval_knn.py --k 20 --block B
# --train-subset F --seed S` gives the same top-1, tests/test_knn_monitor.py).
KNN_MONITOR_K = 20  # DINO eval_knn.py: "20 is usually working the best"
KNN_TEMPERATURE = 0.07  # DINO eval_knn.py; Wu et al. 2018 Sec. 3.4


def knn_bank_indices(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of the k-NN bank: round(fraction * n) (at least 1) of n, drawn with a generator seeded `seed`."""
    if fraction == 1.0:
        return torch.arange(n)
    m = max(1, int(round(fraction * n)))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values


@torch.no_grad()
def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 ks, T: float, num_classes: int, chunk: int = 256) -> dict:
    """Weighted k-NN vote on cosine similarity (DINO eval_knn.knn_classifier; Wu et al. 2018 Eq. 7-8): score_c = sum
    over the k nearest of exp(s_i / T) [y_i = c], as exp((s_i - s_max) / T) (no overflow, same vote). train_f (N, D)
    of any float dtype and scale (never copied), test_f (M, D); k clipped to N.
    Returns {"top1": {k: %}, "top5": {k: %} (when num_classes > 5)}."""
    n_train, device = train_f.shape[0], train_f.device
    if n_train == 0 or test_f.shape[0] == 0:
        raise UserError("k-NN needs at least one train and one val image")
    train_y = train_y.to(device)
    # 1/|t_i| in fp32, chunked so that no fp32 copy of a half bank is made   # (N,)
    inv_norm = torch.cat([c.float().norm(dim=1) for c in train_f.split(max(chunk, 4096))]).clamp_min(1e-12).reciprocal()
    kmax = min(max(ks), n_train)
    correct1, correct5 = {k: 0 for k in ks}, {k: 0 for k in ks}
    for start in range(0, test_f.shape[0], chunk):
        q = F.normalize(test_f[start:start + chunk].to(device).float(), dim=1)  # (C, D)
        y = test_y[start:start + chunk].to(device)  # (C,)
        sim = (q.to(train_f.dtype) @ train_f.T).float() * inv_norm  # (C, N) cosine
        top_sim, top_idx = sim.topk(kmax, dim=1)  # (C, kmax), sorted descending
        top_lab = train_y[top_idx]  # (C, kmax)
        weight = ((top_sim - top_sim[:, :1]) / T).exp()  # (C, kmax)
        for k in ks:
            kk = min(k, n_train)
            votes = torch.zeros(q.shape[0], num_classes, device=device)
            votes.scatter_add_(1, top_lab[:, :kk], weight[:, :kk])  # (C, classes): sum of one-hot x weight
            val, pred = votes.topk(min(5, num_classes), dim=1)
            correct1[k] += (pred[:, 0] == y).sum().item()
            if num_classes > 5:
                correct5[k] += ((pred == y[:, None]) & (val > 0)).any(dim=1).sum().item()
    m = test_f.shape[0]
    return {"top1": {k: 100.0 * correct1[k] / m for k in ks},
            "top5": {k: 100.0 * correct5[k] / m for k in ks} if num_classes > 5 else {}}


def labelled_splits(data: str) -> bool:
    """True when `data` is synthetic (labelled train and val) or a folder with labelled train/ and val/."""
    if common.is_synthetic(data):
        return True
    root = Path(data)
    return all((root / s).is_dir() and any(d.is_dir() for d in (root / s).iterdir()) for s in ("train", "val"))


class KnnMonitor:
    """k-NN top-1 (k 20, T 0.07) every `every` epochs (0: off) of `blocks`: bank a seeded `subset` of the train split,
    queries the val split, both eval_transform. `data` (--knn-data) None: the training root when it has labelled
    train/ and val/, else off with one line. Built and called on every rank (after the epoch's checkpoint, with
    the encoder its "model" holds); logs `knn/top1_block{B}` and prints one line."""

    def __init__(self, dist_info: common.DistInfo, log: common.Logger, *, every: int, data: str | None, train_data: str,
                 subset: float, img_size: int, batch_size: int, num_workers: int, seed: int, blocks=(-1,),
                 pool: str = "cls"):
        self.every, self.dist_info, self.log, self.blocks, self.pool = every, dist_info, log, list(blocks), pool
        if every and data is None:
            if not labelled_splits(train_data):
                log.print(f"k-NN monitor off: {train_data} has no labelled train/ and val/ splits "
                          f"(pass --knn-data ROOT with ROOT/train/<class>/ and ROOT/val/<class>/)")
                self.every = 0
            data = train_data
        if not self.every:
            return
        tf = eval_transform(img_size)
        train = build_dataset(data, "train", tf, img_size=img_size, seed=seed, require_labels=True)
        self.bank = torch.utils.data.Subset(train, knn_bank_indices(len(train), subset, seed).tolist())
        self.val = build_dataset(data, "val", tf, img_size=img_size, seed=seed, require_labels=True)
        self.batch, self.num_workers = batch_size, num_workers
        self.desc = f"{len(self.bank)} train images ({subset:g} of {data} train) as bank, {len(self.val)} val"

    def __call__(self, epochs_done: int, encoder, step: int) -> dict | None:
        """Evaluate when epochs_done is a multiple of `every`; returns {block: top-1 %} on rank 0."""
        if not self.every or epochs_done % self.every:
            return None
        enc = common.unwrap(encoder)
        blocks = sorted({b % enc.depth for b in self.blocks})
        was_training = enc.training
        enc.eval()
        t0 = time.time()
        kw = dict(batch_size=self.batch * self.dist_info.world_size, num_workers=self.num_workers, pool=self.pool)
        bank, bank_y = extract_features(enc, self.bank, blocks, self.dist_info, desc="k-NN bank", **kw)
        val, val_y = extract_features(enc, self.val, blocks, self.dist_info, desc="k-NN val", **kw)
        enc.train(was_training)
        if common.is_sharded(enc):  # FSDP2 leaves the root unit gathered after a forward without backward
            for m in enc.modules():
                if callable(getattr(m, "reshard", None)):
                    m.reshard()
        if not self.dist_info.is_main:
            return None
        num_classes = int(max(bank_y.max(), val_y.max())) + 1
        dev = self.dist_info.device  # the vote on the accelerator: ImageNet is 50k x 128k similarities per block
        top1 = {b: knn_classify(bank[b].to(dev), bank_y, val[b].to(dev), val_y, [KNN_MONITOR_K], KNN_TEMPERATURE,
                                num_classes)["top1"][KNN_MONITOR_K] for b in blocks}
        secs = time.time() - t0
        self.log.log({**{f"knn/top1_block{b}": v for b, v in top1.items()}, "knn/seconds": secs}, step=step)
        self.log.print(f"epoch {epochs_done - 1} k-NN top-1 (k={KNN_MONITOR_K}, {self.pool}, {self.desc}): "
                       + ", ".join(f"block {b} {v:.2f}" for b, v in top1.items()) + f" ({secs:.1f} s)")
        return top1



# ----------------------------------------------------------------------------------------------
# Evaluation of one feature (full bank and low-shot subsets)
# ----------------------------------------------------------------------------------------------
def evaluate(train_f, train_y, val_f, val_y, args: Args, num_classes: int, device, class_names=None,
             low_shot: bool = False) -> dict:
    """Standardise (optionally), L2-normalise on `device`, run the vote; with low_shot also the
    n-shot subsets. Returns {"top1", "top5"[, "low_shot"]}."""
    mean, std = standardize_stats(train_f) if args.standardize else (None, None)
    dtype = train_f.dtype if device.type == "cuda" else torch.float32  # fp16 matmul only where it is fast
    tr = prepare_features(train_f, mean, std, device, dtype)
    va = prepare_features(val_f, mean, std, device, dtype)
    res = knn_classify(tr, train_y, va, val_y, args.k, args.temperature, num_classes, args.chunk_size)
    if low_shot and args.shots:
        res["low_shot"] = {}
        for n in args.shots:
            runs = []
            for s in range(args.shot_seeds):
                sub = low_shot_indices(train_y, n, args.seed + s, num_classes, class_names).to(tr.device)
                runs.append(knn_classify(tr[sub], train_y.to(tr.device)[sub], va, val_y, args.k, args.temperature,
                                         num_classes, args.chunk_size))
            entry = {"k_effective": [min(k, n * num_classes) for k in args.k]}
            for key in ("top1", "top5"):
                entry[key] = {}
                for k in runs[0][key]:
                    accs = torch.tensor([r[key][k] for r in runs], dtype=torch.float64)
                    entry[key][str(k)] = {"mean": accs.mean().item(),
                                          "std": accs.std().item() if len(accs) > 1 else 0.0,
                                          "runs": accs.tolist()}
            res["low_shot"][str(n)] = entry
    return res


def save_plot(per_block: dict, ks, path: str, title: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("per-block plot skipped: matplotlib is missing; `pip install matplotlib` (in requirements-dev.txt)")
        return None
    blocks = sorted(int(b) for b in per_block)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in ks:
        ax.plot(blocks, [per_block[str(b)]["top1"][str(k)] for b in blocks], marker="o", label=f"k={k}")
    ax.set_xlabel("block (0-based)")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _str_keys(res: dict) -> dict:
    return {key: {str(k): v for k, v in res[key].items()} for key in ("top1", "top5")}


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(args: Args):
    # ---- flags
    if not args.checkpoint:
        raise UserError("pass --checkpoint PATH (or --checkpoint none for a randomly initialised baseline)")
    if not args.k:
        raise UserError("--k: give at least one k, e.g. --k 10 20")
    for flag, path in (("--save-features", args.save_features), ("--output-json", args.output_json),
                       ("--plot", args.plot)):
        if path:  # before the feature extraction, not after it
            common.check_output_path(path, flag)
    args.k = sorted(set(args.k))

    dist_info = init_distributed(args.device)
    device = dist_info.device
    encoder, weights = build_encoder(args)
    encoder.to(device).eval()
    depth, img_size = encoder.depth, encoder.img_size
    main_block = resolve_block(args.block if args.block is not None else -1, depth)
    sweep = sweep_blocks(args.blocks, depth)
    blocks = sorted(set([main_block] + sweep))

    # ---- data (labels are checked before the expensive pass, on every rank)
    tf = eval_transform(img_size)
    train_ds = build_dataset(args.data, "train", tf, img_size=img_size, seed=args.seed, require_labels=True)
    val_ds = build_dataset(args.data, "val", tf, img_size=img_size, seed=args.seed, require_labels=True)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UserError(f"--data {args.data}: train and val need at least one image each")
    if list(train_ds.classes) != list(val_ds.classes):
        raise UserError(f"train and val have different class folders ({len(train_ds.classes)} vs {len(val_ds.classes)}); "
                        f"k-NN needs the same classes in ROOT/train and ROOT/val")
    class_names = list(train_ds.classes)
    train_targets = dataset_labels(train_ds)
    if args.train_subset != 1.0:  # the bank: a seeded subset of train (k-NN monitor of the training scripts)
        keep = knn_bank_indices(len(train_ds), args.train_subset, args.seed)
        train_ds, train_targets = torch.utils.data.Subset(train_ds, keep.tolist()), train_targets[keep]
    if max(args.k) > len(train_ds) and dist_info.is_main:  # the vote uses the whole bank: said; the table shows it
        print(f"warning: --k {max(args.k)} is more than the {len(train_ds)} images of the train bank: every image "
              f"votes there (k = {len(train_ds)}; the table shows 'k (used)')", file=sys.stderr)
    num_classes = max(len(class_names), int(train_targets.max()) + 1, int(dataset_labels(val_ds).max()) + 1)
    for n in args.shots:  # fail now, not after extraction
        low_shot_indices(train_targets, n, args.seed, num_classes, class_names)

    # ---- protocol, printed first and stored in the JSON
    has_ln = not encoder.post_norm
    def feature_name(b):
        ln = " + final LayerNorm" if (b == depth - 1 and args.final_norm and has_ln) else " (raw, no LayerNorm)"
        if b == depth - 1 and not has_ln:
            ln = " (post-norm model: already normalised, no final LayerNorm exists)"
        return f"block {b} of {depth}{ln}"
    dtype = torch.float16 if args.half_features else torch.float32
    resize = eval_resize(img_size)
    protocol = {
        "checkpoint": args.checkpoint,
        "weights": weights + ("; EMA/momentum weights (--ema)" if args.ema else
                              "; the file's main encoder (online unless the file marks it as EMA; --ema for the EMA one)"),
        "model": ("post-norm " if encoder.post_norm else "") + describe_vit(encoder.config()),
        "feature": f"{'CLS token' if args.pool == 'cls' else 'mean of patch tokens'} of {feature_name(main_block)}",
        "block": main_block, "pool": args.pool, "final_norm": args.final_norm and has_ln and main_block == depth - 1,
        "standardize": "train mean/std (+1e-6), then L2 (MIM-Refiner)" if args.standardize else "none (DINO)",
        "normalization": "L2, cosine similarity",
        "k": args.k, "k_effective": [min(k, len(train_ds)) for k in args.k], "temperature": args.temperature,
        "vote": "sum over top-k of exp(sim/T) per class (DINO)",
        "n_train": len(train_ds), "train_subset": args.train_subset, "n_val": len(val_ds), "num_classes": num_classes,
        "data": args.data, "img_size": img_size, "patch_size": encoder.patch_size,
        "transform": f"Resize({resize}, bicubic) + CenterCrop({img_size}) + ImageNet mean/std",
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "feature_bank": str(dtype).replace("torch.", ""),
        "world_size": dist_info.world_size, "seed": args.seed,
        "blocks_sweep": sweep, "shots": args.shots, "shot_seeds": args.shot_seeds,
    }
    if dist_info.is_main:
        print("k-NN protocol:")
        for key, v in protocol.items():
            print(f"  {key}: {v}")
        print(flush=True)

    # ---- features: all needed blocks in one pass over each split
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, pool=args.pool, final_norm=args.final_norm,
              dtype=dtype)
    train_banks, train_y = extract_features(encoder, train_ds, blocks, dist_info, desc="train features", **kw)
    val_banks, val_y = extract_features(encoder, val_ds, blocks, dist_info, desc="val features", **kw)
    if not dist_info.is_main:
        return  # rank 0 classifies; the others are done
    del encoder
    if args.save_features:
        feats = {"train_features": train_banks[main_block], "train_labels": train_y,
                 "val_features": val_banks[main_block], "val_labels": val_y, "protocol": protocol}
        common.write_atomic(args.save_features, lambda f: torch.save(feats, f), flag="--save-features")
        print(f"features saved to {args.save_features}")

    # ---- k-NN on the evaluated feature (and low-shot subsets)
    result = {"protocol": protocol}
    res = evaluate(train_banks[main_block], train_y, val_banks[main_block], val_y, args, num_classes, device,
                   class_names, low_shot=True)
    result.update(_str_keys(res))
    print(f"k-NN on {protocol['feature']}, T={args.temperature}, {len(train_ds)} train / {len(val_ds)} val, "
          f"{num_classes} classes")
    print("    k   top-1   top-5")
    for k in args.k:
        t5 = f"{res['top5'][k]:7.2f}" if res["top5"] else "      -"
        used = f" ({len(train_ds)})" if k > len(train_ds) else ""
        print(f"{k:5d} {res['top1'][k]:7.2f} {t5}{used}")

    result["low_shot"] = res.get("low_shot", {})
    if result["low_shot"]:
        print(f"low-shot k-NN top-1 (mean +- std over {args.shot_seeds} seeds)")
        print("shots " + " ".join(f"{'k=' + str(k):>15}" for k in args.k))
        for n, entry in result["low_shot"].items():
            cells = [f"{entry['top1'][str(k)]['mean']:7.2f} +- {entry['top1'][str(k)]['std']:4.2f}" for k in args.k]
            print(f"{n:>5} " + " ".join(f"{c:>15}" for c in cells))

    # ---- per-block sweep
    result["per_block"] = {}
    if sweep:
        for b in sweep:
            r = res if b == main_block else evaluate(train_banks[b], train_y, val_banks[b], val_y, args, num_classes, device)
            result["per_block"][str(b)] = {"feature": feature_name(b), **_str_keys(r)}
        print(f"per-block k-NN top-1 ({args.pool}, final LayerNorm on the last block: {args.final_norm and has_ln})")
        print("block " + " ".join(f"{'k=' + str(k):>8}" for k in args.k))
        for b in sweep:
            print(f"{b:5d} " + " ".join(f"{result['per_block'][str(b)]['top1'][str(k)]:8.2f}" for k in args.k))
        best = max(sweep, key=lambda b: result["per_block"][str(b)]["top1"][str(args.k[0])])
        print(f"best block for k={args.k[0]}: {best}")
        plot = args.plot or (os.path.splitext(args.output_json)[0] + ".png" if args.output_json else "knn_per_block.png")
        saved = save_plot(result["per_block"], args.k, plot, f"{protocol['model']}, {args.pool}, {os.path.basename(args.checkpoint)}")
        if saved:
            print(f"per-block plot saved to {saved}")
            result["per_block_plot"] = saved

    if args.output_json:
        write_json(args.output_json, result)


def write_json(path: str, result: dict, flag: str = "--output-json"):
    """`result` (every number with its protocol) as JSON at `path`, written atomically (common.write_atomic), and say
    where."""
    common.write_atomic(path, lambda f: json.dump(result, f, indent=2), mode="w", flag=flag)
    print(f"results written to {path}")


if __name__ == "__main__":
    run_main(main, Args)
