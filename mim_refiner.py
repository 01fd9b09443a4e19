"""MIM-Refiner: ID heads with Nearest Neighbor Alignment on intermediate blocks of a pre-trained MIM encoder.

Paper: Alkin, Miklautz, Hochreiter, Brandstetter, "MIM-Refiner: A Contrastive Learning Boost from
Intermediate Pre-Trained Representations", ICLR 2025, arXiv:2402.10093 (Sec. 3, Eq. 1-2, App. A.1,
B.1-B.3, Table 1, Table 10). Official code: github.com/ml-jku/MIM-Refiner.

What this file does (one run, two stages, resumable inside either):
  Stage "heads" (App. B.3, following MAE-CT): encoder frozen (eval, no graph); one ID head per chosen
    block trains for --head-epochs (20) epochs, base lr 2e-4, top-1 NN lookup.
  Stage "refine" (Table 10): encoder + heads train for --epochs (30 MAE L/H, 20 MAE-2B and data2vec 2.0),
    base lr 4e-4, layer-wise lr decay 0.65 on the encoder, random top-20 NN; an EMA (0.9999) of the
    encoder is what the paper evaluates, saved as "model" (the online encoder as "model_online").
  Heads and queues carry over from stage "heads" to "refine" (official stage-3 initialisation).

Heads (App. B.2; official nnclr_head.py). For every block b in --head-blocks (0-based; default the last
third: L/16 and 2B/14 blocks 16-23, H/14 blocks 20-31, App. A.1):
  f_b = CLS token of block b's raw output (residual stream, no LayerNorm); the head on the LAST block reads
        the encoder output, i.e. after the final LayerNorm for pre-norm (MAE) ViTs (official "cls" head).
  z = g(f_b): projector Lin(D,2048)-BN-GELU-Lin(2048,2048)-BN-GELU-Lin(2048,256)-BN
  p = h(z):   predictor Lin(256,4096)-BN-GELU-Lin(4096,256)-BN       (no biases, xavier init, SyncBN under DDP)
  BN statistics are taken over all 2+L views of the micro-batch at once (official).

NNA loss, Eq. 1-2, as the authors implement it (official nnclr_loss.py). Per head, n images per rank,
N = n * world, views [g0, g1, l0..l(L-1)], all vectors L2-normalised:
  pre_i  = SG(z of global view i)                                    i in {0, 1}   (n, 256)
  post_i = NN(pre_i, Q) = argmax_q pre_i . q  (Eq. 2; refine: uniform pick among the top-20; by default
           entries holding the same dataset index are skipped, official)            (n, 256)
  P_j    = all_gather_with_grad(p of view j)                                        (N, 256)
  logit_ij[b, c] = post_i[b] . P_j[c] / tau   if c == rank*n + b   (positive: the image's NN vs its other view)
                 = pre_i[b]  . P_j[c] / tau   otherwise             (negatives: other images' predictions;
                                                                     Sec. 3: no NN-swap for the negatives)
  L_ij = CE(logit_ij, rank*n + b), mean over b;  (i, j) in {(0,1), (1,0)} + {(i, 2+l): i in {0,1}, l < L}
  L_head = mean over those 2 + 2L terms;  L = sum over heads (Table 1c: summing suffices).
  Gradient flows only through the predictions p (gathered with gradient). As in the official code this is
  the transpose of Eq. 1: the softmax runs over the gathered predictions for one detached NN/query.
  Queue Q per head (65,536 x 256, FIFO, initialised randn with ids -1): after the lookup, the raw projections
  of global view 0 of ALL ranks (all-gathered, no grad) are enqueued with their dataset ids and labels.
  lr = blr * global_batch / 256; 4 warmup epochs (per update, starting just above 0) then cosine to 1e-6.

Launch (the user's command; paper setting for MAE ViT-H/14: batch 512, tau 0.3, 30+20 epochs):
  torchrun --nproc_per_node=4 mim_refiner.py --model vit_h14
    (expects checkpoints/mae_pretrain_vit_huge.pth and data/imagenet/train/<class>/*.JPEG)
  ViT-L/16: --model vit_l16 (checkpoints/mae_pretrain_vit_large.pth, batch 1024, tau 0.2)
  ViT-2B/14: --model vit_2b14 (checkpoints/mae_in1k/vit_2b14.pt from MAWS, batch 512, tau 0.35, blocks 0-5 frozen)
  data2vec 2.0: --init checkpoints/huge_imagenet.pt (fairseq file; selects the post-norm ViT, 20 epochs)
  kNN of the result as the paper (App. C.4 k = 10, official knn.py: EMA encoder = "model", last-block CLS
  without the final LayerNorm, train-standardised; printed at the end of the run):
    eval_knn.py --checkpoint runs/mim_refiner/checkpoint-last.pth --data data/imagenet --no-final-norm --standardize --k 10
Tiny CPU smoke run (--ema-momentum 0.9: at 0.9999 the EMA barely moves in 32 updates):
  python mim_refiner.py --model vit_t16 --img-size 32 --patch-size 4 --data synthetic:512 --init MAE.pth \
    --batch-size 64 --head-epochs 1 --epochs 4 --warmup-epochs 0.5 --blr 4e-3 --head-blr 4e-3 --queue-size 1024 \
    --local-crops 2 --head-blocks 10 11 --freeze-blocks 8 --head-hidden 256 --pred-hidden 512 --topk 1 \
    --ema-momentum 0.9 --num-workers 0 --device cpu

Deviations (paper default here; the flag named gives the official ml-jku/MIM-Refiner behaviour):
  * Every local view is a target (the paper); official predicted[:, l] indexing: `--official-local-indexing`.
  * BYOL's augmentation order, grayscale before blur/solarize (official kappadata: after; no flag).
  * The NN lookup skips the sample's own dataset index (the one official default); Eq. 2: `--no-exclude-self`.
  * Encoder EMA on every rank, both stages in one run, common.sync_batchnorm on CPU/gloo: same maths as official.
Memory per GPU, measured: docs/memory.md; `--plan 4x40` prints this run's plan (no data, no GPU needed).
Official-code details: docs/official_code.md.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError


# ==============================================================================================
# ID heads (App. B.2; official nnclr_head.py)
# ==============================================================================================
class IDHead(nn.Module):
    """Projector g (3 Linears) and predictor h (2 Linears); every Linear without bias and followed by BN,
    every BN but the last of each MLP by GELU. xavier_uniform Linears, BN weight 1 / bias 0 (official)."""

    def __init__(self, dim: int, hidden: int = 2048, out_dim: int = 256, pred_hidden: int = 4096):
        super().__init__()
        self.projector = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.GELU(),
            nn.Linear(hidden, out_dim, bias=False), nn.BatchNorm1d(out_dim))
        self.predictor = nn.Sequential(
            nn.Linear(out_dim, pred_hidden, bias=False), nn.BatchNorm1d(pred_hidden), nn.GELU(),
            nn.Linear(pred_hidden, out_dim, bias=False), nn.BatchNorm1d(out_dim))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)

    def forward(self, f: torch.Tensor):  # (M, D) -> z (M, 256), p (M, 256)
        z = self.projector(f)
        return z, self.predictor(z)


class Refiner(nn.Module):
    """Encoder + one ID head per block in `head_blocks`. One forward = the whole multi-crop step, so that
    DDP sees a single forward per backward: the encoder runs once on the global views and once on the
    local views (two resolutions), each head sees the CLS tokens of all views concatenated."""

    def __init__(self, encoder: common.VisionTransformer, head_blocks: list[int], hidden: int, out_dim: int,
                 pred_hidden: int):
        super().__init__()
        self.encoder, self.head_blocks = encoder, list(head_blocks)
        self.heads = nn.ModuleList([IDHead(encoder.dim, hidden, out_dim, pred_hidden) for _ in head_blocks])

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """CLS token per head (B, D): raw block output; the last block's head reads the encoder output
        (after the final LayerNorm for pre-norm ViTs; identical to the raw output for post-norm)."""
        last = self.encoder.depth - 1
        out, blocks = self.encoder.forward_features(x, return_blocks=self.head_blocks)  # (B, 1+N, D), [(B, 1+N, D)]
        return [(out if b == last else o)[:, 0] for b, o in zip(self.head_blocks, blocks)]

    def forward(self, x_global: torch.Tensor, x_local: Optional[torch.Tensor], train_encoder: bool = True):
        """x_global (2n, 3, S, S) = [g0; g1]; x_local (L*n, 3, s, s) = [l0; ...; l(L-1)] or None.
        Returns per head (z, p), each (V*n, 256) in view-major order [g0; g1; l0; ...]."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and train_encoder):  # stage "heads": no graph
            feats = self.features(x_global)
            if x_local is not None:
                feats = [torch.cat([fg, fl]) for fg, fl in zip(feats, self.features(x_local))]
        return [head(f if train_encoder else f.detach()) for head, f in zip(self.heads, feats)]


