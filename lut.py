"""LUT: Learning with Unmasked Tokens Drives Stronger Vision Learners (Kim et al., ECCV 2024, arXiv:2310.13593).

MAE plus a "broader contextualisation" loss on the *unmasked* tokens: the pooled visible tokens of the
masked view must predict what a momentum encoder sees in the *whole* (strongly augmented) image.

What one training step computes (paper Sec. 3, official naver-ai/lut @4420a27 for what the text leaves open):
  1. Two views of each image (Sec. 3 "On contextual discrepancies across views", Sec. 5.1.2), both with
     simple resized crop (SRC, DeiT III: resize the short side, RandomCrop with 4 px reflect padding,
     flip), drawn independently per view:
       v  ("weak")   SRC only;
       v' ("strong") SRC + ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 + 3-augment (exactly one of grayscale,
                     solarize, Gaussian blur; DeiT III).
  2. MAE branch on v (Eq. 1; re-stated here from He et al. 2022): per-sample random masking keeps
     K = int(N (1 - r)) patches (r = 0.75); the online encoder f sees only those; the decoder g (8 blocks,
     512 wide, 16 heads) reconstructs all patches; the loss is the MSE to per-patch normalised pixels
     (norm-pix), averaged over the masked patches only:
        L_mim = sum_i m_i mean_j (g(f(v_vis))_ij - xhat_ij)^2 / sum_i m_i,
        xhat = (x - mean(x)) / sqrt(var(x) + 1e-6)   per patch (unbiased var, as official MAE).
  3. Context branch (Eq. 2 with the choices of Sec. 3.0.2/3.0.3/3.0.5):
        q = h_pred(h(mean_{i visible} f(v_vis)_i))          online, pooled visible tokens (CLS excluded)
        k = sg[h~(mean_{i=1..N} f~(v')_i)]                  momentum encoder f~ + head h~ on the FULL v'
        L_bc = || q/|q| - k/|k| ||^2 = 2 - 2 cos(q, k)     ("normalised l2 distance, i.e. cosine distance")
     h, h~ and h_pred (online only, the asymmetry that prevents collapse, BYOL) are 2-layer MLPs D-4096-D
     (Linear-BN-ReLU-Linear, no biases).
  4. Total (Eq. 3):  L = L_mim + lambda L_bc,  lambda = 1.0 (ViT-S) / 0.25 (ViT-B) (Sec. 5.1.2).
  5. AdamW step on (f, g, h, h_pred); momentum update of (f~, h~): theta~ <- m theta~ + (1 - m) theta with
     m rising from 0.996 to 1 by a half cosine over the run (Sec. 5.1.2 "momentum decay rate 0.996").

Launch (paper setting, ViT-B/16, 1600 epochs, global batch 4096 = 8 GPUs x 128 x accum 4, Sec. 5.1.2):

    torchrun --nproc_per_node=8 lut.py --model vit_b16 --data /path/imagenet --epochs 1600 \\
        --warmup-epochs 40 --batch-size 4096 --accum-steps 4 --output-dir runs/lut_vitb16
    # ViT-S/16 (lambda = 1.0 chosen automatically): --model vit_s16
    # official two-sided variant and learning-rate rule: --symmetric --lr-scaling sqrt
    # Miniature (CPU, synthetic shapes), the budget of mae.py's `make repro` run plus small heads:
    #   python lut.py --model vit_t16 --img-size 32 --patch-size 8 --data synthetic:2000:500 --device cpu \\
    #       --num-workers 0 --epochs 20 --warmup-epochs 1 --batch-size 128 --blr 1.5e-3 --decoder-dim 128 \\
    #       --decoder-depth 2 --decoder-heads 4 --head-hidden-dim 512 --pred-hidden-dim 512 --momentum 0.99
    #   (--context-weight 0 --crop rrc turns this into plain MAE with MAE's augmentation)

Checkpoint (`OUTPUT_DIR/checkpoint-last.pth`, automatic resume): "model" = the online encoder f (the one the
paper fine-tunes), "model_ema" = the momentum encoder f~ (`eval_knn.py --ema`), heads, decoder, optimizer.

Deviations (paper default here; the flag named gives the official code's behaviour):
  * One-sided L_bc (Sec. 3, Fig. 2); official: both views masked, disjoint visible sets: `--symmetric`.
  * lr = blr * batch / 256 (MAE's protocol, Sec. 5.1.2); official blr * sqrt(batch) / 4: `--lr-scaling sqrt`.
  * AdamW betas (0.9, 0.95), no layer decay (MAE, official); the paper text's beta2: `--beta2 0.999`.
  * Momentum head BN: running statistics, as official (paper silent); BYOL's target BN: `--momentum-bn batch`.
  * The momentum reaches exactly 1.0 at the last step (official: just below 1; no flag).
  * cls_token and mask_token get no weight decay (official: decayed; no flag).
  * Head BN over the global batch under DDP (official SyncBN; common.sync_batchnorm, also on CPU/gloo).
  * Official-code bugs are not copied (the `--w_b`/`--w_bc` mismatch: here `--context-weight`).
In the CPU miniature LUT ends below MAE: MAE's reconstruction gradient vanishes and L_bc alone steers
the encoder (lab/lut_gradients.py measures it).
Official-code details (naver-ai/lut): docs/official_code.md; miniature findings: lab/findings.md.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Annotated, Callable, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from einops import rearrange

import common
from common import UserError


# ================================================================================================
# MAE branch (re-stated from mae.py / He et al. 2022 so that this file reads on its own)
# ================================================================================================
def random_masking(B: int, N: int, mask_ratio: float, device, symmetric: bool = False):
    """Per-sample random masking by argsort of uniform noise (MAE `random_masking`).

    Returns keep1 (B, K) long: visible patches of view 1 (ascending noise order); ids_restore (B, N):
    inverse permutation for the decoder; mask1 (B, N) float, 1 = masked (removed), 0 = visible;
    keep2 (B, K) or None: with `symmetric`, view 2's visible patches ids_shuffle[:, K:2K] (official
    models_lut.random_masking), disjoint from keep1 by construction. K = int(N (1 - mask_ratio)).
    """
    K = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, device=device)  # (B, N) in [0, 1): small = keep
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, N)
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    keep1 = ids_shuffle[:, :K]  # (B, K)
    mask1 = torch.ones(B, N, device=device)
    mask1[:, :K] = 0
    mask1 = torch.gather(mask1, 1, ids_restore)  # (B, N) back in patch order
    keep2 = ids_shuffle[:, K:2 * K] if symmetric else None  # (B, K)
    return keep1, ids_restore, mask1, keep2


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3) in MAE's order (row-major patches, pixels (p, q, c))."""
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def mae_loss(pred: torch.Tensor, imgs: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool):
    """Eq. (1) as MAE forward_loss: pred (B, N, p*p*3), imgs (B, 3, H, W), mask (B, N) 1 = masked.
    MSE per patch, averaged over the masked patches only."""
    target = patchify(imgs, patch_size).float()  # (B, N, p*p*3)
    if norm_pix:  # per-patch normalised pixels; torch's default unbiased var, as official MAE
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N)
    return (loss * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """MAE decoder (official names): decoder_embed D->d, mask_token, fixed sin-cos decoder_pos_embed,
    `depth` pre-norm blocks, decoder_norm, decoder_pred d->p*p*3."""

    def __init__(self, enc_dim: int, grid: int, patch_size: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.decoder_embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Parameter(common.sincos_pos_embed_2d(dim, grid, grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([common.Block(dim, heads) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, patch_size ** 2 * 3)
        for m in self.modules():  # MAE initialize_weights
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)  # (B, 1+K, d)
        B, N, d = x.shape[0], ids_restore.shape[1], x.shape[2]
        x_ = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(B, N - (x.shape[1] - 1), d)], dim=1)  # (B, N, d)
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, d))  # unshuffle to patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed  # (B, 1+N, d)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, p*p*3), CLS dropped


