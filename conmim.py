"""ConMIM: Masked Image Modeling with Denoising Contrast (Yi, Ge et al., ICLR 2023, arXiv:2205.09616).

Pure MIM without a tokenizer: the masked patches of a *corrupted* view are "looked up" in a dynamic
patch-level dictionary built from the *full* view of the same image by a slowly progressing
(momentum) copy of the network.

What one training step computes (paper Sec. 4, Algorithm 1 in App. A.2):
  1. Shared basic augmentation (RandomResizedCrop + flip, same parameters for both inputs so that
     patch positions stay aligned); the full input x additionally gets the strong photometric
     augmentation (colour jitter, grayscale, blur, solarize), the corrupted input only the basic one
     ("asymmetric image perturbations", Sec. 4 / Table 8).
  2. Corruption: a mask M (75% of the patches, masked in blocks of `--mask-block` x `--mask-block`
     patches, Table 11 "masking patch size") replaces the patch embeddings by a learned `mask_token`;
     all 1+N tokens go through the encoder (BEiT/SimMIM style, nothing is dropped).
  3. q = g(f(x_hat)) for the online encoder f and 3-layer projector g (MoCo v3 style, Sec. 4
     "Pre-training setup"); k = sg[g~(f~(x))] for the momentum encoder f~ / projector g~ on the full
     strongly augmented view ("asymmetric model progress rates").
  4. Denoising contrastive loss, Eq. (3), one dictionary per image (intra-image negatives only):

        L = E_{j in M} [ -log  exp(<q_j, k_j>/tau) / sum_{i=1..N} exp(<q_j, k_i>/tau) ]

     <.,.> cosine similarity, tau = 0.1 (Table 11 / Table 16). The expectation is over all masked
     positions of the (global) batch, as Algorithm 1's CrossEntropyLoss(sim[mask], labels[mask]).
  5. AdamW step on (f, g, mask_token); momentum update theta~ <- alpha theta~ + (1 - alpha) theta with
     alpha rising from 0.996 to 1 by a half cosine over all steps (Sec. 4, Table 11).

Launch (paper setting, ViT-B/16, 800 epochs, global batch 2048 = 16 GPUs x 128, Table 11):

    torchrun --nproc_per_node=8 --nnodes=2 ... conmim.py --model vit_b16 --data /path/imagenet \\
        --epochs 800 --batch-size 2048 --output-dir runs/conmim_vitb16
    # ViT-S/16 (Table 11): --model vit_s16 --epochs 300 --mask-block 1 --drop-path 0.1
    # ViT-L/16 (Table 11): --model vit_l16 --clip-grad 1.0
    # Tiny CPU run: python conmim.py --model vit_t16 --img-size 32 --patch-size 4 --data synthetic \\
    #     --epochs 2 --batch-size 64 --head-hidden-dim 256 --head-out-dim 64 --device cpu

Checkpoint (`OUTPUT_DIR/checkpoint-last.pth`, automatic resume): "model" = the online encoder f (trained by
back-propagation), "model_ema" = the momentum encoder f~ (`eval_knn.py --ema`), the projectors g, g~, the mask
tokens, optimizer. finetune.py fine-tunes "model_ema", as the official README does (its released
checkpoint_copy-799.pth is the teacher; Sec. 4 does not say which); `--encoder model` takes f.

Deviations (paper default here; the flag named gives the official TencentARC/ConMIM @4263955 behaviour):
  * Backbone: BEiT's shared relative position bias, no absolute positions (`--pos-embed rel`, paper and
    official); not copied: BEiT's layer scale, q/v-only qkv bias and init (no flag).
  * `--pos-embed abs` (sin-cos, as the other scripts) is NOT recommended: with absolute positions in both
    branches Eq. (3) has a positional shortcut (the positive is "the key at the same position").
  * With `rel`, all mask tokens enter identical, and while the bias table is zero every masked position has
    the same output, so the loss stays near log N until the table grows; `--rel-pos-lr-mult` (default 1,
    the paper) scales the table's lr.
  * Masking: `--mask-type grid --mask-block 2` = official random_mps32; official parser default:
    `--mask-type beit --mask-ratio 0.38`.
  * lr = blr * batch / 256, = Table 11's 5e-4 at batch 2048; official unscaled rule: `--lr 5e-4`.
  * Warmup 10 epochs, clipping 3.0 (Table 11); official parser defaults: `--warmup-epochs 5 --clip-grad none`.
  * Grayscale p 0.2 (official, SimCLR; not in Table 11's list): `--gray-p 0` for the list alone.
  * mask_token gets no weight decay (official: decayed; no flag).
  * Projector BN: SyncBN under DDP (MoCo v3); official per-GPU BN: `--no-sync-bn`.
  * Loss over the global batch's masked tokens under DDP (official: per-GPU mean; no flag).
Official-code details and derivations: docs/official_code.md; miniature findings: lab/findings.md.
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
import torchvision.transforms.functional as TF

import common
from common import UserError


# ================================================================================================
# Masking (paper Sec. 4 / Table 11; official masking_generator.py). Convention: True = masked.
# ================================================================================================
def grid_mask(grid: int, ratio: float, block: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random masking in units of `block` x `block` patches (official MaskGenerator, 'random_mps32'):
    ceil(cells * ratio) of the (grid/block)^2 cells are chosen uniformly without replacement and each
    is expanded to its block of patches. Returns (grid*grid,) bool in row-major patch order."""
    g = grid // block
    n_mask = int(math.ceil(g * g * ratio))
    cells = torch.zeros(g * g, dtype=torch.bool)
    cells[torch.randperm(g * g, generator=generator)[:n_mask]] = True
    m = cells.view(g, g).repeat_interleave(block, 0).repeat_interleave(block, 1)  # (grid, grid)
    return m.flatten()


