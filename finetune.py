"""Fine-tuning: a pre-trained ViT trained end to end as an image classifier, the papers' headline protocol.

Papers and official code
  MAE, He et al., CVPR 2022, arXiv:2111.06377: Sec. 4 and App. A.1 / Table 9 (ImageNet-1K, Table 3: ViT-B/L/H 83.6 /
    85.9 / 86.9). facebookresearch/mae FINETUNE.md (the per-size values that reproduce the released numbers),
    main_finetune.py, engine_finetune.py, util/lr_decay.py, util/lr_sched.py, models_vit.py.
  LUT, Kim et al., ECCV 2024, arXiv:2310.13593: App. Table D (Table 1: ViT-B 84.2); naver-ai/lut docs/FINETUNE.md.
  ConMIM, Yi et al., ICLR 2023, arXiv:2205.09616: Table 12 with BEiT's fine-tuning (Tables 1-3: ViT-B 83.7);
    TencentARC/ConMIM run_class_finetuning.py (= microsoft/unilm beit/run_class_finetuning.py) and its README.
  MAE-CT, Lehner et al., AAAI 2024, arXiv:2304.10520: App. B / Table 10 (Table 1: 1 % and 10 % of the labels).
  MIM-Refiner, Alkin et al., ICLR 2025, arXiv:2402.10093: App. C.5 (Table 2: 1 % / 10 %, Table 5: 100 %);
    ml-jku/MIM-Refiner src/yamls/eval/finetune*/ (the released low-shot configurations).

Equations (image x, label y, C classes, L blocks):
  tokens        z = ViT(x), (B, 1+N, D); pos_embed is trained here (frozen sin-cos in pre-training)
  pooling       avg: f = fc_norm(mean_{p >= 1} z_p), z before the pre-trained final norm, which is dropped
                (MAE models_vit.py global_pool; BEiT use_mean_pooling); cls: f = norm(z)_0
  logits        h = W f + b, W ~ N(0, (2e-5)^2), b = 0                                   (main_finetune.py)
  mixing        per batch: with p 0.5 cutmix (lam ~ Beta(1, 1)), else mixup (lam ~ Beta(0.8, 0.8));
                mixup x~ = lam x + (1 - lam) x', cutmix pastes a box of x' of area ~ 1 - lam and sets lam to the
                box's clipped area; x' = the batch reversed (timm Mixup, mode "batch")
  target        t = lam s(y) + (1 - lam) s(y'), s(y) = (1 - eps) onehot(y) + eps / C      (eps = 0.1)
  loss          -sum_c t_c log softmax(h)_c, mean over the batch
  layer decay   group lr = lr(t) d^(L+1-l): l = 0 for cls_token, pos_embed, patch_embed; l = i + 1 for blocks.i;
                l = L + 1 for the rest (fc_norm, head)                     (util/lr_decay.param_groups_lrd)
  lr(t)         lr t / (w S) for t < w S, else min_lr + (lr - min_lr) (1 + cos(pi (t - w S) / ((E - w) S))) / 2,
                per update t, S updates per epoch, w warmup and E total epochs  (util/lr_sched.py); the group's
                scale multiplies min_lr too; lr = blr x batch / 256 (blr x sqrt(batch) / 8 for LUT's code)
  stochastic depth  block i drops each branch of a sample with rate p i / (L - 1) (timm drop_path)

Launch (ImageNet-1K, ROOT/train and ROOT/val ImageFolders, 8 GPUs; global batch 1024 = 8 x 128):
  MAE ViT-B/16 (FINETUNE.md):
    torchrun --nproc_per_node=8 finetune.py --init checkpoints/mae_pretrain_vit_base.pth --data /imagenet \
        --output-dir runs/ft_mae_b16 --output-json runs/ft_mae_b16/result.json
  ViT-L/16 (50 epochs, 8 x 32 x 4 accumulation): ... --init mae_pretrain_vit_large.pth --accum-steps 4
  LUT / ConMIM checkpoints: --recipe lut / --recipe conmim (ConMIM: the momentum teacher, as its README)
  1 % / 10 % of the labels (MAE-CT Table 1, MIM-Refiner Table 2), google-research/simclr's lists:
    torchrun --nproc_per_node=8 finetune.py --init CKPT --data /imagenet --recipe lowshot-1pct \
        --train-subset imagenet_subsets/1percent.txt
  Supervised from scratch (the control): --init none --model vit_b16
  Tiny CPU run:
    python finetune.py --init runs/mae/checkpoint-last.pth --data synthetic:2000:500 --device cpu \
        --num-workers 0 --epochs 2 --batch-size 64 --output-dir runs/ft
Rerun the same command to resume from OUTPUT_DIR/checkpoint-last.pth (bit-identical to an uninterrupted run).

Checkpoint (OUTPUT_DIR/checkpoint-last.pth, every epoch; checkpoint-best.pth at the best val top-1): "model" = the
classifier in timm's key names: it loads strictly into timm's VisionTransformer(num_classes=C, global_pool='avg',
fc_norm=True) (recipes with --pool cls: global_pool='token'); ConMIM's per-block relative position bias into
timm's Beit after conmim.timm_beit_state_dict. Also "classes", "pool", "optimizer", "epoch", "step", "best",
"args".

Deviations (the flag named gives the official behaviour):
  * The reported numbers are the last epoch's AND the best epoch's val top-1, labelled; the official scripts report
    the maximum over epochs on val (MAE prints "Max accuracy", BEiT and LUT save "best", MIM-Refiner keeps the
    best checkpoint).
  * Mixing draws come from the step's seed and the partner of a sample is its mirror in the GLOBAL batch (rank
    W-1-r sends its micro-batch); stochastic depth is drawn per sample from the step's seed too. So N processes
    train what one process does (timm's Mixup and drop_path draw per process from global generators).
  * An epoch's incomplete last accumulation group is skipped (official: skipped too, but an epoch shorter than
    --accum-steps never updates, mae#49); evaluation is exact under DDP (official --dist_eval pads duplicates).
  * bf16 autocast on CUDA without a grad scaler (official: fp16 + GradScaler; ConMIM: DeepSpeed fp16).
  * ConMIM: our backbone has no layer scale and a full qkv bias (BEiT: q and v bias); the per-block position
    tables get no weight decay (BEiT decays them unless --disable_weight_decay_on_rel_pos_bias).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import common
from common import UserError


# ==============================================================================================
# Recipes (each value cites its source; every value is overridden by its own flag)
# ==============================================================================================
# The MAE recipe's shared values (App. A.1 Table 9; FINETUNE.md; main_finetune.py): AdamW (0.9, 0.999), weight decay
# 0.05, batch 1024, 5 warmup epochs, cosine to 1e-6, RandAugment (9, 0.5), mixup 0.8, cutmix 1.0, smoothing 0.1.
MAE_AUG = dict(rand_aug="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, smoothing=0.1)
MAE_OPT = dict(batch_size=1024, warmup_epochs=5, weight_decay=0.05, min_lr=1e-6, lr_rule="linear")
MIN_AUG = dict(rand_aug="off", reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1)  # crop and flip (+ smoothing)

RECIPES = {
    "mae": dict(
        source="facebookresearch/mae FINETUNE.md (the values that reproduce MAE Table 3)",
        note="the paper's Table 9 differs for ViT-B (blr 1e-3, layer decay 0.75) and ViT-H (drop path 0.2): "
             "--recipe mae-paper",
        all=dict(pool="avg", **MAE_OPT, **MAE_AUG),
        b=dict(blr=5e-4, layer_decay=0.65, drop_path=0.1, epochs=100),
        l=dict(blr=1e-3, layer_decay=0.75, drop_path=0.2, epochs=50),
        h=dict(blr=1e-3, layer_decay=0.75, drop_path=0.3, epochs=50)),
    "mae-paper": dict(
        source="MAE App. A.1 Table 9 (the [CLS] token: 'works similarly well with average pooling')",
        note="Table 9 lists no random erasing (the official code adds --reprob 0.25)",
        all=dict(pool="cls", blr=1e-3, layer_decay=0.75, **MAE_OPT, **{**MAE_AUG, "reprob": 0.0}),
        b=dict(drop_path=0.1, epochs=100), l=dict(drop_path=0.1, epochs=50), h=dict(drop_path=0.2, epochs=50)),
    "lut": dict(
        source="LUT App. Table D",
        note="naver-ai/lut docs/FINETUNE.md runs --blr 1e-3 with lr = blr x sqrt(batch) / 8 (4x the paper's lr at "
             "batch 1024), layer decay 0.75 and --reprob 0.25: --blr 1e-3 --lr-rule sqrt --layer-decay 0.75 "
             "--reprob 0.25",
        all=dict(pool="avg", drop_path=0.1, **MAE_OPT, **{**MAE_AUG, "reprob": 0.0}),
        s=dict(blr=5e-4, layer_decay=0.75, epochs=300), b=dict(blr=2.5e-4, layer_decay=0.65, epochs=100),
        l=dict(blr=1e-3, layer_decay=0.65, epochs=50)),
    "conmim": dict(
        source="ConMIM Table 12 (BEiT's fine-tuning) and its README's ViT-B command (--lr 4e-3, absolute)",
        note="Table 12's peak lr is a grid {1e-3, ..., 5e-3} (the reported number is its best); BEiT copies the "
             "shared relative position bias into every block (done here)",
        all=dict(pool="avg", lr=4e-3, **MAE_OPT, **MAE_AUG),
        s=dict(layer_decay=0.8, drop_path=0.1, epochs=200, warmup_epochs=5),
        b=dict(layer_decay=0.65, drop_path=0.1, epochs=100, warmup_epochs=20),
        l=dict(layer_decay=0.75, drop_path=0.2, epochs=50, warmup_epochs=5)),
    "lowshot-1pct": dict(
        source="MAE-CT App. B (1 %: crop and flip only) with ml-jku/MIM-Refiner finetune_1p/"
               "template_tracked_*_ijepamin.yaml (blr 3e-5 at batch 512, 50 epochs, [CLS], no drop path)",
        note="pass the papers' split: --train-subset 1percent.txt (google-research/simclr imagenet_subsets/)",
        all=dict(pool="cls", blr=3e-5, batch_size=512, epochs=50, warmup_epochs=5, weight_decay=0.05,
                 min_lr=1e-6, lr_rule="linear", drop_path=0.0, **MIN_AUG),
        b=dict(layer_decay=0.65), l=dict(layer_decay=0.75), h=dict(layer_decay=0.75)),
    "lowshot-10pct": dict(
        source="MAE-CT App. B (10 %: the MAE protocol) with ml-jku/MIM-Refiner finetune_10p/"
               "template_tracked_huge14_semivit.yaml (blr 1e-3 at batch 256, 50 epochs, [CLS])",
        note="pass the papers' split: --train-subset 10percent.txt (google-research/simclr imagenet_subsets/)",
        all=dict(pool="cls", blr=1e-3, batch_size=256, epochs=50, warmup_epochs=5, weight_decay=0.05, min_lr=1e-6,
                 lr_rule="linear", **MAE_AUG),
        b=dict(layer_decay=0.65, drop_path=0.1), l=dict(layer_decay=0.75, drop_path=0.1),
        h=dict(layer_decay=0.75, drop_path=0.2)),
}
SIZES = {192: "t", 384: "s", 768: "b", 1024: "l", 1280: "h", 2560: "2b"}  # encoder width -> size
ROW_FALLBACK = {"t": "sb", "s": "b", "2b": "h"}  # a size without its own row takes the first of these that exists
SIZE_NAMES = {"t": "ViT-T", "s": "ViT-S", "b": "ViT-B", "l": "ViT-L", "h": "ViT-H", "2b": "ViT-2B"}


def recipe_values(recipe: str, dim: int) -> tuple[dict, str]:
    """The recipe's values for an encoder of width `dim`, and which row they come from."""
    r = RECIPES[recipe]
    size = SIZES.get(dim, "b")
    row = size if size in r else next((s for s in ROW_FALLBACK.get(size, "b") if s in r), "b")
    where = SIZE_NAMES[row] + (f" row (no {SIZE_NAMES.get(size, f'width-{dim}')} row)" if row != size else " row")
    return {**r["all"], **r.get(row, {})}, where


