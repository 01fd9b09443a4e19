"""Linear probing of a frozen ViT: a grid of linear classifiers trained at once on one encoder pass.

Protocol papers
  - MIM-Refiner, Alkin et al., arXiv:2402.10093, App. C.3 and Table 2 ("Probe"): the DINOv2 protocol,
    50 epochs, SGD momentum 0.9, RandomResizedCrop + horizontal flip; the grid is 13 learning rates from
    1e-4 to 0.5 x {last block, concatenation of the last 4 blocks} x {[CLS], [CLS] + mean patch token}.
    DINOv2, Oquab et al., arXiv:2304.07193, official dinov2/eval/linear.py: every classifier sees the same
    frozen features, lr x global batch / 256, weight N(0, 0.01), bias 0, weight decay 0, cosine
    schedule to 0 per iteration (CosineAnnealingLR), the sum of the classifiers' cross-entropies is
    minimised (each head only receives the gradient of its own term), the best classifier on val is reported.
  - MAE-CT, Lehner et al., arXiv:2304.10520, App. B, Table 9 (Table 1 "Linear probing"): a non-affine
    BatchNorm between the frozen encoder and the linear layer (it folds into the layer afterwards),
    50 epochs, batch 1024, SGD momentum 0.9, weight decay 0, lr in {0.1, 0.09, ..., 0.01}, 5 warmup
    epochs then cosine, RandomResizedCrop 224 + flip; feature: the [CLS] token after the final LayerNorm.
    The official probe scales these lrs by batch / 256 (0.4 ... 0.04 at batch 1024), as mae_ct.py scales the
    paper's training lrs: ml-jku/MAE-CT yamls/probe.yaml lists lr 0.1 ... 0.01, optimizers/__init__.py gives
    every optimizer the linear_lr_scaler (lr x factor / 256) and trainers/base/trainer_base.py passes the
    effective batch size as the factor.

Equations (feature f of one image, C classes, head h = (lr_h, n_h, avg_h)):
  tokens of block b       z_b = LN(x_b) (DINOv2 get_intermediate_layers(norm=True); --no-final-norm: x_b)
  head input (dinov2)     u_h = [z_{L-n_h+1}[CLS]; ...; z_L[CLS]] (+ [mean_p z_L[p]] if avg_h)   (B, n_h*D + avg_h*D)
  head input (maect)      u = (z_L[CLS] - mu_B) / sqrt(var_B + 1e-5)  (BN, affine=False, global-batch stats)
  logits                  W_h u_h + b_h                                                        (B, C)
  loss                    sum_h CE(W_h u_h + b_h, y)  (sum over heads = every head trained alone)
  lr of head h at step t  lr_h(t) = lr_h * s * cos_sched(t)    s = global batch / 256 (both protocols)

Launch (ImageNet-1K, ROOT/train and ROOT/val ImageFolders, 8 GPUs, global batch 1024):
  MIM-Refiner Table 2 "Probe" (DINOv2 protocol, EMA weights):
    torchrun --nproc_per_node=8 eval_linear.py --checkpoint CKPT --ema --data /imagenet --protocol dinov2 \
        --output-json linear_dinov2.json
  MAE-CT Table 1 "Linear probing" (Table 9 protocol):
    torchrun --nproc_per_node=8 eval_linear.py --checkpoint CKPT --ema --data /imagenet --protocol maect \
        --output-json linear_maect.json
  Tiny CPU run:
    python eval_linear.py --checkpoint CKPT --data synthetic:200:100 --epochs 2 --batch-size 50 \
        --num-workers 0 --device cpu

Distributed: the global batch is split over the processes; the heads' gradients are all-reduced and
averaged (cleanrl multigpu style, no DDP wrapper), the BatchNorm statistics are those of the global batch,
and every image's crop/flip is drawn from a generator seeded by (seed, epoch, image index). So N processes
with batch B/N each train exactly the heads of 1 process with batch B (tests/test_eval_frozen.py).

Deviations, each deliberate:
  - DINOv2 trains 12500 iterations with an infinite sampler and evaluates periodically; here --epochs
    epochs of the train set (MIM-Refiner: 50) and one evaluation at the end;
  - DINOv2's default lr list is {1e-5, ..., 0.1} (x batch/256); the default here is MIM-Refiner's
    {1e-4, ..., 0.5} (App. C.3; official probe grid), also x batch/256;
  - MIM-Refiner's official probe puts a parameter-free BatchNorm before each head of the DINOv2 grid
    and warms up; `--protocol dinov2` follows DINOv2's linear.py (no BN, no warmup) as App. C.3 says;
  - bf16 autocast for the encoder on CUDA (DINOv2 too), fp32 heads; fp32 everywhere on CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError, all_gather_nograd, autocast, build_dataset, build_loader, progress, run_main

DINOV2_LRS = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.3, 0.5]  # MIM-Refiner App. C.3
MAECT_LRS = [round(0.01 * i, 2) for i in range(10, 0, -1)]  # MAE-CT Table 9: {0.1, 0.09, ..., 0.01}


@dataclass
class Args(common.Flags):
    checkpoint: str = ""
    """Encoder weights (as eval_knn.py: ours, official MAE / MAE-CT / MIM-Refiner / data2vec 2.0, raw state
    dict, or `none` for a random encoder with --model). Required."""
    model: Optional[str] = None
    """ViT preset (vit_t16 ... vit_2b14). Default: inferred from the checkpoint."""
    img_size: Optional[common.PosInt] = None
    """Crop size for training and evaluation (papers: 224). Default: the checkpoint's, else 224."""
    patch_size: Optional[common.PosInt] = None
    """Patch size. Default: the checkpoint's, else the preset's."""
    data: str = "data/imagenet"
    """ROOT with ROOT/train and ROOT/val ImageFolders, or synthetic[:N_TRAIN[:N_VAL]] (synthetic.py); paper: ImageNet-1K."""
    protocol: Literal["dinov2", "maect"] = "dinov2"
    """dinov2: MIM-Refiner App. C.3 grid (13 lrs x {1, 4} blocks x {CLS, CLS+avg}); maect: MAE-CT Table 9
    (non-affine BN + linear on the last block's CLS, 10 peak lrs, 5 warmup epochs)."""
    lrs: list[common.PosFloat] = field(default_factory=list)
    """Learning rates of the grid, each x global batch / 256. Default: dinov2 1e-4 2e-4 5e-4 1e-3 2e-3 5e-3 0.01
    0.02 0.05 0.1 0.2 0.3 0.5 (DINOv2 linear.py); maect 0.1 0.09 ... 0.01 (Table 9; the official probe scales them
    as well, ml-jku/MAE-CT optimizers/__init__.py linear_lr_scaler: peak 0.4 ... 0.04 at batch 1024)."""
    epochs: common.PosInt = 50
    """Training epochs (MIM-Refiner App. C.3: 50; MAE-CT Table 9: 50)."""
    warmup_epochs: Optional[common.NonNegInt] = None
    """Linear warmup epochs before the cosine. Default: 0 (dinov2, DINOv2 CosineAnnealingLR), 5 (maect)."""
    batch_size: common.PosInt = 1024
    """GLOBAL batch, split over processes (MAE-CT Table 9: 1024; DINOv2: 128 x 8 GPUs). Must be a multiple
    of the number of processes and at most the train set size (the last incomplete batch is dropped)."""
    momentum: common.Prob = 0.9
    """SGD momentum (both protocols: 0.9)."""
    weight_decay: common.NonNegFloat = 0.0
    """SGD weight decay (both protocols: 0)."""
    crop_scale: common.PosUnit = 0.08
    """Smallest area fraction of RandomResizedCrop (torchvision / DINOv2 default 0.08)."""
    final_norm: bool = True
    """Apply the final LayerNorm to the used blocks' tokens (DINOv2 get_intermediate_layers norm=True; MAE
    linprobe: CLS after the norm). --no-final-norm: raw residual stream. No effect on post-norm models."""
    ema: bool = False
    """Use the EMA/momentum encoder (MIM-Refiner and MAE-CT evaluate their EMA encoder)."""
    num_workers: common.NonNegInt = 8
    """DataLoader workers per process."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (CUDA if visible), cpu or cuda."""
    seed: int = 0
    """Seed of the head init, the data order and the augmentations (and of --checkpoint none, synthetic data)."""
    output_json: Optional[str] = None
    """Write {protocol, grid, best} (accuracies in percent) to this file."""