def beit_block_mask(grid: int, num_masking: int, min_patches: int = 16, min_aspect: float = 0.3,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """BEiT block-wise masking (BEiT Alg. 1, masking_generator.MaskingGenerator): add random rectangles
    of area U[min_patches, remaining] and log-uniform aspect in [min_aspect, 1/min_aspect] until
    `num_masking` patches are masked (at most; it stops when 10 attempts add nothing).
    Returns (grid*grid,) bool."""
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    log_lo, log_hi = math.log(min_aspect), math.log(1 / min_aspect)

    def rand(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    def add_block(max_patches):
        for _ in range(10):
            area = rand(min_patches, max_patches)
            aspect = math.exp(rand(log_lo, log_hi))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top = int(torch.randint(0, grid - h + 1, (), generator=generator))
                left = int(torch.randint(0, grid - w + 1, (), generator=generator))
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= max_patches:
                    mask[top:top + h, left:left + w] = True
                    return new
        return 0

    count = 0
    while count < num_masking:
        delta = add_block(num_masking - count)
        if delta == 0:
            break
        count += delta
    return mask.flatten()


class MaskGenerator:
    """Draws one mask per image from the global torch RNG (reseeded every epoch; in DataLoader workers
    the per-worker seed is a function of the loader's generator), so resumed runs draw the same masks."""

    def __init__(self, args: Args, grid: int):
        self.args, self.grid = args, grid

    def __call__(self) -> torch.Tensor:  # (N,) bool
        a = self.args
        if a.mask_type == "grid":
            return grid_mask(self.grid, a.mask_ratio, a.mask_block)
        return beit_block_mask(self.grid, int(round(a.mask_ratio * self.grid ** 2)), a.beit_min_patches,
                               a.beit_min_aspect)


# ================================================================================================
# Model: online encoder f + mask token + projector g; the momentum copy (f~, g~) is a deepcopy.
# ================================================================================================
class Projector(nn.Module):
    """3-layer MoCo v3 projection head (Sec. 4 "following MoCo v3"; official `projectors`), applied to
    every token: Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN(affine=False), no Linear biases."""

    def __init__(self, dim: int, hidden: int, out: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, out, bias=False), nn.BatchNorm1d(out, affine=False))
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # official: BEiT trunc_normal(std 0.02) truncated at +-1 std
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)

    def forward(self, x):  # (B, T, D) -> (B, T, out); BN statistics over all B*T tokens
        B, T_, D = x.shape
        return self.mlp(x.reshape(B * T_, D)).view(B, T_, -1)


class ConMIMBranch(nn.Module):
    """f and g (and the mask token used to corrupt f's input). forward -> projected patch tokens."""

    def __init__(self, encoder: common.VisionTransformer, head: Projector):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # official (BEiT) init

    def forward(self, x, mask=None):
        """x (B, 3, H, W); mask (B, N) bool or None (full input). Returns (B, N, C)."""
        z = self.encoder.forward_features(x, mask=mask, mask_token=None if mask is None else self.mask_token)  # (B, 1+N, D)
        return self.head(z)[:, 1:]  # projector on all tokens (official), CLS dropped -> (B, N, C)


def momentum_copy(online: ConMIMBranch) -> ConMIMBranch:
    """f~, g~: an exact copy of f, g and the mask token (Algorithm 1), updated only by common.ema_update."""
    teacher = copy.deepcopy(online)
    for p in teacher.parameters():
        p.requires_grad_(False)
    for blk in teacher.encoder.blocks:  # the momentum model computes targets: no stochastic depth
        blk.drop_path = 0.0
    return teacher