# ==============================================================================================
# The classifier (MAE models_vit.py; BEiT modeling_finetune.py for the per-block position bias)
# ==============================================================================================
HEAD_INIT_STD = 2e-5  # main_finetune.py: trunc_normal_(head.weight, std=2e-5)


class Classifier(nn.Module):
    """A ViT encoder + pooling + linear head. avg: the mean of the patch tokens into a new `fc_norm`, the encoder's
    final norm replaced by Identity (MAE global_pool); cls: the [CLS] token after the final norm. With a relative
    position bias (ConMIM) every block gets its own copy of the pre-trained shared table, named as BEiT's
    `blocks.i.attn.relative_position_bias_table` (its fine-tuning: the shared table copied into each block)."""

    def __init__(self, encoder: common.VisionTransformer, num_classes: int, pool: str, checkpointed: int = 0):
        super().__init__()
        self.pool, self.checkpointed = pool, checkpointed
        self.encoder = encoder
        encoder.requires_grad_(True)  # pos_embed too: learned in fine-tuning (MAE; MIM-Refiner pos_embed_is_learnable)
        self.drop_rates = [blk.drop_path for blk in encoder.blocks]  # stochastic depth, drawn per sample in the step
        self.rel_pos_index = None
        if encoder.rel_pos_bias is not None:
            shared = encoder.rel_pos_bias
            for blk in encoder.blocks:
                blk.attn.relative_position_bias_table = nn.Parameter(shared.relative_position_bias_table.detach().clone())
            self.rel_pos_index = shared.relative_position_index  # (1+N, 1+N), a buffer (not saved)
            del shared.relative_position_bias_table  # the module stays: it marks the ViT as one without pos_embed
        self.fc_norm = None
        if pool == "avg":
            if not encoder.post_norm:
                encoder.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(encoder.dim, eps=1e-6)
        self.head = nn.Linear(encoder.dim, num_classes)
        nn.init.normal_(self.head.weight, std=HEAD_INIT_STD)  # |w| never reaches timm's absolute +-2 truncation
        nn.init.zeros_(self.head.bias)

    def forward(self, x, keep=None):
        """x (B, 3, H, W) -> logits (B, C). keep: None, or per block None / (2, B) stochastic-depth multipliers."""
        enc = self.encoder
        z = enc.embed(x)  # (B, 1+N, D) [CLS; patches] + positions (none with the relative position bias)
        for i, blk in enumerate(enc.blocks):
            bias = None
            if self.rel_pos_index is not None:  # (h, 1+N, 1+N) from block i's own table
                bias = blk.attn.relative_position_bias_table[self.rel_pos_index].permute(2, 0, 1)
            k = None if keep is None else keep[i]
            if i < self.checkpointed and torch.is_grad_enabled():
                z = torch.utils.checkpoint.checkpoint(blk, z, bias, k, use_reentrant=False)
            else:
                z = blk(z, bias, k)
        if self.pool == "avg":
            f = self.fc_norm(z[:, 1:].mean(dim=1))  # (B, D); the final norm is Identity (post-norm: none)
        else:
            f = (z if enc.post_norm else enc.norm(z))[:, 0]  # (B, D)
        return self.head(f)