# ==============================================================================================
# Queue and NN lookup (Eq. 2; official nnclr_queue.py)
# ==============================================================================================
class NNQueue(nn.Module):
    """FIFO ring of raw (un-normalised) projections with the dataset index and label of every entry.
    Initialised with randn vectors and ids/labels -1 (official)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("x", torch.randn(size, dim))  # (Q, d)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def lookup(self, z: torch.Tensor, ids: Optional[torch.Tensor] = None, topk: int = 1):
        """NN(z, Q) of Eq. 2 by cosine similarity; topk > 1: a uniformly random one of the k most similar
        (refinement, Table 10). With `ids`, entries holding the sample's own dataset id get similarity -1
        (official self-exclusion). z (m, d), ids (m,) -> (stored vectors (m, d), queue positions (m,))."""
        sim = F.normalize(z.float(), dim=1) @ F.normalize(self.x, dim=1).T  # (m, Q)
        if ids is not None:
            sim = sim.masked_fill(ids[:, None] == self.ids[None, :], -1.0)
        if topk == 1:
            pos = sim.argmax(dim=1)  # (m,)
        else:
            cand = sim.topk(topk, dim=1).indices  # (m, k)
            pick = torch.randint(topk, (z.shape[0],), device=z.device)  # independently per row
            pos = cand[torch.arange(z.shape[0], device=z.device), pick]
        return self.x[pos], pos

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor):
        """Write the (globally gathered) rows at the pointer, oldest entries out, wrapping around."""
        size = self.x.shape[0]
        if z.shape[0] > size:  # only the newest `size` rows survive a longer write
            self.ptr.copy_((self.ptr + z.shape[0] - size) % size)
            z, ids, labels = z[-size:], ids[-size:], labels[-size:]
        pos = (self.ptr + torch.arange(z.shape[0], device=z.device)) % size
        self.x[pos] = z.float()
        self.ids[pos] = ids
        self.labels[pos] = labels
        self.ptr.copy_((self.ptr + z.shape[0]) % size)


# ==============================================================================================
# Loss (Eq. 1; official nnclr_loss.py)
# ==============================================================================================
def view_pairs(num_views: int, official_local_indexing: bool = False) -> list[tuple[int, int]]:
    """(anchor global view i, target view j) terms: the 2 global pairs, then each global vs each local.
    Official code: local target index l instead of 2+l (nnclr_loss.py)."""
    locals_ = range(num_views - 2)
    return [(0, 1), (1, 0)] + [(i, l if official_local_indexing else 2 + l) for i in (0, 1) for l in locals_]


def nna_loss(z_global: torch.Tensor, nn_global: torch.Tensor, p: torch.Tensor, temperature: float,
             rank: int = 0, official_local_indexing: bool = False) -> torch.Tensor:
    """NNA loss of one head (Eq. 1). z_global (2n, d): this rank's detached projections of [g0; g1];
    nn_global (2n, d): their queue NNs; p (V*n, d): predictions of all views [g0; g1; l0; ...] (with grad).
    The predictions of all ranks are gathered with gradient (negatives); labels offset by rank*n."""
    n = z_global.shape[0] // 2
    num_views = p.shape[0] // n
    pre = F.normalize(z_global.float(), dim=-1).view(2, n, -1)  # (2, n, d) anchors' own projections
    post = F.normalize(nn_global.float(), dim=-1).view(2, n, -1)  # (2, n, d) their nearest neighbours
    pred = F.normalize(p.float(), dim=-1).view(num_views, n, -1).transpose(0, 1)  # (n, V, d)
    pred_all = common.all_gather_grad(pred.contiguous())  # (N, V, d), rank-major
    labels = torch.arange(n, device=p.device) + rank * n  # (n,) column of each row's own image
    terms = []
    for i, j in view_pairs(num_views, official_local_indexing):
        logits = pre[i] @ pred_all[:, j].T / temperature  # (n, N) negatives: own projection vs others' predictions
        positive = (post[i] * pred_all[labels, j]).sum(-1, keepdim=True) / temperature  # (n, 1) NN vs own prediction
        logits = logits.scatter(1, labels[:, None], positive)  # the NN-swap only for the positive (Sec. 3)
        terms.append(F.cross_entropy(logits, labels))
    return torch.stack(terms).mean()


def refiner_loss(outputs, queues: nn.ModuleList, ids: torch.Tensor, labels: torch.Tensor, n: int, topk: int,
                 temperature: float, rank: int, official_local_indexing: bool, exclude_self: bool = False):
    """Sum over heads of the NNA loss (Table 1c); per head: lookup with both global views, then enqueue
    global view 0 of all ranks (official order). Returns (loss, per-head losses, per-head NN accuracy)."""
    total, head_losses, nn_accs = 0.0, [], []
    ids2 = torch.cat([ids, ids])  # (2n,) ids of [g0; g1]
    for (z, p), queue in zip(outputs, queues):
        z_global = z.detach().float()[:2 * n]  # (2n, d)
        nn_global, pos = queue.lookup(z_global, ids2 if exclude_self else None, topk)
        loss = nna_loss(z_global, nn_global, p, temperature, rank, official_local_indexing)
        # NN accuracy (App. E "accuracy of the NN-swap"): does the neighbour share the label? -1 = unknown
        nn_lab, lab2 = queue.labels[pos], torch.cat([labels, labels])
        known = (nn_lab >= 0) & (lab2 >= 0)
        nn_accs.append(((nn_lab == lab2) & known).sum().float() / known.sum().clamp(min=1))
        queue.enqueue(common.all_gather_nograd(z_global[:n]), common.all_gather_nograd(ids),
                      common.all_gather_nograd(labels))
        total = total + loss
        head_losses.append(loss.detach())
    return total, head_losses, nn_accs


# ==============================================================================================
# Data: 2 global + L local BYOL views (Table 10)
# ==============================================================================================
def build_views(args: Args) -> common.MultiView:
    """g0: blur p 1.0; g1: blur p 0.1 + solarize p 0.2; locals: blur p 0.5 (BYOL asymmetry, official yaml).
    Blur radius U[0.1, 2.0] px at 224 for every view (official: absolute, also for the small locals)."""
    col = dict(jitter_p=0.8, gray_p=0.2) if args.color_aug else dict(jitter_p=0.0, gray_p=0.0)
    c = 1.0 if args.color_aug else 0.0  # --no-color-aug (App. A.2): crop + flip only

    def view(size, scale, blur_p, solarize_p):
        t = common.byol_view(size, scale=tuple(scale), blur_p=blur_p * c, solarize_p=solarize_p * c, **col)
        t.transforms = [common.GaussianBlur(blur_p * c, args.img_size) if isinstance(s, common.GaussianBlur) else s
                        for s in t.transforms]  # radius relative to the global resolution, not the crop
        return t

    g0 = view(args.img_size, args.global_scale, 1.0, 0.0)
    g1 = view(args.img_size, args.global_scale, 0.1, 0.2)
    local = view(args.local_size, args.local_scale, 0.5, 0.0)
    return common.MultiView([g0, g1] + [local] * args.local_crops)


# ==============================================================================================
# ALGO LOGIC: one training step (Sec. 3, Eq. 1-2)
# ==============================================================================================
@dataclass
class TrainState:
    """What a step, an epoch and a checkpoint touch; ddp and optimizer are rebuilt per stage."""
    ddp: nn.Module  # `model` as the step runs it: DDP-wrapped, FSDP-sharded or plain
    model: Refiner  # encoder + ID heads, unwrapped (heads saved as "heads"; the optimizer's state dict)
    encoder: common.VisionTransformer  # the online encoder (= model.encoder), saved as "model_online"
    ema: common.VisionTransformer  # its EMA (Table 10), the evaluated encoder, saved as "model"
    queues: nn.ModuleList  # one NNQueue per head, (Q, 256) projections with ids and labels
    optimizer: torch.optim.Optimizer  # the stage's AdamW (each group's lr_scale is its peak lr)


def train_step(state: TrainState, x_global, x_local, ids, labels, *, stage: str, sync: bool, rank: int, step: int,
               args: Args):
    """One micro-batch of the multi-crop NNA step (Sec. 3) of `stage`: forward of all views, loss with queue lookup
    (top --head-topk in "heads", top --topk in "refine") and enqueue (Eq. 1-2), backward; on the last micro-batch
    of an update (`sync`) the AdamW step and, while the encoder trains (stage "refine"), its EMA (Table 10;
    official EmaCallback, constant momentum per update).
    x_global (2n, 3, S, S) = [g0; g1]; x_local (L*n, 3, s, s) or None; ids, labels (n,).
    Returns (loss, per-head losses, per-head NN accuracies)."""
    n, train_encoder = ids.shape[0], stage == "refine"
    topk = args.head_topk if stage == "heads" else args.topk
    with common.grad_sync(state.ddp, sync):  # DDP no_sync / FSDP: no reduce-scatter until the last micro-step
        with common.autocast(x_global.device):
            outputs = state.ddp(x_global, x_local, train_encoder=train_encoder)  # per head (z, p), each (V*n, 256)
        loss, head_losses, nn_accs = refiner_loss(outputs, state.queues, ids, labels, n, topk, args.temperature, rank,
                                                  args.official_local_indexing, args.exclude_self)
        common.check_finite(loss, step, args.output_dir)
        (loss / args.accum_steps).backward()
    if sync:
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        if train_encoder:
            common.ema_update(state.ema, state.encoder, args.ema_momentum)
    return loss, head_losses, nn_accs


# ==============================================================================================
# Flags (each field: its paper default and source), the Table 10 presets
# ==============================================================================================
BATCH_WHY = ("the NNA loss contrasts each image with the other images of the step's batch over all ranks "
             "(Eq. 1): with one image it is exactly 0; --batch-size / --accum-steps must be >= 2")


@dataclass
class Args(common.Flags):
    # ---- common flags ----
    model: str = "vit_l16"
    """encoder architecture (common.VIT_CONFIGS); the paper refines vit_l16, vit_h14, vit_2b14"""
    img_size: common.PosInt = 224
    """global-view resolution (Table 10: 224); the --init pos_embed is interpolated if it differs"""
    patch_size: Optional[common.PosInt] = None
    """patch size; None -> the model's own (16, or 14 for H/14 and 2B/14). Must match --init"""
    data: str = "data/imagenet"
    """ImageFolder root (ROOT/train), a flat image folder, or synthetic[:N_TRAIN[:N_VAL]] (synthetic.py); paper: ImageNet-1K train"""
    output_dir: str = "runs/mim_refiner"
    """where checkpoint-last.pth, log.jsonl, args.json and TensorBoard logs go; rerunning the same command
    resumes"""
    epochs: Optional[common.NonNegInt] = None
    """refinement epochs; None -> Table 10: 30 (MAE L/H), 20 (MAE 2B, data2vec 2.0)"""
    warmup_epochs: common.NonNegFloat = 4
    """linear lr warmup epochs at the start of each stage (Table 10: 4)"""
    batch_size: Optional[Annotated[int, common.Range(2, why=BATCH_WHY)]] = None
    """GLOBAL batch of images (each gives 2 global + --local-crops views); None -> Table 10: 1024 (L), 512 (H, 2B)"""
    accum_steps: common.PosInt = 1
    """gradient accumulation; >1 makes BN statistics, negatives and queue updates per micro-batch (warned)"""
    blr: common.PosFloat = 4e-4
    """refinement base lr for encoder and heads, scaled by global_batch/256 (Table 10: 4e-4; LinearLrScaler)"""
    lr: Optional[common.PosFloat] = None
    """absolute peak refinement lr; None -> blr * batch_size / 256"""
    weight_decay: common.NonNegFloat = 0.05
    """encoder AdamW weight decay (Table 10: 0.05); biases, 1-D params and cls_token get 0"""
    num_workers: common.NonNegInt = 10
    """DataLoader worker processes per rank"""
    seed: int = 0
    """random seed (reseeded per epoch and rank via common.epoch_seed, so a resumed run is exact)"""
    grad_checkpointing: Literal["auto", "on", "off"] = "auto"
    """activation checkpointing of the encoder blocks: auto (on CUDA: as many blocks as the measured memory plan
    needs, printed before step 1; off on CPU), on (every trainable block) or off (docs/memory.md)"""
    plan: Optional[str] = None
    """GPUSxGB, e.g. 4x80: print the memory plan of this run on that many GPUs of that size and exit (reads no
    data and no initial checkpoint: one training step on fake tensors)"""
    compile: bool = False
    """torch.compile the encoder's forward_features"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (CUDA if visible), 'cpu' or 'cuda'"""
    fsdp: bool = False
    """shard encoder, EMA encoder, heads, gradients and AdamW states over the processes with PyTorch FSDP2
    (fully_shard) instead of DDP; selected by --grad-checkpointing auto when DDP cannot fit (docs/memory.md). Checkpoints keep the plain format"""
    # ---- MIM-Refiner flags ----
    init: Optional[str] = None
    """pre-trained MIM encoder: our mae.py checkpoint, an official MAE / MAWS / data2vec 2.0 file; None ->
    checkpoints/mae_pretrain_vit_{large,huge}.pth (L, H), checkpoints/mae_in1k/vit_2b14.pt (2B)"""
    post_norm: bool = False
    """force the post-norm (data2vec 2.0) ViT; a data2vec 2.0 --init selects it automatically (App. B.1)"""
    head_blocks: Optional[list[int]] = None
    """0-based blocks with an ID head (negatives count from the end); None -> App. A.1: last 8 blocks for
    L/16 and 2B/14, last 12 for H/14, last depth//3 otherwise. The last block's head reads the final-norm output"""
    head_hidden: common.PosInt = 2048
    """projector hidden width (App. B.2: 2048)"""
    head_dim: common.PosInt = 256
    """projector/predictor output width = queue width (official: 256)"""
    pred_hidden: common.PosInt = 4096
    """predictor hidden width (App. B.2: 4096)"""
    queue_size: common.PosInt = 65536
    """FIFO queue length per head (official: 65,536); initialised with randn"""
    topk: common.PosInt = 20
    """refinement NN lookup: uniform pick among the top-k (Table 10: 20)"""
    head_topk: common.PosInt = 1
    """head-stage NN lookup k (App. B.3: top-1)"""
    temperature: Optional[common.PosFloat] = None
    """tau of Eq. 1; None -> Table 10: 0.2 (L), 0.3 (H), 0.35 (2B); 0.2 for smaller models"""
    local_crops: common.NonNegInt = 10
    """number of local views (Table 10: 10)"""
    local_size: Optional[common.PosInt] = None
    """local view resolution; None -> Table 10: 96 for /16, 98 for /14 at 224, i.e. patch*round(3/7*img/patch)"""
    global_scale: list[common.PosUnit] = field(default_factory=lambda: [0.25, 1.0])
    """RandomResizedCrop area scale of the 2 global views (Table 10: [0.25, 1.0])"""
    local_scale: list[common.PosUnit] = field(default_factory=lambda: [0.05, 0.25])
    """RandomResizedCrop area scale of the local views (Table 10: [0.05, 0.25])"""
    color_aug: bool = True
    """BYOL colour jitter, grayscale, blur, solarize (Table 10); --no-color-aug: crop+flip only (App. A.2)"""
    head_epochs: common.NonNegInt = 20
    """head-stage epochs on the frozen encoder (App. B.3: 20); 0 skips the stage"""
    head_blr: common.PosFloat = 2e-4
    """head-stage base lr, scaled by global_batch/256 (App. B.3: 2e-4)"""
    head_weight_decay: common.NonNegFloat = 1e-5
    """AdamW weight decay of the ID heads in both stages (Table 10: 1e-5)"""
    min_lr: common.NonNegFloat = 1e-6
    """lr at the end of the cosine of each stage (official wupcos schedule: absolute 1e-6)"""
    layer_decay: common.PosUnit = 0.65
    """layer-wise lr decay of the encoder (Table 10: 0.65): block k gets 0.65^(depth-k), the final norm 1"""
    freeze_blocks: Optional[common.NonNegInt] = None
    """refinement: freeze patch_embed, cls_token and blocks [0, k) (Table 10: 6 for 2B/14, else 0)"""
    ema_momentum: common.Prob = 0.9999
    """encoder EMA momentum per update during refinement (Table 10: 0.9999); the EMA is saved as "model\""""
    official_local_indexing: bool = False
    """official loss indexing (official nnclr_loss.py): local targets predicted[:, l] instead of [:, 2+l]"""
    exclude_self: bool = True
    """official lookup: never return the sample's own (older) queue entry as its NN; --no-exclude-self: Eq. 2's
    literal lookup of the whole queue (differs on ~0.13% of ImageNet lookups, far more on small data)"""
    exit_after_epochs: Optional[common.PosInt] = None
    """testing: stop after this many completed epochs (all stages counted), as if the run was killed; rerun to
    resume"""
    knn_every: common.NonNegInt = 1
    """k-NN monitor every N epochs (eval_knn.KnnMonitor: top-1 at k=20, T=0.07, DINO's vote, on the encoder saved as
    "model"); 0 = off. Official: k-NN on a 10% ImageNet subset after every epoch, both stages (App. E)."""
    knn_data: Optional[str] = None
    """labelled data for the monitor: ROOT with ROOT/train/<class>/ and ROOT/val/<class>/, or synthetic[:N[:M]];
    None -> --data when it has labelled train/ and val/ splits, else the monitor is off (one-line note)"""
    knn_subset: common.PosUnit = 0.1
    """fraction of the k-NN data's train split used as the monitor's bank, drawn with --seed (official MIM-Refiner
    / MAE-CT monitors: a 10% ImageNet subset); the whole val split is queried"""
    save_every: common.NonNegInt = 10
    """keep OUTPUT_DIR/checkpoint-epochNNN.pth ("model" + "encoder_config" only, NNN = epochs done) every N
    epochs; 0 = none. checkpoint-last.pth stays the full resumable state. Official: one kept every 10 epochs."""
    save_minutes: Optional[common.NonNegFloat] = None
    """also write checkpoint-last.pth inside an epoch every M minutes, at an update boundary (a resume continues
    exactly there); None -> 30 on CUDA (stretched so that a save costs at most 1 % of the run), off on the CPU;
    0 = at epoch ends only. SIGTERM/SIGUSR1/SIGINT save and stop at the next boundary (docs/scale.md)"""