def conmim_loss(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, temperature: float):
    """Eq. (3) summed over masked positions. q (B, N, C) online on the corrupted input, k (B, N, C)
    momentum on the full input (no gradient), mask (B, N) bool. Each masked query q_j is classified
    among the N keys of ITS OWN image (intra-image dictionary, Sec. 4 / Table 7) with target j.
    Returns (sum of the per-token losses, number of masked tokens)."""
    B, N, _ = q.shape
    q = F.normalize(q.float(), dim=-1)
    k = F.normalize(k.float(), dim=-1)
    logits = torch.einsum("bic,bjc->bij", q, k) / temperature  # (B, N, N): query i vs key j, same image
    target = torch.arange(N, device=q.device).expand(B, N)  # positive = the key at the same position
    # CE of every position, kept where masked: the same sum as CE(logits[mask], target[mask]) without a
    # data-dependent shape, so the step also runs on fake tensors (--plan)
    ce = F.cross_entropy(logits.flatten(0, 1), target.reshape(-1), reduction="none")  # (B*N,)
    return (ce * mask.reshape(-1)).sum(), mask.sum()


# ================================================================================================
# Data: shared crop/flip, weak (basic) input for the corrupted branch, strong input for the keys
# ================================================================================================
class ConMIMTransform:
    """PIL image -> (x_weak (3,H,W), x_strong (3,H,W), mask (N,) bool). Sec. 4 'Asymmetric image
    perturbations': the same flip/resize/crop for both inputs (patch positions stay aligned); colour
    distortion, blur and solarization for the full input only."""

    def __init__(self, args: Args, grid: int):
        self.size, self.scale = args.img_size, (args.crop_min_scale, 1.0)
        self.strong = T.Compose([
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=args.jitter_p),  # Table 11
            T.RandomGrayscale(p=args.gray_p),
            common.GaussianBlur(args.blur_p, args.img_size),
            common.Solarize(args.solarize_p),
        ])
        self.normalize = common.normalize_transform()
        self.masks = MaskGenerator(args, grid)

    def __call__(self, img):
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.scale, (3 / 4, 4 / 3))
        img = TF.resized_crop(img, i, j, h, w, [self.size, self.size], interpolation=T.InterpolationMode.BICUBIC)
        if torch.rand(()) < 0.5:
            img = TF.hflip(img)
        return self.normalize(img), self.normalize(self.strong(img)), self.masks()