def timm_state_dict(model: Classifier) -> dict:
    """The classifier's state dict in timm's key names (the encoder's without "encoder.", fc_norm, head)."""
    return {k.removeprefix("encoder."): v for k, v in common.unwrap(model).state_dict().items()}


def load_timm_state_dict(model: Classifier, sd: dict):
    ours = model.state_dict()
    model.load_state_dict({(k if k in ours else "encoder." + k): v for k, v in sd.items()})


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with MAE's grouping (util/lr_decay.param_groups_lrd, via common.param_groups on timm names):
    layer 0 = cls_token, pos_embed, patch_embed; blocks.i = i + 1; the rest depth + 1; scale decay^(depth + 1 -
    layer); no weight decay on 1-D parameters, pos_embed, cls_token (and the position bias tables)."""
    named = [(n.removeprefix("encoder."), p) for n, p in model.named_parameters()]
    return common.param_groups(named, weight_decay, layer_decay, model.encoder.depth)


def describe_groups(model: Classifier, groups: list[dict], layer_decay: float, weight_decay: float) -> str:
    """The lr scale of every layer and what it holds, one line each (layer decay silently off is the classic
    fine-tuning bug: this table shows it at start-up)."""
    names = {id(p): n.removeprefix("encoder.") for n, p in model.named_parameters()}
    rows: dict[int, list] = {}
    for g in groups:
        layer = int(g["name"].split("_")[0].removeprefix("layer"))
        row = rows.setdefault(layer, [g["lr_scale"], set(), 0, 0])
        for p in g["params"]:
            n = names[id(p)]
            row[1].add(".".join(n.split(".")[:2]) if n.startswith("blocks.") else n.split(".")[0])
            row[2 if g["weight_decay"] > 0 else 3] += p.numel()
    lines = [f"layer-wise lr decay {layer_decay:g} (facebookresearch/mae util/lr_decay.py), weight decay "
             f"{weight_decay:g}: layer, lr scale, parameters, with / without weight decay"]
    for layer in sorted(rows):
        scale, what, wd, nwd = rows[layer]
        lines.append(f"  {layer:3d}  x{scale:<9.4g} {', '.join(sorted(what)):40s} {wd:>12,} / {nwd:,}")
    return "\n".join(lines)


# ==============================================================================================
# Mixup / CutMix with seeded draws, the global-batch partner, and stochastic depth per sample
# ==============================================================================================
def step_seed(seed: int, step: int, micro: int) -> int:
    """Seed of one micro-batch's mixing and stochastic depth: the same on every rank and after a resume."""
    return (common.epoch_seed(seed, 0, 0) * 1_000_033 + step * 4099 + micro) % 2**32


def mirror(t: torch.Tensor, dist_info: common.DistInfo) -> torch.Tensor:
    """For this rank's micro-batch of the global batch (DistributedSampler: sample j of rank r is global position
    j W + r), the samples at the mirrored global positions B - 1 - m: rank W-1-r's micro-batch, reversed."""
    peer = dist_info.world_size - 1 - dist_info.rank
    if peer == dist_info.rank:
        return t.flip(0)
    t = t.contiguous()
    got = torch.empty_like(t)
    for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, t, peer), dist.P2POp(dist.irecv, got, peer)]):
        req.wait()
    return got.flip(0)


