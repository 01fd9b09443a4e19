"""Other codebases' checkpoint layouts (optional neighbour of common.py, imported by common.convert_to_ours when a
file has one): data2vec 2.0 (fairseq), the MIM-Refiner release and MAE-CT. Without this file such a checkpoint
stops with one line naming it; ours and official MAE files need nothing here.

data2vec 2.0 (facebookresearch/fairseq, a trainer checkpoint {"cfg", "model", ...}; fairseq/trainer.py state_dict):
`Data2VecMultiModel` (examples/data2vec/models/data2vec2.py) keeps the transformer `blocks.N.*` at the top level of
the model and only the image stem under `modality_encoders.IMAGE.` (modalities/images.py ImageEncoder,
modalities/base.py ModalitySpecificEncoder): `local_encoder.proj` (timm PatchEmbed),
`fixed_positional_encoder.positions` (1, N, D), `extra_tokens` (1, 1, D), and `context_encoder`
(modalities/modules.py BlockEncoder) with `norm` and `prenet_depth` blocks of its own. The forward (base.py
contextualized_features, then data2vec2.py forward) is
  x = patches + positions; x = [extra_token; x]; x = context_encoder.norm(x); x = context_encoder.blocks(x);
  x = blocks(x)    (AltBlock with layer_norm_first=False: x = norm1(x + attn(x)); x = norm2(x + mlp(x)); no final norm)
i.e. our post-norm ViT with `embed_norm` and the prenet blocks first; the CLS token gets no position (a zero row).
ml-jku/MIM-Refiner src/initializers/pretrained_initializer.py renames the same stem keys and keeps `blocks.N`.
`_ema` (the teacher, a nested dict), `modality_encoders.IMAGE.decoder.*`, `shared_decoder`, `recon_proj` are dropped;
fine-tuned files hold the same under `model.` (examples/data2vec/models/data2vec_image_classification.py).

MIM-Refiner release (ml-jku/MIM-Refiner hubconf.py, hub/prenorm_vit.py and hub/postnorm_vit.py on KappaModules;
src/callbacks/base/writers/checkpoint_writer.py: {"state_dict", "ctor_kwargs", ...}): `cls_tokens.tokens` (1, 1, D),
`pos_embed.embed` (1, H, W, D) without a CLS slot, timm block names, `norm` (MAE-refined) or `embed_norm`
(D2V2-refined).
MAE-CT release (ml-jku/MAE-CT models/vit/vit_mae.py, loggers/writers/checkpoint_writer.py: {"state_dict",
"ctor_kwargs"}): timm names with `pos_embed` (1, N, D) without a CLS row (older files: (1, 1+N, D), kept as is).
"""
import math

import torch

import common

DATA2VEC2_PREFIX = "modality_encoders.IMAGE."
# the image stem under DATA2VEC2_PREFIX -> ours (names from modalities/base.py, images.py, modules.py)
DATA2VEC2_STEM = {"local_encoder.proj.weight": "patch_embed.proj.weight",
                  "local_encoder.proj.bias": "patch_embed.proj.bias",
                  "extra_tokens": "cls_token", "fixed_positional_encoder.positions": "pos_embed",
                  "context_encoder.norm.weight": "embed_norm.weight", "context_encoder.norm.bias": "embed_norm.bias"}


def data2vec2_to_ours(sd: dict) -> dict:
    """fairseq Data2VecMultiModel (image) -> our post-norm ViT: the context encoder's blocks, then the top-level."""
    if any(k.startswith("model.modality_encoders.") for k in sd):  # fine-tuned file: the pre-trained model as `model.`
        sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    enc = {k[len(DATA2VEC2_PREFIX):]: v for k, v in sd.items() if k.startswith(DATA2VEC2_PREFIX)}
    extra = enc.get("extra_tokens")
    why = None
    if "context_encoder.norm.weight" not in enc:
        why = "no context_encoder.norm (a pre-norm model, layer_norm_first)"
    elif extra is None or extra.shape[1] != 1:
        why = f"{0 if extra is None else extra.shape[1]} extra tokens"
    elif "fixed_positional_encoder.positions" not in enc or "alibi_scale" in enc:
        why = "ALiBi instead of fixed positions"
    elif "local_encoder.proj.weight" not in enc:
        why = "a projected patch embedding (modality embed_dim != embed_dim)"
    if why:
        raise common.UserError(f"this data2vec 2.0 checkpoint has {why}; only the released image models' layout "
                               f"(post-norm, one extra token, fixed positions) maps onto the ViT")
    out = {DATA2VEC2_STEM[k]: v for k, v in enc.items() if k in DATA2VEC2_STEM}
    # base.py runs the context encoder's prenet_depth blocks (2 for ViT-B, 0 for L and H) before data2vec2.py's blocks
    prenet = {k[len("context_encoder."):]: v for k, v in enc.items() if k.startswith("context_encoder.blocks.")}
    offset = 1 + max((int(k.split(".")[1]) for k in prenet), default=-1)
    for group, first in ((prenet, 0), (sd, offset)):
        for k, v in group.items():
            if k.startswith("blocks."):  # in `sd` that skips _ema, decoders, recon_proj and the stem
                _, i, rest = k.split(".", 2)
                out[f"blocks.{first + int(i)}.{rest}"] = v
    return out


def to_ours(sd: dict) -> dict:
    """Map a foreign encoder layout onto our (timm) key names; `sd` comes from common.convert_to_ours, which has
    stripped wrapper prefixes and drops the decoder / mask token / classifier afterwards."""
    if any(k.startswith(("modality_encoders.", "model.modality_encoders.")) for k in sd):
        sd = data2vec2_to_ours(sd)
    if "cls_tokens.tokens" in sd:
        sd["cls_token"] = sd.pop("cls_tokens.tokens")
        if sd["cls_token"].shape[1] != 1:
            raise common.UserError(f"this MIM-Refiner checkpoint has {sd['cls_token'].shape[1]} CLS tokens; the ViT "
                                   f"has one")
    if "pos_embed.embed" in sd:
        sd["pos_embed"] = sd.pop("pos_embed.embed")  # (1, H, W, D), row-major as the patch tokens
    if "pos_embed" in sd:
        pe = sd["pos_embed"]
        pe = pe.reshape(1, -1, pe.shape[-1])
        n = pe.shape[1]
        if math.isqrt(n) ** 2 == n:  # no CLS slot (MAE-CT, MIM-Refiner, data2vec 2.0): CLS gets no position
            pe = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
        sd["pos_embed"] = pe
    return sd