# ================================================================================================
# Context branch: heads, loss, the online model and its momentum copy (Sec. 3.0.2 - 3.0.5)
# ================================================================================================
def mlp_head(in_dim: int, hidden: int, out: int) -> nn.Sequential:
    """2-layer MLP of Sec. 5.1.1 / official _build_mlp(2, ...): Linear-BN-ReLU-Linear, no biases, no last BN.
    Xavier-uniform init (official: MAE's self.apply(_init_weights) covers the heads)."""
    head = nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out, bias=False))
    for m in head:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
    return head


def context_loss(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """L_bc (Sec. 3.0.5): squared distance of the L2-normalised vectors = 2 - 2 cos(q, k), batch mean.
    q (B, C) online prediction, k (B, C) momentum target (no gradient)."""
    q = F.normalize(q.float(), dim=-1)
    k = F.normalize(k.float(), dim=-1)
    return (2 - 2 * (q * k).sum(dim=-1)).mean()


def pooled(tokens: torch.Tensor) -> torch.Tensor:
    """Mean of the patch tokens after the final norm, CLS excluded (Table 4 "pooled visual tokens"). (B, 1+n, D) -> (B, D)"""
    return tokens[:, 1:].mean(dim=1)


class LUTOnline(nn.Module):
    """Everything trained by back-propagation: encoder f, decoder g, projector h, predictor h_pred."""

    def __init__(self, encoder: common.VisionTransformer, args: Args):
        super().__init__()
        out = args.head_out_dim or encoder.dim
        self.encoder = encoder
        self.decoder = MAEDecoder(encoder.dim, encoder.grid, encoder.patch_size, args.decoder_dim,
                                  args.decoder_depth, args.decoder_heads)
        self.head = mlp_head(encoder.dim, args.head_hidden_dim, out)
        self.predictor = mlp_head(out, args.pred_hidden_dim, out)
        self.norm_pix = args.norm_pix_loss

    def forward(self, x1, keep1, ids_restore, mask1, x2=None, keep2=None):
        """x1 (B, 3, H, W) the weak view with its mask; x2/keep2 only in the symmetric variant.
        Returns (L_mim, q1 (B, C), q2 (B, C) or None)."""
        z1 = self.encoder.forward_features(x1, keep_idx=keep1)  # (B, 1+K, D) visible tokens only
        loss_mim = mae_loss(self.decoder(z1, ids_restore), x1, mask1, self.encoder.patch_size, self.norm_pix)
        q1 = self.predictor(self.head(pooled(z1)))  # (B, C)
        q2 = None
        if x2 is not None:  # official: the strong view is masked too (disjoint visible set), no reconstruction
            z2 = self.encoder.forward_features(x2, keep_idx=keep2)  # (B, 1+K, D)
            q2 = self.predictor(self.head(pooled(z2)))  # separate BN call: per-view batch statistics (official)
        return loss_mim, q1, q2


class MomentumBranch(nn.Module):
    """Context encoder f~ and head h~ (Sec. 3.0.2): momentum copies, no predictor, full (unmasked) input."""

    def __init__(self, online: LUTOnline):
        super().__init__()
        self.encoder = copy.deepcopy(online.encoder)
        self.head = copy.deepcopy(online.head)
        for p in self.parameters():
            p.requires_grad_(False)
        for blk in self.encoder.blocks:  # targets are deterministic
            blk.drop_path = 0.0

    @torch.no_grad()
    def forward(self, x):  # (B, 3, H, W) -> (B, C)
        return self.head(pooled(self.encoder.forward_features(x)))  # all N patch tokens pooled


@torch.no_grad()
def momentum_update(momentum: MomentumBranch, online: LUTOnline, m: float):
    """theta~ <- m theta~ + (1 - m) theta for the momentum encoder and head: parameters and floating-point
    buffers (BN running mean/var; official ModelEma over the state dict). Nothing else is touched."""
    for part in ("encoder", "head"):
        src = getattr(online, part).state_dict()
        for name, t in getattr(momentum, part).state_dict().items():  # state_dict tensors share storage
            if t.is_floating_point():
                t.mul_(m).add_(src[name].to(t.dtype), alpha=1.0 - m)


def default_context_weight(dim: int) -> float:
    """lambda of Eq. (3): 1.0 for ViT-S (D 384) and smaller, 0.25 for ViT-B (D 768) and larger (Sec. 5.1.2)."""
    return 1.0 if dim <= 384 else 0.25


# ================================================================================================
# Data: two views, SRC geometry drawn per view; weak = geometry only, strong = + colour + 3-augment
# ================================================================================================
def lut_transform(args: Args) -> common.MultiView:
    """PIL image -> [weak (3, H, W), strong (3, H, W)] (Sec. 3.0.4, 5.1.2; official TwoGlobalViewAugmentation)."""
    size = args.img_size
    if args.crop == "src":  # DeiT III simple random crop: no scale/ratio jitter, views overlap heavily
        geometric = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
                               T.RandomCrop(size, padding=args.src_padding, padding_mode="reflect"),
                               T.RandomHorizontalFlip()])
        weak = T.Compose([geometric, common.normalize_transform()])
    else:
        geometric = T.Compose([T.RandomResizedCrop(size, scale=(args.rrc_min_scale, 1.0),
                                                   interpolation=T.InterpolationMode.BICUBIC),
                               T.RandomHorizontalFlip()])
        weak = common.mae_train_transform(size, scale=(args.rrc_min_scale, 1.0))
    photometric = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=args.jitter_p)]
    if args.three_augment:  # DeiT III 3-augment: exactly one of the three, each at p 1 (official RandomChoice)
        photometric.append(T.RandomChoice([T.RandomGrayscale(p=1.0), common.Solarize(1.0),
                                           common.GaussianBlur(1.0, size)]))
    strong = T.Compose([geometric, *photometric, common.normalize_transform()])
    return common.MultiView([weak, strong])