# ================================================================================================
# Export: the BEiT-layout encoder for timm
# ================================================================================================
def timm_beit_state_dict(sd: dict) -> dict:
    """Our `--pos-embed rel` encoder state dict -> timm `Beit(use_abs_pos_emb=False, use_shared_rel_pos_bias=True,
    init_values=None, global_pool="token", num_classes=0)` (strict load). Only the qkv bias changes layout: BEiT
    has q_bias and v_bias and no key bias; dropping the key bias is exact, because q . b_k is the same for
    every key of a query and cancels in the softmax. Tested against timm in tests/test_conmim.py."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias"):
            d = v.shape[0] // 3
            out[k[:-len("qkv.bias")] + "q_bias"], out[k[:-len("qkv.bias")] + "v_bias"] = v[:d], v[2 * d:]
        else:
            out[k] = v
    return out


# ================================================================================================
# ALGO LOGIC: one training step (Sec. 4, Algorithm 1)
# ================================================================================================
def rel_pos_absmax(encoder) -> float:
    """Largest |entry| of the shared relative position bias table (0 with --pos-embed abs): how far the only
    symmetry breaker between mask tokens has grown (logged)."""
    rpb = encoder.rel_pos_bias
    return 0.0 if rpb is None else float(rpb.relative_position_bias_table.detach().abs().max())


def forward_loss(online, teacher, weak, strong, mask, temperature):
    """Returns (loss_sum over this rank's masked tokens, masked count). Algorithm 1."""
    with torch.no_grad():
        k = teacher(strong)  # (B, N, C) keys of the full, strongly augmented view (asymmetric progress)
    q = online(weak, mask)  # (B, N, C) predictions for the corrupted, weakly augmented view
    return conmim_loss(q, k, mask, temperature)


@dataclass
class TrainState:
    """What a step, an epoch and a checkpoint touch."""
    model: nn.Module  # `online` as the step runs it: DDP-wrapped or plain
    online: ConMIMBranch  # f, g and the mask token: trained by back-propagation
    teacher: ConMIMBranch  # f~, g~: the momentum copy (common.ema_update)
    opt: torch.optim.Optimizer  # AdamW over `online`


def train_step(state: TrainState, weak: torch.Tensor, strong: torch.Tensor, mask: torch.Tensor, *, world: int,
               sync: bool, m: float, step: int, args: Args):
    """One micro-batch of ConMIM (Algorithm 1): dense contrastive loss of the corrupted weak view against the
    momentum model's full strong view (Sec. 4, asymmetric image perturbations), backward of loss / accum_steps; on the
    last micro-batch of an update (`sync`) gradient clipping, the AdamW step and the momentum update with
    coefficient m (Sec. 4, parameters only).
    weak, strong (n, 3, S, S); mask (n, N) bool; `world` processes. Returns (loss, grad norm or None)."""
    model, online, teacher = state.model, state.online, state.teacher
    no_sync = not sync and isinstance(model, nn.parallel.DistributedDataParallel)
    with model.no_sync() if no_sync else contextlib.nullcontext():
        with common.autocast(weak.device):
            loss_sum, n_masked = forward_loss(model, teacher, weak, strong, mask, args.temperature)
        # mean over the masked tokens of the GLOBAL micro-batch: sum / (global count / world), so that
        # DDP's gradient averaging gives the single-process gradient (module docstring)
        n_global = common.all_reduce_mean(n_masked.float()) * world if world > 1 else n_masked.float()
        loss = loss_sum * world / n_global.clamp(min=1)
        common.check_finite(loss, step, args.output_dir)
        (loss / args.accum_steps).backward()
    if not sync:
        return loss, None
    grad_norm = torch.nn.utils.clip_grad_norm_(online.parameters(), args.clip_grad if args.clip_grad else float("inf"))
    state.opt.step()
    state.opt.zero_grad(set_to_none=True)
    common.ema_update(teacher, online, m, copy_buffers=False)  # official: parameters only
    return loss, grad_norm


# ================================================================================================
# Flags (each field: its paper default and source)
# ================================================================================================
@dataclass
class Args(common.Flags):
    # ---------------------------------------------------------------- common flags
    model: str = "vit_b16"
    """encoder architecture (common.VIT_CONFIGS); paper: vit_s16 / vit_b16 / vit_l16 (Table 11)"""
    img_size: common.PosInt = 224
    """training crop size in pixels; paper 224 (Table 11)"""
    patch_size: Optional[common.PosInt] = None
    """patch size in pixels; none = the model's own (16, Table 11)"""
    data: str = "data/imagenet"
    """ImageFolder root (ROOT/train), a flat image folder, or synthetic[:N_TRAIN[:N_VAL]] (synthetic.py); paper ImageNet-1K"""
    output_dir: str = "runs/conmim"
    """where checkpoint-last.pth, log.jsonl, args.json and TensorBoard logs go; rerunning the same command
    resumes"""
    epochs: common.PosInt = 800
    """pre-training epochs; paper 300 (S) / 800 (B, L) (Table 11)"""
    warmup_epochs: common.NonNegInt = 10
    """linear lr warmup epochs; paper 10 (Table 11; official parser default 5)"""
    batch_size: common.PosInt = 2048
    """GLOBAL batch size (all processes and accumulation steps); paper 2048 (Table 11)"""
    accum_steps: common.PosInt = 1
    """gradient accumulation steps (projector BN then sees only the micro-batch; a warning is printed)"""
    blr: common.PosFloat = 6.25e-5
    """base lr per 256 images: lr = blr * batch_size / 256 = 5e-4 at the paper's batch 2048 (Table 11)"""
    lr: Optional[common.PosFloat] = None
    """absolute peak lr; none -> blr * batch_size / 256. The official code uses --lr 5e-4 unscaled"""
    min_lr: common.NonNegFloat = 1e-5
    """final lr of the cosine schedule; paper 1e-5 (Table 11); clipped to the peak lr"""
    weight_decay: common.NonNegFloat = 0.05
    """AdamW weight decay; paper 0.05 (Table 11)"""
    num_workers: common.NonNegInt = 8
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
    # ---------------------------------------------------------------- ConMIM
    pos_embed: Literal["rel", "abs"] = "rel"
    """rel: BEiT's shared relative position bias, no absolute position embedding (the paper's backbone; blocks
    Eq. (3)'s positional shortcut, see the docstring); abs: the shared fixed sin-cos ViT (official MAE/timm
    layout, loads into timm's VisionTransformer)"""
    mask_type: Literal["grid", "beit"] = "grid"
    """grid: random masking in units of mask_block x mask_block patches (paper Sec. 4 + Table 11 = official
    random_mps32); beit: BEiT block-wise masking (official parser default 'block')"""
    mask_ratio: common.OpenUnit = 0.75
    """fraction of patches (grid: of mask_block cells, rounded up) replaced by the mask token; paper 0.75
    (Sec. 4, Table 15)"""
    mask_block: common.PosInt = 2
    """grid masking cell size in patches: Table 11 masking patch size 32 px / patch 16 px = 2 for ViT-B/L,
    16/16 = 1 for ViT-S"""
    beit_min_patches: common.PosInt = 16
    """beit masking: minimum patches per block (BEiT: 16 at a 14x14 grid)"""
    beit_min_aspect: common.PosUnit = 0.3
    """beit masking: block aspect ratio in [a, 1/a] (BEiT: 0.3)"""
    crop_min_scale: common.PosUnit = 0.08
    """RandomResizedCrop minimum area fraction, shared by both inputs; official/BEiT (0.08, 1)"""
    jitter_p: common.Prob = 0.8
    """strong (full-image) view: probability of ColorJitter(0.4, 0.4, 0.2, 0.1) (Table 11; official p 0.8)"""
    gray_p: common.Prob = 0.2
    """strong view: grayscale probability (official code; SimCLR colour distortion cited in Sec. 4)"""
    blur_p: common.Prob = 0.1
    """strong view: Gaussian blur probability (Table 11 'GaussianBlur(0.1)')"""
    solarize_p: common.Prob = 0.2
    """strong view: solarization probability (Table 11 'Solarization(0.2)')"""
    temperature: common.PosFloat = 0.1
    """tau of Eq. (3); paper 0.1 (Table 11, Table 16)"""
    momentum: common.Prob = 0.996
    """initial momentum coefficient alpha; paper 0.996 (Table 11, Table 17)"""
    momentum_final: common.Prob = 1.0
    """final momentum coefficient (cosine schedule); paper 1 (Table 11)"""
    head_hidden_dim: common.PosInt = 4096
    """projector hidden width (MoCo v3 head: D-4096-4096-256; official code)"""
    head_out_dim: common.PosInt = 256
    """projector output width (MoCo v3 / official code: 256)"""
    drop_path: Annotated[float, common.Range(0, 1, hi_open=True)] = 0.0
    """stochastic depth of the online encoder; paper 0.1 (S), none (B, L) (Table 11)"""
    rel_pos_lr_mult: common.PosFloat = 1.0
    """lr multiplier of the shared relative position bias table (--pos-embed rel); paper 1 (one lr for all,
    Table 11). The table is the only thing that can tell the identical mask tokens apart (docstring), and
    Adam moves it by about lr per step: a 300-step miniature needs a larger multiplier"""
    clip_grad: Optional[common.PosFloat] = 3.0
    """max gradient norm; paper 3 (S, B), 1 (L) (Table 11); none disables (official default)"""
    sync_bn: bool = True
    """BatchNorm statistics of the projectors over the global batch under DDP (MoCo v3's SyncBatchNorm; on
    CPU/gloo common.GatheredBatchNorm1d, the same maths); --no-sync-bn = official per-GPU BN"""
    log_every: common.PosInt = 20
    """log train/* metrics to log.jsonl/TensorBoard every this many optimizer steps"""
    exit_after_epochs: Optional[common.PosInt] = None
    """testing: stop after this many completed epochs (all stages counted), as if the run was killed; rerun to
    resume"""
    knn_every: common.NonNegInt = 0
    """k-NN monitor every N epochs (eval_knn.KnnMonitor: top-1 at k=20, T=0.07, DINO's vote, on the encoder saved as
    "model"); 0 = off. The ConMIM paper reports no k-NN."""
    knn_data: Optional[str] = None
    """labelled data for the monitor: ROOT with ROOT/train/<class>/ and ROOT/val/<class>/, or synthetic[:N[:M]];
    None -> --data when it has labelled train/ and val/ splits, else the monitor is off (one-line note)"""
    knn_subset: common.PosUnit = 0.1
    """fraction of the k-NN data's train split used as the monitor's bank, drawn with --seed (official MIM-Refiner
    / MAE-CT monitors: a 10% ImageNet subset); the whole val split is queried"""
    save_every: common.NonNegInt = 20
    """keep OUTPUT_DIR/checkpoint-epochNNN.pth ("model" + "encoder_config" only, NNN = epochs done) every N
    epochs; 0 = none. checkpoint-last.pth stays the full resumable state. Official README run: every 20 epochs."""
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
    """memplan.plan_memory (optional neighbour memplan.py) for ConMIM (online branch with its projector,
    momentum branch) at the per-GPU batch."""
    import memplan
    n = common.per_rank_batch(args.batch_size, args.accum_steps, gpus)

    def build(k):
        encoder = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size,
                                    drop_path_rate=args.drop_path, rel_pos_bias=args.pos_embed == "rel")
        trunc_normal = nn.init.trunc_normal_  # its data-dependent range check cannot run on fake tensors, and
        nn.init.trunc_normal_ = lambda t, *a, **kw: t  # the values do not change the memory
        try:
            online = ConMIMBranch(encoder, Projector(encoder.dim, args.head_hidden_dim, args.head_out_dim))
        finally:
            nn.init.trunc_normal_ = trunc_normal
        teacher = momentum_copy(online)
        online.encoder.grad_checkpointing = k
        opt = common.make_adamw(build_param_groups(online, args), 1.0, betas=(0.9, 0.98))
        x = torch.randn(n, 3, args.img_size, args.img_size)
        mask = torch.zeros(n, encoder.num_patches, dtype=torch.bool)
        mask[:, :int(args.mask_ratio * encoder.num_patches)] = True  # the masked count is all the step depends on
        state = TrainState(online, online, teacher, opt)
        step = lambda: train_step(state, x, x.clone(), mask, world=1, sync=True, m=0.996, step=0,  # noqa: E731
                                  args=args)
        return [online, teacher], [opt], step, list(encoder.blocks)

    what = f"ConMIM {args.model}, {n} images x 2 views per GPU"
    return memplan.plan_memory(build, what, n_blocks(args), gpus, capacity, mode, False, False,
                              "the projector BatchNorm normalises per micro-batch")