def mix_batch(x: torch.Tensor, y: torch.Tensor, rng: np.random.RandomState, *, mixup: float, cutmix: float,
              smoothing: float, num_classes: int, partner: Callable[[torch.Tensor], torch.Tensor],
              switch_prob: float = 0.5):
    """timm.data.Mixup(mixup, cutmix, prob=1, switch_prob=0.5, mode='batch', correct_lam=True, label_smoothing) on x
    (n, 3, H, W) and labels y (n,), drawing from `rng` in timm's order (rand, rand, beta, randint, randint: given
    np.random's state, the same numbers as timm) with `partner` the batch's mirror. Returns (x~, soft targets (n, C))."""
    lam, use_cutmix = 1.0, False
    if mixup > 0 or cutmix > 0:
        if rng.rand() < 1.0:  # timm's mix_prob draw (prob 1)
            if mixup > 0 and cutmix > 0:
                use_cutmix = rng.rand() < switch_prob
                lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
            elif mixup > 0:
                lam = float(rng.beta(mixup, mixup))
            else:
                use_cutmix, lam = True, float(rng.beta(cutmix, cutmix))
    other, y_other = partner(x), partner(y)
    if lam != 1.0:
        if use_cutmix:  # timm rand_bbox: a box of side sqrt(1 - lam) centred anywhere, clipped; lam = 1 - its area
            H, W = x.shape[-2:]
            r = math.sqrt(1 - lam)
            ch, cw = int(H * r), int(W * r)
            cy, cx = rng.randint(0, H), rng.randint(0, W)
            yl, yh = np.clip(cy - ch // 2, 0, H), np.clip(cy + (ch + 1) // 2, 0, H)
            xl, xh = np.clip(cx - cw // 2, 0, W), np.clip(cx + (cw + 1) // 2, 0, W)
            x = x.clone()
            x[:, :, yl:yh, xl:xh] = other[:, :, yl:yh, xl:xh]
            lam = 1.0 - float((yh - yl) * (xh - xl)) / (H * W)
        else:
            x = x * lam + other * (1.0 - lam)
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    t1 = torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y[:, None], on)  # s(y), (n, C)
    t2 = torch.full((len(y), num_classes), off, device=y.device).scatter_(1, y_other[:, None], on)
    return x, t1 * lam + t2 * (1.0 - lam)


def drop_path_keep(rates: list[float], n: int, gen: torch.Generator, dist_info: common.DistInfo, device):
    """Per block None (rate 0) or (2, n) multipliers for this rank's n samples: Bernoulli(1 - p) / (1 - p) for the
    attention and the MLP branch (timm drop_path), drawn for the whole global batch of n x W samples and sliced at
    this rank's global positions j W + r."""
    W = dist_info.world_size
    u = torch.rand(len(rates), 2, n * W, generator=gen)[:, :, dist_info.rank::W]  # (L, 2, n)
    return [None if p == 0 else ((u[i] >= p).float() / (1 - p)).to(device) for i, p in enumerate(rates)]


# ==============================================================================================
# ALGO LOGIC: one training step, the evaluation
# ==============================================================================================
@dataclass
class TrainState:
    ddp: nn.Module  # the classifier as the step runs it: DDP-wrapped (and compiled) or plain
    model: Classifier  # unwrapped: saved, evaluated
    optimizer: torch.optim.Optimizer
    best: dict = dataclasses.field(default_factory=lambda: {"top1": None, "epoch": None})  # val top-1, rank 0
    last: dict = dataclasses.field(default_factory=dict)  # the last evaluation's top-1 / top-5 / epoch


def train_step(state: TrainState, imgs, labels, *, sync: bool, step: int, micro: int, num_classes: int,
               dist_info: common.DistInfo, args: Args) -> torch.Tensor:
    """One micro-batch: mixing (or label smoothing alone) with the step's draws, the classifier with per-sample
    stochastic depth, soft-target cross-entropy, backward of loss / accum_steps; at the update's last micro-batch
    (`sync`) gradient clipping (if set) and the AdamW step. imgs (n, 3, H, W), labels (n,). Returns the loss."""
    rng = np.random.RandomState(step_seed(args.seed, step, micro))
    gen = torch.Generator().manual_seed(step_seed(args.seed, step, micro))
    if args.mixup > 0 or args.cutmix > 0:
        imgs, target = mix_batch(imgs, labels, rng, mixup=args.mixup, cutmix=args.cutmix, smoothing=args.smoothing,
                                 num_classes=num_classes, partner=functools.partial(mirror, dist_info=dist_info))
    else:
        target = labels
    keep = drop_path_keep(state.model.drop_rates, len(imgs), gen, dist_info, imgs.device)
    with common.grad_sync(state.ddp, sync):
        with common.autocast(imgs.device):
            logits = state.ddp(imgs, keep)  # (n, C)
        # soft targets carry the smoothing; hard labels get it from cross_entropy (timm LabelSmoothingCrossEntropy)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=0.0 if target.ndim == 2 else args.smoothing)
        common.check_finite(loss, step, args.output_dir)
        (loss / args.accum_steps).backward()
    if sync:
        if args.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), args.clip_grad)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def evaluate(model: Classifier, val_ds, batch: int, dist_info: common.DistInfo, num_workers: int) -> dict | None:
    """Top-1 and top-5 (%) on the whole val set, each image counted once under any number of processes (its
    correctness gathered and placed by dataset index). {"top1", "top5"} on rank 0, None elsewhere."""
    was = model.training
    model.eval()
    loader = common.build_loader(common.WithIndex(val_ds), batch, dist_info, shuffle=False, drop_last=False,
                                 num_workers=num_workers)
    n, dev = len(val_ds), dist_info.device
    hits = torch.zeros(n, 2, dtype=torch.bool)
    for img, y, idx in common.progress(loader, dist_info, desc="val", leave=False):
        img, y = img.to(dev, non_blocking=True), y.to(dev)
        with common.autocast(dev):
            logits = model(img).float()  # (B, C)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, k)
        ok = torch.stack([top[:, 0] == y, (top == y[:, None]).any(dim=1)], dim=1)  # (B, 2)
        ok, idx = common.all_gather_nograd(ok.to(torch.uint8)), common.all_gather_nograd(idx.to(dev))
        hits[idx.cpu()] = ok.cpu().bool()
    model.train(was)
    if not dist_info.is_main:
        return None
    top1, top5 = (100.0 * hits.double().mean(0)).tolist()
    return {"top1": top1, "top5": top5}