# ================================================================================================
# ALGO LOGIC: one training step (Sec. 3, Eq. 3)
# ================================================================================================
def forward_losses(model, momentum: MomentumBranch, weak, strong, num_patches: int, mask_ratio: float,
                   symmetric: bool):
    """One step's losses. Returns (L_mim, L_bc). `model` is LUTOnline (possibly DDP-wrapped)."""
    keep1, ids_restore, mask1, keep2 = random_masking(weak.shape[0], num_patches, mask_ratio, weak.device, symmetric)
    if symmetric:
        loss_mim, q1, q2 = model(weak, keep1, ids_restore, mask1, strong, keep2)
        k1, k2 = momentum(weak), momentum(strong)  # both full views (official ema=True forward)
        loss_bc = 0.5 * (context_loss(q1, k2) + context_loss(q2, k1))  # cross-view pairs only
    else:
        loss_mim, q1, _ = model(weak, keep1, ids_restore, mask1)
        loss_bc = context_loss(q1, momentum(strong))  # masked weak view -> full strong view (Eq. 2)
    return loss_mim, loss_bc


@dataclass
class TrainState:
    """What a step, an epoch and a checkpoint touch."""
    model: nn.Module  # `online` as the step runs it: DDP-wrapped or plain
    online: LUTOnline  # f, g, h, h_pred: trained by back-propagation
    momentum: MomentumBranch  # f~, h~: momentum copies (momentum_update)
    opt: torch.optim.Optimizer  # AdamW over `online`


def train_step(state: TrainState, weak: torch.Tensor, strong: torch.Tensor, *, weight: float, sync: bool, m: float,
               step: int, args: Args):
    """One micro-batch of LUT: MIM and context (momentum-branch) losses of Eq. (3) with context weight `weight`
    (lambda), backward of loss / accum_steps; on the last micro-batch of an update (`sync`) the AdamW step and the
    momentum update with coefficient m (Sec. 5.1.2). weak, strong (n, 3, S, S). Returns (loss, loss_mim, loss_bc)."""
    model = state.model
    no_sync = not sync and isinstance(model, nn.parallel.DistributedDataParallel)
    with model.no_sync() if no_sync else contextlib.nullcontext():
        with common.autocast(weak.device):
            loss_mim, loss_bc = forward_losses(model, state.momentum, weak, strong, state.online.encoder.num_patches,
                                               args.mask_ratio, args.symmetric)
        loss = args.mae_weight * loss_mim + weight * loss_bc  # Eq. (3)
        common.check_finite(loss, step, args.output_dir)
        (loss / args.accum_steps).backward()
    if sync:
        state.opt.step()
        state.opt.zero_grad(set_to_none=True)
        momentum_update(state.momentum, state.online, m)
    return loss, loss_mim, loss_bc


