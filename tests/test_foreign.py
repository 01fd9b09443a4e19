"""foreign.py against the codebases that write the files: a data2vec 2.0 checkpoint built from fairseq's own module
names and file layout, MIM-Refiner and MAE-CT release files built from their repositories' modules. Each other
codebase's forward is transcribed here from its source (not from common.VisionTransformer), and the converted encoder
(common.load_encoder, strict) must give its features; eval_knn.py --checkpoint of the fairseq file too."""
import re
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block as TimmBlock, Mlp, PatchEmbed
from torch import nn

import common
import eval_knn
import mim_refiner as mr
from conftest import ONE_THREAD, ROOT, TINY, run_script

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

DIM, HEADS, PATCH, IMG = 192, 3, 4, 32  # vit_t16 at the TINY flags
GRID = IMG // PATCH


def _perturb(module: nn.Module, seed: int, scale=0.02):
    """Every tensor of the state dict (buffers and the fixed positions too) moved off its initial value, so that
    each lands somewhere visible: a tensor in the wrong place changes the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            if isinstance(t, torch.Tensor) and t.is_floating_point():  # not fairseq's nested `_ema` dict
                t.add_(scale * torch.randn(t.shape, generator=g))
    return module


# =============================================================================================
# data2vec 2.0 as facebookresearch/fairseq builds and saves it. Attribute names (hence state-dict keys) and the
# forward of Data2VecMultiModel.extract_features(mode="IMAGE", mask=False, remove_extra_tokens=False) in eval mode
# (dropout, DropPath and layerdrop are identities there and are left out; the released image configs have
# use_alibi_encoder false, so no ALiBi). Key families and the file each comes from:
#   blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}       examples/data2vec/models/data2vec2.py (AltBlock:
#                                                                    modalities/modules.py, Mlp from timm)
#   _ema (nested dict, the EMA teacher's fp32 params)               data2vec2.py state_dict (fairseq/modules/
#                                                                    ema_module.py EMAModule.fp32_params)
#   modality_encoders.IMAGE.local_encoder.proj                      modalities/images.py (timm PatchEmbed, via
#                                                                    examples/data2vec/models/mae.py)
#   modality_encoders.IMAGE.fixed_positional_encoder.positions      modalities/images.py, FixedPositionalEncoder in
#                                                                    modalities/modules.py
#   modality_encoders.IMAGE.context_encoder.{norm,blocks.N}         modalities/images.py, BlockEncoder in modules.py
#   modality_encoders.IMAGE.decoder.{blocks.N.0,proj}               Decoder2d in modalities/modules.py
#   modality_encoders.IMAGE.extra_tokens                            ModalitySpecificEncoder in modalities/base.py
#   file: {args, cfg, model, criterion, optimizer_history, task_state, extra_state, last_optimizer_state}
#                                                                    fairseq/trainer.py state_dict
# =============================================================================================
def d2v_sincos(embed_dim, grid_size):  # examples/data2vec/models/mae.py get_2d_sincos_pos_embed(cls_token=False)
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    g = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(g, g), axis=0).reshape([2, 1, grid_size, grid_size])  # w goes first
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


class AltAttention(nn.Module):  # modalities/modules.py
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)  # data2vec2.py make_block: qkv_bias=True
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = attn.softmax(dim=-1, dtype=torch.float32).to(dtype=q.dtype)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class AltBlock(nn.Module):  # modalities/modules.py with layer_norm_first=False (Data2VecMultiConfig default)
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # norm_eps 1e-6 in the image configs
        self.attn = AltAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(in_features=dim, hidden_features=4 * dim, act_layer=nn.GELU)

    def forward(self, x):
        x = x + self.attn(x)
        r = x = self.norm1(x)
        x = self.mlp(x)
        return self.norm2(r + x)


class FixedPositionalEncoder(nn.Module):  # modalities/modules.py
    def __init__(self, pos_embed):
        super().__init__()
        self.positions = pos_embed


class BlockEncoder(nn.Module):  # modalities/modules.py: the context encoder (norm first when not layer_norm_first)
    def __init__(self, blocks, norm):
        super().__init__()
        self.blocks, self.norm = blocks, norm

    def forward(self, x):
        x = self.norm(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class Decoder2d(nn.Module):  # modalities/modules.py: per block Conv2d, SamePad2d, TransposeLast, LayerNorm without
    def __init__(self, dim, decoder_dim=32, layers=3, kernel=5, groups=16):  # affine (fairseq.modules), ..., GELU
        super().__init__()
        self.blocks = nn.Sequential(*[nn.Sequential(
            nn.Conv2d(dim if i == 0 else decoder_dim, decoder_dim, kernel, padding=kernel // 2, groups=groups),
            nn.Identity(), nn.Identity(), nn.LayerNorm(decoder_dim, elementwise_affine=False), nn.Identity(), nn.GELU())
            for i in range(layers)])
        self.proj = nn.Linear(decoder_dim, dim)


class ImageEncoder(nn.Module):  # modalities/images.py ImageEncoder + modalities/base.py ModalitySpecificEncoder
    def __init__(self, dim, num_heads, prenet_depth, with_decoder=True):
        super().__init__()
        self.local_encoder = PatchEmbed(IMG, PATCH, 3, dim)
        self.project_features = nn.Identity()
        pos = nn.Parameter(torch.zeros(1, GRID * GRID, dim), requires_grad=False)
        pos.data.copy_(torch.from_numpy(d2v_sincos(dim, GRID)).float().unsqueeze(0))
        self.fixed_positional_encoder = FixedPositionalEncoder(pos)
        self.context_encoder = BlockEncoder(nn.ModuleList(AltBlock(dim, num_heads) for _ in range(prenet_depth)),
                                            nn.LayerNorm(dim, eps=1e-6))
        self.decoder = Decoder2d(dim) if with_decoder else None  # the EMA copy has none (make_target_model)
        self.extra_tokens = nn.Parameter(torch.zeros(1, 1, dim))  # num_extra_tokens: 1
        nn.init.normal_(self.extra_tokens)  # init_extra_token_zero: false

    def forward(self, img):  # local_features, then contextualized_features(mask=False)
        x = self.project_features(self.local_encoder(img))
        x = x + self.fixed_positional_encoder.positions  # the positions, before the extra token is prepended
        x = torch.cat([self.extra_tokens.expand(x.size(0), -1, -1), x], dim=1)
        return self.context_encoder(x)


class Data2VecMultiModel(nn.Module):  # examples/data2vec/models/data2vec2.py
    def __init__(self, depth, prenet_depth, dim=DIM, num_heads=HEADS, skip_ema=False):
        super().__init__()
        self.modality_encoders = nn.ModuleDict({"IMAGE": ImageEncoder(dim, num_heads, prenet_depth, not skip_ema)})
        self.blocks = nn.ModuleList([AltBlock(dim, num_heads) for _ in range(depth)])
        self.norm = None  # only with layer_norm_first
        self.ema_params = None
        if not skip_ema:  # ema_encoder_only: false -> the teacher is a whole model without decoder, other weights
            teacher = _perturb(Data2VecMultiModel(depth, prenet_depth, dim, num_heads, skip_ema=True), seed=99)
            self.ema_params = {k: v.float() for k, v in teacher.state_dict().items()}  # EMAModule.fp32_params

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.ema_params is not None:
            state["_ema"] = self.ema_params
        return state

    def extract_features(self, img):  # features_only=True, remove_extra_tokens=False
        x = self.modality_encoders["IMAGE"](img)
        for blk in self.blocks:
            x = blk(x)
        return x


def fairseq_checkpoint(model: Data2VecMultiModel, depth: int, prenet_depth: int) -> dict:
    """The file fairseq/checkpoint_utils.save_checkpoint writes (fairseq/trainer.py state_dict): the model in fp16
    (common.fp16: true in the image configs, trainer.py halves the model; the EMA stays fp32), cfg as a plain dict
    (OmegaConf.to_container)."""
    sd = model.state_dict()
    sd = {k: (v.half() if k != "_ema" and v.is_floating_point() else v) for k, v in sd.items()}
    cfg = {"common": {"fp16": True, "seed": 1}, "task": {"_name": "mae_image_pretraining"},
           "model": {"_name": "data2vec_multi", "depth": depth, "embed_dim": DIM, "num_heads": HEADS,
                     "layer_norm_first": False, "ema_encoder_only": False, "supported_modality": "IMAGE",
                     "modalities": {"image": {"patch_size": PATCH, "prenet_depth": prenet_depth,
                                              "num_extra_tokens": 1, "use_alibi_encoder": False}}}}
    return {"args": None, "cfg": cfg, "model": sd, "criterion": None,
            "optimizer_history": [{"criterion_name": "ModelCriterion", "optimizer_name": "FairseqCompositeOptimizer",
                                   "lr_scheduler_state": {}, "num_updates": 500000}],
            "task_state": {}, "extra_state": {"metrics": {}, "previous_training_time": 1.0,
                                              "train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": 0}},
            "last_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3}]}}


def fairseq_model(depth, prenet_depth, seed=0):
    torch.manual_seed(seed)
    model = _perturb(Data2VecMultiModel(depth, prenet_depth), seed).eval()
    ckpt = fairseq_checkpoint(model, depth, prenet_depth)
    model.load_state_dict({k: v for k, v in ckpt["model"].items() if k != "_ema"})  # the stored fp16 values
    return model, ckpt


def converted(ckpt) -> common.VisionTransformer:
    enc = common.create_vit("vit_t16", IMG, PATCH, post_norm=True).eval()
    common.load_encoder(enc, ckpt)  # strict: every key of the post-norm ViT must come from the file
    return enc


@pytest.mark.parametrize("depth,prenet_depth", [(12, 0), (10, 2)])  # ViT-L/H configs: prenet 0; ViT-B: 2 + 10
def test_data2vec2_release_converts_with_every_block(depth, prenet_depth):
    model, ckpt = fairseq_model(depth, prenet_depth)
    assert "blocks.0.attn.qkv.weight" in ckpt["model"] and not any(
        k.startswith("modality_encoders.IMAGE.blocks.") for k in ckpt["model"])  # the layout under test
    assert common.checkpoint_encoder_config(common.convert_to_ours(ckpt["model"]))["depth"] == depth + prenet_depth
    enc = converted(ckpt)
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        ref = model.extract_features(x)
        ours = enc.forward_features(x)
    assert ref.shape == ours.shape == (3, 1 + GRID * GRID, DIM)
    assert torch.allclose(ours, ref, atol=2e-5), (ours - ref).abs().max()
    # the student is loaded, not the EMA teacher stored beside it
    teacher = Data2VecMultiModel(depth, prenet_depth, skip_ema=True).eval()
    teacher.load_state_dict(ckpt["model"]["_ema"])
    with torch.no_grad():
        assert (teacher.extract_features(x) - ref).abs().max() > 0.1
    # a fine-tuned file (data2vec_image_classification.py) holds the same model under `model.`, plus its head
    ft = {f"model.{k}": v for k, v in ckpt["model"].items() if k != "_ema"}
    ft.update({"fc_norm.weight": torch.ones(DIM), "fc_norm.bias": torch.zeros(DIM), "head.weight": torch.zeros(5, DIM),
               "head.bias": torch.zeros(5)})
    with torch.no_grad():
        assert torch.equal(converted({"model": ft}).forward_features(x), ours)


def test_data2vec2_release_through_eval_knn_and_mim_refiner(tmp_path):
    model, ckpt = fairseq_model(12, 0, seed=1)
    path = tmp_path / "huge_imagenet.pt"
    torch.save(ckpt, path)
    feats = tmp_path / "feats.pth"
    run_script("eval_knn.py", "--checkpoint", path, *TINY, "--data", "synthetic:20:10", "--k", "1", "--seed", "0",
               "--save-features", feats, env=ONE_THREAD)
    saved = torch.load(feats, weights_only=True)
    val = common.build_dataset("synthetic:20:10", "val", common.eval_transform(IMG), img_size=IMG, seed=0,
                               require_labels=True)
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        ref = model.extract_features(x)[:, 0]  # the extra token (CLS) after the last block: post-norm, no final norm
        ours = converted(ckpt).forward_features(x)[:, 0]
    assert torch.allclose(saved["val_features"], ref, atol=2e-5)
    assert torch.allclose(saved["val_features"], ours, atol=1e-5)
    assert not torch.allclose(ref, ref.mean(0), atol=1e-2)  # images told apart
    # mim_refiner.py --init FILE (the paper's D2V2-Refined rows): the post-norm ViT, every block loaded
    args, init_ckpt, post_norm = mr.resolve_init(mr.Args(model="vit_t16", img_size=IMG, patch_size=PATCH,
                                                         data="synthetic:16:4", init=str(path)), None)
    encoder, _, _ = mr.build_modules(mr.resolve_args(args, post_norm), post_norm, 0)
    common.load_encoder(encoder, init_ckpt, what="--init")
    with torch.no_grad():
        assert post_norm and torch.allclose(encoder.eval().forward_features(x)[:, 0], ref, atol=2e-5)


def test_data2vec2_layouts_it_cannot_map_are_one_line_errors():
    _, ckpt = fairseq_model(2, 0)
    sd = ckpt["model"]
    prenorm = {k: v for k, v in sd.items() if not k.startswith("modality_encoders.IMAGE.context_encoder.norm.")}
    prenorm["norm.weight"] = torch.ones(DIM)  # layer_norm_first: the norm after the blocks, none before
    alibi = {**sd, "modality_encoders.IMAGE.alibi_scale": torch.ones(1, 1, 1, 1, 1)}
    two = {**sd, "modality_encoders.IMAGE.extra_tokens": torch.zeros(1, 2, DIM)}
    for bad, what in ((prenorm, "pre-norm"), (alibi, "ALiBi"), (two, "2 extra tokens")):
        with pytest.raises(common.UserError, match=f"data2vec 2.0 checkpoint has .*{what}.*released image models"):
            common.convert_to_ours(bad)


def test_python_objects_in_a_release_file_name_the_extraction_command(tmp_path):
    """fairseq files pickle training state beside the weights; anything that is not a plain type stops the
    weights-only load with one line giving a command that extracts the weights, and that command works."""
    _, ckpt = fairseq_model(2, 0)
    ckpt["extra_state"]["metrics"] = {"train": np.float64(0.5)}  # a numpy scalar logged by a criterion
    path = tmp_path / "release.pt"
    torch.save(ckpt, path)
    with pytest.raises(common.UserError) as e:
        common.load_file(str(path))
    msg = str(e.value)
    assert "\n" not in msg and "numpy" in msg and "weights_only=False" in msg
    cmd = re.search(r"extract the weights once: (python -c \".*\") and pass (\S+)$", msg)
    subprocess.run(cmd.group(1).replace("python", sys.executable, 1), shell=True, check=True, cwd=ROOT)
    enc = common.create_vit("vit_t16", IMG, PATCH, depth=2, post_norm=True)
    common.load_encoder(enc, cmd.group(2))
    assert torch.equal(enc.blocks[1].mlp.fc2.bias, ckpt["model"]["blocks.1.mlp.fc2.bias"].float())


# =============================================================================================
# MIM-Refiner release (ml-jku/MIM-Refiner hubconf.py: sd["state_dict"] into hub/postnorm_vit.py PostnormVit (D2V2-
# refined) or hub/prenorm_vit.py PrenormVit (MAE-refined), built from KappaModules: vit/vit_patch_embed.py (proj,
# channels last), vit/vit_pos_embed.py (`embed` (1, H, W, D), a buffer when fixed), vit/vit_class_tokens.py (`tokens`),
# transformer/postnorm_block.py and prenorm_block.py (norm1, attn.{qkv,proj}, norm2, mlp.{fc1,fc2})); the file is
# src/callbacks/base/writers/checkpoint_writer.py's {state_dict, ctor_kwargs, ckpt, abs_ckpt, stage_id}.
# MAE-CT release (ml-jku/MAE-CT models/vit/vit_mae.py VitMae: patch_embed.proj, cls_token, `pos_embed` (1, N, D) buffer
# without a CLS row, blocks of models/modules/vit_block.py = timm Block names, norm; the file is
# loggers/writers/checkpoint_writer.py's {state_dict, ctor_kwargs}).
# =============================================================================================
class KappaBlock(nn.Module):
    def __init__(self, post):
        super().__init__()
        self.post = post
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.norm1, self.norm2 = nn.LayerNorm(DIM, eps=1e-6), nn.LayerNorm(DIM, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(DIM, 4 * DIM), nn.Linear(4 * DIM, DIM)

    def attend(self, x):  # attention/dot_product_attention.py
        B, N, _ = x.shape
        q, k, v = self.attn.qkv(x).reshape(B, N, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        return self.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, DIM))

    def forward(self, x):
        mlp = lambda y: self.mlp.fc2(F.gelu(self.mlp.fc1(y)))  # noqa: E731
        if self.post:  # postnorm_block.py
            x = self.norm1(x + self.attend(x))
            return self.norm2(x + mlp(x))
        x = x + self.attend(self.norm1(x))  # prenorm_block.py
        return x + mlp(self.norm2(x))


class RefinerVit(nn.Module):
    def __init__(self, post):
        super().__init__()
        self.post = post
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.pos_embed = nn.Module()
        self.pos_embed.register_buffer("embed", torch.zeros(1, GRID, GRID, DIM))
        self.cls_tokens = nn.Module()
        self.cls_tokens.tokens = nn.Parameter(torch.zeros(1, 1, DIM))
        if post:
            self.embed_norm = nn.LayerNorm(DIM, eps=1e-6)
        self.blocks = nn.ModuleList([KappaBlock(post) for _ in range(12)])
        if not post:
            self.norm = nn.LayerNorm(DIM, eps=1e-6)

    def forward(self, img):
        x = self.patch_embed.proj(img).permute(0, 2, 3, 1) + self.pos_embed.embed  # b h w d
        x = torch.cat([self.cls_tokens.tokens.expand(len(x), -1, -1), x.flatten(1, 2)], dim=1)
        x = self.embed_norm(x) if self.post else x
        for blk in self.blocks:
            x = blk(x)
        return x if self.post else self.norm(x)


class MaectVit(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed(IMG, PATCH, 3, DIM)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.register_buffer("pos_embed", torch.zeros(1, GRID * GRID, DIM))
        self.blocks = nn.ModuleList([TimmBlock(DIM, HEADS, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
                                     for _ in range(12)])
        self.norm = nn.LayerNorm(DIM, eps=1e-6)

    def forward(self, img):  # embed_and_add_pos, append_cls_token, apply_transformer_blocks
        x = self.patch_embed(img) + self.pos_embed
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


@pytest.mark.parametrize("kind", ["d2v2_refined", "mae_refined", "maect"])
def test_mim_refiner_and_maect_releases_give_their_own_features(tmp_path, kind):
    torch.manual_seed(0)
    ref_model = _perturb(MaectVit() if kind == "maect" else RefinerVit(post=kind == "d2v2_refined"), seed=3).eval()
    sd = ref_model.state_dict()
    if kind == "maect":
        ckpt = {"state_dict": sd, "ctor_kwargs": {"kind": "vit.masked_encoder", "patch_size": PATCH,
                                                  "embedding_dim": DIM, "depth": 12, "attention_heads": HEADS}}
    else:
        ckpt = {"state_dict": sd, "ctor_kwargs": {"kind": "vit.data2vec2_vit", "patch_size": PATCH, "dim": DIM},
                "ckpt": {"epoch": 30, "update": 1000, "sample": 16000}, "abs_ckpt": {"epoch": 30}, "stage_id": "x1y2"}
    torch.save(ckpt, tmp_path / "release.th")
    enc, _ = eval_knn.build_encoder(eval_knn.Args(checkpoint=str(tmp_path / "release.th")))  # architecture inferred
    assert enc.post_norm == (kind == "d2v2_refined") and enc.depth == 12 and enc.num_heads == HEADS
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        ref, ours = ref_model(x), enc.eval().forward_features(x)
    assert torch.allclose(ours, ref, atol=2e-5), (ours - ref).abs().max()