# ==============================================================================================
# Data: transforms (timm's RandAugment and random erasing), the labelled subset
# ==============================================================================================
def train_transform(args: Args, img_size: int):
    """RandomResizedCrop(scale 0.08-1, bicubic) + flip (+ RandAugment + random erasing through
    timm.data.create_transform, as main_finetune.py's util/datasets.py build_transform)."""
    T = common._tv()
    if args.rand_aug == "off" and args.reprob == 0:  # crop and flip only: no timm needed
        return T.Compose([T.RandomResizedCrop(img_size, scale=(args.crop_min_scale, 1.0),
                                              interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(), common.normalize_transform()])
    try:
        from timm.data import create_transform
    except ImportError:
        raise UserError("RandAugment and random erasing come from timm (pip install timm); or pass --rand-aug off "
                        "--reprob 0 for crop and flip only") from None
    # torchvision's RandAugment is another operation set and magnitude scale; MAE passes these values explicitly
    # (timm's defaults: bilinear, constant erasing); re_device 'cpu' as the transform runs in loader workers
    tf = create_transform(img_size, is_training=True, scale=(args.crop_min_scale, 1.0), color_jitter=None,
                          auto_augment=None if args.rand_aug == "off" else args.rand_aug, interpolation="bicubic",
                          re_prob=args.reprob, re_mode="pixel", re_count=1, mean=common.IMAGENET_MEAN,
                          std=common.IMAGENET_STD)
    # At magnitude 10 (N(9, 0.5) clipped at 10: about 2 % of draws) timm's PosterizeIncreasing keeps 0 bits, which
    # Pillow >= 13 refuses (ValueError), ending a run at random in its first epoch; the Pillow the recipe ran with
    # made those images black, and so does this
    import timm.data.auto_augment as timm_aa
    for t in getattr(tf, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "aug_fn", None) is timm_aa.posterize:
                op.aug_fn = posterize_zero_bits_black
    return tf


def posterize_zero_bits_black(img, bits_to_keep, **kwargs):
    """timm.data.auto_augment.posterize, with 0 bits kept giving what Pillow < 13 gave: every channel 0."""
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    import timm.data.auto_augment as timm_aa
    return timm_aa.posterize(img, bits_to_keep, **kwargs)


def read_subset(path: str, train_ds) -> list[int]:
    """Indices of the train images a split file names, one per line: a file name (google-research/simclr
    1percent.txt / 10percent.txt, facebookresearch/msn *imgs_class.txt) or class/file name. Counts per class may
    differ (SimCLR's 1 %: 12 or 13)."""
    samples = getattr(train_ds, "samples", None)
    if samples is None:
        raise UserError("--train-subset names image files; --data synthetic has none (use --label-fraction)")
    by_name: dict[str, list[int]] = {}
    for i, (p, _) in enumerate(samples):
        q = Path(p)
        by_name.setdefault(q.name, []).append(i)
        by_name.setdefault(f"{q.parent.name}/{q.name}", []).append(i)
    try:
        with open(path, encoding="utf-8") as f:
            names = [ln.strip() for ln in f if ln.strip()]
    except FileNotFoundError:
        raise UserError(f"--train-subset {path} does not exist; pass a list of train file names") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--train-subset {path} is not a UTF-8 text file ({e.reason} at byte {e.start}); pass a list "
                        f"of train file names, one per line") from None
    if not names:
        raise UserError(f"--train-subset {path} is empty; pass a list of train file names, one per line")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise UserError(f"--train-subset {path}: {len(missing)} of {len(names)} names are not in the train data "
                        f"(first: {', '.join(missing[:3])}); is it the list for this dataset?")
    ambiguous = [n for n in names if len(by_name[n]) > 1]
    if ambiguous:
        raise UserError(f"--train-subset {path}: {ambiguous[0]} names {len(by_name[ambiguous[0]])} files; write it "
                        f"as class/{ambiguous[0]}")
    idx = sorted({by_name[n][0] for n in names})
    if len(idx) != len(names):
        raise UserError(f"--train-subset {path} lists {len(names) - len(idx)} image(s) twice; remove the repeats")
    return idx


def fraction_subset(targets, fraction: float, seed: int) -> list[int]:
    """A seeded class-balanced subset: round(fraction x n_c) (at least 1) images of each class c."""
    targets = torch.as_tensor(list(targets))
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in targets.unique().tolist():
        idx = (targets == c).nonzero().flatten()
        picked += idx[torch.randperm(len(idx), generator=g)[:max(1, round(fraction * len(idx)))]].tolist()
    return sorted(picked)


# ==============================================================================================
# Flags
# ==============================================================================================
@dataclass
class Args(common.Flags):
    init: str = ""
    """the pre-trained encoder: our checkpoint (any of the five scripts), an official MAE release file, an MAE-CT /
    MIM-Refiner / data2vec 2.0 release (foreign.py), or `none` for the supervised-from-scratch control (with
    --model). Required"""
    encoder: Literal["auto", "model", "model_ema", "model_online"] = "auto"
    """which encoder of the file: auto = what its paper fine-tunes: "model" (MAE, LUT: the online encoder; MAE-CT,
    MIM-Refiner: their EMA), ConMIM's momentum teacher "model_ema" (its README fine-tunes the teacher). In a short
    run the teacher still holds much of its initialisation: --encoder model takes the online one"""
    model: Optional[str] = None
    """ViT preset (common.VIT_CONFIGS); default: inferred from --init (needed with --init none)"""
    img_size: Optional[common.PosInt] = None
    """training and evaluation crop (papers: 224); default: the checkpoint's, else 224"""
    patch_size: Optional[common.PosInt] = None
    """patch size; default: the checkpoint's, else the preset's"""
    data: str = "data/imagenet"
    """ROOT with ROOT/train and ROOT/val ImageFolders (one folder per class), or synthetic[:N_TRAIN[:N_VAL]]
    (synthetic.py); papers: ImageNet-1K"""
    train_subset: Optional[str] = None
    """train on the images this file lists (one file name, or class/file name, per line): google-research/simclr
    imagenet_subsets/1percent.txt and 10percent.txt (MAE-CT Table 1, MIM-Refiner Table 2), facebookresearch/msn
    imagenet_subsets{1,2,3}/*imgs_class.txt"""
    label_fraction: Optional[common.PosUnit] = None
    """without a split file: a seeded class-balanced fraction of the train images (NOT the papers' split; said in
    the output)"""
    recipe: Literal["mae", "mae-paper", "lut", "conmim", "lowshot-1pct", "lowshot-10pct"] = "mae"
    """the preset of every value below left at none (printed at start with its source, recorded in args.json):
    mae (facebookresearch/mae FINETUNE.md per model size), mae-paper (MAE Table 9), lut (LUT App. Table D),
    conmim (ConMIM Table 12), lowshot-1pct / lowshot-10pct (MAE-CT App. B, MIM-Refiner's released configs)"""
    epochs: Optional[common.PosInt] = None
    """recipe: 100 (ViT-B) / 50 (ViT-L, ViT-H) for mae (Table 9)"""
    warmup_epochs: Optional[common.NonNegFloat] = None
    """linear lr warmup from 0 (recipe: 5; conmim ViT-B: 20)"""
    batch_size: Optional[common.PosInt] = None
    """GLOBAL batch = per-rank micro-batch x accum_steps x processes (recipe: 1024; lowshot-1pct 512, lowshot-10pct 256)"""
    accum_steps: common.PosInt = 1
    """gradient accumulation micro-batches per update (official --accum_iter)"""
    blr: Optional[common.PosFloat] = None
    """base lr; lr = blr x batch / 256 (recipe: mae 5e-4 ViT-B, 1e-3 ViT-L/H; lut 2.5e-4 ViT-B)"""
    lr: Optional[common.PosFloat] = None
    """absolute peak lr, instead of blr (recipe conmim: 4e-3, its README)"""
    lr_rule: Optional[Literal["linear", "sqrt"]] = None
    """lr from blr: linear = blr x batch / 256 (MAE App. A.1), sqrt = blr x sqrt(batch) / 8 (naver-ai/lut
    main_finetune.py); the two agree at batch 1024"""
    min_lr: Optional[common.NonNegFloat] = None
    """lr at the end of the cosine (recipe: 1e-6, util/lr_sched.py), scaled by each group's layer decay as there"""
    weight_decay: Optional[common.NonNegFloat] = None
    """AdamW weight decay (recipe: 0.05); none on 1-D parameters, pos_embed, cls_token"""
    layer_decay: Optional[common.PosUnit] = None
    """layer-wise lr decay d (recipe: mae 0.65 ViT-B, 0.75 ViT-L/H); 1 = off"""
    drop_path: Optional[common.Prob] = None
    """stochastic depth rate of the last block, linear from 0 (recipe: mae 0.1 / 0.2 / 0.3 for B / L / H)"""
    pool: Optional[Literal["avg", "cls"]] = None
    """avg: mean of the patch tokens into a new fc_norm (MAE global_pool, BEiT); cls: the [CLS] token after the
    final norm (MAE-CT / MIM-Refiner low-shot)"""
    rand_aug: Optional[str] = None
    """timm RandAugment config, or off (recipe: rand-m9-mstd0.5-inc1 = Table 9's RandAug (9, 0.5))"""
    reprob: Optional[common.Prob] = None
    """random erasing probability (recipe mae: 0.25, main_finetune.py --reprob; the papers' tables list none)"""
    mixup: Optional[common.NonNegFloat] = None
    """mixup alpha, 0 = off (recipe: 0.8, Table 9)"""
    cutmix: Optional[common.NonNegFloat] = None
    """cutmix alpha, 0 = off (recipe: 1.0, Table 9)"""
    smoothing: Optional[common.Annotated[float, common.Range(0, 1, hi_open=True)]] = None
    """label smoothing (recipe: 0.1, Table 9)"""
    crop_min_scale: common.PosUnit = 0.08
    """RandomResizedCrop's smallest area fraction (timm / torchvision default, main_finetune.py)"""
    clip_grad: Optional[common.PosFloat] = None
    """clip the gradient norm to this (MAE: none)"""
    eval_every: common.PosInt = 1
    """evaluate on val every N epochs (and after the last)"""
    output_dir: str = "runs/finetune"
    """checkpoint-last.pth, checkpoint-best.pth, log.jsonl, args.json, TensorBoard; rerunning resumes"""
    output_json: Optional[str] = None
    """write {protocol, top1_last, top1_best, ...} here at the end"""
    num_workers: common.NonNegInt = 10
    """DataLoader workers per process"""
    seed: int = 0
    """seed of the head, the data order, the augmentations, the mixing and stochastic depth"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (CUDA if visible), cpu or cuda"""
    grad_checkpointing: Literal["auto", "on", "off"] = "auto"
    """activation checkpointing of every block: auto = on for common.STATIC_CHECKPOINTED models on CUDA"""
    compile: bool = False
    """torch.compile the classifier"""
    save_minutes: Optional[common.NonNegFloat] = None
    """also save inside an epoch every M minutes (longrun.py; None: 30 on CUDA, off on the CPU)"""
    exit_after_epochs: Optional[common.PosInt] = None
    """testing: stop after this many epochs as if killed; rerun to resume"""