# ================================================================================================
# Flags (each field: its paper default and source)
# ================================================================================================
@dataclass
class Args(common.Flags):
    # ---------------------------------------------------------------- common flags
    model: str = "vit_b16"
    """encoder architecture (common.VIT_CONFIGS); paper: vit_s16 / vit_b16 / vit_l16 (Table 1)"""
    img_size: common.PosInt = 224
    """training crop size in pixels; paper 224 (Sec. 5.1.2)"""
    patch_size: Optional[common.PosInt] = None
    """patch size in pixels; none = the model's own (16, Sec. 5.1.1)"""
    data: str = "data/imagenet"
    """ImageFolder root (ROOT/train), a flat image folder, or synthetic[:N_TRAIN[:N_VAL]] (synthetic.py); paper ImageNet-1K"""
    output_dir: str = "runs/lut"
    """where checkpoint-last.pth, log.jsonl, args.json and TensorBoard logs go; rerunning the same command
    resumes"""
    epochs: common.PosInt = 1600
    """pre-training epochs; paper 1600 (Sec. 5.1.2; ablations 400, Sec. 6.1)"""
    warmup_epochs: common.NonNegInt = 40
    """linear lr warmup epochs; paper 40 (Sec. 5.1.2)"""
    batch_size: common.PosInt = 4096
    """GLOBAL batch size (all processes and accumulation steps); paper 4096 (Sec. 5.1.2)"""
    accum_steps: common.PosInt = 1
    """gradient accumulation steps (head BN then sees only the micro-batch; a warning is printed);
    official ViT-B command: 4"""
    blr: common.PosFloat = 1.5e-4
    """base lr: lr = blr * batch_size / 256 (MAE protocol, Sec. 5.1.2) or blr * sqrt(batch_size) / 4
    (--lr-scaling sqrt, official); 1.5e-4 (official PRETRAIN.md, MAE)"""
    lr: Optional[common.PosFloat] = None
    """absolute peak lr; none -> from --blr and --lr-scaling"""
    min_lr: common.NonNegFloat = 0.0
    """final lr of the cosine schedule; MAE/official 0"""
    weight_decay: common.NonNegFloat = 0.05
    """AdamW weight decay; paper 0.05 (MAE protocol, official)"""
    num_workers: common.NonNegInt = 10
    """DataLoader worker processes per rank"""
    seed: int = 0
    """random seed (reseeded per epoch and rank via common.epoch_seed, so a resumed run is exact)"""
    grad_checkpointing: Literal["auto", "on", "off"] = "auto"
    """activation checkpointing of the online encoder: auto (on CUDA: as many blocks as the measured memory plan
    needs, printed before step 1; off on CPU), on (every block) or off (docs/memory.md)"""
    plan: Optional[str] = None
    """GPUSxGB, e.g. 4x80: print the memory plan of this run on that many GPUs of that size and exit (reads no
    data and no initial checkpoint: one training step on fake tensors)"""
    compile: bool = False
    """torch.compile the encoders' forward_features"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (CUDA if visible), 'cpu' or 'cuda'"""
    # ---------------------------------------------------------------- MAE branch (Eq. 1)
    mask_ratio: common.OpenUnit = 0.75
    """fraction of patches removed from the online encoder's input; paper 0.75 (Sec. 5.1.2)"""
    norm_pix_loss: bool = True
    """reconstruct per-patch normalised pixels (MAE; official PRETRAIN.md --norm_pix_loss)"""
    decoder_dim: common.PosInt = 512
    """decoder width; paper 512 (MAE 8-block decoder, Sec. 5.1.1; official dec512d8b)"""
    decoder_depth: common.PosInt = 8
    """decoder blocks; paper 8 (Sec. 5.1.1)"""
    decoder_heads: common.PosInt = 16
    """decoder attention heads; official 16"""
    mae_weight: common.NonNegFloat = 1.0
    """weight of L_mim in Eq. (3); official --w_mae 1.0"""
    # ---------------------------------------------------------------- context branch (Eq. 2)
    context_weight: Optional[common.NonNegFloat] = None
    """lambda of Eq. (3); none -> 1.0 for ViT-S and smaller, 0.25 for ViT-B and larger (Sec. 5.1.2;
    0.25 also for L, as the official ViT-B command)"""
    head_hidden_dim: common.PosInt = 4096
    """hidden width of the projector h / h~; paper 4096 (Sec. 5.1.1)"""
    head_out_dim: Optional[common.PosInt] = None
    """output width of h / h~ and the predictor; none = the encoder width D (official)"""
    pred_hidden_dim: common.PosInt = 4096
    """hidden width of the online-only predictor; paper 4096 (Sec. 5.1.1)"""
    momentum: common.Prob = 0.996
    """initial momentum of f~ / h~; paper 0.996 (Sec. 5.1.2)"""
    momentum_final: common.Prob = 1.0
    """final momentum (half-cosine schedule); official 1.0"""
    symmetric: bool = False
    """official two-sided formulation (both views masked with disjoint visible sets, loss both ways,
    reconstruction of the weak view only); default: the paper's one-sided description"""
    sync_bn: bool = True
    """BatchNorm statistics of the heads over the global batch under DDP (official SyncBatchNorm; on CPU/gloo
    common.GatheredBatchNorm1d, the same maths); --no-sync-bn: each process normalises its own batch"""
    momentum_bn: Literal["running", "batch"] = "running"
    """BatchNorm of the momentum head h~: running (official: the momentum model stays in eval mode and its BN
    normalises with running statistics EMA'd from the online head's) or batch (BYOL, which Sec. 5.1.1
    follows for the heads: the statistics of the current batch of full views); the paper does not say"""
    # ---------------------------------------------------------------- augmentation (Sec. 3.0.4, 5.1.2)
    crop: Literal["src", "rrc"] = "src"
    """geometric augmentation of both views: src (simple resized crop, DeiT III; paper) or rrc
    (RandomResizedCrop, MAE; paper Table 4 ablation)"""
    src_padding: common.NonNegInt = 4
    """SRC: reflect padding of the random crop in pixels (DeiT III / official 4)"""
    rrc_min_scale: common.PosUnit = 0.2
    """--crop rrc: minimum crop area fraction (MAE 0.2)"""
    jitter_p: common.Prob = 0.8
    """strong view: probability of ColorJitter(0.4, 0.4, 0.2, 0.1) (official 0.8)"""
    three_augment: bool = True
    """strong view: apply exactly one of grayscale / solarize / blur (DeiT III 3-augment, Sec. 5.1.2)"""
    # ---------------------------------------------------------------- optimiser details
    lr_scaling: Literal["linear", "sqrt"] = "linear"
    """linear: lr = blr * batch / 256 (MAE protocol, paper); sqrt: lr = blr * sqrt(batch) / 4 (official)"""
    beta2: Annotated[float, common.Range(0, 1, hi_open=True)] = 0.95
    """AdamW beta2; MAE/official 0.95 (the paper's text lists 0.999, the fine-tuning value)"""
    log_every: common.PosInt = 20
    """log train/* metrics to log.jsonl/TensorBoard every this many optimizer steps"""
    exit_after_epochs: Optional[common.PosInt] = None
    """testing: stop after this many completed epochs (all stages counted), as if the run was killed; rerun to
    resume"""
    knn_every: common.NonNegInt = 0
    """k-NN monitor every N epochs (eval_knn.KnnMonitor: top-1 at k=20, T=0.07, DINO's vote, on the encoder saved as
    "model"); 0 = off. The LUT paper reports no k-NN."""
    knn_data: Optional[str] = None
    """labelled data for the monitor: ROOT with ROOT/train/<class>/ and ROOT/val/<class>/, or synthetic[:N[:M]];
    None -> --data when it has labelled train/ and val/ splits, else the monitor is off (one-line note)"""
    knn_subset: common.PosUnit = 0.1
    """fraction of the k-NN data's train split used as the monitor's bank, drawn with --seed (official MIM-Refiner
    / MAE-CT monitors: a 10% ImageNet subset); the whole val split is queried"""
    save_every: common.NonNegInt = 100
    """keep OUTPUT_DIR/checkpoint-epochNNN.pth ("model" + "encoder_config" only, NNN = epochs done) every N
    epochs; 0 = none. checkpoint-last.pth stays the full resumable state. Official: every 100 epochs (ModelSaver every_100_epochs)."""
    save_minutes: Optional[common.NonNegFloat] = None
    """also write checkpoint-last.pth inside an epoch every M minutes, at an update boundary (a resume continues
    exactly there); None -> 30 on CUDA (stretched so that a save costs at most 1 % of the run), off on the CPU;
    0 = at epoch ends only. SIGTERM/SIGUSR1/SIGINT save and stop at the next boundary (docs/scale.md)"""