# ================================================================================================
# Training loop: flags, one epoch, the epoch-end checkpoint, main
# ================================================================================================
def validate(args: Args):
    """Flag combinations that cannot work, as one-line errors (before any heavy work); each flag's own range
    is declared on its Args field (checked by common.Flags)."""
    if args.pos_embed == "abs" and args.rel_pos_lr_mult != 1.0:
        raise UserError("--rel-pos-lr-mult applies to the relative position bias; drop it or use --pos-embed rel")


def build_param_groups(online: ConMIMBranch, args: Args) -> list[dict]:
    """common.param_groups, with the shared relative position bias table in groups of its own that scale the lr
    by --rel-pos-lr-mult (no such groups with --pos-embed abs)."""
    is_table = lambda n: n.endswith("relative_position_bias_table")  # noqa: E731
    groups = common.param_groups([(n, p) for n, p in online.named_parameters() if not is_table(n)], args.weight_decay)
    groups += common.param_groups([(n, p) for n, p in online.named_parameters() if is_table(n)], args.weight_decay,
                                  lr_scale=args.rel_pos_lr_mult, tag="rel_pos_")
    return groups


def load_conmim_state(online: ConMIMBranch, teacher: ConMIMBranch, state: dict, args: Args):
    """Resume: check the checkpoint's flags against args, then load both branches (encoder, projector, mask
    token) from a checkpoint written by save_state."""
    common.check_resume_args(state, args, args.output_dir, shape=("pos_embed", "head_hidden_dim", "head_out_dim"),
                             state_keys=("model", "model_ema", "head", "head_ema", "optimizer", "epoch", "step"))
    was_rel = state.get("encoder_config", {}).get("rel_pos_bias", False)
    if was_rel != (args.pos_embed == "rel"):
        raise UserError(f"{common.checkpoint_path(args.output_dir)} was trained with --pos-embed "
                        f"{'rel' if was_rel else 'abs'}; resume with that flag or use another --output-dir")
    online.encoder.load_state_dict(state["model"])
    teacher.encoder.load_state_dict(state["model_ema"])
    online.head.load_state_dict(state["head"])
    teacher.head.load_state_dict(state["head_ema"])
    with torch.no_grad():
        online.mask_token.copy_(state["mask_token"])
        teacher.mask_token.copy_(state["mask_token_ema"])


