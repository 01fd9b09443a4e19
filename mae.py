"""MAE: masked autoencoder pre-training of a ViT.

Paper: He, Chen, Xie, Li, Dollar, Girshick, "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022, arXiv:2111.06377 (Sec. 3 "Approach", Sec. 4 + Appendix A.1 "pre-training setting",
Table 1 ablations). Official code: github.com/facebookresearch/mae (models_mae.py,
engine_pretrain.py, main_pretrain.py, util/lr_sched.py).

Method (Sec. 3), for an image x cut into N patches of p x p pixels:
  masking      noise ~ U[0,1)^N per sample; ids_shuffle = argsort(noise); keep the len_keep =
               int(N (1 - r)) patches with the smallest noise (r = 0.75, Sec. 4.1 / Fig. 5);
               ids_restore = argsort(ids_shuffle); mask m in {0,1}^N, 1 = removed       ("Masking")
  encoder      z = ViT(patch_embed(x_i) + pos_i for the visible i only, with [CLS])      ("MAE encoder")
  decoder      u = decoder_embed(z); the N - len_keep mask tokens are appended after the visible
               patch tokens, un-shuffled with ids_restore, [CLS] prepended, the decoder's own fixed
               sin-cos positions added, 8 blocks of width 512 (16 heads), LN, Linear -> p*p*3
               pixel values per patch (Table 1a/1b defaults)                               ("MAE decoder")
  target       t_i = patchify(x)_i in (p, q, c) order; with normalised pixels (Table 1d)
               t_i <- (t_i - mean(t_i)) / sqrt(var_unbiased(t_i) + 1e-6)                ("Reconstruction target")
  loss         L = sum_i m_i ||y_i - t_i||^2 / (p*p*3) / sum_i m_i, the mean over ALL masked
               patches of the (per-rank) batch; the visible patches and [CLS] get no loss.
Optimisation (App. A.1, Table 8): AdamW(0.9, 0.95), weight decay 0.05, lr = blr * global_batch / 256
with blr 1.5e-4, global batch 4096, 40 warmup epochs then half-cosine (per iteration), 800 epochs
(ablations; 1600 for the released models), augmentation RandomResizedCrop(scale 0.2-1) + flip.

Launch (paper setting, ViT-L/16, ImageNet-1K, 8 GPUs x 64 images x 8 accumulation = 4096):
  torchrun --standalone --nproc_per_node=8 mae.py --model vit_l16 --data /path/to/imagenet \
      --batch-size 4096 --accum-steps 8 --epochs 800 --output-dir runs/mae_l16
  (ViT-B/16: --model vit_b16; ViT-H/14: --model vit_h14; the memory plan checkpoints as many blocks as needed
  and switches to --fsdp, which shards parameters, gradients and AdamW states over the processes with PyTorch
  FSDP2 and still writes the plain checkpoint below, when DDP cannot fit; --plan GPUSxGB prints the plan.)
  Rerun the same command to resume from OUTPUT_DIR/checkpoint-last.pth.
Tiny CPU run (the `make demo` / `make repro` configuration of miniature/mini_repro.py; its numbers are in
results/README.md):
  python mae.py --model vit_t16 --img-size 32 --patch-size 8 --data synthetic:2000:500 \
      --device cpu --num-workers 0 --epochs 20 --warmup-epochs 1 --batch-size 128 --blr 1.5e-3 \
      --decoder-dim 128 --decoder-depth 2 --decoder-heads 4 --vis-images 0 --output-dir runs/mae
  python eval_knn.py --checkpoint runs/mae/checkpoint-last.pth --data synthetic:2000:500 --device cpu \
      --model vit_t16 --img-size 32 --patch-size 8 --blocks all

Checkpoint (OUTPUT_DIR/checkpoint-last.pth, every epoch): "model" = the encoder alone (timm names,
loads strictly into timm's VisionTransformer(num_classes=0) and into any script's --init),
"decoder" = mask_token, decoder_embed, decoder_pos_embed, decoder_blocks, decoder_norm, decoder_pred
(official key names: merging "model" and "decoder" gives an official *_full.pth state dict), plus
"optimizer", "epoch", "step", "args". Each epoch also writes OUTPUT_DIR/recon_epochEEE.png (original /
masked / reconstruction / visible patches pasted back; norm-pix predictions are de-normalised with the TRUE
patch's mean/std, mae#174).

Deviations (none changes the method; the flag named gives the official behaviour):
  * No weight decay on cls_token/mask_token (common practice); official decays them: `--token-weight-decay`.
  * Accumulation: DDP no_sync() on non-final micro-steps; an epoch's incomplete last group is skipped (no flag).
  * bf16 autocast on CUDA without a grad scaler (official: fp16 + GradScaler, mae#65; no flag); fp32 loss.
  * A checkpoint every epoch (official: every 20) with bit-identical resume; masks from a per-rank epoch seed.
Official-code details: docs/official_code.md.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torchvision.utils
from einops import rearrange

import common
from common import UserError


# ==============================================================================================
# Masking and patch layout (Sec. 3 "Masking"; official random_masking / patchify)
# ==============================================================================================
def random_masking(batch: int, num_patches: int, mask_ratio: float, device, noise: Optional[torch.Tensor] = None):
    """Per-sample random subset of the patches (uniform without replacement via argsort of noise).

    Returns ids_keep (B, len_keep) long: the visible patch indices in shuffled order;
            ids_restore (B, N) long: position of each patch in [visible..., masked...] (un-shuffle);
            mask (B, N) float: 0 = visible, 1 = removed (official convention).
    """
    len_keep = int(num_patches * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device)  # (B, N) in [0, 1)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, len_keep)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, N), back in patch order
    return ids_keep, ids_restore, mask


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches row-major, each vector in (p, q, c) order (official nchpwq->nhwpqc)."""
    return rearrange(imgs, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x: torch.Tensor, p: int, channels: int = 3) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); the inverse of patchify for a square grid."""
    h = math.isqrt(x.shape[1])
    return rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, p=p, q=p, c=channels)


def patch_targets(imgs: torch.Tensor, p: int, norm_pix: bool):
    """Targets t (B, N, p*p*C) and each patch's (mean, std) (B, N, 1) used for the normalisation
    (Sec. 3 'Reconstruction target': per-patch mean/std, official unbiased var + 1e-6)."""
    target = patchify(imgs, p).float()
    if not norm_pix:
        return target, None, None
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5  # torch.var is unbiased, as official
    return (target - mean) / std, mean, std


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """Sec. 3 'Reconstruction target' (official forward_loss): per-patch MSE, averaged over the masked
    patches of the whole batch. imgs (B, 3, H, W), pred (B, N, p*p*3), mask (B, N) with 1 = removed."""
    target, _, _ = patch_targets(imgs, p, norm_pix)
    loss = ((pred.float() - target) ** 2).mean(dim=-1)  # (B, N) mean over the p*p*3 values
    return (loss * mask).sum() / mask.sum()  # only removed patches count


# ==============================================================================================
# Decoder (Sec. 3 "MAE decoder"; official MaskedAutoencoderViT.forward_decoder)
# ==============================================================================================
class MaeDecoder(nn.Module):
    """Lightweight decoder. Parameter names are the official ones (mask_token, decoder_embed,
    decoder_pos_embed, decoder_blocks.*, decoder_norm, decoder_pred), so an official *_full.pth decoder
    loads into it and ours merges into an official state dict."""

    def __init__(self, enc_dim: int, grid: int, patch_size: int, dim: int = 512, depth: int = 8, num_heads: int = 16,
                 in_chans: int = 3, mlp_ratio: float = 4.0, grad_checkpointing: int = 0):
        super().__init__()
        if isinstance(grad_checkpointing, bool):  # a block count: True would silently mean 1
            raise TypeError("grad_checkpointing is a number of blocks, not a bool")
        self.grad_checkpointing = grad_checkpointing
        self.decoder_embed = nn.Linear(enc_dim, dim)  # encoder width -> decoder width
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # one shared learned vector (Sec. 3)
        # the decoder's own fixed 2-D sin-cos table with a zero CLS row, frozen (official)
        self.decoder_pos_embed = nn.Parameter(common.sincos_pos_embed_2d(dim, grid, grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList([common.Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, patch_size ** 2 * in_chans)  # pixels of one patch, (p, q, c) order
        self._init_weights()

    def _init_weights(self):  # official initialize_weights / _init_weights
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1+len_keep, D_enc) encoder output ([CLS] first); ids_restore (B, N).
        Returns the predicted pixels of every patch, (B, N, p*p*3)."""
        x = self.decoder_embed(latent)  # (B, 1+n, d)
        B, N = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(B, N - (x.shape[1] - 1), -1)  # (B, N-n, d)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # (B, N, d): [visible (shuffled order), masked]
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # un-shuffle, (B, N, d)
        x = torch.cat([x[:, :1], x_], dim=1)  # prepend [CLS], (B, 1+N, d)
        x = x + self.decoder_pos_embed
        for i, blk in enumerate(self.decoder_blocks):
            if i < self.grad_checkpointing and torch.is_grad_enabled():  # the first k blocks
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # (B, 1+N, p*p*3)
        return x[:, 1:]  # the [CLS] prediction is discarded


