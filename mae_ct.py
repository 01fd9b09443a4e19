"""MAE-CT: contrastive tuning of a pre-trained MAE encoder with an NNCLR head.

Paper: Lehner, Alkin, Fürst, Rumetshofer, Miklautz, Hochreiter, "Contrastive Tuning: A Little Help
to Make Masked Autoencoders Forget", AAAI 2024, arXiv:2304.10520 (Sec. 3, Algorithm 1, App. A.2,
Tables 7-8). Official code: github.com/ml-jku/MAE-CT.

What this file does (one run, two stages, resumable inside either):
  Stage 1 "NNCLR initialisation" (Sec. 3, App. A.2): encoder fully frozen; train projector g and
    predictor h for --head-epochs (20) epochs, lr 1e-4 (x batch*views/256), tau 0.15, top-1 NN, no
    projector EMA (the NN path uses the online projector).
  Stage 2 "contrastive tuning" (Algorithm 1, Tables 7/8): lower half of the blocks + stem frozen,
    layer-wise lr decay 0.65 on the rest, top-k NN lookup, fast projector EMA g_m (NN path + queue),
    slow encoder EMA f_m (0.9999), which is the released encoder (saved as "model").

Equations (y = encoder output after the final LayerNorm, pooled: [CLS] for L/H, mean of the patch
tokens for B, App. A.2):
  p_v = normalize(h(g(y_v)))                 predictor path, once per view v (BN per view)
  z_v = normalize(g_m(y_v))                  NN path (stage 1: g instead of g_m)
  topk-NN(z, Q, k) = U_{1..k}( topk_{q in Q} z.q )                                       (Eq. 1)
  L_i(nn, p) = -log exp(nn_i . p_i / tau) / sum_j exp(nn_i . p_j / tau)                   (Eq. 2)
      j runs over the GLOBAL batch: the predictions of all ranks are gathered with gradient, the
      anchors nn_i are this rank's (detached) neighbours, labels offset by rank*B (official loss).
  L = L(nn(z_0), p_1)/2 + L(nn(z_1), p_0)/2                                  (Algorithm 1, symmetric)
  Q <- FIFO(Q, all_gather(z_0))              queue of normalised view-0 NN-path embeddings
  g_m <- t2 g_m + (1-t2) g,  f_m <- t1 f_m + (1-t1) f      (t2 0.99/0.995, t1 0.9999; Table 7/8)
  lr = base_lr * global_batch * 2 views / 256; warmup 20% of the updates, then cosine (Table 7).

Launch (paper setting, MAE-CT_min ViT-L/16, 8 GPUs, global batch 1024 per Table 7):
  torchrun --standalone --nproc_per_node=8 mae_ct.py --model vit_l16 \
      --init mae_pretrain_vit_large.pth --data /path/to/imagenet --output-dir runs/maect_l16
  ViT-B/16: --model vit_b16 (mean-patch pooling); ViT-H/14: --model vit_h14 (batch 512, 30 epochs);
  MAE-CT_aug: add --aug byol (Table 8 defaults: epochs 80/40/40, head lr 5e-4, k 10/10/30).
  kNN of the result as the paper (App. B: DINO's weighted k-NN, k = 10; printed at the end of the run):
    eval_knn.py --checkpoint runs/maect_l16/checkpoint-last.pth --data /path/to/imagenet --k 10
  (for B/16 add --pool avg, the pooling the head was trained on).
Tiny CPU run (vit_t16, 32 px, patch 4; the paper's EMA 0.9999 and lr need thousands of updates, so a
few-minute run uses a faster encoder EMA and larger lrs):
  python mae_ct.py --model vit_t16 --img-size 32 --patch-size 4 --data synthetic:2000:500 --device cpu \
      --num-workers 0 --init runs/mae/checkpoint-last.pth --output-dir runs/mae_ct --batch-size 32 \
      --head-epochs 1 --epochs 2 --aug byol --blr 4e-3 --head-blr 2e-3 --head-init-blr 2e-3 --encoder-ema 0.9 \
      --layer-decay 0.8 --temperature 0.2 --topk 1 --queue-size 1024 --proj-hidden 256 --proj-dim 64 --pred-hidden 512
  python eval_knn.py --checkpoint runs/mae_ct/checkpoint-last.pth --data synthetic:2000:500 --pool avg --device cpu

Paper vs official code (paper is the default, official behaviour behind a flag; one exception):
  * Self-match in the NN lookup: Algorithm 1 looks up the whole queue; the official head sets the
    similarity of queue entries with the sample's own dataset index to -1 (contrastive_head_base.py
    get_queue_similarity_matrix). Default here: that exclusion, with -inf instead of -1 (NNQueue.find_nn).
    A cosine is never below -1, so both pick the same entries, except that the official -1 still returns
    the own entry when it ties with entries at exactly -1 or fewer than k others are above -1; -inf never
    does, which is what the exclusion is for. `--no-exclude-self` gives the literal lookup, which differs
    even with a queue shorter than an epoch: a sample drawn late in one epoch can meet its own entry early
    in the next, about (Q/N)^2/2 = 0.13% of lookups on ImageNet (Q = 65,536, N = 1.28M), and on any data
    set smaller than the queue a sizeable fraction.
  * MAE-CT_aug ViT-H top-k: Table 8 says k=30, the official yaml uses 20 -> `--topk 20`.
  * Enqueue time: Algorithm 1 shifts z_0 in after the optimizer step, the official code before
    backward. Nothing reads the queue in between, so both give the same numbers (we do the latter).
  * Warmup shape (paper: "warmup -> cosine", 20%): the official per-update rule
    lr*(s+1)/(W+1) (never 0) for s < W = floor(0.2*updates), then lr*(1+cos(pi*s'/C))/2.
Other differences to the official code (no effect on the maths unless noted):
  * The official pos_embed has no CLS row (CLS gets no position); ours has a zero row: identical.
  * Official asserts queue_size % global_batch == 0; our FIFO wraps around (same result when divisible).
  * The official encoder EMA lives on rank 0 only; here every rank keeps it (identical values).
  * One run holds both stages; stage 2 starts a fresh AdamW (official: two separate runs) and its
    target projector is a copy of the stage-1 projector, the queue carries over (as official).
  * ViT-T/S (not in the paper) use the ViT-B column of Tables 7/8, including mean-patch pooling.
  * Gradient accumulation is refused: it would shrink the BN batch and the negatives of Eq. 2.
  * bf16 autocast on CUDA (as official), fp32 on CPU.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import gc
import time
from dataclasses import dataclass
from typing import Annotated, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import UserError


# ==============================================================================================
# NNCLR head: projector g, predictor h (App. A.2 "NNCLR architecture"; official ContrastiveHeadBase)
# ==============================================================================================
def build_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """3-layer MLP, no biases; every Linear is followed by BN, every BN but the last by ReLU.
    The last BN is affine (official). PyTorch default init (official stage 2)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim, bias=False), nn.BatchNorm1d(out_dim))