# ================================================================================================
# The memory plan (--plan, --grad-checkpointing auto)
# ================================================================================================
def n_blocks(args: Args) -> int:
    """Blocks the memory plan may checkpoint: every encoder block."""
    return common.VIT_CONFIGS[args.model][1]


def memory_plan(args: Args, gpus: int, capacity, mode: str):
    """memplan.plan_memory (optional neighbour memplan.py) for LUT (online branch with decoder and head,
    momentum branch) at the per-GPU batch."""
    import memplan
    n = common.per_rank_batch(args.batch_size, args.accum_steps, gpus)

    def build(k):
        encoder = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size)
        weight = args.context_weight if args.context_weight is not None else default_context_weight(encoder.dim)
        online = LUTOnline(encoder, args)
        momentum = MomentumBranch(online).eval()
        online.encoder.grad_checkpointing = k
        opt = common.make_adamw(common.param_groups(online.named_parameters(), args.weight_decay), 1.0,
                                betas=(0.9, args.beta2))
        weak, strong = torch.randn(n, 3, args.img_size, args.img_size), torch.randn(n, 3, args.img_size, args.img_size)
        state = TrainState(online, online, momentum, opt)
        step = lambda: train_step(state, weak, strong, weight=weight, sync=True, m=args.momentum,  # noqa: E731
                                  step=0, args=args)
        return [online, momentum], [opt], step, list(encoder.blocks)

    what = f"LUT {args.model}, {n} images x 2 views per GPU"
    return memplan.plan_memory(build, what, n_blocks(args), gpus, capacity, mode, False, False,
                              "the head BatchNorm normalises per micro-batch")