RECIPE_FIELDS = ("epochs", "warmup_epochs", "batch_size", "blr", "lr", "lr_rule", "min_lr", "weight_decay",
                 "layer_decay", "drop_path", "pool", "rand_aug", "reprob", "mixup", "cutmix", "smoothing")


def resolve_args(args: Args, dim: int) -> tuple[Args, str]:
    """Every recipe field left at None filled from the recipe's row for the encoder width; a line saying so."""
    values, row = recipe_values(args.recipe, dim)
    given = {f: getattr(args, f) for f in RECIPE_FIELDS if getattr(args, f) is not None}
    if "blr" in given and "lr" not in given:  # an explicit base lr wins over a recipe's absolute lr
        values.pop("lr", None)
    filled = {f: given.get(f, values.get(f)) for f in RECIPE_FIELDS}
    r = RECIPES[args.recipe]
    line = (f"recipe {args.recipe}, {row}: {r['source']}" + (f"; note: {r['note']}" if r.get("note") else "")
            + (f"; set by flags: {', '.join('--' + f.replace('_', '-') for f in given)}" if given else ""))
    return dataclasses.replace(args, **filled), line


def peak_lr(args: Args) -> float:
    if args.lr is not None:
        return args.lr
    return args.blr * (args.batch_size / 256 if args.lr_rule == "linear" else math.sqrt(args.batch_size) / 8)


# ==============================================================================================
# Training loop
# ==============================================================================================
@dataclass
class Run:
    """The run: what its epochs share (ranks, log, run control, data, batch, schedules)."""
    dist_info: common.DistInfo
    log: common.Logger
    ctl: object  # common.run_control: saves and stops at update boundaries
    dataset: torch.utils.data.Dataset  # the augmented, labelled train images
    val: torch.utils.data.Dataset
    classes: list
    micro: int  # per-rank micro-batch
    steps_per_epoch: int
    lr_schedule: Callable[[int], float]  # global update -> peak-relative lr (warmup + cosine, util/lr_sched.py)
    rms_start: float  # the initial weights' RMS (save_checkpoint's divergence check)