def build_predictor(dim: int, hidden: int) -> nn.Sequential:
    """2-layer MLP, no biases, BN+ReLU after the first layer only (App. A.2)."""
    return nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim, bias=False))


class MaeCt(nn.Module):
    """Encoder f + projector g + predictor h. The encoder runs once on all views concatenated, the heads
    once PER VIEW so that BatchNorm statistics are per view (App. A.2; official forward_heads)."""

    def __init__(self, encoder: common.VisionTransformer, pool: str, proj_hidden: int, proj_dim: int, pred_hidden: int):
        super().__init__()
        self.encoder, self.pool = encoder, pool
        self.projector = build_projector(encoder.dim, proj_hidden, proj_dim)
        self.predictor = build_predictor(proj_dim, pred_hidden)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder.forward_features(x)  # (B, 1+N, D), after the final LayerNorm
        return tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(dim=1)  # (B, D)

    def forward(self, views: list[torch.Tensor]):
        n = views[0].shape[0]
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):  # stage 1: frozen encoder, no graph
            y = self.pooled(torch.cat(views))  # (V*B, D)
        ys = list(y.split(n))  # V x (B, D)
        projected = [self.projector(yv) for yv in ys]  # V x (B, 256), BN statistics per view
        predicted = [self.predictor(zv) for zv in projected]  # V x (B, 256)
        return ys, projected, predicted


class NNQueue(nn.Module):
    """FIFO shift register Q of normalised embeddings (Alg. 1) with the dataset index and label of each
    entry. Initialised with random unit vectors, ids/labels -1 (official ContrastiveHeadBase)."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))  # (Q, d)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long))  # (Q,)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def find_nn(self, z: torch.Tensor, topk: int = 1, ids: Optional[torch.Tensor] = None):
        """topk-NN(z, Q, k) of Eq. 1: a uniformly random one of the k most similar entries (k=1: the NN).
        z (B, d) unit vectors; ids (B,) excludes entries holding the same sample (--exclude-self).
        Returns (Q[idx] (B, d), idx (B,))."""
        sim = z.float() @ self.queue.T  # (B, Q) cosine similarities
        if ids is not None:
            sim = sim.masked_fill(ids[:, None] == self.ids[None, :], float("-inf"))
        if topk == 1:
            idx = sim.argmax(dim=1)  # (B,)
        else:
            cand = sim.topk(topk, dim=1).indices  # (B, k)
            pick = torch.randint(topk, (z.shape[0],), device=z.device)  # uniform over the k candidates
            idx = cand[torch.arange(z.shape[0], device=z.device), pick]
        return self.queue[idx], idx

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor):
        """Shift the (globally gathered) batch in, oldest entries out (FIFO, wrapping around)."""
        size, n = self.queue.shape[0], z.shape[0]
        pos = ((self.ptr + torch.arange(n, device=z.device)) % size)[-size:]  # if n > size only the newest stay
        self.queue[pos] = z[-size:].float()
        self.ids[pos] = ids[-size:]
        self.labels[pos] = labels[-size:]
        self.ptr.copy_((self.ptr + n) % size)


# ==============================================================================================
# Loss (Eq. 2, Algorithm 1)
# ==============================================================================================
def nnclr_loss(nn_anchor: torch.Tensor, pred: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2 for one direction. nn_anchor (B, d): this rank's detached neighbours (rows); pred (B, d):
    this rank's normalised predictions, gathered over ranks WITH gradient (columns; the negatives are
    the predictions of the whole global batch). Positive of row i is column rank*B + i. Mean over rows."""
    pred_all = common.all_gather_grad(pred)  # (W*B, d)
    logits = nn_anchor @ pred_all.T / temperature  # (B, W*B)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    labels = torch.arange(pred.shape[0], device=pred.device) + rank * pred.shape[0]
    return F.cross_entropy(logits, labels)


def mae_ct_forward_loss(model: nn.Module, target_projector: Optional[nn.Module], queue: NNQueue,
                        views: list[torch.Tensor], ids: torch.Tensor, labels: torch.Tensor,
                        temperature: float, topk: int, exclude_self: bool, device: torch.device):
    """One step's forward: both views, NN lookups, symmetric loss, then enqueue view 0 (official order:
    before backward). Stage 1 passes target_projector=None (NN path = online projector, App. A.2).
    Returns (loss, metrics)."""
    with common.autocast(device):
        ys, projected, predicted = model(views)
    with torch.no_grad():  # NN path: z = normalize(g_m(y)) (Alg. 1); detached, batch-stat BN (train mode)
        if target_projector is not None:
            with common.autocast(device):
                zs = [target_projector(y.detach()) for y in ys]
        else:
            zs = [z.detach() for z in projected]
        zs = [F.normalize(z.float(), dim=1) for z in zs]  # V x (B, d)
        lookups = [queue.find_nn(z, topk, ids if exclude_self else None) for z in zs]
    ps = [F.normalize(p.float(), dim=1) for p in predicted]  # V x (B, d)
    # symmetrised InfoNCE: NN of view 0 vs predictions of view 1 and vice versa (Alg. 1)
    loss = 0.5 * nnclr_loss(lookups[0][0], ps[1], temperature) + 0.5 * nnclr_loss(lookups[1][0], ps[0], temperature)
    # NN accuracy (does the neighbour share the label?), a cheap online monitor; -1 = unknown
    nn_labels = queue.labels[lookups[0][1]]
    known = (labels >= 0) & (nn_labels >= 0)
    nn_acc = ((nn_labels == labels) & known).sum().float() / known.sum().clamp(min=1)
    queue.enqueue(common.all_gather_nograd(zs[0]), common.all_gather_nograd(ids), common.all_gather_nograd(labels))
    return loss, {"nn_acc": nn_acc}