# ----------------------------------------------------------------------------------------------
# Heads (pure modules; tests import them)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadSpec:
    lr: float  # base lr (before the batch scaling)
    n_blocks: int  # [CLS] of the last n_blocks blocks, concatenated
    avgpool: bool  # + mean of the last block's patch tokens
    batchnorm: bool  # non-affine BN in front (MAE-CT)

    @property
    def feature(self) -> tuple[int, bool]:
        return self.n_blocks, self.avgpool

    @property
    def name(self) -> str:  # DINOv2 linear.py naming
        return f"classifier_{self.n_blocks}_blocks_avgpool_{self.avgpool}_lr_{self.lr:.5f}".replace(".", "_")


def grid_specs(protocol: str, lrs: list[float]) -> list[HeadSpec]:
    if protocol == "dinov2":  # DINOv2 linear.py setup_linear_classifiers: n_last_blocks x avgpool x lrs
        return [HeadSpec(lr, n, avg, False) for n in (1, 4) for avg in (False, True) for lr in lrs]
    return [HeadSpec(lr, 1, False, True) for lr in lrs]  # MAE-CT: BN + linear on the last block's CLS


class GlobalBatchNorm(nn.Module):
    """BatchNorm1d(affine=False) whose training statistics are those of the GLOBAL batch (sums all-reduced
    over processes, in fp64), so N processes equal one (as SyncBatchNorm). Running stats as torch
    (momentum 0.1, unbiased running variance). Inputs are frozen features: no gradient flows through the
    statistics (none is needed)."""

    def __init__(self, dim: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x):  # (B, D) -> (B, D)
        if not self.training:
            return (x - self.running_mean) / (self.running_var + self.eps).sqrt()
        with torch.no_grad():
            xd = x.double()
            stats = torch.cat([xd.sum(0), (xd * xd).sum(0), xd.new_tensor([x.shape[0]])])  # (2D+1,)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(stats)
            d = x.shape[1]
            n = stats[-1]
            mean = stats[:d] / n
            var = (stats[d:2 * d] / n - mean * mean).clamp_min(0)  # biased, used to normalise
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.float())
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * (var * n / max(n - 1, 1)).float())
        return (x - mean.float()) / (var.float() + self.eps).sqrt()