# ================================================================================================
# Training loop: flags, one epoch, the epoch-end checkpoint, main
# ================================================================================================
def load_lut_state(online: LUTOnline, momentum: MomentumBranch, state: dict, dist_info):
    """A checkpoint's model entries (written by save_state) into the online model and the momentum branch; h~'s
    BN statistics of this rank when the checkpoint has them for this number of processes."""
    online.encoder.load_state_dict(state["model"])
    online.decoder.load_state_dict(state["decoder"])
    online.head.load_state_dict(state["head"])
    online.predictor.load_state_dict(state["predictor"])
    momentum.encoder.load_state_dict(state["model_ema"])
    momentum.head.load_state_dict(state["head_ema"])
    per_rank = state.get("head_ema_buffers_per_rank") or []
    if len(per_rank) == dist_info.world_size:
        momentum.head.load_state_dict({**momentum.head.state_dict(), **per_rank[dist_info.rank]})


def validate(args: Args):
    """Flag combinations that cannot work, as one-line errors (before any heavy work); each flag's own range
    is declared on its Args field (checked by common.Flags)."""
    if args.symmetric and args.mask_ratio < 0.5:
        raise UserError(f"--symmetric needs --mask-ratio >= 0.5 (two disjoint visible sets), got {args.mask_ratio}")
    if args.decoder_dim % args.decoder_heads or args.decoder_dim % 4:
        raise UserError(f"--decoder-dim {args.decoder_dim} must be a multiple of 4 and of --decoder-heads {args.decoder_heads}")


def peak_lr(args: Args) -> tuple[float, str]:
    """The peak learning rate from --lr or --blr and the global batch, and how it was derived (for the log)."""
    if args.lr is not None:
        return args.lr, "--lr"
    if args.lr_scaling == "linear":  # MAE's linear rule (global batch)
        return args.blr * args.batch_size / 256, f"blr {args.blr:.3e} x {args.batch_size}/256"
    # official main_lut.py
    return args.blr * math.sqrt(args.batch_size) / 4, f"blr {args.blr:.3e} x sqrt({args.batch_size})/4"


@dataclass
class Run:
    """The run: what its epochs share (ranks, log, run control, data, batch, schedules)."""
    dist_info: common.DistInfo  # ranks and the device
    log: common.Logger  # log.jsonl, TensorBoard, rank-0 printing
    ctl: longrun.RunControl | common.EpochEndSaves  # common.run_control: saves and stops at update boundaries
    dataset: torch.utils.data.Dataset  # (weak, strong) view pairs
    micro: int  # per-rank micro-batch: batch_size / (accum_steps x processes)
    steps_per_epoch: int  # optimizer updates per epoch
    total_steps: int  # optimizer updates of the run
    lr_schedule: Callable[[int], float]  # global optimizer step -> lr (warmup + cosine)
    momentum_schedule: Callable[[int], float]  # global optimizer step -> momentum coefficient m
    weight: float  # lambda of Eq. (3), the context loss's weight
    rms_start: float  # the initial encoder weights' RMS, the divergence check's reference (save_checkpoint)


def train_one_epoch(state: TrainState, run: Run, epoch: int, step: int, *, position: Optional[dict],
                    args: Args) -> int:
    """One epoch of run.steps_per_epoch updates of accum_steps micro-batches of run.micro image pairs each: lr
    and momentum coefficient from the schedules at the global optimizer step, train_step per micro-batch, the
    rank-mean losses logged every --log-every updates and for the epoch; after each update the run control decides
    whether to save (save_state) and stop. `position`: the mid-epoch checkpoint's resume point inside this epoch,
    or None. `step` counts the optimizer steps done before this epoch (or before
    `position`); returns the count after it."""
    dist_info, log, micro, steps_per_epoch = run.dist_info, run.log, run.micro, run.steps_per_epoch
    device = dist_info.device
    start = common.epoch_start(args.seed, epoch, dist_info, position, log)
    sums = dict(position["sums"]) if start else {"loss": 0.0, "mim": 0.0, "context": 0.0, "micro": 0}
    loader = common.build_loader(run.dataset, micro, dist_info, shuffle=True, drop_last=True,
                                 num_workers=args.num_workers, seed=args.seed, epoch=epoch,
                                 skip=start * args.accum_steps * micro)
    state.model.train()
    state.momentum.eval()  # official: the momentum model is never in train mode (BN uses its running statistics)
    if args.momentum_bn == "batch":
        state.momentum.head.train()  # BYOL: target BN with this batch's statistics (no dropout/drop-path anywhere in it)
    t0, it_acc = time.time(), 0
    bar = common.progress(range(start * args.accum_steps, steps_per_epoch * args.accum_steps), dist_info,
                          desc=f"epoch {epoch}")
    it = iter(loader)
    for micro_step in bar:
        (weak, strong), _ = next(it)
        weak, strong = weak.to(device, non_blocking=True), strong.to(device, non_blocking=True)  # (n, 3, S, S)
        last = (micro_step + 1) % args.accum_steps == 0
        if it_acc == 0:
            cur_lr = run.lr_schedule(step)
            common.set_lr(state.opt, cur_lr)
        m = run.momentum_schedule(step)
        loss, loss_mim, loss_bc = train_step(state, weak, strong, weight=run.weight, sync=last, m=m, step=step,
                                             args=args)
        for k, v in zip(("loss", "mim", "context"), (loss, loss_mim, loss_bc)):
            sums[k] += float(common.all_reduce_mean(v.detach()))
        sums["micro"] += 1
        it_acc += 1
        if not last:
            continue
        it_acc = 0
        step += 1
        n = sums["micro"]
        if dist_info.is_main:
            ips = (micro_step + 1 - start * args.accum_steps) * micro * dist_info.world_size / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{sums['loss'] / n:.4f}", mim=f"{sums['mim'] / n:.4f}",
                            bc=f"{sums['context'] / n:.4f}", lr=f"{cur_lr:.2e}", img_s=f"{ips:.0f}")
        if step % args.log_every == 0 or step == run.total_steps:
            log.log({"train/loss": sums["loss"] / n, "train/loss_mim": sums["mim"] / n,
                     "train/loss_context": sums["context"] / n, "train/lr": cur_lr, "train/momentum": m,
                     "train/epoch": epoch + (micro_step + 1) / (steps_per_epoch * args.accum_steps)}, step)
        update = (micro_step + 1) // args.accum_steps
        save, stop = run.ctl.at_update(update, steps_per_epoch)  # one all-reduce: a stop signal anywhere, the timer
        if save:
            with run.ctl.saving(epoch, update, steps_per_epoch):
                save_state(state, run, epoch, update, step, position=run.ctl.position(update, sums), args=args)
        if stop:
            run.ctl.stop(f"at epoch {epoch} step {update}")

    ep = [sums[k] / max(sums["micro"], 1) for k in ("loss", "mim", "context")]
    log.log({"train/epoch_loss": ep[0], "train/epoch_loss_mim": ep[1], "train/epoch_loss_context": ep[2],
             "train/epoch_time_s": time.time() - t0, "epoch": epoch + 1}, step)
    log.print(f"epoch {epoch + 1}/{args.epochs}: loss {ep[0]:.4f} (mim {ep[1]:.4f}, context {ep[2]:.4f}) "
              f"({time.time() - t0:.1f}s)")
    return step