# ==============================================================================================
# Freezing and optimisation
# ==============================================================================================
def set_trainable(model: MaeCt, stage: int, frozen_blocks: int):
    """Stage 1: whole encoder frozen (Sec. 3 'NNCLR initialization'). Stage 2: blocks [0, frozen_blocks)
    and, if block 0 is frozen, the stem (patch_embed, cls_token) frozen (official vit_block_freezer);
    pos_embed is always fixed (sin-cos). Heads always train."""
    enc = model.encoder
    for n, p in enc.named_parameters():
        if stage == 1 or n == "pos_embed":
            p.requires_grad_(False)
        elif n.startswith("blocks."):
            p.requires_grad_(int(n.split(".")[1]) >= frozen_blocks)
        elif n.startswith(("patch_embed.", "cls_token", "embed_norm.")):
            p.requires_grad_(frozen_blocks == 0)
        else:  # final norm
            p.requires_grad_(True)
    for p in list(model.projector.parameters()) + list(model.predictor.parameters()):
        p.requires_grad_(True)


def build_optimizer(model: MaeCt, stage: int, args: Args, enc_lr: float, head_lr: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) (Table 7). Each group's lr_scale holds its PEAK lr (encoder: LLRD 0.65^(depth+1-layer)
    x enc_lr; heads: head_lr, wd 1e-5); set_lr multiplies in the schedule factor (lr_factor)."""
    groups = []
    if stage == 2:
        groups += common.param_groups(model.encoder.named_parameters(), args.weight_decay, args.layer_decay,
                                      model.encoder.depth, lr_scale=enc_lr, tag="encoder_")
    heads = [("projector." + n, p) for n, p in model.projector.named_parameters()] + \
            [("predictor." + n, p) for n, p in model.predictor.named_parameters()]
    groups += common.param_groups(heads, args.head_weight_decay, lr_scale=head_lr, tag="head_")
    return common.make_adamw(groups, lr=0.0)


def min_aug_transform(img_size: int, min_scale: float):
    """MAE-CT_min (Table 7): RandomResizedCrop(scale min_scale-1, bicubic) + horizontal flip, both views."""
    return common.mae_train_transform(img_size, scale=(min_scale, 1.0))


def build_views(args: Args):
    if args.aug == "min":
        t = min_aug_transform(args.img_size, args.min_scale)
        return common.MultiView([t, t])
    # MAE-CT_aug (Table 8): BYOL's asymmetric pair, view 0 always blurred, view 1 blur 0.1 + solarize 0.2
    return common.MultiView([common.byol_view(args.img_size, scale=(args.min_scale, 1.0), blur_p=1.0, solarize_p=0.0),
                             common.byol_view(args.img_size, scale=(args.min_scale, 1.0), blur_p=0.1, solarize_p=0.2)])


# ==============================================================================================
# ALGO LOGIC: one training step (Algorithm 1, Eq. 1-2)
# ==============================================================================================
@dataclass
class TrainState:
    """What a step, an epoch and a checkpoint touch; ddp, optimizer and target_projector are rebuilt per stage."""
    ddp: nn.Module  # `model` as the step runs it: DDP-wrapped or plain
    model: MaeCt  # encoder f + projector g + predictor h, unwrapped (their state dicts, the EMA sources)
    optimizer: torch.optim.Optimizer  # the stage's AdamW (each group's lr_scale is its peak lr)
    target_projector: Optional[nn.Module]  # g_m, the EMA of g (Alg. 1); None in stage 1 (the NN path uses g)
    ema_encoder: common.VisionTransformer  # f_m, the EMA of f (Alg. 1), saved as "model"
    queue: NNQueue  # (Q, d) normalised view-0 NN-path embeddings with ids and labels


def train_step(state: TrainState, views: list[torch.Tensor], ids, labels, *, stage: int, temperature: float,
               topk: int, step: int, args: Args, device):
    """One update of Algorithm 1: forward of both views, NN lookup in the queue, symmetric NNCLR loss, enqueue of
    view 0, backward, AdamW step; in stage 2 the projector EMA g_m and the encoder EMA f_m (BN buffers copied).
    views 2 x (n, 3, S, S); ids, labels (n,). Returns (loss, metrics)."""
    loss, metrics = mae_ct_forward_loss(state.ddp, state.target_projector, state.queue, views, ids, labels,
                                        temperature, topk, args.exclude_self, device)
    common.check_finite(loss, step, args.output_dir)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    if stage == 2:
        common.ema_update(state.target_projector, state.model.projector, args.projector_ema)
        common.ema_update(state.ema_encoder, state.model.encoder, args.encoder_ema)
    return loss, metrics


# ==============================================================================================
# Flags (each field: its paper default and source), the Tables 7 / 8 presets, the lr rules
# ==============================================================================================
@dataclass
class Args(common.Flags):
    # ---- common flags ----
    model: str = "vit_l16"
    """encoder architecture (common.VIT_CONFIGS); the paper tunes vit_b16, vit_l16, vit_h16, vit_h14"""
    img_size: common.PosInt = 224
    """training resolution (paper 224); the MAE pos_embed is interpolated if --init differs"""
    patch_size: Optional[common.PosInt] = None
    """patch size; None -> the model's own (16, or 14 for H/14). Must match the --init checkpoint"""
    data: str = "data/imagenet"
    """ImageFolder root (ROOT/train), a flat folder of images, or synthetic[:N_TRAIN[:N_VAL]] (synthetic.py); paper: ImageNet-1K train"""
    output_dir: str = "runs/mae_ct"
    """where checkpoint-last.pth, log.jsonl, args.json and TensorBoard logs go; rerunning the same command
    resumes"""
    epochs: Optional[common.NonNegInt] = None
    """contrastive-tuning (stage 2) epochs; None -> Table 7 (min aug: B 20, L 20, H 30) or Table 8 (aug: 80, 40, 40)"""
    warmup_epochs: Optional[common.NonNegFloat] = None
    """stage-2 warmup epochs; None -> --warmup-fraction of the stage-2 updates (Table 7: 20 percent)"""
    batch_size: Optional[Annotated[int, common.Range(2, why="BatchNorm in the heads needs 2 samples per view")]] = None
    """GLOBAL batch (images, each gives 2 views); None -> Table 7/8: 1024 (B/L), 512 (H)"""
    accum_steps: common.PosInt = 1
    """gradient accumulation; must stay 1: accumulating shrinks the BatchNorm batch and the negatives of Eq. 2"""
    blr: common.PosFloat = 1e-4
    """encoder base lr, scaled by global_batch*2 views/256 (Table 7/8: 1e-4; official LinearLrScaler)"""
    lr: Optional[common.PosFloat] = None
    """absolute peak encoder lr; None -> blr * batch_size * 2 / 256"""
    weight_decay: common.NonNegFloat = 0.05
    """encoder AdamW weight decay (Table 7/8: 0.05); biases and 1-D params get 0"""
    num_workers: common.NonNegInt = 10
    """DataLoader worker processes per rank"""
    seed: int = 0
    """random seed (reseeded per epoch and rank via common.epoch_seed, so a resumed run is exact)"""
    grad_checkpointing: Literal["auto", "on", "off"] = "auto"
    """activation checkpointing of the encoder blocks: auto (on CUDA: as many trainable blocks as the measured
    memory plan needs, printed before step 1; off on CPU), on (every trainable block) or off (docs/memory.md)"""
    plan: Optional[str] = None
    """GPUSxGB, e.g. 4x80: print the memory plan of this run on that many GPUs of that size and exit (reads no
    data and no initial checkpoint: one training step on fake tensors)"""
    compile: bool = False
    """torch.compile the encoder's forward_features"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (CUDA if visible), 'cpu' or 'cuda'"""
    # ---- MAE-CT flags ----
    init: Optional[str] = None
    """MAE encoder to tune (required): our mae.py checkpoint or an official MAE release file (mae_pretrain_vit_*.pth)"""
    aug: Literal["min", "byol"] = "min"
    """'min': MAE-CT_min, 2 views of RandomResizedCrop(0.08-1)+flip (Table 7); 'byol': MAE-CT_aug, BYOL's
    asymmetric colour/blur/solarize views (Table 8). Also selects the per-model defaults"""
    min_scale: common.PosUnit = 0.08
    """lower bound of the RandomResizedCrop area scale for both views (official: 0.08)"""
    pool: Optional[Literal["cls", "avg"]] = None
    """head input: 'cls' (CLS token) or 'avg' (mean of the patch tokens), after the final LayerNorm;
    None -> 'avg' for ViT-B (and T/S), 'cls' for L/H (App. A.2)"""
    head_epochs: common.NonNegInt = 20
    """stage-1 NNCLR head initialisation epochs on the frozen encoder (App. A.2: 20); 0 skips stage 1"""
    head_init_blr: common.PosFloat = 1e-4
    """stage-1 head base lr, scaled like --blr (App. A.2: 1e-4)"""
    head_init_temperature: common.PosFloat = 0.15
    """stage-1 temperature tau (App. A.2: 0.15)"""
    head_blr: Optional[common.PosFloat] = None
    """stage-2 head base lr, scaled like --blr; None -> Table 7: 1e-4 (min), Table 8: 5e-4 (aug)"""
    head_weight_decay: common.NonNegFloat = 1e-5
    """AdamW weight decay of projector/predictor in both stages (Table 7/8: 1e-5)"""
    warmup_fraction: common.Prob = 0.2
    """warmup length as a fraction of each stage's updates (Table 7/8 and App. A.2: 20 percent)"""
    layer_decay: common.PosUnit = 0.65
    """layer-wise lr decay of the encoder in stage 2 (Table 7/8: 0.65; MAE util/lr_decay rule)"""
    frozen_blocks: Optional[common.NonNegInt] = None
    """stage-2 frozen lower blocks (plus patch_embed and cls_token); None -> depth/2 (Table 7: 6/12/16)"""
    temperature: Optional[common.PosFloat] = None
    """stage-2 tau of Eq. 2; None -> Table 7 (0.15/0.2/0.3 for B/L/H) or Table 8 (0.15/0.15/0.35)"""
    topk: Optional[common.PosInt] = None
    """stage-2 k of the topk-NN lookup (Eq. 1); None -> Table 7 (20/20/20) or Table 8 (10/10/30; official H: 20)"""
    projector_ema: Optional[common.Prob] = None
    """stage-2 momentum t2 of the projector EMA g_m (Alg. 1); None -> Table 7/8: 0.99 (B/L), 0.995 (H)"""
    encoder_ema: common.Prob = 0.9999
    """momentum t1 of the encoder EMA f_m, the encoder released/evaluated (Alg. 1, Table 7/8: 0.9999)"""
    queue_size: common.PosInt = 65536
    """length of the NN queue Q (Sec. 4 / Alg. 1: 65,536); initialised with random unit vectors (official)"""
    exclude_self: bool = True
    """official-code behaviour: never return the sample's own (older) queue entry as its NN; --no-exclude-self:
    Alg. 1's literal lookup of the whole queue (differs on ~0.13% of ImageNet lookups, more on small data)"""
    proj_hidden: common.PosInt = 2048
    """projector hidden width (Alg. 1: 2048)"""
    proj_dim: common.PosInt = 256
    """projector / predictor output width (Alg. 1: 256)"""
    pred_hidden: common.PosInt = 4096
    """predictor hidden width (Alg. 1: 4096)"""
    exit_after_epochs: Optional[common.PosInt] = None
    """testing: stop after this many completed epochs (all stages counted), as if the run was killed; rerun to
    resume"""
    knn_every: common.NonNegInt = 1
    """k-NN monitor every N epochs (eval_knn.KnnMonitor: top-1 at k=20, T=0.07, DINO's vote, on the encoder saved as
    "model"); 0 = off. Official: k-NN after every epoch, both stages."""
    knn_data: Optional[str] = None
    """labelled data for the monitor: ROOT with ROOT/train/<class>/ and ROOT/val/<class>/, or synthetic[:N[:M]];
    None -> --data when it has labelled train/ and val/ splits, else the monitor is off (one-line note)"""
    knn_subset: common.PosUnit = 0.1
    """fraction of the k-NN data's train split used as the monitor's bank, drawn with --seed (official MIM-Refiner
    / MAE-CT monitors: a 10% ImageNet subset); the whole val split is queried"""
    save_every: common.NonNegInt = 0
    """keep OUTPUT_DIR/checkpoint-epochNNN.pth ("model" + "encoder_config" only, NNN = epochs done) every N
    epochs; 0 = none. checkpoint-last.pth stays the full resumable state."""
    save_minutes: Optional[common.NonNegFloat] = None
    """also write checkpoint-last.pth inside an epoch every M minutes, at an update boundary (a resume continues
    exactly there); None -> 30 on CUDA (stretched so that a save costs at most 1 % of the run), off on the CPU;
    0 = at epoch ends only. SIGTERM/SIGUSR1/SIGINT save and stop at the next boundary (docs/scale.md)"""