# Table 10 and App. A.1 per model; init file names from the official src/initializers/pretrained_initializer.py.
PRESETS = {
    "vit_l16": dict(head_blocks=list(range(16, 24)), temperature=0.2, batch_size=1024, freeze_blocks=0,
                    init="checkpoints/mae_pretrain_vit_large.pth"),
    "vit_h14": dict(head_blocks=list(range(20, 32)), temperature=0.3, batch_size=512, freeze_blocks=0,
                    init="checkpoints/mae_pretrain_vit_huge.pth"),
    "vit_h16": dict(head_blocks=list(range(20, 32)), temperature=0.3, batch_size=512, freeze_blocks=0, init=None),
    "vit_2b14": dict(head_blocks=list(range(16, 24)), temperature=0.35, batch_size=512, freeze_blocks=6,
                     init="checkpoints/mae_in1k/vit_2b14.pt"),
}


def default_local_size(img_size: int, patch_size: int) -> int:
    """Table 10: 96 px (/16) and 98 px (/14) local views at 224 px, i.e. 3/7 of the global grid side,
    rounded to whole patches (6x6 resp. 7x7 patches); the same rule scales tiny runs (32/4 -> 12)."""
    grid = img_size // patch_size
    return patch_size * max(1, int(grid * 96 / 224 + 0.5))