def save_state(state: TrainState, run: Run, epoch: int, update: int, step: int, *, position: Optional[dict],
               args: Args):
    """OUTPUT_DIR/checkpoint-last.pth (rank 0 writes) after `update` updates of `epoch`: both branches, the
    optimizer, the counters; at the epoch's end (update == run.steps_per_epoch) first the kept epoch file when
    due, inside it `position` (what the exact resume needs, longrun.RunControl.position)."""
    online, momentum, dist_info = state.online, state.momentum, run.dist_info
    done = update == run.steps_per_epoch
    if done:  # before checkpoint-last: a run killed between the two redoes the epoch and rewrites both
        common.save_kept(args.save_every, args.output_dir, dist_info, epoch + 1,
                         common.encoder_state_dict(online.encoder), online.encoder.config(), model_is_ema=False)
    # h~'s BN statistics are copied from each rank's online head after its own batch: they differ by rank unless
    # --sync-bn (the default) runs, and h~ normalises with them (--momentum-bn running), so each rank's are kept
    head_ema_per_rank = common.gather_per_rank(dist_info, {k: v.cpu() for k, v in momentum.head.state_dict().items()
                                                           if not v.is_floating_point() or "running" in k})
    if dist_info.is_main:
        common.save_checkpoint(common.checkpoint_path(args.output_dir), {
            "model": common.encoder_state_dict(online.encoder),
            "encoder_config": online.encoder.config(),
            "model_is_ema": False,
            "model_ema": common.encoder_state_dict(momentum.encoder),
            "decoder": online.decoder.state_dict(),
            "head": online.head.state_dict(),
            "predictor": online.predictor.state_dict(),
            "head_ema": momentum.head.state_dict(),
            "head_ema_buffers_per_rank": head_ema_per_rank,
            "optimizer": state.opt.state_dict(),
            "epoch": epoch + done,
            "step": step,
            "resume": None if done else position,
            "weights_rms_start": run.rms_start,
            "args": dataclasses.asdict(args),
        }, weights_rms_start=run.rms_start)


