"""An independent implementation in the suite: Hugging Face transformers' ViTMAEForPreTraining at a tiny size,
weights mapped both ways, the same `noise`: equal mask, encoder output, prediction and loss (fp32, 1e-5)."""
import pytest
import torch

import common
import mae

transformers = pytest.importorskip("transformers")  # requirements-dev.txt; CI installs it

DIM, DEPTH, HEADS, IMG, PATCH, DEC_DIM, DEC_DEPTH, DEC_HEADS = 32, 2, 2, 32, 8, 16, 2, 2


def _ours(norm_pix: bool, seed: int = 0) -> mae.MaskedAutoencoder:
    torch.manual_seed(seed)
    enc = common.create_vit("vit_t16", IMG, PATCH, dim=DIM, depth=DEPTH, num_heads=HEADS)
    dec = mae.MaeDecoder(DIM, IMG // PATCH, PATCH, dim=DEC_DIM, depth=DEC_DEPTH, num_heads=DEC_HEADS)
    return mae.MaskedAutoencoder(enc, dec, mask_ratio=0.75, norm_pix=norm_pix).eval()


def _hf(norm_pix: bool):
    cfg = transformers.ViTMAEConfig(
        hidden_size=DIM, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=4 * DIM,
        image_size=IMG, patch_size=PATCH, decoder_hidden_size=DEC_DIM, decoder_num_hidden_layers=DEC_DEPTH,
        decoder_num_attention_heads=DEC_HEADS, decoder_intermediate_size=4 * DEC_DIM, layer_norm_eps=1e-6,
        hidden_act="gelu", qkv_bias=True, mask_ratio=0.75, norm_pix_loss=norm_pix)
    return transformers.ViTMAEForPreTraining(cfg).eval()


def key_map(hf_keys) -> dict:
    """our MaskedAutoencoder key -> HF ViTMAEForPreTraining key, or the (q, k, v) keys our fused qkv splits into
    (rows [q; k; v], as timm). transformers 5 renamed the layer modules; both layouts are handled."""
    v5 = any(k.startswith("vit.layers.") for k in hf_keys)
    m = {"encoder.cls_token": "vit.embeddings.cls_token", "encoder.pos_embed": "vit.embeddings.position_embeddings",
         "decoder.mask_token": "decoder.mask_token", "decoder.decoder_pos_embed": "decoder.decoder_pos_embed"}
    for t in ("weight", "bias"):
        m[f"encoder.patch_embed.proj.{t}"] = f"vit.embeddings.patch_embeddings.projection.{t}"
        m[f"encoder.norm.{t}"] = f"vit.layernorm.{t}"
        for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
            m[f"decoder.{name}.{t}"] = f"decoder.{name}.{t}"
    layer = ({"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
              "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"} if v5 else
             {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
              "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"})
    qkv = (("attention.q_proj", "attention.k_proj", "attention.v_proj") if v5 else
           ("attention.attention.query", "attention.attention.key", "attention.attention.value"))
    for ours, theirs, depth in (("encoder.blocks", "vit.layers" if v5 else "vit.encoder.layer", DEPTH),
                                ("decoder.decoder_blocks", "decoder.decoder_layers", DEC_DEPTH)):
        for i in range(depth):
            for t in ("weight", "bias"):
                for a, b in layer.items():
                    m[f"{ours}.{i}.{a}.{t}"] = f"{theirs}.{i}.{b}.{t}"
                m[f"{ours}.{i}.attn.qkv.{t}"] = tuple(f"{theirs}.{i}.{q}.{t}" for q in qkv)
    return m


def ours_to_hf(ours_sd: dict, hf_keys) -> dict:
    out = {}
    for k, hk in key_map(hf_keys).items():
        if isinstance(hk, tuple):
            out.update(zip(hk, ours_sd[k].chunk(3, dim=0)))
        else:
            out[hk] = ours_sd[k]
    return {k: v.detach().clone() for k, v in out.items()}


def hf_to_ours(hf_sd: dict) -> dict:
    return {k: torch.cat([hf_sd[h] for h in hk]) if isinstance(hk, tuple) else hf_sd[hk].clone()
            for k, hk in key_map(hf_sd).items()}


def _compare(ours: mae.MaskedAutoencoder, hf, seed: int):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(3, 3, IMG, IMG, generator=g)
    noise = torch.rand(3, (IMG // PATCH) ** 2, generator=g)  # (B, N): the same masks in both
    with torch.no_grad():
        loss, pred, mask = ours(imgs, noise=noise)
        ids_keep, _, _ = mae.random_masking(3, noise.shape[1], 0.75, imgs.device, noise)
        latent = ours.encoder.forward_features(imgs, keep_idx=ids_keep)  # (B, 1+n, D)
        out = hf(pixel_values=imgs, noise=noise)
        hf_latent = hf.vit(pixel_values=imgs, noise=noise).last_hidden_state  # (B, 1+n, D), after the final LN
    assert torch.equal(out.mask, mask)
    assert 0.1 < mask.mean() < 0.9 and latent.abs().max() > 0.1  # a real mask and non-trivial features
    torch.testing.assert_close(hf_latent, latent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits, pred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_equals_hf_vitmae_both_ways(norm_pix, one_thread):
    ours, hf = _ours(norm_pix), _hf(norm_pix)
    hf_keys = list(hf.state_dict())
    mapped = ours_to_hf(ours.state_dict(), hf_keys)
    assert set(mapped) == set(hf_keys)  # every HF tensor comes from ours (position tables and tokens included)
    hf.load_state_dict(mapped, strict=True)
    _compare(ours, hf, seed=1)
    # HF -> ours: perturb every HF tensor (a fresh HF model leaves position tables and tokens at zero until its
    # own init runs; ours mapped in are perturbed too), load into a fresh model of ours, compare again
    torch.manual_seed(2)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fresh = _ours(norm_pix, seed=3)
    back = hf_to_ours(hf.state_dict())
    assert set(back) == set(fresh.state_dict())
    fresh.load_state_dict(back, strict=True)
    _compare(fresh, hf, seed=4)