class LinearGrid(nn.Module):
    """One linear layer per HeadSpec. Heads on the same feature start from the same weights: the init of a
    head is a function of (seed, n_blocks, avgpool) only, so a grid of one head trains the same weights as
    that head inside the full grid."""

    def __init__(self, specs: list[HeadSpec], dim: int, num_classes: int, seed: int = 0):
        super().__init__()
        self.specs = list(specs)
        self.heads = nn.ModuleList()
        for s in self.specs:
            lin = nn.Linear(dim * s.n_blocks + dim * s.avgpool, num_classes)
            g = torch.Generator().manual_seed(seed + 1009 * s.n_blocks + 17 * int(s.avgpool))
            with torch.no_grad():  # DINOv2 LinearClassifier: normal_(0, 0.01), zero bias
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.01)
                lin.bias.zero_()
            self.heads.append(lin)
        self.bn = GlobalBatchNorm(dim) if any(s.batchnorm for s in self.specs) else None

    def forward(self, feats: dict) -> list[torch.Tensor]:
        """feats: {(n_blocks, avgpool): (B, F)} -> one (B, C) logit tensor per head."""
        cache = {}
        out = []
        for s, lin in zip(self.specs, self.heads):
            key = (s.feature, s.batchnorm)
            if key not in cache:  # BN once per feature (the heads share its input and thus its statistics)
                cache[key] = self.bn(feats[s.feature]) if s.batchnorm else feats[s.feature]
            out.append(lin(cache[key]))
        return out