@dataclass
class Run:
    """The run: what its epochs share (ranks, log, run control, data, batch, schedules)."""
    dist_info: common.DistInfo  # ranks and the device
    log: common.Logger  # log.jsonl, TensorBoard, rank-0 printing
    ctl: longrun.RunControl | common.EpochEndSaves  # common.run_control: saves and stops at update boundaries
    dataset: torch.utils.data.Dataset  # (weak, strong, mask) triples
    micro: int  # per-rank micro-batch: batch_size / (accum_steps x processes)
    steps_per_epoch: int  # optimizer updates per epoch
    total_steps: int  # optimizer updates of the run
    lr_schedule: Callable[[int], float]  # global optimizer step -> lr (warmup + cosine)
    momentum_schedule: Callable[[int], float]  # global optimizer step -> momentum coefficient alpha
    rms_start: float  # the initial encoder weights' RMS, the divergence check's reference (save_checkpoint)


def train_one_epoch(state: TrainState, run: Run, epoch: int, step: int, *, position: Optional[dict],
                    args: Args) -> int:
    """One epoch of run.steps_per_epoch updates of accum_steps micro-batches of run.micro (weak, strong, mask)
    triples each: lr and momentum coefficient from the schedules at the global optimizer step, train_step per
    micro-batch, the rank-mean loss logged every --log-every updates and for the epoch; after each update the run
    control decides whether to save (save_state) and stop. `position`: the mid-epoch checkpoint's resume point
    inside this epoch, or None. `step` counts the optimizer steps done before this epoch
    (or before `position`); returns the count after it."""
    dist_info, log, micro, steps_per_epoch = run.dist_info, run.log, run.micro, run.steps_per_epoch
    device = dist_info.device
    start = common.epoch_start(args.seed, epoch, dist_info, position, log)
    sums = dict(position["sums"]) if start else {"loss": 0.0, "micro": 0}
    loader = common.build_loader(run.dataset, micro, dist_info, shuffle=True, drop_last=True,
                                 num_workers=args.num_workers, seed=args.seed, epoch=epoch,
                                 skip=start * args.accum_steps * micro)
    state.model.train()
    state.teacher.train()  # official: the momentum model's projector BN uses batch statistics
    t0, it_acc = time.time(), 0
    bar = common.progress(range(start * args.accum_steps, steps_per_epoch * args.accum_steps), dist_info,
                          desc=f"epoch {epoch}")
    it = iter(loader)
    for micro_step in bar:
        (weak, strong, mask), _ = next(it)
        weak, strong = weak.to(device, non_blocking=True), strong.to(device, non_blocking=True)  # (n, 3, S, S)
        mask = mask.to(device, non_blocking=True)  # (n, N) bool
        last = (micro_step + 1) % args.accum_steps == 0
        if it_acc == 0:
            cur_lr = run.lr_schedule(step)
            common.set_lr(state.opt, cur_lr)
        m = run.momentum_schedule(step)
        loss, grad_norm = train_step(state, weak, strong, mask, world=dist_info.world_size, sync=last, m=m, step=step,
                                     args=args)
        sums["loss"] += float(common.all_reduce_mean(loss.detach()))
        sums["micro"] += 1
        it_acc += 1
        if not last:
            continue
        it_acc = 0
        step += 1
        ep_loss = sums["loss"] / sums["micro"]
        if dist_info.is_main:
            ips = (micro_step + 1 - start * args.accum_steps) * micro * dist_info.world_size / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{ep_loss:.4f}", lr=f"{cur_lr:.2e}", img_s=f"{ips:.0f}")
        if step % args.log_every == 0 or step == run.total_steps:
            log.log({"train/loss": ep_loss, "train/lr": cur_lr, "train/momentum": m,
                     "train/grad_norm": float(grad_norm), "train/masked_frac": float(mask.float().mean()),
                     "train/rel_pos_bias_absmax": rel_pos_absmax(state.online.encoder),
                     "train/epoch": epoch + (micro_step + 1) / (steps_per_epoch * args.accum_steps)}, step)
        update = (micro_step + 1) // args.accum_steps
        save, stop = run.ctl.at_update(update, steps_per_epoch)  # one all-reduce: a stop signal anywhere, the timer
        if save:
            with run.ctl.saving(epoch, update, steps_per_epoch):
                save_state(state, run, epoch, update, step, position=run.ctl.position(update, sums), args=args)
        if stop:
            run.ctl.stop(f"at epoch {epoch} step {update}")

    ep_loss = sums["loss"] / max(sums["micro"], 1)
    log.log({"train/epoch_loss": ep_loss, "train/epoch_time_s": time.time() - t0, "epoch": epoch + 1}, step)
    log.print(f"epoch {epoch + 1}/{args.epochs}: loss {ep_loss:.4f} ({time.time() - t0:.1f}s)")
    return step


