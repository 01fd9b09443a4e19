"""Other codebases' checkpoint layouts (optional neighbour of common.py, imported by common.convert_to_ours when a
file has one): data2vec 2.0 (fairseq), the MIM-Refiner release and MAE-CT. Without this file such a checkpoint
stops with one line naming it; ours and official MAE files need nothing here.
"""
import math

import torch

DATA2VEC2_PREFIX = "modality_encoders.IMAGE."


def to_ours(sd: dict) -> dict:
    """Map a foreign encoder layout onto our (timm) key names; `sd` comes from common.convert_to_ours, which has
    stripped wrapper prefixes and drops the decoder / mask token / classifier afterwards.

    - MAE-CT (`pos_embed` (1, N, D) without a CLS row): prepend a zero row;
    - MIM-Refiner release (`cls_tokens.tokens`, `pos_embed.embed` (1, H, W, D)): rename, flatten,
      prepend a zero CLS row;
    - data2vec 2.0 fairseq (`modality_encoders.IMAGE.*`): official key mapping (MIM-Refiner
      pretrained_initializer): local_encoder.proj -> patch_embed.proj, extra_tokens -> cls_token,
      fixed_positional_encoder.positions -> pos_embed, context_encoder.norm -> embed_norm.
    """
    if any(k.startswith(DATA2VEC2_PREFIX) for k in sd):
        ren = {"local_encoder.proj.": "patch_embed.proj.", "extra_tokens": "cls_token",
               "fixed_positional_encoder.positions": "pos_embed", "context_encoder.norm.": "embed_norm."}
        out = {}
        for k, v in sd.items():
            if not k.startswith(DATA2VEC2_PREFIX):
                continue  # decoder, _ema and other modalities
            k = k[len(DATA2VEC2_PREFIX):]
            for a, b in ren.items():
                if k.startswith(a):
                    k = b + k[len(a):]
            if k.startswith(("patch_embed.", "cls_token", "pos_embed", "embed_norm.", "blocks.")) and "decoder" not in k:
                out[k] = v
        sd = out
    if "cls_tokens.tokens" in sd:
        sd["cls_token"] = sd.pop("cls_tokens.tokens")
    if "pos_embed.embed" in sd:
        pe = sd.pop("pos_embed.embed")
        sd["pos_embed"] = pe.reshape(1, -1, pe.shape[-1]) if pe.ndim == 4 else pe
    if "pos_embed" in sd:
        pe = sd["pos_embed"]
        pe = pe.reshape(1, -1, pe.shape[-1])
        n = pe.shape[1]
        if math.isqrt(n) ** 2 == n:  # no CLS slot (MAE-CT, MIM-Refiner, data2vec 2.0): CLS gets no position
            pe = torch.cat([pe.new_zeros(1, 1, pe.shape[-1]), pe], dim=1)
        sd["pos_embed"] = pe
    return sd