def train_one_epoch(state: TrainState, run: Run, epoch: int, *, position: Optional[dict], args: Args) -> float:
    """One epoch of steps_per_epoch updates (lr set per update, util/lr_sched.py), the rank-mean loss logged per
    update; after each the run control decides whether to save (save_state) and stop. Returns the epoch's mean
    loss."""
    dist_info, log, micro, spe = run.dist_info, run.log, run.micro, run.steps_per_epoch
    start = common.epoch_start(args.seed, epoch, dist_info, position, log)
    sums = dict(position["sums"]) if start else {"loss": 0.0}
    loader = common.build_loader(run.dataset, micro, dist_info, shuffle=True, drop_last=True,
                                 num_workers=args.num_workers, seed=args.seed, epoch=epoch,
                                 skip=start * args.accum_steps * micro)
    state.ddp.train()
    bar = common.progress(loader, dist_info, total=(spe - start) * args.accum_steps, desc=f"epoch {epoch}")
    accum_loss, cur_lr = 0.0, 0.0
    for it, (imgs, labels) in enumerate(bar, start=start * args.accum_steps):
        if it >= spe * args.accum_steps:
            break  # an incomplete accumulation group at the epoch end is skipped
        step = epoch * spe + it // args.accum_steps
        last_micro = (it + 1) % args.accum_steps == 0
        if it % args.accum_steps == 0:
            cur_lr = run.lr_schedule(step)
            common.set_lr(state.optimizer, cur_lr)
        imgs = imgs.to(dist_info.device, non_blocking=True)
        labels = labels.to(dist_info.device, non_blocking=True)
        loss = train_step(state, imgs, labels, sync=last_micro, step=step, micro=it % args.accum_steps,
                          num_classes=len(run.classes), dist_info=dist_info, args=args)
        accum_loss += loss.detach() / args.accum_steps
        if not last_micro:
            continue
        loss_v = common.all_reduce_mean(accum_loss).item()
        accum_loss = 0.0
        sums["loss"] += loss_v
        if dist_info.is_main:
            bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{cur_lr:.2e}")
            log.log({"train/loss": loss_v, "train/lr": cur_lr}, step=step)
        update = (it + 1) // args.accum_steps
        save, stop = run.ctl.at_update(update, spe)  # one all-reduce: a stop signal anywhere, the timer
        if save:
            with run.ctl.saving(epoch, update, spe):
                save_state(state, run, epoch, update, position=run.ctl.position(update, sums), args=args)
        if stop:
            run.ctl.stop(f"at epoch {epoch} step {update}")
    return sums["loss"] / spe


def save_state(state: TrainState, run: Run, epoch: int, update: int, *, position: Optional[dict], args: Args):
    """OUTPUT_DIR/checkpoint-last.pth after `update` updates of `epoch` (its end: update == steps_per_epoch, or
    inside it with `position` for the exact resume). Rank 0 writes; every rank calls it (position is gathered)."""
    if not run.dist_info.is_main:
        return
    done = update == run.steps_per_epoch
    common.save_checkpoint(common.checkpoint_path(args.output_dir), {
        "model": timm_state_dict(state.model), "classes": run.classes, "num_classes": len(run.classes),
        "pool": args.pool, "encoder_config": state.model.encoder.config(), "model_is_ema": False,
        "optimizer": state.optimizer.state_dict(), "epoch": epoch + done,
        "step": epoch * run.steps_per_epoch + update, "resume": None if done else position, "best": state.best,
        "last": state.last, "weights_rms_start": run.rms_start, "args": dataclasses.asdict(args)},
        weights_rms_start=run.rms_start)


def end_epoch_eval(state: TrainState, run: Run, epoch: int, loss: float, *, args: Args):
    """Val top-1 / top-5 after `epoch` (every rank: a collective); on rank 0 the last and best results, the best
    epoch's classifier as OUTPUT_DIR/checkpoint-best.pth, and the epoch's log line."""
    res = evaluate(state.model, run.val, run.micro, run.dist_info, args.num_workers)
    if not run.dist_info.is_main:
        return
    state.last = {"top1": res["top1"], "top5": res["top5"], "epoch": epoch}
    if state.best["top1"] is None or res["top1"] > state.best["top1"]:
        state.best = dict(state.last)
        common.save_checkpoint(os.path.join(args.output_dir, "checkpoint-best.pth"), {
            "model": timm_state_dict(state.model), "classes": run.classes, "pool": args.pool,
            "encoder_config": state.model.encoder.config(), **state.best})
    run.log.log({"val/top1": res["top1"], "val/top5": res["top5"], "val/top1_best": state.best["top1"],
                 "train/epoch_loss": loss}, step=(epoch + 1) * run.steps_per_epoch)
    run.log.print(f"epoch {epoch}: train loss {loss:.4f}; val top-1 {res['top1']:.2f}, top-5 {res['top5']:.2f} "
                  f"(best {state.best['top1']:.2f}, epoch {state.best['epoch']})")