def main(args: Args):
    validate(args)
    if args.plan is not None:  # no data: the step on fake tensors
        common.plan_run(args, torch.device("cpu"), 1, n_blocks(args), functools.partial(memory_plan, args))
        return
    dist_info = common.init_distributed(args.device)
    device, world = dist_info.device, dist_info.world_size
    checkpointed, _ = common.plan_run(args, device, world, n_blocks(args), functools.partial(memory_plan, args))
    micro = common.per_rank_batch(args.batch_size, args.accum_steps, world)
    if micro < 2 and not (dist_info.enabled and args.sync_bn):
        raise UserError(f"--batch-size {args.batch_size} gives {micro} image per process and step; the heads' "
                        f"BatchNorm needs at least 2: raise --batch-size")
    lr, rule = peak_lr(args)
    min_lr = min(args.min_lr, lr)

    # ---------------------------------------------------------------- model
    common.seed_everything(args.seed)  # identical initial weights on every rank
    encoder = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size)
    weight = args.context_weight if args.context_weight is not None else default_context_weight(encoder.dim)
    if int(encoder.num_patches * (1 - args.mask_ratio)) < 1:
        raise UserError(f"--mask-ratio {args.mask_ratio} leaves no visible patch of {encoder.num_patches}; lower it")
    online = LUTOnline(encoder, args)
    if args.sync_bn:  # the heads' BN over the global batch (official SyncBatchNorm); one process: unchanged
        online = common.sync_batchnorm(online, device)
    momentum = MomentumBranch(online)  # f~, h~ start as exact copies (official deepcopy)
    online.to(device)
    momentum.to(device)
    online.encoder.grad_checkpointing = checkpointed

    groups = common.param_groups(online.named_parameters(), args.weight_decay)
    opt = common.make_adamw(groups, lr, betas=(0.9, args.beta2))

    # ---------------------------------------------------------------- resume
    start_epoch, step, position, rms_start = 0, 0, None, None
    resume_ckpt = common.load_resume_state(args.output_dir)
    if resume_ckpt is not None:
        common.check_resume_args(resume_ckpt, args, args.output_dir, shape=(
            "decoder_dim", "decoder_depth", "decoder_heads", "head_hidden_dim", "head_out_dim", "pred_hidden_dim"),
            state_keys=("model", "decoder", "head", "predictor", "model_ema", "head_ema", "optimizer", "epoch", "step"))
        load_lut_state(online, momentum, resume_ckpt, dist_info)
        opt.load_state_dict(resume_ckpt["optimizer"])
        start_epoch, step = resume_ckpt["epoch"], resume_ckpt["step"]
        position, rms_start = resume_ckpt.get("resume"), resume_ckpt.get("weights_rms_start")  # inside epoch start_epoch, or None
    resume_ckpt = None  # loaded into the modules: no second copy on the host for the whole run
    if rms_start is None:
        rms_start = common.weights_rms(online.encoder.state_dict())  # the divergence check's reference

    log = common.Logger(args.output_dir, args, dist_info,
                        extra={"effective_lr": lr, "micro_batch": micro, "effective_context_weight": weight})
    log.print(f"global batch {args.batch_size} = {micro} per rank x {args.accum_steps} accum x {world} processes; "
              f"peak lr {lr:.3e} ({rule}); context weight {weight}; "
              f"{'symmetric (official)' if args.symmetric else 'one-sided (paper)'} LUT, mask ratio {args.mask_ratio}")
    if args.accum_steps > 1:
        log.print("warning: --accum-steps > 1: the head BatchNorm normalises over micro-batches only, "
                  "which changes the dynamics compared with the full batch")
    if step:
        log.print(f"resumed from {common.checkpoint_path(args.output_dir)} at epoch {start_epoch}, step {step}")
    if start_epoch >= args.epochs:
        log.print(f"training already finished ({start_epoch}/{args.epochs} epochs); nothing to do")
        log.close()
        return

    if args.compile:  # the momentum encoder was copied before, so each compiled function is bound to its own encoder
        online.encoder.forward_features = torch.compile(online.encoder.forward_features)
        momentum.encoder.forward_features = torch.compile(momentum.encoder.forward_features)
    model = nn.parallel.DistributedDataParallel(online, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist_info.enabled else online

    # ---------------------------------------------------------------- data
    ds = common.build_dataset(args.data, "train", lut_transform(args), img_size=args.img_size, seed=args.seed)
    steps_per_epoch = len(ds) // world // micro // args.accum_steps  # optimizer steps
    if steps_per_epoch == 0:
        raise UserError(f"the dataset has {len(ds)} images, fewer than one global batch of {args.batch_size}; "
                        f"lower --batch-size")
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = steps_per_epoch * args.warmup_epochs

    # ---------------------------------------------------------------- train
    lr_schedule = functools.partial(common.cosine_schedule, total_steps=total_steps, base=lr, final=min_lr,
                                    warmup_steps=warmup_steps)
    # momentum coefficient (Sec. 5.1.2): 0.996 at the first optimizer step -> exactly 1 at the last one
    momentum_schedule = functools.partial(common.momentum_schedule, total_steps=max(total_steps - 1, 1),
                                          base=args.momentum, final=args.momentum_final)
    knn = common.knn_monitor(dist_info, log, every=args.knn_every, data=args.knn_data, train_data=args.data,
                             subset=args.knn_subset, img_size=args.img_size, batch_size=micro,
                             num_workers=args.num_workers, seed=args.seed)
    ctl = common.run_control(args.save_minutes, dist_info, log)
    train_state = TrainState(model, online, momentum, opt)
    run = Run(dist_info, log, ctl, ds, micro=micro, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              lr_schedule=lr_schedule, momentum_schedule=momentum_schedule, weight=weight, rms_start=rms_start)
    for epoch in range(start_epoch, args.epochs):
        step = train_one_epoch(train_state, run, epoch, step, args=args,
                               position=position if epoch == start_epoch else None)
        save_state(train_state, run, epoch, steps_per_epoch, step, position=None, args=args)
        knn(epoch + 1, online.encoder, step)
        ctl.epoch_done(epoch + 1)
        if args.exit_after_epochs is not None and epoch + 1 >= args.exit_after_epochs and epoch + 1 < args.epochs:
            log.print(f"--exit-after-epochs {args.exit_after_epochs}: stopping; rerun to resume")
            break
    else:  # the LUT paper evaluates by fine-tuning and linear probing (Sec. 4), not k-NN
        log.print("to evaluate as the paper: fine-tune (Table 1): " + common.paper_eval_command(
            args, "--recipe lut", "finetune.py"))
        log.print("  linear probe (MAE's recipe; the nearest here, MAE-CT's): "
                  + common.paper_eval_command(args, "--protocol maect", "eval_linear.py"))
        log.print("  k-NN with DINO's protocol: " + common.paper_eval_command(args))
    log.print(f"done: {common.checkpoint_path(args.output_dir)}")
    log.close()


if __name__ == "__main__":
    common.run_main(main, Args)