def resolve_args(args: Args, post_norm: bool) -> Args:
    """The None defaults in one merge (Table 10 per model, PRESETS; 20 epochs for data2vec 2.0 and ViT-2B/14, else
    30; App. A.1's heads on the last third of the blocks of other models; local views of 3/7 of the global side),
    then the rules between flags (each flag's own range is on its Args field; the image size: common.create_vit)."""
    _, depth, _, own_patch = common.vit_config(args.model)
    patch = args.patch_size or own_patch
    defaults = {"epochs": 20 if (post_norm or args.model == "vit_2b14") else 30, "batch_size": 1024,
                "temperature": 0.2, "freeze_blocks": 0, "head_blocks": list(range(depth - max(1, depth // 3), depth)),
                "local_size": default_local_size(args.img_size, patch),
                **{k: v for k, v in PRESETS.get(args.model, {}).items() if k != "init"}}
    args = dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})
    if args.local_crops > 0 and (args.local_size < patch or args.local_size % patch):
        raise UserError(f"--local-size {args.local_size} must be a positive multiple of the patch size {patch}")
    bad = [b for b in args.head_blocks if not -depth <= b < depth]
    if bad or not args.head_blocks:
        raise UserError(f"--head-blocks {bad or '(none)'}: {args.model} has blocks 0..{depth - 1}")
    blocks = [b % depth for b in args.head_blocks]
    if len(set(blocks)) != len(blocks):
        raise UserError(f"--head-blocks {args.head_blocks} names a block twice")
    args = dataclasses.replace(args, head_blocks=blocks)
    if not 0 <= args.freeze_blocks <= depth:
        raise UserError(f"--freeze-blocks {args.freeze_blocks} is outside [0, {depth}] for {args.model}")
    if max(args.topk, args.head_topk) > args.queue_size:
        raise UserError(f"need 1 <= --topk/--head-topk <= --queue-size (got {args.topk}/{args.head_topk}, "
                        f"{args.queue_size})")
    if args.epochs + args.head_epochs == 0:
        raise UserError("--epochs and --head-epochs are both 0; nothing to train")
    for name in ("global_scale", "local_scale"):
        lo_hi = getattr(args, name)
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
            raise UserError(f"--{name.replace('_', '-')} needs two numbers 0 < lo <= hi <= 1")
    if args.batch_size // args.accum_steps < 2:
        raise UserError(f"--batch-size {args.batch_size} / --accum-steps {args.accum_steps} leaves "
                        f"{args.batch_size // args.accum_steps} image per step; {BATCH_WHY}")
    if args.fsdp and args.compile:
        raise UserError("--fsdp with --compile is not supported; drop one of them")
    if args.fsdp:
        common.neighbour("fsdp", "--fsdp")  # optional neighbour: one line if it is missing
    return args


# ==============================================================================================
# Freezing, optimisation, schedules
# ==============================================================================================
def set_trainable(encoder: common.VisionTransformer, stage: str, freeze_blocks: int):
    """Stage "heads": the whole encoder is frozen. Stage "refine": blocks [0, freeze_blocks) and, if any
    block is frozen, the stem (patch_embed, cls_token, embed_norm) are frozen (official vit_block_freezer);
    pos_embed is always fixed (sin-cos)."""
    for n, p in encoder.named_parameters():
        if stage == "heads" or n == "pos_embed":
            p.requires_grad_(False)
        elif n.startswith("blocks."):
            p.requires_grad_(int(n.split(".")[1]) >= freeze_blocks)
        elif n.startswith(("patch_embed.", "cls_token", "embed_norm.")):
            p.requires_grad_(freeze_blocks == 0)
        else:  # final norm
            p.requires_grad_(True)


def build_optimizer(model: Refiner, stage: str, args: Args, peak_lr: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) (Table 10). Each group's lr_scale is its PEAK lr: encoder peak_lr x 0.65^(depth+1-layer)
    (stem 0.65^(depth+1), block k 0.65^(depth-k), final norm 1; official layerwise_lr_decay_modifier.py), wd 0.05; heads peak_lr, wd 1e-5.
    set_lr multiplies in the schedule factor."""
    groups = []
    if stage == "refine":
        groups += common.param_groups(model.encoder.named_parameters(), args.weight_decay, args.layer_decay,
                                      model.encoder.depth, lr_scale=peak_lr, tag="encoder_")
    groups += common.param_groups(model.heads.named_parameters(), args.head_weight_decay, lr_scale=peak_lr,
                                  tag="heads_")
    return common.make_adamw(groups, lr=0.0, betas=(0.9, 0.95))


def lr_factor(step: int, total_steps: int, warmup_steps: int, final: float) -> float:
    """Per-update multiplier of the peak lr: linear warmup starting just above 0 ((s+1)/(W+1), official
    kappaschedules), then half-cosine down to `final` (= 1e-6 / peak lr) at the end of the stage."""
    return common.cosine_schedule(step, total_steps, base=1.0, final=final, warmup_steps=warmup_steps,
                                  warmup_start=1.0 / (warmup_steps + 1))


# ==============================================================================================
# Models and the memory plan (--plan, --grad-checkpointing auto)
# ==============================================================================================
def build_modules(args: Args, post_norm: bool, grad_checkpointing):
    """Encoder, Refiner (encoder + ID heads) and queues of the configured run (weights not yet loaded)."""
    encoder = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size, post_norm=post_norm,
                                grad_checkpointing=grad_checkpointing)
    model = Refiner(encoder, args.head_blocks, args.head_hidden, args.head_dim, args.pred_hidden)
    queues = nn.ModuleList([NNQueue(args.queue_size, args.head_dim) for _ in args.head_blocks])
    return encoder, model, queues


def plan_builder(args: Args, post_norm: bool, n: int, device=torch.device("cpu"), wrap=None):
    """build(k) of memplan.plan_memory: the refinement stage (the heavier one: the encoder trains) with k
    checkpointed blocks, random views of n images, and its train_step (on `device`, the model wrapped by `wrap`,
    e.g. in DDP: benchmarks/gpu_check.py)."""
    def build(k):
        with torch.device(device) if device.type != "cpu" else contextlib.nullcontext():  # initialised where it runs
            encoder, model, queues = build_modules(args, post_norm, k)
        ema = copy.deepcopy(encoder).requires_grad_(False)
        set_trainable(encoder, "refine", args.freeze_blocks)
        if device.type != "cpu":  # (a fake module cannot be moved; it is on the CPU already)
            model.to(device), queues.to(device), ema.to(device)
        optimizer = build_optimizer(model, "refine", args, 1.0)
        S, s, kw = args.img_size, args.local_size, dict(device=device)
        xg = torch.randn(2 * n, 3, S, S, **kw)
        xl = torch.randn(args.local_crops * n, 3, s, s, **kw) if args.local_crops else None
        ids, labels = torch.arange(n, **kw), torch.zeros(n, dtype=torch.long, **kw)
        state = TrainState(wrap(model) if wrap else model, model, encoder, ema, queues, optimizer)
        step = lambda: train_step(state, xg, xl, ids, labels, stage="refine", sync=True, rank=0, step=0,  # noqa: E731
                                  args=args)
        return [model, queues, ema], [optimizer], step, list(encoder.blocks)
    return build


def n_blocks(args: Args) -> int:
    """Blocks the memory plan may checkpoint: the trainable ones (after --freeze-blocks)."""
    return common.VIT_CONFIGS[args.model][1] - args.freeze_blocks


def memory_plan(args: Args, post_norm: bool, gpus: int, capacity, mode: str):
    """memplan.plan_memory (optional neighbour memplan.py) of this run at the per-GPU batch that `gpus`
    processes give."""
    import memplan
    n = common.per_rank_batch(args.batch_size, args.accum_steps, gpus)
    build = plan_builder(args, post_norm, n)
    what = f"MIM-Refiner {args.model}, {n} images x (2 + {args.local_crops}) views per GPU"
    return memplan.plan_memory(build, what, n_blocks(args), gpus, capacity, mode, args.fsdp, not args.compile,
                              "BN statistics, the negatives of Eq. 1 and the queue update become per micro-batch")


# ==============================================================================================
# Training loop: the initial weights, one stage's set-up, one epoch, the epoch-end checkpoint, main
# ==============================================================================================
def is_post_norm_checkpoint(ckpt: dict) -> bool:
    """True for a data2vec 2.0 encoder (fairseq file, or any file with an `embed_norm` and no final norm):
    App. B.1, the refined model keeps the architecture of the MIM model (post-norm for data2vec 2.0)."""
    sd, _ = common.select_weights(ckpt)
    return common.checkpoint_encoder_config(common.convert_to_ours(sd))["post_norm"]


def resolve_init(args: Args, state):
    """The pre-trained encoder to start from (none on resume) and whether the ViT is post-norm; with the data
    root, checked to exist first: one line that says what to put where. Returns (args, init_ckpt, post_norm)."""
    post_norm = args.post_norm
    if state is not None:  # (a foreign file has no encoder_config: check_resume_args names it)
        return args, None, state.get("encoder_config", {}).get("post_norm", post_norm)
    init = args.init or PRESETS.get(args.model, {}).get("init")
    if init is None:
        raise UserError(f"--model {args.model} has no default pre-trained checkpoint; pass --init PATH "
                        f"(a mae.py checkpoint or an official MAE / data2vec 2.0 file)")
    missing = []
    if not os.path.isfile(init):
        missing.append(f"the pre-trained encoder at {init} (official MAE release file, or pass --init PATH)")
    if not common.is_synthetic(args.data) and not os.path.isdir(args.data):
        missing.append(f"ImageNet at {args.data}/train/<class>/*.JPEG (or pass --data ROOT)")
    if missing:
        raise UserError("missing " + " and ".join(missing))
    init_ckpt = common.load_file(init)
    return dataclasses.replace(args, init=init), init_ckpt, post_norm or is_post_norm_checkpoint(init_ckpt)


@dataclass
class Stage:
    """What one stage keeps fixed."""
    name: str  # "heads" (frozen encoder) or "refine" (encoder + heads, EMA)
    first: int  # its first epoch
    last: int  # one past its last epoch
    lr: float  # peak lr: each group's lr_scale
    warmup_steps: int  # linear-warmup updates at its start


@dataclass
class Run:
    """The run: what its epochs share (ranks, log, run control, data, batch, schedules)."""
    dist_info: common.DistInfo  # ranks and the device
    log: common.Logger  # log.jsonl, TensorBoard, rank-0 printing
    ctl: longrun.RunControl | common.EpochEndSaves  # common.run_control: saves and stops at update boundaries
    dataset: torch.utils.data.Dataset  # WithIndex: (2 + L views, label, dataset index)
    micro: int  # per-rank micro-batch of images: batch_size / (accum_steps x processes)
    steps_per_epoch: int  # optimizer updates per epoch
    rms_start: float  # the initial encoder weights' RMS, the divergence check's reference (save_checkpoint)


def start_stage(model: Refiner, encoder, resume, log, stage: Stage, *, start_epoch: int, args: Args,
                device) -> torch.optim.AdamW:
    """`stage` (epochs stage.first..stage.last-1): what trains, its AdamW at peak stage.lr (with the saved state
    when `resume`, the resume checkpoint's stage state, lies inside this stage: consumed here), one log line of the
    trainable parameters. Returns the optimizer."""
    set_trainable(encoder, stage.name, args.freeze_blocks)
    optimizer = build_optimizer(model, stage.name, args, stage.lr)
    if resume is not None and resume["stage"] == stage.name and (start_epoch > stage.first or resume["position"]):
        common.load_optimizer_state_dict(model, optimizer, resume.pop("optimizer"))
    n_enc = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    n_head = sum(p.numel() for p in model.heads.parameters())
    log.print(f"stage {stage.name!r}: epochs {stage.first}-{stage.last - 1}, trainable encoder params {n_enc:,}, "
              f"head params {n_head:,} ({len(args.head_blocks)} heads)")
    return optimizer


def train_one_epoch(state: TrainState, run: Run, stage: Stage, epoch: int, *, position, args: Args) -> float:
    """One epoch of `stage` ("heads" or "refine"): the epoch's seed and loader (or the state of the mid-epoch
    checkpoint's `position`), the lr of every update (warmup + cosine over the stage, peak stage.lr), train_step
    per micro-batch, the per-update log line; after each update the run control decides whether to save
    (save_state, every rank) and stop. Returns the last update's loss (mean over ranks)."""
    dist_info, log, micro, steps_per_epoch = run.dist_info, run.log, run.micro, run.steps_per_epoch
    device, world, rank = dist_info.device, dist_info.world_size, dist_info.rank
    lr, stage_steps = stage.lr, (stage.last - stage.first) * steps_per_epoch
    start = common.epoch_start(args.seed, epoch, dist_info, position, log)
    sums = dict(position["sums"]) if start else {"loss": float("nan")}
    loader = common.build_loader(run.dataset, micro, dist_info, shuffle=True, drop_last=True,
                                 num_workers=args.num_workers, seed=args.seed, epoch=epoch,
                                 skip=start * args.accum_steps * micro)
    state.model.train()
    state.encoder.train(stage.name == "refine")  # stage "heads": encoder in eval mode (official)
    bar = common.progress(loader, dist_info, total=(steps_per_epoch - start) * args.accum_steps,
                          desc=f"{stage.name} epoch {epoch}")
    t0 = time.time()
    for it, (views, labels, ids) in enumerate(bar, start=start * args.accum_steps):
        update, micro_step = divmod(it, args.accum_steps)
        if update >= steps_per_epoch:
            break
        step = (epoch - stage.first) * steps_per_epoch + update  # update index inside this stage
        global_step = epoch * steps_per_epoch + update
        factor = lr_factor(step, stage_steps, stage.warmup_steps, args.min_lr / lr)
        if micro_step == 0:
            common.set_lr(state.optimizer, factor)  # each group's lr_scale is its peak lr
        views = [v.to(device, non_blocking=True) for v in views]  # from pinned memory, then concatenated on the device
        x_global = torch.cat(views[:2])  # (2n, 3, S, S) [g0; g1]
        x_local = torch.cat(views[2:]) if args.local_crops else None  # (L*n, 3, s, s)
        labels, ids = labels.to(device), ids.to(device)
        sync = micro_step == args.accum_steps - 1
        loss, head_losses, nn_accs = train_step(state, x_global, x_local, ids, labels, stage=stage.name, sync=sync,
                                                rank=rank, step=global_step, args=args)
        if not sync:
            continue
        sums["loss"] = common.all_reduce_mean(loss.detach()).item()
        if dist_info.is_main:
            ips = (it + 1 - start * args.accum_steps) * micro * world / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{lr * factor:.2e}", img_s=f"{ips:.0f}")
            metrics = {"train/loss": sums["loss"], "train/lr": lr * factor, "train/epoch": epoch,
                       "train/stage": 0 if stage.name == "heads" else 1}
            for b, hl, acc in zip(args.head_blocks, head_losses, nn_accs):
                metrics[f"train/loss_block{b}"] = hl.item()
                metrics[f"train/nn_acc_block{b}"] = acc.item()
            log.log(metrics, step=global_step)
        save, stop = run.ctl.at_update(update + 1, steps_per_epoch)  # one all-reduce: a stop signal anywhere, the timer
        if save:
            with run.ctl.saving(epoch, update + 1, steps_per_epoch):
                save_state(state, run, stage, epoch, update + 1, loss_v=sums["loss"],
                           position=run.ctl.position(update + 1, sums), args=args)
        if stop:
            run.ctl.stop(f"at epoch {epoch} step {update + 1}")
    return sums["loss"]


def save_state(state: TrainState, run: Run, stage: Stage, epoch: int, update: int, *, loss_v: float, position,
               args: Args):
    """OUTPUT_DIR/checkpoint-last.pth (EMA as "model", what eval_knn.py reads; all the resume needs) after `update`
    updates of `epoch`: at its end (update == run.steps_per_epoch) first the kept EMA-only copy every --save-every
    epochs, inside it `position` (what the exact resume needs, longrun.RunControl.position). Every rank calls it
    (collectives)."""
    model, encoder, dist_info = state.model, state.encoder, run.dist_info
    # gathered on every rank under --fsdp (collectives), plain state dicts otherwise
    ema_sd, online_sd = common.full_state_dict(state.ema), common.full_state_dict(encoder)
    heads_sd, opt_sd = common.full_state_dict(model.heads), common.full_optimizer_state_dict(model, state.optimizer)
    done = update == run.steps_per_epoch
    if done:  # before checkpoint-last: a run killed between the two redoes the epoch and rewrites both
        common.save_kept(args.save_every, args.output_dir, dist_info, epoch + 1,
                         ema_sd, encoder.config(), model_is_ema=True)
    if dist_info.is_main:
        common.save_checkpoint(common.checkpoint_path(args.output_dir), {
            "model": ema_sd, "model_is_ema": True,
            "model_online": online_sd, "encoder_config": encoder.config(),
            "heads": heads_sd, "head_blocks": list(args.head_blocks),
            "queues": state.queues.state_dict(), "optimizer": opt_sd,
            "epoch": epoch + done, "step": epoch * run.steps_per_epoch + update, "stage": stage.name,
            "resume": None if done else position, "weights_rms_start": run.rms_start,
            "args": dataclasses.asdict(args)}, weights_rms_start=run.rms_start)
        if done:
            run.log.print(f"epoch {epoch} ({stage.name}) done, loss {loss_v:.4f}; "
                          f"saved {common.checkpoint_path(args.output_dir)}")


def main(args: Args):
    if args.plan is not None:  # no data, no checkpoint: the step on fake tensors
        args = resolve_args(args, args.post_norm)
        common.plan_run(args, torch.device("cpu"), 1, n_blocks(args), functools.partial(memory_plan, args, args.post_norm))
        return
    dist_info = common.init_distributed(args.device)
    device, world = dist_info.device, dist_info.world_size
    resume_ckpt = common.load_resume_state(args.output_dir)
    args, init_ckpt, post_norm = resolve_init(args, resume_ckpt)
    args = resolve_args(args, post_norm)
    if resume_ckpt is not None:  # after resolve_args: compares the filled-in values, as stored
        common.check_resume_args(resume_ckpt, args, args.output_dir, shape=(
            "head_blocks", "head_hidden", "head_dim", "pred_hidden", "queue_size", "post_norm", "freeze_blocks"),
            state_keys=("model", "model_online", "heads", "queues", "stage", "optimizer", "epoch", "encoder_config"))
    if args.accum_steps > 1:
        warnings.warn("--accum-steps > 1: BatchNorm statistics, the negatives of Eq. 1 and the queue updates become "
                      "per micro-batch (not the paper's setting)")
    checkpointed, use_fsdp = common.plan_run(args, device, world, n_blocks(args),
                                             functools.partial(memory_plan, args, post_norm))
    micro = common.per_rank_batch(args.batch_size, args.accum_steps, world)
    peak_lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256
    head_stage_lr = args.head_blr * args.batch_size / 256
    total_epochs = args.head_epochs + args.epochs
    start_epoch = resume_ckpt["epoch"] if resume_ckpt is not None else 0

    dataset = common.WithIndex(common.build_dataset(args.data, "train", build_views(args), img_size=args.img_size,
                                                    seed=args.seed))
    steps_per_epoch = len(dataset) // (micro * world) // args.accum_steps  # optimizer updates per epoch
    if steps_per_epoch == 0:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch of {args.batch_size}; "
                        f"lower --batch-size")
    log = common.Logger(args.output_dir, args, dist_info, extra=dict(
        effective_batch=args.batch_size, per_rank_batch=micro, refine_lr=peak_lr, head_stage_lr=head_stage_lr,
        steps_per_epoch=steps_per_epoch, post_norm=post_norm, fsdp_chosen_by_plan=use_fsdp and not args.fsdp))
    log.print(f"global batch {args.batch_size} images x (2 + {args.local_crops}) views; refine lr {peak_lr:.3g} "
              f"(= {args.blr:g} x {args.batch_size} / 256), head-stage lr {head_stage_lr:.3g}; "
              f"heads on blocks {args.head_blocks}, tau {args.temperature}, local views {args.local_size}px")
    if start_epoch >= total_epochs:
        log.print(f"{common.checkpoint_path(args.output_dir)} already holds all {total_epochs} epochs; nothing to do")
        log.close()
        return

    # ---- model: the same seed on every rank, so heads and random queues start identical ----
    common.seed_everything(args.seed)
    encoder, model, queues = build_modules(args, post_norm, checkpointed)
    resume = rms_start = None  # what the stage to resume needs from the checkpoint, once its weights are loaded
    if resume_ckpt is not None:
        common.load_encoder(encoder, resume_ckpt["model_online"], what="the resume checkpoint")
        model.heads.load_state_dict(resume_ckpt["heads"])
        queues.load_state_dict(resume_ckpt["queues"])
        resume = {"stage": resume_ckpt["stage"], "optimizer": resume_ckpt["optimizer"], "position": resume_ckpt.get("resume")}
        rms_start = resume_ckpt.get("weights_rms_start")
        at = f", step {resume['position']['update']} of {steps_per_epoch}" if resume["position"] else ""
        log.print(f"resuming {common.checkpoint_path(args.output_dir)} at epoch {start_epoch}{at} (stage {resume_ckpt['stage']})")
    else:
        desc = common.load_encoder(encoder, init_ckpt, what="--init")
        log.print(f"loaded {desc} from {args.init} ({'post' if post_norm else 'pre'}-norm ViT)")
    ema = copy.deepcopy(encoder).requires_grad_(False)  # evaluated encoder (Table 10 EMA); = encoder until "refine"
    if resume_ckpt is not None:
        common.load_encoder(ema, resume_ckpt["model"], what="the resume checkpoint")
    resume_ckpt = init_ckpt = None  # loaded into the modules: no second copy on the host for the whole run
    if rms_start is None:
        rms_start = common.weights_rms(encoder.state_dict())  # the divergence check's reference (save_checkpoint)
    model.heads = common.sync_batchnorm(model.heads, device)  # BN over the global batch (official sync_batchnorm)
    model.to(device), ema.to(device), queues.to(device)
    fsdp = use_fsdp and dist_info.in_group
    if use_fsdp and not fsdp:
        log.print("--fsdp: not launched by torchrun, nothing to shard; running unsharded")
    if fsdp:  # ZeRO-3 (fsdp.py): blocks and stems of both encoders sharded, heads in the root unit (fp32, autocast as DDP)
        sharding = common.neighbour("fsdp", "--fsdp")
        sharding.shard_vit(encoder)
        sharding.shard(model)
        sharding.shard_vit(ema)  # never run; sharded storage, EMA on the shards
    if args.compile:
        encoder.forward_features = torch.compile(encoder.forward_features)

    knn = common.knn_monitor(dist_info, log, every=args.knn_every, data=args.knn_data, train_data=args.data,
                             subset=args.knn_subset, img_size=args.img_size, batch_size=micro,
                             num_workers=args.num_workers, seed=args.seed, blocks=[*args.head_blocks, -1])  # the refined blocks
    ctl = common.run_control(args.save_minutes, dist_info, log)
    run = Run(dist_info, log, ctl, dataset, micro=micro, steps_per_epoch=steps_per_epoch, rms_start=rms_start)
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)
    stages = (Stage("heads", 0, args.head_epochs, head_stage_lr, warmup_steps),
              Stage("refine", args.head_epochs, total_epochs, peak_lr, warmup_steps))
    for stage in stages:
        if start_epoch >= stage.last:
            continue
        optimizer = start_stage(model, encoder, resume, log, stage, start_epoch=start_epoch, args=args, device=device)
        ddp = train_state = None
        gc.collect()  # the previous stage's DDP wrapper (held by its TrainState) sits in a reference cycle: free it now
        ddp = model
        if dist_info.enabled and not fsdp:
            # blocks after the last head (and the final norm) get no gradient unless the last block has a head
            unused = stage.name == "refine" and max(args.head_blocks) != encoder.depth - 1
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                      find_unused_parameters=unused, gradient_as_bucket_view=True)
        train_state = TrainState(ddp, model, encoder, ema, queues, optimizer)

        for epoch in range(max(start_epoch, stage.first), stage.last):
            position = resume["position"] if resume is not None and epoch == start_epoch else None
            loss_v = train_one_epoch(train_state, run, stage, epoch, position=position, args=args)
            save_state(train_state, run, stage, epoch, steps_per_epoch, loss_v=loss_v, position=None, args=args)
            knn(epoch + 1, ema, (epoch + 1) * steps_per_epoch)
            ctl.epoch_done(epoch + 1)
            if args.exit_after_epochs is not None and epoch + 1 >= args.exit_after_epochs:
                log.print(f"--exit-after-epochs {args.exit_after_epochs}: stopping; rerun to resume")
                log.close()
                return
    # App. C.4 (k = 10, DINO's vote) with the official knn.py feature: EMA ("model"), last-block CLS without
    # the final LayerNorm, standardised with the train statistics
    # Tables 1-3: k-NN (App. C.4), linear probe (App. C.3, DINOv2's grid), 1/2/5-shot (App. C.5), k-means (Sec. 5.3)
    log.print("to evaluate as the paper: k-NN: " + common.paper_eval_command(args, "--no-final-norm --standardize --k 10"))
    log.print("  linear probe: " + common.paper_eval_command(args, "--protocol dinov2", "eval_linear.py"))
    log.print("  1/2/5-shot and k-means: " + common.paper_eval_command(args, "--few-shot 1 2 5 --cluster", "eval_frozen.py"))
    for pct in (1, 10):  # Table 2's 1 % / 10 % columns: fine-tuned on the labelled subset (App. C.5)
        log.print(f"  fine-tune with {pct} % of the labels: " + common.paper_eval_command(
            args, f"--recipe lowshot-{pct}pct {common.label_split(args, pct)}", "finetune.py"))
    log.print("  fine-tune with all labels (Table 5; its [CLS] configuration): " + common.paper_eval_command(
        args, "--recipe mae --pool cls", "finetune.py"))
    log.close()


if __name__ == "__main__":
    common.run_main(main, Args)