def main(args: Args):
    if not args.init:
        raise UserError("pass --init CHECKPOINT (the pre-trained encoder), or --init none --model NAME for the "
                        "supervised-from-scratch control")
    if args.output_json:
        common.check_output_path(args.output_json, "--output-json")
    if args.train_subset and args.label_fraction:
        raise UserError("--train-subset and --label-fraction both choose the labelled images; pass one")
    dist_info = common.init_distributed(args.device)
    device, world = dist_info.device, dist_info.world_size

    # ---- the encoder: which one of the file, its width (the recipe's row), then the recipe, then the ViT
    ckpt, key = None, None
    if args.init.lower() == "none":
        if args.model not in common.VIT_CONFIGS:
            raise UserError(f"--init none (supervised from scratch) needs --model, one of {', '.join(common.VIT_CONFIGS)}")
        dim = common.VIT_CONFIGS[args.model][0]
    else:
        ckpt = common.load_file(args.init)
        key = default_encoder(ckpt) if args.encoder == "auto" else args.encoder
        if not isinstance(ckpt.get(key), dict) and key == "model":
            key = None  # a release file: common.select_weights finds its weights
        sd = ckpt.get(key) if key else common.select_weights(ckpt)[0]
        dim = common.checkpoint_encoder_config(common.convert_to_ours(sd))["dim"] if isinstance(sd, dict) else 0
    args, recipe_line = resolve_args(args, dim)
    if args.recipe.startswith("lowshot") and not (args.train_subset or args.label_fraction):
        raise UserError(f"--recipe {args.recipe} fine-tunes on a labelled subset: pass --train-subset FILE "
                        f"(google-research/simclr imagenet_subsets/{args.recipe[8:].replace('pct', 'percent')}.txt) "
                        f"or --label-fraction F")
    micro = common.per_rank_batch(args.batch_size, args.accum_steps, world)
    if (args.mixup > 0 or args.cutmix > 0) and micro * world < 2:
        raise UserError(f"mixup / cutmix mix each image with another of its batch: a global micro-batch of "
                        f"{micro * world} has none; raise --batch-size or pass --mixup 0 --cutmix 0")
    encoder, weights = common.encoder_from_checkpoint(args.init, args.model, args.img_size, args.patch_size, key=key,
                                                      seed=args.seed, ckpt=ckpt, drop_path_rate=args.drop_path)
    ckpt = sd = None  # the weights live in the encoder now
    img_size = encoder.img_size
    checkpointed = {"on": encoder.depth, "off": 0}.get(
        args.grad_checkpointing, encoder.depth if device.type == "cuda" and args.model in common.STATIC_CHECKPOINTED
        else 0)

    # ---- data
    train = common.build_dataset(args.data, "train", train_transform(args, img_size), img_size=img_size,
                                 seed=args.seed, require_labels=True)
    val = common.build_dataset(args.data, "val", common.eval_transform(img_size), img_size=img_size, seed=args.seed,
                               require_labels=True)
    if list(train.classes) != list(val.classes):
        raise UserError(f"{args.data}: train and val have different classes ({len(train.classes)} vs "
                        f"{len(val.classes)}, first differences: "
                        f"{sorted(set(train.classes) ^ set(val.classes))[:3]}); fine-tuning needs the same class folders")
    labelled = "all train images"
    if args.train_subset:
        train = torch.utils.data.Subset(train, read_subset(args.train_subset, train))
        labelled = f"the {len(train)} images of {args.train_subset}"
    elif args.label_fraction:
        train = torch.utils.data.Subset(train, fraction_subset(train.targets, args.label_fraction, args.seed))
        labelled = (f"a seeded class-balanced {args.label_fraction:g} of the train images ({len(train)}; not the "
                    f"papers' split)")
    steps_per_epoch = len(train) // world // micro // args.accum_steps
    if steps_per_epoch == 0:
        raise UserError(f"{len(train)} labelled train images are fewer than one global batch of {args.batch_size}; "
                        f"lower --batch-size")
    lr = peak_lr(args)
    total_steps = args.epochs * steps_per_epoch
    lr_schedule = functools.partial(common.cosine_schedule, total_steps=total_steps, base=lr, final=args.min_lr,
                                    warmup_steps=round(args.warmup_epochs * steps_per_epoch))

    # ---- resume or start
    resume = common.load_resume_state(args.output_dir)
    if resume is not None:
        common.check_resume_args(resume, args, args.output_dir, state_keys=("model", "optimizer", "epoch", "classes"),
                                 shape=("pool", "encoder"), refuse={
                                     "train_subset": "it chooses the labelled images", "label_fraction": "it chooses "
                                     "the labelled images", "accum_steps": "it sets the steps per epoch"})
    start_epoch = resume["epoch"] if resume is not None else 0
    position = resume.get("resume") if resume is not None else None
    classes = list(train.dataset.classes if isinstance(train, torch.utils.data.Subset) else train.classes)
    log = common.Logger(args.output_dir, args, dist_info, extra=dict(
        recipe_line=recipe_line, weights=weights, effective_lr=lr, per_rank_batch=micro,
        steps_per_epoch=steps_per_epoch, labelled=labelled, n_train=len(train), n_val=len(val)))
    log.print(recipe_line)
    log.print(f"{args.init}: {weights}; {('post-norm ' if encoder.post_norm else '')}"
              f"{common.describe_vit(encoder.config())} at {img_size} px, {args.pool} pooling, {len(classes)} classes")
    rule = "--lr" if args.lr is not None else (f"blr {args.blr:g} x {args.batch_size} / 256" if args.lr_rule == "linear"
                                               else f"blr {args.blr:g} x sqrt({args.batch_size}) / 8")
    log.print(f"global batch {args.batch_size} = {micro} per rank x {args.accum_steps} accumulation x {world} "
              f"process(es); lr {lr:.4g} ({rule}); {steps_per_epoch} updates per epoch; trained on {labelled}")

    common.seed_everything(args.seed)  # the head's initialisation: the same on every rank
    model = Classifier(encoder, len(classes), args.pool, checkpointed)
    groups = layer_decay_groups(model, args.weight_decay, args.layer_decay)
    log.print(describe_groups(model, groups, args.layer_decay, args.weight_decay))
    optimizer_state = rms_start = record = None
    if resume is not None:
        load_timm_state_dict(model, resume["model"])
        optimizer_state, rms_start = resume["optimizer"], resume.get("weights_rms_start")
        record = dict(best=resume["best"], last=resume["last"])
        log.print(f"resuming {common.checkpoint_path(args.output_dir)} at epoch {start_epoch}"
                  + (f", step {position['update']} of {steps_per_epoch}" if position else ""))
    resume = None
    if rms_start is None:
        rms_start = common.weights_rms(timm_state_dict(model))
    model.to(device)
    optimizer = common.make_adamw(groups, lr=lr, betas=(0.9, 0.999))  # Table 9: AdamW (0.9, 0.999)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    ddp = model
    if dist_info.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        ddp = torch.compile(ddp)
    state = TrainState(ddp, model, optimizer, **(record or {}))
    run = Run(dist_info, log, common.run_control(args.save_minutes, dist_info, log), train, val, classes, micro,
              steps_per_epoch, lr_schedule, rms_start)

    if start_epoch >= args.epochs:
        log.print(f"{common.checkpoint_path(args.output_dir)} already holds all {args.epochs} epochs")
    for epoch in range(start_epoch, args.epochs):
        loss = train_one_epoch(state, run, epoch, args=args, position=position if epoch == start_epoch else None)
        position = None
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            end_epoch_eval(state, run, epoch, loss, args=args)
        save_state(state, run, epoch, steps_per_epoch, position=None, args=args)
        run.ctl.epoch_done(epoch + 1)
        if args.exit_after_epochs is not None and epoch + 1 >= args.exit_after_epochs and epoch + 1 < args.epochs:
            log.print(f"--exit-after-epochs {args.exit_after_epochs}: stopping; rerun to resume")
            log.close()
            return
    best, last = state.best, state.last
    if dist_info.is_main:
        log.print(f"fine-tuned top-1 on {len(val)} val images: last epoch ({last['epoch']}) {last['top1']:.2f}, "
                  f"best epoch ({best['epoch']}) {best['top1']:.2f} (the maximum over epochs on val, which the "
                  f"official scripts report)")
        if args.output_json:
            common.write_atomic(args.output_json, lambda f: json.dump({
                "protocol": {**{f: getattr(args, f) for f in RECIPE_FIELDS}, "recipe": args.recipe,
                             "recipe_line": recipe_line, "init": args.init, "weights": weights, "effective_lr": lr,
                             "labelled": labelled, "n_train": len(train), "n_val": len(val), "img_size": img_size,
                             "world_size": world, "seed": args.seed},
                "top1_last": last["top1"], "top5_last": last["top5"], "epoch_last": last["epoch"],
                "top1_best": best["top1"], "top5_best": best["top5"], "epoch_best": best["epoch"]}, f, indent=2), mode="w",
                flag="--output-json")
            log.print(f"results written to {args.output_json}")
    log.close()


def default_encoder(ckpt: dict) -> str:
    """The encoder a paper fine-tunes: conmim.py's files (a "model_ema" and "head_ema", no decoder) the momentum
    teacher, as TencentARC/ConMIM's README fine-tunes its teacher checkpoint; every other file its "model"."""
    return "model_ema" if {"model_ema", "head_ema"} <= set(ckpt) and "decoder" not in ckpt else "model"


if __name__ == "__main__":
    common.run_main(main, Args)