def save_state(state: TrainState, run: Run, epoch: int, update: int, step: int, *, position: Optional[dict],
               args: Args):
    """OUTPUT_DIR/checkpoint-last.pth (rank 0 writes) after `update` updates of `epoch`: both branches, the
    optimizer, the counters; at the epoch's end (update == run.steps_per_epoch) first the kept epoch file when
    due, inside it `position` (what the exact resume needs, longrun.RunControl.position)."""
    online, teacher = state.online, state.teacher
    done = update == run.steps_per_epoch
    if done:  # before checkpoint-last: a run killed between the two redoes the epoch and rewrites both
        common.save_kept(args.save_every, args.output_dir, run.dist_info, epoch + 1,
                         common.encoder_state_dict(online.encoder), online.encoder.config(), model_is_ema=False)
    if run.dist_info.is_main:
        common.save_checkpoint(common.checkpoint_path(args.output_dir), {
            "model": common.encoder_state_dict(online.encoder),
            "encoder_config": online.encoder.config(),
            "model_is_ema": False,
            "model_ema": common.encoder_state_dict(teacher.encoder),
            "head": online.head.state_dict(),
            "head_ema": teacher.head.state_dict(),
            "mask_token": online.mask_token.detach().cpu(),
            "mask_token_ema": teacher.mask_token.detach().cpu(),
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
    lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256  # linear scaling (see docstring)
    min_lr = min(args.min_lr, lr)

    # ---------------------------------------------------------------- model
    common.seed_everything(args.seed)  # identical initial weights on every rank
    encoder = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size,
                                drop_path_rate=args.drop_path, rel_pos_bias=args.pos_embed == "rel")
    grid = encoder.grid
    if args.mask_type == "grid" and grid % args.mask_block:
        raise UserError(f"--mask-block {args.mask_block} does not divide the {grid}x{grid} patch grid; "
                        f"choose a divisor of {grid}")
    if args.mask_type == "beit" and args.beit_min_patches > args.mask_ratio * grid * grid:
        raise UserError(f"--beit-min-patches {args.beit_min_patches} exceeds the {args.mask_ratio} x {grid * grid} "
                        f"patches to mask; lower it")
    online = ConMIMBranch(encoder, Projector(encoder.dim, args.head_hidden_dim, args.head_out_dim))
    teacher = momentum_copy(online)
    if args.sync_bn:  # the projectors' BN over the global batch (MoCo v3 SyncBN); one process: unchanged
        online, teacher = common.sync_batchnorm(online, device), common.sync_batchnorm(teacher, device)
    online.to(device)
    teacher.to(device)
    online.encoder.grad_checkpointing = checkpointed

    opt = common.make_adamw(build_param_groups(online, args), lr, betas=(0.9, 0.98))  # Table 11 betas, eps 1e-8

    # ---------------------------------------------------------------- resume
    start_epoch, step, position, rms_start = 0, 0, None, None
    resume_ckpt = common.load_resume_state(args.output_dir)
    if resume_ckpt is not None:
        load_conmim_state(online, teacher, resume_ckpt, args)
        opt.load_state_dict(resume_ckpt["optimizer"])
        start_epoch, step = resume_ckpt["epoch"], resume_ckpt["step"]
        position, rms_start = resume_ckpt.get("resume"), resume_ckpt.get("weights_rms_start")  # inside epoch start_epoch, or None
    resume_ckpt = None  # loaded into the modules: no second copy on the host for the whole run
    if rms_start is None:
        rms_start = common.weights_rms(online.encoder.state_dict())  # the divergence check's reference

    log = common.Logger(args.output_dir, args, dist_info, extra={"effective_lr": lr, "micro_batch": micro})
    log.print(f"global batch {args.batch_size} = {micro} per rank x {args.accum_steps} accum x {world} processes; "
              f"peak lr {lr:.3e} ({'--lr' if args.lr is not None else f'blr {args.blr:.3e} x {args.batch_size}/256'}), "
              f"min lr {min_lr:.3e}; masking {args.mask_type} {args.mask_ratio:.2f} on a {grid}x{grid} grid")
    if args.accum_steps > 1:
        log.print("warning: --accum-steps > 1: the projector BatchNorm normalises over micro-batches only, "
                  "which changes the dynamics compared with the full batch")
    if step:
        log.print(f"resumed from {common.checkpoint_path(args.output_dir)} at epoch {start_epoch}, step {step}")
    if start_epoch >= args.epochs:
        log.print(f"training already finished ({start_epoch}/{args.epochs} epochs); nothing to do")
        log.close()
        return

    if args.compile:  # teacher was copied before, so each compiled function is bound to its own encoder
        online.encoder.forward_features = torch.compile(online.encoder.forward_features)
        teacher.encoder.forward_features = torch.compile(teacher.encoder.forward_features)
    model = nn.parallel.DistributedDataParallel(online, device_ids=[device.index] if device.type == "cuda" else None) \
        if dist_info.enabled else online

    # ---------------------------------------------------------------- data
    ds = common.build_dataset(args.data, "train", ConMIMTransform(args, grid), img_size=args.img_size, seed=args.seed)
    steps_per_epoch = len(ds) // world // micro // args.accum_steps  # optimizer steps
    if steps_per_epoch == 0:
        raise UserError(f"the dataset has {len(ds)} images, fewer than one global batch of {args.batch_size}; "
                        f"lower --batch-size")
    total_steps = steps_per_epoch * args.epochs
    warmup_steps = steps_per_epoch * args.warmup_epochs

    # ---------------------------------------------------------------- train
    lr_schedule = functools.partial(common.cosine_schedule, total_steps=total_steps, base=lr, final=min_lr,
                                    warmup_steps=warmup_steps)
    # momentum coefficient (Sec. 4): theta~ <- m theta~ + (1 - m) theta, m: cosine 0.996 -> 1 over all steps
    momentum_schedule = functools.partial(common.momentum_schedule, total_steps=total_steps, base=args.momentum,
                                          final=args.momentum_final)
    knn = common.knn_monitor(dist_info, log, every=args.knn_every, data=args.knn_data, train_data=args.data,
                             subset=args.knn_subset, img_size=args.img_size, batch_size=micro,
                             num_workers=args.num_workers, seed=args.seed)
    ctl = common.run_control(args.save_minutes, dist_info, log)
    train_state = TrainState(model, online, teacher, opt)
    run = Run(dist_info, log, ctl, ds, micro=micro, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
              lr_schedule=lr_schedule, momentum_schedule=momentum_schedule, rms_start=rms_start)
    for epoch in range(start_epoch, args.epochs):
        step = train_one_epoch(train_state, run, epoch, step, args=args,
                               position=position if epoch == start_epoch else None)
        save_state(train_state, run, epoch, steps_per_epoch, step, position=None, args=args)
        knn(epoch + 1, online.encoder, step)
        ctl.epoch_done(epoch + 1)
        if args.exit_after_epochs is not None and epoch + 1 >= args.exit_after_epochs and epoch + 1 < args.epochs:
            log.print(f"--exit-after-epochs {args.exit_after_epochs}: stopping; rerun to resume")
            log.close()
            return
    # the ConMIM paper evaluates by fine-tuning (Sec. 4), not k-NN
    log.print("to evaluate as the paper: fine-tune (Tables 1-3; the momentum teacher 'model_ema', as the official "
              "README): " + common.paper_eval_command(args, "--recipe conmim", "finetune.py"))
    log.print("  k-NN with DINO's protocol: " + common.paper_eval_command(args))
    log.print(f"done: {common.checkpoint_path(args.output_dir)}")
    log.close()


if __name__ == "__main__":
    common.run_main(main, Args)