def grid_features(encoder, img, n_last: int, final_norm: bool) -> dict:
    """Frozen encoder -> {(n, avg): (B, n*D + avg*D)} for n in {1, n_last}, avg in {False, True}
    (DINOv2 create_linear_input)."""
    blocks = list(range(-n_last, 0))
    _, outs = encoder.forward_features(img, return_blocks=blocks)  # n_last x (B, 1+N, D), raw
    if final_norm and not encoder.post_norm:
        outs = [encoder.norm(o) for o in outs]  # DINOv2 get_intermediate_layers(norm=True)
    cls = [o[:, 0].float() for o in outs]
    avg = outs[-1][:, 1:].mean(dim=1).float()  # (B, D) mean of the last block's patch tokens
    feats = {}
    for n in sorted({1, n_last}):
        f = torch.cat(cls[-n:], dim=1)  # (B, n*D)
        feats[(n, False)] = f
        feats[(n, True)] = torch.cat([f, avg], dim=1)
    return feats


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def linear_train_transform(img_size: int, scale_min: float):
    """DINOv2 make_classification_train_transform / MAE-CT Table 9: RandomResizedCrop (bicubic) + flip."""
    T = common._tv()
    return T.Compose([T.RandomResizedCrop(img_size, scale=(scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), common.normalize_transform()])


class SeededAugment(torch.utils.data.Dataset):
    """Applies `transform` to image i of `ds` with the torch RNG seeded by (seed, epoch, i): the crop and
    flip of an image do not depend on the process or worker that loads it (N processes = 1 process)."""

    def __init__(self, ds, transform, seed: int, epoch: int):
        self.ds, self.transform, self.seed, self.epoch = ds, transform, seed, epoch

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, y = self.ds[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(common.epoch_seed(self.seed, self.epoch, 0) * 1_000_033 + i)
            return self.transform(img), y


# ----------------------------------------------------------------------------------------------
# Training and evaluation of the grid
# ----------------------------------------------------------------------------------------------
def train_grid(encoder, grid: LinearGrid, train_ds, args: Args, dist_info, lr_scale: float, warmup_epochs: int,
               n_last: int, log=print) -> list[float]:
    """Train every head of `grid` on the frozen `encoder` (one encoder pass per batch). `train_ds` yields
    PIL images (the seeded augmentation is applied here). Returns each head's mean train loss of the last
    epoch (global batch mean)."""
    device, world = dist_info.device, dist_info.world_size
    per_rank = common.per_rank_batch(args.batch_size, 1, world)
    steps_per_epoch = len(train_ds) // args.batch_size
    total, warmup = steps_per_epoch * args.epochs, steps_per_epoch * warmup_epochs
    groups = [{"params": list(h.parameters()), "lr": s.lr * lr_scale, "base_lr": s.lr * lr_scale}
              for s, h in zip(grid.specs, grid.heads)]
    opt = torch.optim.SGD(groups, lr=0.0, momentum=args.momentum, weight_decay=args.weight_decay)
    tf = linear_train_transform(encoder.img_size, args.crop_scale)
    encoder.eval()
    grid.train()
    params = [p for h in grid.heads for p in h.parameters()]
    step, last_losses = 0, [0.0] * len(grid.specs)
    for epoch in range(args.epochs):
        loader = build_loader(SeededAugment(train_ds, tf, args.seed, epoch), per_rank, dist_info, shuffle=True,
                              drop_last=True, num_workers=args.num_workers, seed=args.seed, epoch=epoch)
        loss_sum = torch.zeros(len(grid.specs), dtype=torch.float64)
        for img, y in progress(loader, dist_info, desc=f"linear epoch {epoch + 1}/{args.epochs}"):
            img, y = img.to(device, non_blocking=True), y.to(device, non_blocking=True)
            factor = common.cosine_schedule(step, total, 1.0, 0.0, warmup)  # DINOv2: CosineAnnealingLR(eta_min=0)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            with torch.no_grad(), autocast(device):
                feats = grid_features(encoder, img, n_last, args.final_norm)  # the encoder runs once for all heads
            losses = torch.stack([F.cross_entropy(logits, y) for logits in grid(feats)])  # (H,) local means
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()  # head h only receives d loss_h: the sum trains every head alone
            if world > 1:  # mean of the local-batch means = mean over the global batch (equal local batches)
                flat = torch.cat([p.grad.flatten() for p in params])
                dist.all_reduce(flat)
                flat /= world
                i = 0
                for p in params:
                    p.grad.copy_(flat[i:i + p.numel()].view_as(p))
                    i += p.numel()
            opt.step()
            loss_sum += common.all_reduce_mean(losses.detach()).double().cpu()
            step += 1
        last_losses = (loss_sum / max(steps_per_epoch, 1)).tolist()
        if dist_info.is_main:
            best = min(range(len(last_losses)), key=lambda h: last_losses[h])
            log(f"epoch {epoch + 1}/{args.epochs}: lowest train loss {last_losses[best]:.4f} ({grid.specs[best].name})")
    return last_losses


@torch.no_grad()
def evaluate_grid(encoder, grid: LinearGrid, val_ds, args: Args, dist_info, n_last: int) -> list[float] | None:
    """Top-1 (%) of every head on `val_ds` (eval transform). Each process runs its shard; the correctness
    of each image is gathered and keyed by dataset index (the sampler's padded duplicates are dropped).
    Returns the accuracies on rank 0, None elsewhere."""
    device = dist_info.device
    encoder.eval()
    grid.eval()
    per_rank = max(1, -(-args.batch_size // dist_info.world_size))
    loader = build_loader(common.WithIndex(val_ds), per_rank, dist_info, shuffle=False, drop_last=False,
                          num_workers=args.num_workers, seed=args.seed)
    n, h = len(val_ds), len(grid.specs)
    correct = torch.zeros(n, h, dtype=torch.bool)
    for img, y, idx in progress(loader, dist_info, desc="linear val"):
        img, y = img.to(device, non_blocking=True), y.to(device)
        with autocast(device):
            feats = grid_features(encoder, img, n_last, args.final_norm)  # fp32 (B, F); the heads run in fp32
        ok = torch.stack([logits.argmax(1) == y for logits in grid(feats)], dim=1)  # (B, H)
        ok = all_gather_nograd(ok.to(torch.uint8))
        idx = all_gather_nograd(idx.to(device))
        correct[idx.cpu()] = ok.cpu().bool()
    return (100.0 * correct.double().mean(0)).tolist() if dist_info.is_main else None


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main(args: Args):
    eval_knn = common.neighbour("eval_knn", "eval_linear.py")  # its encoder loading and JSON writer
    if not args.checkpoint:
        raise UserError("pass --checkpoint PATH (or --checkpoint none for a randomly initialised baseline)")
    if args.output_json:
        common.check_output_path(args.output_json, "--output-json")
    lrs = args.lrs or (DINOV2_LRS if args.protocol == "dinov2" else MAECT_LRS)
    warmup_epochs = args.warmup_epochs if args.warmup_epochs is not None else (0 if args.protocol == "dinov2" else 5)
    if warmup_epochs >= args.epochs and warmup_epochs > 0:
        raise UserError(f"--warmup-epochs {warmup_epochs}{' (the maect default)' if args.warmup_epochs is None else ''} must "
                        f"be smaller than --epochs {args.epochs}; pass a smaller --warmup-epochs or more --epochs")

    dist_info = common.init_distributed(args.device)
    device = dist_info.device
    if args.batch_size % dist_info.world_size:
        raise UserError(f"--batch-size {args.batch_size} (global) is not divisible by {dist_info.world_size} processes; "
                        f"choose a multiple of {dist_info.world_size}")
    encoder, weights = eval_knn.build_encoder(args)
    encoder.to(device).eval().requires_grad_(False)
    img_size = encoder.img_size
    n_last = 4 if args.protocol == "dinov2" else 1
    if encoder.depth < n_last:
        raise UserError(f"--protocol dinov2 concatenates the last 4 blocks; the encoder has only {encoder.depth}")

    train_ds = build_dataset(args.data, "train", None, img_size=img_size, seed=args.seed, require_labels=True)
    val_ds = build_dataset(args.data, "val", common.eval_transform(img_size), img_size=img_size, seed=args.seed,
                           require_labels=True)
    if len(val_ds) == 0:
        raise UserError(f"--data {args.data}: val needs at least one image")
    if list(train_ds.classes) != list(val_ds.classes):
        raise UserError(f"train and val have different class folders ({len(train_ds.classes)} vs "
                        f"{len(val_ds.classes)}); linear probing needs the same classes in ROOT/train and ROOT/val")
    if len(train_ds) < args.batch_size:
        raise UserError(f"--batch-size {args.batch_size} is larger than the train set ({len(train_ds)} images; the "
                        f"incomplete last batch is dropped); lower --batch-size")
    num_classes = len(train_ds.classes)
    lr_scale = args.batch_size / 256  # DINOv2 linear.py; MAE-CT's official probe (linear_lr_scaler, divisor 256)
    specs = grid_specs(args.protocol, lrs)

    resize = common.eval_resize(img_size)
    protocol = {
        "protocol": {"dinov2": "DINOv2 linear grid (MIM-Refiner App. C.3)",
                     "maect": "non-affine BN + linear, lr sweep (MAE-CT App. B Table 9)"}[args.protocol],
        "checkpoint": args.checkpoint,
        "weights": weights + ("; EMA/momentum weights (--ema)" if args.ema else "; the file's main encoder"),
        "model": ("post-norm " if encoder.post_norm else "") + common.describe_vit(encoder.config()),
        "features": ("[CLS] of the last 1 / 4 blocks, with / without the last block's mean patch token"
                     if args.protocol == "dinov2" else "[CLS] of the last block")
                    + (" after the final LayerNorm" if args.final_norm and not encoder.post_norm else " (raw)"),
        "heads": len(specs), "base_lrs": lrs, "lr_scale": lr_scale,
        "lr_rule": f"lr x global batch / 256 ({'DINOv2' if args.protocol == 'dinov2' else 'MAE-CT official probe'})",
        "schedule": f"{warmup_epochs} warmup epochs, then cosine to 0, per iteration",
        "optimizer": f"SGD momentum {args.momentum}, weight decay {args.weight_decay}",
        "epochs": args.epochs, "batch_size": args.batch_size, "world_size": dist_info.world_size,
        "train_transform": f"RandomResizedCrop({img_size}, scale=({args.crop_scale}, 1), bicubic) + flip",
        "val_transform": f"Resize({resize}, bicubic) + CenterCrop({img_size})",
        "n_train": len(train_ds), "n_val": len(val_ds), "num_classes": num_classes,
        "data": args.data, "img_size": img_size, "seed": args.seed,
        "precision": "bf16 autocast encoder, fp32 heads" if device.type == "cuda" else "fp32",
    }
    if dist_info.is_main:
        print("linear probing protocol:")
        for k, v in protocol.items():
            print(f"  {k}: {v}")
        print(flush=True)

    grid = LinearGrid(specs, encoder.dim, num_classes, seed=args.seed).to(device)
    losses = train_grid(encoder, grid, train_ds, args, dist_info, lr_scale, warmup_epochs, n_last)
    accs = evaluate_grid(encoder, grid, val_ds, args, dist_info, n_last)
    if not dist_info.is_main:
        return
    rows = [{"name": s.name, "base_lr": s.lr, "lr": s.lr * lr_scale, "n_blocks": s.n_blocks, "avgpool": s.avgpool,
             "batchnorm": s.batchnorm, "top1": a, "train_loss": l} for s, a, l in zip(specs, accs, losses)]
    best = max(rows, key=lambda r: r["top1"])  # first of the ties, in grid order
    print(f"linear probing grid ({args.protocol}), top-1 on {len(val_ds)} val images:")
    print(f"  {'blocks':>6} {'avgpool':>7} {'lr':>9} {'top-1':>7} {'train loss':>10}")
    for r in rows:
        print(f"  {r['n_blocks']:>6} {str(r['avgpool']):>7} {r['lr']:9.3g} {r['top1']:7.2f} {r['train_loss']:10.4f}")
    print(f"best linear probe ({args.protocol}): top-1 {best['top1']:.2f} ({best['name']}, lr {best['lr']:g})")
    if args.output_json:
        eval_knn.write_json(args.output_json, {"protocol": protocol, "grid": rows, "best": best})


if __name__ == "__main__":
    run_main(main, Args)