class MaskedAutoencoder(nn.Module):
    """Encoder (common ViT, run on the visible patches only) + MaeDecoder. forward returns
    (loss, pred (B, N, p*p*3), mask (B, N))."""

    def __init__(self, encoder: common.VisionTransformer, decoder: MaeDecoder, mask_ratio: float, norm_pix: bool):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix

    def forward(self, imgs: torch.Tensor, noise: Optional[torch.Tensor] = None):
        B = imgs.shape[0]
        N = (imgs.shape[-2] // self.encoder.patch_size) * (imgs.shape[-1] // self.encoder.patch_size)
        ids_keep, ids_restore, mask = random_masking(B, N, self.mask_ratio, imgs.device, noise)
        latent = self.encoder.forward_features(imgs, keep_idx=ids_keep)  # (B, 1+len_keep, D), after the final LN
        pred = self.decoder(latent, ids_restore)  # (B, N, p*p*3)
        loss = mae_loss(imgs, pred, mask, self.encoder.patch_size, self.norm_pix)
        return loss, pred, mask


# ==============================================================================================
# ALGO LOGIC: one training step (Sec. 3)
# ==============================================================================================
@dataclass
class TrainState:
    """What a step, an epoch and a checkpoint touch."""
    ddp: nn.Module  # `model` as the step runs it: DDP-wrapped, FSDP-sharded or plain
    encoder: common.VisionTransformer  # saved as "model"
    decoder: MaeDecoder  # saved as "decoder"
    model: MaskedAutoencoder  # encoder + decoder, unwrapped (the figure, the optimizer's state dict)
    optimizer: torch.optim.Optimizer  # AdamW over encoder and decoder


def train_step(state: TrainState, imgs: torch.Tensor, *, sync: bool, step: int, args: Args) -> torch.Tensor:
    """One micro-batch of MAE (Sec. 3): random masking, encoder on the visible patches, decoder, per-patch pixel
    MSE on the masked patches (Eq. in Sec. 3, norm_pix_loss App. A.1), backward of loss / accum_steps; on the last
    micro-batch of an update (`sync`) the AdamW step. imgs (n, 3, H, W). Returns the loss (scalar)."""
    with common.grad_sync(state.ddp, sync):  # DDP no_sync / FSDP: no reduce-scatter until the last micro-step
        with common.autocast(imgs.device):
            loss, _, _ = state.ddp(imgs)
        common.check_finite(loss, step, args.output_dir)
        (loss / args.accum_steps).backward()  # gradients of the mean over the accumulated micro-batches
    if sync:
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
    return loss


# ==============================================================================================
# Flags: each field names its paper default and source (--help is the reference)
# ==============================================================================================
@dataclass
class Args(common.Flags):
    # ---- common flags ----
    model: str = "vit_l16"
    """encoder architecture (common.VIT_CONFIGS); the paper pre-trains vit_b16, vit_l16 (main ablations), vit_h14"""
    img_size: common.PosInt = 224
    """training crop size (paper: 224, App. A.1)"""
    patch_size: Optional[common.PosInt] = None
    """patch size p; None -> the model's own (16, or 14 for H/14)"""
    data: str = "data/imagenet"
    """ImageFolder root (ROOT/train), a flat folder of images (no labels needed), or synthetic[:N_TRAIN[:N_VAL]] (synthetic.py);
    paper: ImageNet-1K train"""
    output_dir: str = "runs/mae"
    """where checkpoint-last.pth, log.jsonl, args.json and TensorBoard logs go; rerunning the same command
    resumes"""
    epochs: common.NonNegInt = 800
    """pre-training epochs (paper: 800 for the Table 1 ablations, 1600 for the released models; official default 400)"""
    warmup_epochs: common.NonNegFloat = 40
    """linear lr warmup epochs, starting from lr 0 (App. A.1 Table 8: 40)"""
    batch_size: common.PosInt = 4096
    """GLOBAL batch = per-rank micro-batch x accum_steps x processes (App. A.1 Table 8: 4096)"""
    accum_steps: common.PosInt = 1
    """gradient accumulation micro-steps per optimizer step (official --accum_iter; safe for MAE: no BN, no negatives)"""
    blr: common.PosFloat = 1.5e-4
    """base learning rate; lr = blr * global_batch / 256 (App. A.1 Table 8: 1.5e-4; official argparse default 1e-3)"""
    lr: Optional[common.PosFloat] = None
    """absolute peak lr; None -> blr * batch_size / 256 (linear scaling rule, App. A.1)"""
    weight_decay: common.NonNegFloat = 0.05
    """AdamW weight decay (App. A.1 Table 8: 0.05); tokens, biases and norms get 0 (see --token-weight-decay)"""
    num_workers: common.NonNegInt = 10
    """DataLoader worker processes per rank"""
    seed: int = 0
    """random seed (reseeded per epoch and rank via common.epoch_seed, so a resumed run is exact)"""
    grad_checkpointing: Literal["auto", "on", "off"] = "auto"
    """activation checkpointing: auto (on CUDA: the first k encoder, then decoder, blocks the measured memory plan
    needs, printed before step 1; off on CPU), on (every block) or off (docs/memory.md)"""
    plan: Optional[str] = None
    """GPUSxGB, e.g. 4x80: print the memory plan of this run on that many GPUs of that size and exit (reads no
    data and no initial checkpoint: one training step on fake tensors)"""
    compile: bool = False
    """torch.compile the encoder's forward_features and the decoder's forward"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' (CUDA if visible), 'cpu' or 'cuda'"""
    fsdp: bool = False
    """shard encoder, decoder, gradients and AdamW states over the processes with PyTorch FSDP2 (fully_shard)
    instead of DDP (ViT-2B/14 and larger; --plan GPUSxGB says when it is needed). Checkpoints keep the plain format"""
    # ---- MAE flags ----
    mask_ratio: common.OpenUnit = 0.75
    """fraction r of patches removed per image (Sec. 3 'Masking'; Sec. 4.1 / Fig. 5: 0.75)"""
    norm_pix_loss: bool = True
    """per-patch normalised pixel targets (Sec. 3 'Reconstruction target', Table 1d; official --norm_pix_loss,
    used for the released encoders); --no-norm-pix-loss regresses raw (ImageNet-normalised) pixels"""
    decoder_dim: common.PosInt = 512
    """decoder width (Table 1b: 512; official mae_vit_*_dec512d8b)"""
    decoder_depth: common.NonNegInt = 8
    """decoder blocks (Table 1a: 8)"""
    decoder_heads: common.PosInt = 16
    """decoder attention heads (not in the paper; official: 16)"""
    min_lr: common.NonNegFloat = 0.0
    """lr at the end of the cosine schedule (official --min_lr default 0)"""
    crop_min_scale: common.PosUnit = 0.2
    """lower bound of RandomResizedCrop's area scale (Table 8 / Table 1e: RandomResizedCrop; 0.2 from the official code)"""
    token_weight_decay: bool = False
    """official-code behaviour: apply weight decay to cls_token and mask_token too (timm 0.3.2 rule)"""
    init: Optional[str] = None
    """optional encoder to start from (our checkpoint or an official mae_pretrain_*/_full file); a decoder in the
    file with the same shape is loaded too. Ignored when OUTPUT_DIR already holds a checkpoint (resume)"""
    vis_images: common.NonNegInt = 8
    """train images (fixed, center-cropped) shown in recon_epochEEE.png each epoch; 0 disables"""
    exit_after_epochs: Optional[common.PosInt] = None
    """testing: stop after this many completed epochs (all stages counted), as if the run was killed; rerun to
    resume"""
    knn_every: common.NonNegInt = 0
    """k-NN monitor every N epochs (eval_knn.KnnMonitor: top-1 at k=20, T=0.07, DINO's vote, on the encoder saved as
    "model"); 0 = off. The MAE paper reports no k-NN."""
    knn_data: Optional[str] = None
    """labelled data for the monitor: ROOT with ROOT/train/<class>/ and ROOT/val/<class>/, or synthetic[:N[:M]];
    None -> --data when it has labelled train/ and val/ splits, else the monitor is off (one-line note)"""
    knn_subset: common.PosUnit = 0.1
    """fraction of the k-NN data's train split used as the monitor's bank, drawn with --seed (official MIM-Refiner
    / MAE-CT monitors: a 10% ImageNet subset); the whole val split is queried"""
    save_every: common.NonNegInt = 20
    """keep OUTPUT_DIR/checkpoint-epochNNN.pth ("model" + "encoder_config" only, NNN = epochs done) every N
    epochs; 0 = none. checkpoint-last.pth stays the full resumable state. Official: a checkpoint every 20 epochs (main_pretrain.py)."""
    save_minutes: Optional[common.NonNegFloat] = None
    """also write checkpoint-last.pth inside an epoch every M minutes, at an update boundary (a resume continues
    exactly there); None -> 30 on CUDA (stretched so that a save costs at most 1 % of the run), off on the CPU;
    0 = at epoch ends only. SIGTERM/SIGUSR1/SIGINT save and stop at the next boundary (docs/scale.md)"""


def validate(args: Args):
    """Flag combinations that cannot work, as one-line errors (before any heavy work); each flag's own range
    is declared on its Args field (checked by common.Flags)."""
    if args.decoder_dim % args.decoder_heads:
        raise UserError(f"--decoder-dim {args.decoder_dim} is not divisible by --decoder-heads {args.decoder_heads}")
    if args.decoder_dim % 4:
        raise UserError(f"--decoder-dim {args.decoder_dim} must be a multiple of 4 (2-D sin-cos positions)")
    if args.fsdp and args.compile:
        raise UserError("--fsdp with --compile is not supported; drop one of them")
    if args.fsdp:
        common.neighbour("fsdp", "--fsdp")  # optional neighbour: one line if it is missing


# ==============================================================================================
# Optimisation
# ==============================================================================================
def build_param_groups(model: MaskedAutoencoder, weight_decay: float, token_weight_decay: bool) -> list[dict]:
    """AdamW groups over the official flat parameter names (encoder keys + decoder keys). The frozen
    pos_embeds are skipped. Default: no decay on tokens, biases, norms (common.param_groups); with
    token_weight_decay the official timm-0.3.2 rule (only 1-D parameters and biases exempt)."""
    named = list(model.encoder.named_parameters()) + list(model.decoder.named_parameters())
    if not token_weight_decay:
        return common.param_groups(named, weight_decay)
    decay, no_decay = [], []
    for n, p in named:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
    return [dict(params=no_decay, weight_decay=0.0, lr_scale=1.0, name="no_wd"),
            dict(params=decay, weight_decay=weight_decay, lr_scale=1.0, name="wd")]


# ==============================================================================================
# Reconstruction figure (original / masked / reconstruction / reconstruction + visible)
# ==============================================================================================
@torch.no_grad()
def reconstruction_grid(model: MaskedAutoencoder, imgs: torch.Tensor, noise: torch.Tensor, device) -> torch.Tensor:
    """A (3, H', W') image in [0, 1]: one column per image, rows original / masked (removed patches
    grey) / reconstruction of every patch / reconstruction with the visible patches pasted back.
    Norm-pix predictions are mapped back to pixels with each patch's own target mean and std."""
    p = model.encoder.patch_size
    was_training = model.training
    model.eval()
    imgs = imgs.to(device)
    with common.autocast(device):
        _, pred, mask = model(imgs, noise=noise.to(device))
    pred = pred.float()  # (B, N, p*p*3)
    _, mean, std = patch_targets(imgs, p, model.norm_pix)
    if model.norm_pix:
        pred = pred * std + mean  # de-normalise per patch (mae#174)
    m = mask[..., None]  # (B, N, 1)
    patches = patchify(imgs, p).float()
    grey = torch.zeros_like(patches)  # 0 in ImageNet-normalised space = the mean colour (grey)
    rows = [patches, patches * (1 - m) + grey * m, pred, patches * (1 - m) + pred * m]
    mean_c = torch.tensor(common.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std_c = torch.tensor(common.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    rows = [(unpatchify(r, p) * std_c + mean_c).clamp(0, 1) for r in rows]  # un-normalise to [0, 1]
    scale = max(1, 96 // imgs.shape[-1])  # tiny images are upscaled (nearest) so the PNG is readable
    out = torch.cat(rows)  # (4B, 3, H, W)
    if scale > 1:
        out = torch.nn.functional.interpolate(out, scale_factor=scale, mode="nearest")
    model.train(was_training)
    return torchvision.utils.make_grid(out.cpu(), nrow=imgs.shape[0], padding=2, pad_value=1.0)


def reconstruction_batch(args: Args, num_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The figure's fixed inputs: --vis-images train images spread over the (sorted) dataset, un-augmented,
    (V, 3, H, W), and their masking noise (V, N) from a generator of its own (the training RNG is untouched)."""
    vis_ds = common.build_dataset(args.data, "train", common.eval_transform(args.img_size), img_size=args.img_size,
                                  seed=args.seed)
    n_vis = min(args.vis_images, len(vis_ds))
    picks = torch.linspace(0, len(vis_ds) - 1, n_vis).long().tolist()
    vis_imgs = torch.stack([vis_ds[i][0] for i in picks])  # (V, 3, H, W)
    vis_noise = torch.rand(n_vis, num_patches, generator=torch.Generator().manual_seed(args.seed))  # (V, N)
    return vis_imgs, vis_noise


# ==============================================================================================
# Models and the memory plan (--plan, --grad-checkpointing auto)
# ==============================================================================================
def build_modules(args: Args, checkpointed):
    """Encoder, decoder and MaskedAutoencoder; `checkpointed` k: the first k encoder blocks, then decoder blocks."""
    enc_depth = common.VIT_CONFIGS.get(args.model, (0, 0))[1]
    enc_k, dec_k = min(checkpointed, enc_depth), max(0, checkpointed - enc_depth)
    common.seed_everything(args.seed)  # same initial weights on every rank
    encoder = common.create_vit(args.model, img_size=args.img_size, patch_size=args.patch_size, grad_checkpointing=enc_k)
    decoder = MaeDecoder(encoder.dim, encoder.grid, encoder.patch_size, args.decoder_dim, args.decoder_depth,
                         args.decoder_heads, grad_checkpointing=dec_k)
    return encoder, decoder, MaskedAutoencoder(encoder, decoder, args.mask_ratio, args.norm_pix_loss)


def n_blocks(args: Args) -> int:
    """Blocks the memory plan may checkpoint: the encoder's, then the decoder's."""
    return common.VIT_CONFIGS.get(args.model, (0, 0))[1] + args.decoder_depth


def memory_plan(args: Args, gpus: int, capacity, mode: str):
    """memplan.plan_memory (optional neighbour memplan.py) for MAE at the per-GPU batch; k counts encoder blocks
    first, then decoder blocks."""
    import memplan
    n = common.per_rank_batch(args.batch_size, args.accum_steps, gpus)

    def build(k):
        encoder, decoder, model = build_modules(args, k)
        optimizer = common.make_adamw(build_param_groups(model, args.weight_decay, args.token_weight_decay), lr=1.0)
        imgs = torch.randn(n, 3, args.img_size, args.img_size)
        state = TrainState(model, encoder, decoder, model, optimizer)
        step = lambda: train_step(state, imgs, sync=True, step=0, args=args)  # noqa: E731
        return [model], [optimizer], step, list(encoder.blocks) + list(decoder.decoder_blocks)

    what = f"MAE {args.model} + {args.decoder_depth}-block decoder, {n} images per GPU"
    return memplan.plan_memory(build, what, n_blocks(args), gpus, capacity, mode, args.fsdp, not args.compile,
                               "the same maths: the loss is a per-image mean")


# ==============================================================================================
# Training loop: one epoch, the epoch-end checkpoint, main
# ==============================================================================================
@dataclass
class Run:
    """The run: what its epochs share (ranks, log, run control, data, batch, schedules)."""
    dist_info: common.DistInfo  # ranks and the device
    log: common.Logger  # log.jsonl, TensorBoard, rank-0 printing
    ctl: longrun.RunControl | common.EpochEndSaves  # common.run_control: saves and stops at update boundaries
    dataset: torch.utils.data.Dataset  # the augmented train images
    micro: int  # per-rank micro-batch: batch_size / (accum_steps x processes)
    steps_per_epoch: int  # optimizer updates per epoch
    lr_schedule: Callable[[int], float]  # global optimizer step -> lr (warmup + cosine)
    rms_start: float  # the initial encoder weights' RMS, the divergence check's reference (save_checkpoint)
    vis_imgs: Optional[torch.Tensor] = None  # (V, 3, H, W) the figure's fixed images, or None: no figure
    vis_noise: Optional[torch.Tensor] = None  # (V, N) their masking noise


def train_one_epoch(state: TrainState, run: Run, epoch: int, *, position: Optional[dict],
                    args: Args) -> tuple[float, float]:
    """One epoch of run.steps_per_epoch AdamW updates of accum_steps micro-batches of run.micro images each: the
    lr of every update from run.lr_schedule(global step), train_step per micro-batch, the rank-mean loss logged
    per update; after each update the run control decides whether to save (save_state) and stop.
    `position`: the mid-epoch checkpoint's resume point inside this epoch, or None. Returns (mean loss of the
    epoch, start time)."""
    dist_info, log, micro, steps_per_epoch = run.dist_info, run.log, run.micro, run.steps_per_epoch
    start = common.epoch_start(args.seed, epoch, dist_info, position, log)  # CRUCIAL for exact resume
    sums = dict(position["sums"]) if start else {"loss": 0.0}
    loader = common.build_loader(run.dataset, micro, dist_info, shuffle=True, drop_last=True,
                                 num_workers=args.num_workers, seed=args.seed, epoch=epoch,
                                 skip=start * args.accum_steps * micro)
    state.ddp.train()
    bar = common.progress(loader, dist_info, total=(steps_per_epoch - start) * args.accum_steps, desc=f"epoch {epoch}")
    t0, accum_loss = time.time(), 0.0
    for it, (imgs, _) in enumerate(bar, start=start * args.accum_steps):
        if it >= steps_per_epoch * args.accum_steps:
            break  # an incomplete accumulation group at the epoch end is skipped
        step = epoch * steps_per_epoch + it // args.accum_steps  # global optimizer step
        last_micro = (it + 1) % args.accum_steps == 0
        if it % args.accum_steps == 0:  # per iteration (fractional epoch), at the first micro-batch of an update
            cur_lr = run.lr_schedule(step)
            common.set_lr(state.optimizer, cur_lr)
        imgs = imgs.to(dist_info.device, non_blocking=True)  # (n, 3, H, W)
        loss = train_step(state, imgs, sync=last_micro, step=step, args=args)
        accum_loss += loss.detach() / args.accum_steps
        if not last_micro:
            continue
        loss_v = common.all_reduce_mean(accum_loss).item()  # mean over ranks, for logging only
        accum_loss = 0.0
        sums["loss"] += loss_v
        if dist_info.is_main:
            ips = (it + 1 - start * args.accum_steps) * micro * dist_info.world_size / max(time.time() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{cur_lr:.2e}", img_s=f"{ips:.0f}")
            log.log({"train/loss": loss_v, "train/lr": cur_lr, "train/epoch": epoch + (it + 1) / (steps_per_epoch * args.accum_steps)},
                    step=step)
        update = (it + 1) // args.accum_steps
        save, stop = run.ctl.at_update(update, steps_per_epoch)  # one all-reduce: a stop signal anywhere, the timer
        if save:
            with run.ctl.saving(epoch, update, steps_per_epoch):
                save_state(state, run, epoch, update, position=run.ctl.position(update, sums), args=args)
        if stop:
            run.ctl.stop(f"at epoch {epoch} step {update}")
    return sums["loss"] / steps_per_epoch, t0


def save_state(state: TrainState, run: Run, epoch: int, update: int, *, position: Optional[dict],
               args: Args) -> dict:
    """OUTPUT_DIR/checkpoint-last.pth (the format of the module docstring) after `update` updates of `epoch`: at
    its end (update == run.steps_per_epoch) first the kept epoch file when due, or inside it with `position` (what
    the exact resume needs, longrun.RunControl.position). Every rank calls it: under --fsdp the state dicts are
    collectives. Returns the encoder state dict."""
    encoder = state.encoder
    enc_sd, dec_sd = common.full_state_dict(encoder), common.full_state_dict(state.decoder)
    opt_sd = common.full_optimizer_state_dict(state.model, state.optimizer)
    done = update == run.steps_per_epoch
    if done:  # before checkpoint-last: a run killed between the two redoes the epoch and rewrites both
        common.save_kept(args.save_every, args.output_dir, run.dist_info, epoch + 1,
                         enc_sd, encoder.config(), model_is_ema=False)
    if run.dist_info.is_main:
        common.save_checkpoint(common.checkpoint_path(args.output_dir), {
            "model": enc_sd, "encoder_config": encoder.config(), "model_is_ema": False,
            "decoder": dec_sd,
            "decoder_config": dict(dim=args.decoder_dim, depth=args.decoder_depth, num_heads=args.decoder_heads),
            "norm_pix_loss": args.norm_pix_loss, "mask_ratio": args.mask_ratio,
            "optimizer": opt_sd, "epoch": epoch + done, "step": epoch * run.steps_per_epoch + update,
            "resume": None if done else position, "weights_rms_start": run.rms_start,
            "args": dataclasses.asdict(args)}, weights_rms_start=run.rms_start)
    return enc_sd


def end_epoch(state: TrainState, run: Run, epoch: int, epoch_loss: float, t0: float, *, args: Args):
    """After the epoch's checkpoint: the epoch loss and the reconstruction figure (when run.vis_imgs is given;
    under --fsdp its forward is a collective, every rank calls this)."""
    grid = None
    if run.vis_imgs is not None:
        grid = reconstruction_grid(state.model, run.vis_imgs, run.vis_noise, run.dist_info.device)
    step = (epoch + 1) * run.steps_per_epoch
    if run.dist_info.is_main:
        run.log.log({"train/epoch_loss": epoch_loss}, step=step)
        msg = f"epoch {epoch} done, mean loss {epoch_loss:.4f}, {time.time() - t0:.0f} s; saved {common.checkpoint_path(args.output_dir)}"
        if grid is not None:
            png = os.path.join(args.output_dir, f"recon_epoch{epoch:03d}.png")
            torchvision.utils.save_image(grid, png)
            run.log.image("train/reconstruction", grid, step)
            msg += f" and {png}"
        run.log.print(msg)


def main(args: Args):
    validate(args)
    if args.plan is not None:  # no data: the step on fake tensors
        common.plan_run(args, torch.device("cpu"), 1, n_blocks(args), functools.partial(memory_plan, args))
        return
    dist_info = common.init_distributed(args.device)
    device, world = dist_info.device, dist_info.world_size
    checkpointed, use_fsdp = common.plan_run(args, device, world, n_blocks(args), functools.partial(memory_plan, args))
    micro = common.per_rank_batch(args.batch_size, args.accum_steps, world)
    lr = args.lr if args.lr is not None else args.blr * args.batch_size / 256  # linear scaling (App. A.1)

    encoder, decoder, model = build_modules(args, checkpointed)
    N = encoder.num_patches
    len_keep = int(N * (1 - args.mask_ratio))
    if not 1 <= len_keep < N:
        raise UserError(f"--mask-ratio {args.mask_ratio} keeps {len_keep} of {N} patches; it must keep at least one "
                        f"and remove at least one")

    dataset = common.build_dataset(args.data, "train", common.mae_train_transform(args.img_size, (args.crop_min_scale, 1.0)),
                                   img_size=args.img_size, seed=args.seed)
    steps_per_epoch = len(dataset) // world // micro // args.accum_steps  # optimizer steps
    if steps_per_epoch == 0:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one global batch of {args.batch_size}; "
                        f"lower --batch-size")
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    lr_schedule = functools.partial(common.cosine_schedule, total_steps=total_steps, base=lr, final=args.min_lr,
                                    warmup_steps=warmup_steps)  # per update: warmup + cosine (official lr_sched)

    resume_ckpt = common.load_resume_state(args.output_dir)
    if resume_ckpt is not None:
        common.check_resume_args(resume_ckpt, args, args.output_dir, state_keys=("model", "decoder", "optimizer", "epoch"),
                                 shape=("decoder_dim", "decoder_depth", "decoder_heads", "token_weight_decay"))
    start_epoch = resume_ckpt["epoch"] if resume_ckpt is not None else 0
    position = resume_ckpt.get("resume") if resume_ckpt is not None else None  # inside epoch start_epoch, or None
    log = common.Logger(args.output_dir, args, dist_info, extra=dict(
        effective_batch=args.batch_size, per_rank_batch=micro, lr=lr, steps_per_epoch=steps_per_epoch,
        num_patches=N, len_keep=len_keep, fsdp_chosen_by_plan=use_fsdp and not args.fsdp))
    rule = "--lr" if args.lr is not None else f"blr {args.blr:g} x {args.batch_size} / 256"
    log.print(f"global batch {args.batch_size} = {micro} per rank x {args.accum_steps} accumulation x {world} "
              f"process(es); lr {lr:.4g} ({rule}); {N} patches, {len_keep} visible")
    if start_epoch >= args.epochs:
        log.print(f"{common.checkpoint_path(args.output_dir)} already holds all {args.epochs} epochs; nothing to do")
        log.close()
        return

    optimizer_state = rms_start = None
    if resume_ckpt is not None:
        common.load_encoder(encoder, resume_ckpt["model"], what="the resume checkpoint")
        decoder.load_state_dict(resume_ckpt["decoder"])
        optimizer_state, rms_start = resume_ckpt["optimizer"], resume_ckpt.get("weights_rms_start")
        at = f", step {position['update']} of {steps_per_epoch}" if position else ""
        log.print(f"resuming {common.checkpoint_path(args.output_dir)} at epoch {start_epoch}{at}")
    elif args.init is not None:
        ckpt = common.load_file(args.init)
        desc = common.load_encoder(encoder, ckpt, what="--init")
        log.print(f"loaded {desc} from {args.init}; " + load_init_decoder(decoder, ckpt))
        del ckpt
    resume_ckpt = None  # the weights live in the modules now: no second copy on the host for the whole run
    if rms_start is None:
        rms_start = common.weights_rms(encoder.state_dict())  # the divergence check's reference (save_checkpoint)
    n_enc = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    n_dec = sum(p.numel() for p in decoder.parameters() if p.requires_grad)
    log.print(f"encoder {common.describe_vit(encoder.config())}: {n_enc:,} trainable parameters; "
              f"decoder {args.decoder_dim}-d x {args.decoder_depth} blocks x {args.decoder_heads} heads: {n_dec:,}")

    model.to(device)
    fsdp = use_fsdp and dist_info.in_group
    if use_fsdp and not fsdp:
        log.print("--fsdp: not launched by torchrun, nothing to shard; running unsharded")
    if fsdp:  # ZeRO-3 (fsdp.py) instead of DDP: one all-gather unit per encoder/decoder block
        sharding = common.neighbour("fsdp", "--fsdp")
        sharding.shard_vit(encoder)
        sharding.shard(decoder, list(decoder.decoder_blocks))  # fp32 parameters + autocast, as under DDP
        sharding.shard(model)
    optimizer = common.make_adamw(build_param_groups(model, args.weight_decay, args.token_weight_decay), lr=lr,
                                  betas=(0.9, 0.95))  # App. A.1: AdamW beta2 0.95
    if optimizer_state is not None:
        common.load_optimizer_state_dict(model, optimizer, optimizer_state)
        optimizer_state = None
    if args.compile:
        encoder.forward_features = torch.compile(encoder.forward_features)
        decoder.forward = torch.compile(decoder.forward)
    ddp = model
    if dist_info.enabled and not fsdp:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    # a fixed set of train images and masks for the per-epoch reconstruction figure (rank 0)
    vis_imgs = vis_noise = None
    if (dist_info.is_main or fsdp) and args.vis_images > 0:  # under --fsdp every rank runs the (collective) forward
        vis_imgs, vis_noise = reconstruction_batch(args, N)

    knn = common.knn_monitor(dist_info, log, every=args.knn_every, data=args.knn_data, train_data=args.data,
                             subset=args.knn_subset, img_size=args.img_size, batch_size=micro,
                             num_workers=args.num_workers, seed=args.seed)
    ctl = common.run_control(args.save_minutes, dist_info, log)
    train_state = TrainState(ddp, encoder, decoder, model, optimizer)
    run = Run(dist_info, log, ctl, dataset, micro=micro, steps_per_epoch=steps_per_epoch, lr_schedule=lr_schedule,
              rms_start=rms_start, vis_imgs=vis_imgs, vis_noise=vis_noise)
    for epoch in range(start_epoch, args.epochs):
        epoch_loss, t0 = train_one_epoch(train_state, run, epoch, args=args,
                                         position=position if epoch == start_epoch else None)
        save_state(train_state, run, epoch, steps_per_epoch, position=None, args=args)
        end_epoch(train_state, run, epoch, epoch_loss, t0, args=args)
        knn(epoch + 1, encoder, (epoch + 1) * steps_per_epoch)
        ctl.epoch_done(epoch + 1)
        if args.exit_after_epochs is not None and epoch + 1 >= args.exit_after_epochs and epoch + 1 < args.epochs:
            log.print(f"--exit-after-epochs {args.exit_after_epochs}: stopping; rerun to resume")
            log.close()
            return
    # the MAE paper evaluates by fine-tuning and linear probing (Sec. 4), not k-NN
    log.print("to evaluate as the paper: fine-tune (Table 3): " + common.paper_eval_command(
        args, "--recipe mae", "finetune.py"))
    log.print("  linear probe (MAE's recipe is BN + LARS, 90 epochs; the nearest here, MAE-CT's): "
              + common.paper_eval_command(args, "--protocol maect", "eval_linear.py"))
    log.print("  k-NN with DINO's protocol: " + common.paper_eval_command(args))
    log.close()


def load_init_decoder(decoder: MaeDecoder, ckpt: dict) -> str:
    """Load the decoder of an --init file if it has one of the same shape: ours ("decoder") or an official
    *_full.pth (decoder_* and mask_token inside "model"). The fixed decoder_pos_embed is always our own
    table (the same values at the same resolution). Returns a note for the log."""
    sd = ckpt.get("decoder") if isinstance(ckpt, dict) else None
    if sd is None and isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        sd = {k: v for k, v in common.clean_state_dict(ckpt["model"]).items() if k.startswith(("decoder", "mask_token"))}
    if not sd:
        return "no decoder in the file, the decoder starts from scratch"
    sd = {k: v for k, v in sd.items() if k != "decoder_pos_embed"}
    mine = {k: v for k, v in decoder.state_dict().items() if k != "decoder_pos_embed"}
    if set(sd) != set(mine) or any(sd[k].shape != mine[k].shape for k in mine):
        return "its decoder has another shape than --decoder-dim/--decoder-depth/--decoder-heads, the decoder starts from scratch"
    decoder.load_state_dict(sd, strict=False)
    return "decoder loaded too"


if __name__ == "__main__":
    common.run_main(main, Args)