# Tables 7 (MAE-CT_min) and 8 (MAE-CT_aug): column per model size.
PAPER_DEFAULTS = {  # (aug, size) -> epochs, batch, temperature, topk, projector EMA, head base lr
    ("min", "B"): dict(epochs=20, batch_size=1024, temperature=0.15, topk=20, projector_ema=0.99, head_blr=1e-4),
    ("min", "L"): dict(epochs=20, batch_size=1024, temperature=0.2, topk=20, projector_ema=0.99, head_blr=1e-4),
    ("min", "H"): dict(epochs=30, batch_size=512, temperature=0.3, topk=20, projector_ema=0.995, head_blr=1e-4),
    ("byol", "B"): dict(epochs=80, batch_size=1024, temperature=0.15, topk=10, projector_ema=0.99, head_blr=5e-4),
    ("byol", "L"): dict(epochs=40, batch_size=1024, temperature=0.15, topk=10, projector_ema=0.99, head_blr=5e-4),
    ("byol", "H"): dict(epochs=40, batch_size=512, temperature=0.35, topk=30, projector_ema=0.995, head_blr=5e-4),
}
MODEL_SIZE = {"vit_t16": "B", "vit_s16": "B", "vit_b16": "B", "vit_l16": "L", "vit_h14": "H", "vit_h16": "H", "vit_2b14": "H"}
NUM_VIEWS = 2  # Algorithm 1: two augmented views per image


def resolve_args(args: Args) -> Args:
    """The None defaults in one merge (Tables 7/8 per model size and --aug; the average-pooled ViT-B, the [CLS] of
    larger ones; half the blocks frozen), then the rules between flags (each flag's own range is on its Args field)."""
    depth, size = common.vit_config(args.model)[1], MODEL_SIZE[args.model]
    defaults = {"pool": "avg" if size == "B" else "cls", "frozen_blocks": depth // 2, **PAPER_DEFAULTS[(args.aug, size)]}
    args = dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})
    if args.accum_steps != 1:
        raise UserError("--accum-steps must be 1 for MAE-CT: accumulation shrinks the BatchNorm batch and the "
                        "negatives of the NNCLR loss; lower --batch-size or use more GPUs instead")
    if not 0 <= args.frozen_blocks <= depth:
        raise UserError(f"--frozen-blocks {args.frozen_blocks} is outside [0, {depth}] for {args.model}")
    if args.topk > args.queue_size:
        raise UserError(f"--topk {args.topk} exceeds --queue-size {args.queue_size}; lower --topk")
    return args


def scaled_lr(base_lr: float, global_batch: int, views: int = NUM_VIEWS) -> float:
    """lr = base * global_batch * views / 256 (official LinearLrScaler; Table 7 'Learning rate')."""
    return base_lr * global_batch * views / 256


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Per-update schedule multiplier in [0, 1]: official warmup (s+1)/(W+1) (never 0), then half-cosine
    to 0 over the remaining updates (Table 7: 'warmup -> cosine', warmup fraction 20%)."""
    return common.cosine_schedule(step, total_steps, base=1.0, final=0.0, warmup_steps=warmup_steps,
                                  warmup_start=1.0 / (warmup_steps + 1))


# ==============================================================================================
# The memory plan (--plan, --grad-checkpointing auto)
# ==============================================================================================
def n_blocks(args: Args) -> int:
    """Blocks the memory plan may checkpoint: stage 2 trains blocks frozen_blocks..depth-1."""
    return common.VIT_CONFIGS[args.model][1] - args.frozen_blocks


def memory_plan(args: Args, gpus: int, capacity, mode: str):
    """memplan.plan_memory (optional neighbour memplan.py) for stage 2 (encoder, heads, both EMAs and the
    queue) at the per-GPU batch."""
    import memplan
    n = common.per_rank_batch(args.batch_size, args.accum_steps, gpus)

    def build(k):
        encoder = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size, grad_checkpointing=k)
        model = MaeCt(encoder, args.pool, args.proj_hidden, args.proj_dim, args.pred_hidden)
        queue = NNQueue(args.queue_size, args.proj_dim)
        ema_encoder = copy.deepcopy(encoder).requires_grad_(False)
        set_trainable(model, 2, args.frozen_blocks)
        # g_m: the same module as the projector (values do not matter here; deepcopy of a fake BN fails)
        target_projector = build_projector(encoder.dim, args.proj_hidden, args.proj_dim).requires_grad_(False)
        optimizer = build_optimizer(model, 2, args, 1.0, 1.0)
        views = [torch.randn(n, 3, args.img_size, args.img_size) for _ in range(NUM_VIEWS)]
        ids, labels = torch.arange(n), torch.zeros(n, dtype=torch.long)
        state = TrainState(model, model, optimizer, target_projector, ema_encoder, queue)
        step = lambda: train_step(state, views, ids, labels, stage=2, temperature=args.temperature,  # noqa: E731
                                  topk=args.topk, step=0, args=args, device=torch.device("cpu"))
        return [model, queue, ema_encoder, target_projector], [optimizer], step, list(encoder.blocks)

    what = f"MAE-CT {args.model}, {n} images x {NUM_VIEWS} views per GPU"
    return memplan.plan_memory(build, what, n_blocks(args), gpus, capacity, mode, False, False,
                              "this script refuses it: BN statistics, negatives and the queue would change")


# ==============================================================================================
# Training loop: one stage's set-up, one epoch, the epoch-end checkpoint, main
# ==============================================================================================
@dataclass
class Stage:
    """What one stage keeps fixed."""
    number: int  # 1 (NNCLR initialisation, frozen encoder) or 2 (contrastive tuning)
    first: int  # its first epoch
    last: int  # one past its last epoch
    enc_lr: float  # encoder peak lr (stage 1: nothing trains it)
    head_lr: float  # projector + predictor peak lr
    warmup_steps: int  # linear-warmup updates at its start


@dataclass
class Run:
    """The run: what its epochs share (ranks, log, run control, data, batch, schedules)."""
    dist_info: common.DistInfo  # ranks and the device
    log: common.Logger  # log.jsonl, TensorBoard, rank-0 printing
    ctl: longrun.RunControl | common.EpochEndSaves  # common.run_control: saves and stops at update boundaries
    dataset: torch.utils.data.Dataset  # WithIndex: (2 views, label, dataset index)
    micro: int  # per-rank batch of images: batch_size / processes
    steps_per_epoch: int  # optimizer updates per epoch
    rms_start: float  # the initial encoder weights' RMS, the divergence check's reference (save_checkpoint)


def start_stage(model: MaeCt, resume, log, stage: Stage, *, start_epoch: int, args: Args, device):
    """`stage` (epochs stage.first..stage.last-1): what trains, the target projector g_m (stage 2 only), its AdamW
    (encoder peak stage.enc_lr, heads stage.head_lr; the saved states when `resume`, the resume checkpoint's stage
    state, lies inside this stage: consumed here), one log line of the trainable parameters.
    Returns (optimizer, target_projector or None)."""
    number, first = stage.number, stage.first
    resuming_here = resume is not None and resume["stage"] == number and (start_epoch > first or resume["position"])
    set_trainable(model, number, args.frozen_blocks)
    target_projector = None
    if number == 2:  # g_m starts as a copy of the initialised projector (official NnclrEmaQueueHead)
        target_projector = copy.deepcopy(model.projector).requires_grad_(False)
        if resuming_here:
            target_projector.load_state_dict(resume["target_projector"])
    optimizer = build_optimizer(model, number, args, stage.enc_lr, stage.head_lr)
    if resuming_here:
        optimizer.load_state_dict(resume.pop("optimizer"))
    n_enc = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    n_head = sum(p.numel() for p in list(model.projector.parameters()) + list(model.predictor.parameters()))
    log.print(f"stage {number} ({'head initialisation, frozen encoder' if number == 1 else 'contrastive tuning'}): "
              f"epochs {first}-{stage.last - 1}, trainable encoder params {n_enc:,}, head params {n_head:,}")
    return optimizer, target_projector


def train_one_epoch(state: TrainState, run: Run, stage: Stage, epoch: int, *, position, args: Args) -> float:
    """One epoch of `stage`: the epoch's seed and loader (or the state of the mid-epoch checkpoint's `position`),
    the lr of every update (warmup + cosine over the stage), train_step per batch, the per-update log line; after
    each update the run control decides whether to save (save_state) and stop. Returns the last update's loss (mean
    over ranks)."""
    dist_info, log, micro, steps_per_epoch = run.dist_info, run.log, run.micro, run.steps_per_epoch
    device, number, enc_lr, head_lr = dist_info.device, stage.number, stage.enc_lr, stage.head_lr
    stage_steps = (stage.last - stage.first) * steps_per_epoch
    temperature = args.head_init_temperature if number == 1 else args.temperature
    topk = 1 if number == 1 else args.topk  # App. A.2: top-1 during initialisation
    start = common.epoch_start(args.seed, epoch, dist_info, position, log)
    sums = dict(position["sums"]) if start else {"loss": float("nan")}
    loader = common.build_loader(run.dataset, micro, dist_info, shuffle=True, drop_last=True,
                                 num_workers=args.num_workers, seed=args.seed, epoch=epoch, skip=start * micro)
    state.model.train()
    bar = common.progress(loader, dist_info, total=steps_per_epoch - start, desc=f"stage {number} epoch {epoch}")
    t0 = time.time()
    for it, (views, labels, ids) in enumerate(bar, start=start):
        step = (epoch - stage.first) * steps_per_epoch + it  # update index inside this stage
        factor = lr_factor(step, stage_steps, stage.warmup_steps)
        common.set_lr(state.optimizer, factor)  # each group's lr_scale is its peak lr
        views = [v.to(device, non_blocking=True) for v in views]  # 2 x (n, 3, S, S)
        labels, ids = labels.to(device), ids.to(device)
        loss, metrics = train_step(state, views, ids, labels, stage=number, temperature=temperature, topk=topk,
                                   step=epoch * steps_per_epoch + it, args=args, device=device)
        sums["loss"] = common.all_reduce_mean(loss.detach()).item()  # collective: every rank
        if dist_info.is_main:
            ips = (it + 1 - start) * args.batch_size / max(time.time() - t0, 1e-9)
            shown_lr = enc_lr * factor if number == 2 else head_lr * factor
            bar.set_postfix(loss=f"{sums['loss']:.4f}", lr=f"{shown_lr:.2e}", img_s=f"{ips:.0f}")
            log.log({"train/loss": sums["loss"], "train/stage": number, "train/nn_acc": metrics["nn_acc"].item(),
                     "train/lr": enc_lr * factor if number == 2 else 0.0,
                     "train/head_lr": head_lr * factor, "train/epoch": epoch},
                    step=epoch * steps_per_epoch + it)
        save, stop = run.ctl.at_update(it + 1, steps_per_epoch)  # one all-reduce: a stop signal anywhere, the timer
        if save:
            with run.ctl.saving(epoch, it + 1, steps_per_epoch):
                save_state(state, run, stage, epoch, it + 1, loss_v=sums["loss"],
                           position=run.ctl.position(it + 1, sums), args=args)
        if stop:
            run.ctl.stop(f"at epoch {epoch} step {it + 1}")
    return sums["loss"]


def save_state(state: TrainState, run: Run, stage: Stage, epoch: int, update: int, *, loss_v: float, position,
               args: Args):
    """OUTPUT_DIR/checkpoint-last.pth (encoder EMA f_m as "model", what eval_knn.py reads; all the resume needs)
    after `update` updates of `epoch`: at its end (update == run.steps_per_epoch) first the kept EMA-only copy
    every --save-every epochs, inside it `position` (what the exact resume needs, longrun.RunControl.position)."""
    model, ema_encoder, target_projector = state.model, state.ema_encoder, state.target_projector
    done = update == run.steps_per_epoch
    if done:  # before checkpoint-last: a run killed between the two redoes the epoch and rewrites both
        common.save_kept(args.save_every, args.output_dir, run.dist_info, epoch + 1,
                         common.encoder_state_dict(ema_encoder), model.encoder.config(), model_is_ema=True)
    if run.dist_info.is_main:
        common.save_checkpoint(common.checkpoint_path(args.output_dir), {
            "model": common.encoder_state_dict(ema_encoder), "model_is_ema": True,
            "model_online": common.encoder_state_dict(model.encoder),
            "encoder_config": model.encoder.config(), "pool": args.pool,
            "projector": model.projector.state_dict(), "predictor": model.predictor.state_dict(),
            "target_projector": target_projector.state_dict() if target_projector is not None else None,
            "queue": state.queue.state_dict(), "optimizer": state.optimizer.state_dict(),
            "epoch": epoch + done, "step": epoch * run.steps_per_epoch + update, "stage": stage.number,
            "resume": None if done else position, "weights_rms_start": run.rms_start,
            "args": dataclasses.asdict(args)}, weights_rms_start=run.rms_start)
        if done:
            run.log.print(f"epoch {epoch} (stage {stage.number}) done, loss {loss_v:.4f}; "
                          f"saved {common.checkpoint_path(args.output_dir)}")


def main(args: Args):
    args = resolve_args(args)
    if args.plan is not None:  # no data, no checkpoint: the step on fake tensors
        common.plan_run(args, torch.device("cpu"), 1, n_blocks(args), functools.partial(memory_plan, args))
        return
    dist_info = common.init_distributed(args.device)
    device, world = dist_info.device, dist_info.world_size
    checkpointed, _ = common.plan_run(args, device, world, n_blocks(args), functools.partial(memory_plan, args))
    micro = common.per_rank_batch(args.batch_size, args.accum_steps, world)
    enc_lr = args.lr if args.lr is not None else scaled_lr(args.blr, args.batch_size)
    head_lr = scaled_lr(args.head_blr, args.batch_size)
    head_init_lr = scaled_lr(args.head_init_blr, args.batch_size)

    resume_ckpt = common.load_resume_state(args.output_dir)
    if resume_ckpt is not None:
        common.check_resume_args(resume_ckpt, args, args.output_dir, shape=(
            "pool", "proj_hidden", "proj_dim", "pred_hidden", "queue_size", "frozen_blocks"),
            state_keys=("model", "model_online", "projector", "predictor", "queue", "stage", "optimizer", "epoch"))
    if resume_ckpt is None and args.init is None:
        raise UserError("MAE-CT tunes a pre-trained MAE encoder: pass --init PATH (mae.py checkpoint or "
                        "official mae_pretrain_vit_*.pth)")
    total_epochs = args.head_epochs + args.epochs
    start_epoch = resume_ckpt["epoch"] if resume_ckpt is not None else 0

    dataset = common.WithIndex(common.build_dataset(args.data, "train", build_views(args), img_size=args.img_size,
                                                    seed=args.seed))
    steps_per_epoch = len(dataset) // world // micro
    if steps_per_epoch == 0:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch of {args.batch_size}; "
                        f"lower --batch-size")
    log = common.Logger(args.output_dir, args, dist_info, extra=dict(
        effective_batch=args.batch_size, per_rank_batch=micro, encoder_lr=enc_lr, head_lr=head_lr,
        head_init_lr=head_init_lr, steps_per_epoch=steps_per_epoch))
    rule = "--lr" if args.lr is not None else f"{args.blr:g} x {args.batch_size} x {NUM_VIEWS} / 256"
    log.print(f"global batch {args.batch_size} x {NUM_VIEWS} views; encoder lr {enc_lr:.3g} ({rule}), "
              f"head lr {head_lr:.3g}, head-init lr {head_init_lr:.3g} (base x batch x views / 256)")
    if start_epoch >= total_epochs:
        log.print(f"{common.checkpoint_path(args.output_dir)} already holds all {total_epochs} epochs; nothing to do")
        log.close()
        return

    common.seed_everything(args.seed)
    encoder = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size,
                                grad_checkpointing=checkpointed)
    model = MaeCt(encoder, args.pool, args.proj_hidden, args.proj_dim, args.pred_hidden)
    queue = NNQueue(args.queue_size, args.proj_dim)
    resume = rms_start = None  # what the stage to resume needs from the checkpoint, once its weights are loaded
    if resume_ckpt is not None:
        common.load_encoder(encoder, resume_ckpt["model_online"], what="the resume checkpoint")
        model.projector.load_state_dict(resume_ckpt["projector"])
        model.predictor.load_state_dict(resume_ckpt["predictor"])
        queue.load_state_dict(resume_ckpt["queue"])
        resume = {k: resume_ckpt.get(k) for k in ("stage", "optimizer", "target_projector")}
        resume["position"], rms_start = resume_ckpt.get("resume"), resume_ckpt.get("weights_rms_start")
        at = f", step {resume['position']['update']} of {steps_per_epoch}" if resume["position"] else ""
        log.print(f"resuming {common.checkpoint_path(args.output_dir)} at epoch {start_epoch}{at} (stage {resume_ckpt['stage']})")
    else:
        desc = common.load_encoder(encoder, args.init, what="--init")
        log.print(f"loaded {desc} from {args.init}")
    ema_encoder = copy.deepcopy(encoder).requires_grad_(False)  # f_m (Alg. 1); equals f until stage 2 starts
    if resume_ckpt is not None:
        common.load_encoder(ema_encoder, resume_ckpt["model"], what="the resume checkpoint")
    resume_ckpt = None  # loaded into the modules: no second copy on the host for the whole run
    if rms_start is None:
        rms_start = common.weights_rms(encoder.state_dict())  # the divergence check's reference (save_checkpoint)
    model = common.sync_batchnorm(model, device)  # one BN batch over all ranks (official: sync_batchnorm=True)
    model.to(device), ema_encoder.to(device), queue.to(device)
    if args.compile:
        encoder.forward_features = torch.compile(encoder.forward_features)

    knn = common.knn_monitor(dist_info, log, every=args.knn_every, data=args.knn_data, train_data=args.data,
                             subset=args.knn_subset, img_size=args.img_size, batch_size=micro,
                             num_workers=args.num_workers, seed=args.seed, pool=args.pool)
    ctl = common.run_control(args.save_minutes, dist_info, log)
    run = Run(dist_info, log, ctl, dataset, micro=micro, steps_per_epoch=steps_per_epoch, rms_start=rms_start)
    for number, (first, last) in ((1, (0, args.head_epochs)), (2, (args.head_epochs, total_epochs))):
        if start_epoch >= last:
            continue
        stage_steps = (last - first) * steps_per_epoch
        frac_warm = args.warmup_epochs * steps_per_epoch if (number == 2 and args.warmup_epochs is not None) \
            else args.warmup_fraction * stage_steps
        warmup_steps = int(frac_warm)  # official: floor
        stage = Stage(number, first, last, enc_lr, head_lr if number == 2 else head_init_lr, warmup_steps)
        optimizer, target_projector = start_stage(model, resume, log, stage, start_epoch=start_epoch, args=args,
                                                  device=device)
        ddp = train_state = None
        gc.collect()  # the previous stage's DDP wrapper (held by its TrainState) sits in a reference cycle: free it now
        ddp = model
        if dist_info.enabled:
            ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_state = TrainState(ddp, model, optimizer, target_projector, ema_encoder, queue)

        for epoch in range(max(start_epoch, first), last):
            position = resume["position"] if resume is not None and epoch == start_epoch else None
            loss_v = train_one_epoch(train_state, run, stage, epoch, position=position, args=args)
            save_state(train_state, run, stage, epoch, steps_per_epoch, loss_v=loss_v, position=None, args=args)
            knn(epoch + 1, ema_encoder, (epoch + 1) * steps_per_epoch)
            ctl.epoch_done(epoch + 1)
            if args.exit_after_epochs is not None and epoch + 1 >= args.exit_after_epochs:
                log.print(f"--exit-after-epochs {args.exit_after_epochs}: stopping; rerun to resume")
                log.close()
                return
    # App. B: weighted k-NN following DINO with k = 10, on the EMA encoder ("model")
    # Tables 1, 2, 9: k-NN, linear probe (App. B, Table 9), 1/2/5-shot (App. B), k-means ACC + silhouette (Table 2)
    pool = " --pool avg" if args.pool == "avg" else ""
    log.print("to evaluate as the paper: k-NN: " + common.paper_eval_command(args, "--k 10" + pool))
    log.print("  linear probe: " + common.paper_eval_command(args, "--protocol maect", "eval_linear.py"))
    log.print("  1/2/5-shot and k-means: " + common.paper_eval_command(
        args, "--few-shot 1 2 5 --cluster --cluster-norm standardize" + pool, "eval_frozen.py"))
    for pct in (1, 10):  # Table 1's 1 % / 10 % columns: fine-tuned on the labelled subset (App. B)
        log.print(f"  fine-tune with {pct} % of the labels: " + common.paper_eval_command(
            args, f"--recipe lowshot-{pct}pct {common.label_split(args, pct)}", "finetune.py"))
    log.close()


if __name__ == "__main__":
    common.run_main(main, Args)
