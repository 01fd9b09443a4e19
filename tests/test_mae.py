"""Tests for mae.py: masking (count, per-sample difference, un-shuffle), patchify (p, q, c) order and
round trip, the norm-pix loss and the decoder's token placement against explicit loops, end to end on a
tiny ImageFolder and a flat folder (checkpoint loads strictly into our ViT and timm's, official decoder
keys, reconstruction PNG), torchrun with 2 processes and gradient accumulation, exact resume, and the
one-line errors for bad input."""
import json

import pytest
import torch
from PIL import Image

import common
import mae
import conftest
from conftest import ONE_THREAD, TINY, run_script, write_image_folder, write_mae_release_checkpoint

# tiny end-to-end config: patch 8 (16 tokens, 4 visible) and a 1-block decoder keep each step cheap
E2E = [*TINY, "--patch-size", "8", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
       "--batch-size", "8", "--warmup-epochs", "1", "--blr", "1e-3", "--vis-images", "3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def tiny_mae(norm_pix=True, seed=0, img=8, patch=4, mask_ratio=0.75):
    torch.manual_seed(seed)
    enc = common.create_vit("vit_t16", img_size=img, patch_size=patch, dim=16, depth=1, num_heads=2)
    dec = mae.MaeDecoder(enc.dim, enc.grid, patch, dim=8, depth=1, num_heads=2)
    return mae.MaskedAutoencoder(enc, dec, mask_ratio, norm_pix)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_inprocess(capsys, *argv):
    """mae.py's entry point in this process; returns (exit code, stdout, stderr)."""
    return conftest.run_inprocess(capsys, mae, *argv)


def assert_one_line_error(p, needle):
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith("error:") and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr


# ----------------------------------------------------------------------------------------------
# components
# ----------------------------------------------------------------------------------------------
def test_random_masking_count_per_sample_and_unshuffle():
    torch.manual_seed(0)
    B, N, r = 16, 49, 0.75
    ids_keep, ids_restore, mask = mae.random_masking(B, N, r, "cpu")
    len_keep = int(N * (1 - r))  # 12: official int() truncation
    assert ids_keep.shape == (B, len_keep) and mask.shape == (B, N) and len_keep == 12
    assert (mask.sum(1) == N - len_keep).all() and set(mask.unique().tolist()) == {0.0, 1.0}
    for b in range(B):  # kept indices are distinct, exactly the mask-0 positions
        assert sorted(ids_keep[b].tolist()) == [i for i in range(N) if mask[b, i] == 0]
    assert len({tuple(sorted(k.tolist())) for k in ids_keep}) == B  # a different subset per sample
    # un-shuffle: [visible..., removed...] gathered with ids_restore is back in patch order
    x = torch.arange(N).float()[None].expand(B, -1)  # (B, N) patch indices as values
    visible = torch.gather(x, 1, ids_keep)
    removed = torch.stack([torch.tensor([i for i in range(N) if mask[b, i] == 1]).float() for b in range(B)])
    shuffled_removed = torch.gather(x, 1, torch.argsort(ids_restore, 1)[:, len_keep:])  # ids_shuffle tail
    assert torch.equal(shuffled_removed.sort(1).values, removed)
    restored = torch.gather(torch.cat([visible, shuffled_removed], 1), 1, ids_restore)
    assert torch.equal(restored, x)
    # smallest noise is kept (official: ascending argsort)
    noise = torch.rand(2, 8)
    keep, _, m = mae.random_masking(2, 8, 0.5, "cpu", noise=noise)
    assert torch.equal(keep, noise.argsort(1)[:, :4])
    want = torch.ones(2, 8)
    want.scatter_(1, noise.argsort(1)[:, :4], 0.0)
    assert torch.equal(m, want)


def test_patchify_order_and_round_trip():
    B, C, p = 2, 3, 4
    imgs = torch.randn(B, C, 8, 12)  # a 2 x 3 grid of patches
    x = mae.patchify(imgs, p)
    assert x.shape == (B, 6, p * p * C)
    for b in range(B):
        for i in range(2):
            for j in range(3):
                for pp in range(p):
                    for qq in range(p):
                        for c in range(C):  # vector index (pp * p + qq) * C + c: (p, q, c), channel last
                            assert x[b, i * 3 + j, (pp * p + qq) * C + c] == imgs[b, c, i * p + pp, j * p + qq]
    sq = torch.randn(B, C, 12, 12)
    assert torch.equal(mae.unpatchify(mae.patchify(sq, 4), 4), sq)


def hand_loss(imgs, pred, mask, p, norm_pix):
    """Official forward_loss with explicit loops: per-patch target in (p, q, c) order, unbiased variance."""
    B, C, H, W = imgs.shape
    gw = W // p
    total, count = 0.0, 0.0
    for b in range(B):
        for n in range(pred.shape[1]):
            i, j = divmod(n, gw)
            t = [float(imgs[b, c, i * p + pp, j * p + qq]) for pp in range(p) for qq in range(p) for c in range(C)]
            if norm_pix:
                mu = sum(t) / len(t)
                var = sum((v - mu) ** 2 for v in t) / (len(t) - 1)
                t = [(v - mu) / (var + 1e-6) ** 0.5 for v in t]
            err = sum((float(pred[b, n, k]) - t[k]) ** 2 for k in range(len(t))) / len(t)
            total += err * float(mask[b, n])
            count += float(mask[b, n])
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_hand_computation(norm_pix):
    model = tiny_mae(norm_pix)
    imgs = torch.randn(3, 3, 8, 8)
    noise = torch.rand(3, 4)
    loss, pred, mask = model(imgs, noise=noise)
    assert mask.sum().item() == 3 * 3  # 4 patches, keep int(4 * 0.25) = 1
    assert loss.item() == pytest.approx(hand_loss(imgs, pred.detach(), mask, 4, norm_pix), rel=1e-5)
    loss.backward()  # the mask token and every trainable parameter receive a gradient
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.decoder.mask_token.grad.abs().sum() > 0


def test_decoder_places_tokens_like_explicit_loop():
    """The decoder input built by hand: patch n gets the encoder token of n if visible, else the mask
    token; then [CLS], positions, blocks. Must equal the gather-based forward."""
    model = tiny_mae()
    model.eval()
    imgs, noise = torch.randn(2, 3, 8, 8), torch.rand(2, 4)
    with torch.no_grad():
        _, pred, mask = model(imgs, noise=noise)
        ids_keep, ids_restore, _ = mae.random_masking(2, 4, 0.75, "cpu", noise=noise)
        latent = model.encoder.forward_features(imgs, keep_idx=ids_keep)  # (2, 1+1, 16)
        dec = model.decoder
        emb = dec.decoder_embed(latent)
        for b in range(2):
            seq = [emb[b, 0]]
            for n in range(4):
                pos = (ids_keep[b] == n).nonzero()
                seq.append(emb[b, 1 + int(pos[0])] if len(pos) else dec.mask_token[0, 0])
                assert (len(pos) == 0) == bool(mask[b, n])
            x = torch.stack(seq)[None] + dec.decoder_pos_embed
            for blk in dec.decoder_blocks:
                x = blk(x)
            want = dec.decoder_pred(dec.decoder_norm(x))[0, 1:]
            torch.testing.assert_close(pred[b], want, rtol=1e-5, atol=1e-6)
    # official key names, so an official *_full.pth decoder loads; frozen sin-cos table with a zero CLS row
    keys = set(dec.state_dict())
    assert {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_blocks.0.attn.qkv.weight",
            "decoder_norm.weight", "decoder_pred.weight"} <= keys
    assert not dec.decoder_pos_embed.requires_grad and dec.decoder_pos_embed.shape == (1, 5, 8)
    torch.testing.assert_close(dec.decoder_pos_embed[0], common.sincos_pos_embed_2d(8, 2, 2))
    assert dec.decoder_pred.weight.shape == (4 * 4 * 3, 8)


def test_init_from_official_full_checkpoint_layout():
    """An official *_full.pth is {"model": encoder keys + decoder keys + mask_token}; ours splits the same
    keys into "model" and "decoder". Both load the encoder and the decoder exactly."""
    src = tiny_mae(seed=1)
    official = {"model": {**src.encoder.state_dict(), **src.decoder.state_dict()}}
    for ckpt in (official, {"model": src.encoder.state_dict(), "decoder": src.decoder.state_dict()}):
        dst = tiny_mae(seed=2)
        common.load_encoder(dst.encoder, ckpt)
        assert mae.load_init_decoder(dst.decoder, ckpt) == "decoder loaded too"
        for a, b in ((src.encoder, dst.encoder), (src.decoder, dst.decoder)):
            for k, v in a.state_dict().items():
                assert torch.equal(v, b.state_dict()[k]), k
    other = mae.MaeDecoder(16, 2, 4, dim=12, depth=1, num_heads=2)  # another decoder width: not loaded
    assert "from scratch" in mae.load_init_decoder(other, official)
    assert "no decoder" in mae.load_init_decoder(other, {"model": src.encoder.state_dict()})


def test_param_groups_weight_decay_rules():
    model = tiny_mae()
    groups = mae.build_param_groups(model, 0.05, token_weight_decay=False)
    wd = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in list(model.encoder.named_parameters()) + list(model.decoder.named_parameters())}
    decayed = {names[i] for i in wd}
    assert "blocks.0.attn.qkv.weight" in decayed and "decoder_pred.weight" in decayed
    assert not decayed & {"cls_token", "mask_token", "pos_embed", "decoder_pos_embed", "norm.weight", "decoder_pred.bias"}
    n_trainable = sum(len(g["params"]) for g in groups)
    assert n_trainable == sum(p.requires_grad for p in model.parameters())  # frozen pos_embeds skipped
    official = mae.build_param_groups(model, 0.05, token_weight_decay=True)
    decayed = {names[id(p)] for g in official if g["weight_decay"] > 0 for p in g["params"]}
    assert {"cls_token", "mask_token"} <= decayed and "norm.weight" not in decayed


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
def test_end_to_end_image_folder_checkpoint_loads_into_vit_and_timm(tmp_path, capsys):
    data = write_image_folder(tmp_path / "imgs", per_class=6, size=40)  # 18 train images
    out = tmp_path / "run"
    p = run_script("mae.py", *E2E, "--data", data, "--epochs", "2", "--output-dir", out, env=ONE_THREAD)
    assert "global batch 8" in p.stdout and "lr 3.125e-05" in p.stdout  # 1e-3 x 8 / 256
    ck = load(out / "checkpoint-last.pth")
    assert ck["epoch"] == 2 and ck["step"] == 4 and ck["model_is_ema"] is False
    assert not any(k.startswith(("decoder", "mask_token")) for k in ck["model"])
    assert {"mask_token", "decoder_pos_embed", "decoder_pred.weight"} <= set(ck["decoder"])
    enc = common.create_vit("vit_t16", img_size=32, patch_size=8)
    enc.load_state_dict(ck["model"], strict=True)
    import timm.models.vision_transformer as tv
    t = tv.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=0)
    t.load_state_dict(ck["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t.eval()(x), enc.eval()(x), rtol=1e-5, atol=1e-5)
    # the lr schedule actually applied: warmup from 0 over 1 epoch (2 steps), then cosine
    logs = [json.loads(line) for line in open(out / "log.jsonl") if "train/lr" in line]
    lrs = [l["train/lr"] for l in logs]
    base = 1e-3 * 8 / 256
    assert lrs == pytest.approx([0.0, base / 2, base, base * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 2)).item())])
    png = out / "recon_epoch001.png"
    assert (out / "recon_epoch000.png").is_file() and png.is_file()
    assert Image.open(png).size == (3 * 98 + 2, 4 * 98 + 2)  # 3 images x 4 rows of 96 px tiles, padding 2
    assert any((out / "tb").iterdir())
    # then eval_knn.py on the same ImageFolder: its classes differ in colour, so the answer is known (100%)
    js = tmp_path / "knn.json"
    run_script("eval_knn.py", "--checkpoint", out / "checkpoint-last.pth", "--data", data, "--k", "1", "3",
               "--num-workers", "0", "--device", "cpu", "--output-json", js, env=ONE_THREAD)
    res = json.loads(js.read_text())
    assert res["protocol"]["n_train"] == 18 and res["protocol"]["n_val"] == 18
    assert res["top1"]["1"] == 100.0 and res["top1"]["3"] == 100.0
    # --init from that checkpoint on a flat folder of unlabelled images (encoder + decoder continue)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, f in enumerate(sorted((data / "train").rglob("*.png"))[:8]):
        Image.open(f).save(flat / f"{i}.png")
    code, stdout, _ = run_inprocess(capsys, *E2E, "--data", flat, "--epochs", "1", "--vis-images", "0", "--output-dir",
                                    tmp_path / "cont", "--init", out / "checkpoint-last.pth")
    assert code == 0 and "decoder loaded too" in stdout
    assert load(tmp_path / "cont" / "checkpoint-last.pth")["epoch"] == 1


def test_torchrun_two_processes_with_accumulation(tmp_path):
    out = tmp_path / "ddp"
    run_script("mae.py", *E2E, "--data", "synthetic:32:8", "--epochs", "1", "--accum-steps", "2",
               "--output-dir", out, nproc=2, env=ONE_THREAD)
    ck = load(out / "checkpoint-last.pth")
    # 32 images / (2 ranks x 2 per micro-batch) = 8 micro-steps per rank -> 4 optimizer steps
    assert ck["epoch"] == 1 and ck["step"] == 4 and ck["args"]["accum_steps"] == 2
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    logs = [json.loads(line) for line in open(out / "log.jsonl") if "train/loss" in line]
    assert len(logs) == 4 and all(l["train/loss"] > 0 for l in logs)


def test_resume_gives_identical_weights(tmp_path, capsys):
    """2 epochs straight == 1 epoch, 'killed', relaunched with the same command (in-process runs of the
    script's entry point, to keep the suite fast; the subprocess path is covered above)."""
    args = [*E2E, "--data", "synthetic:16:4", "--epochs", "2", "--vis-images", "0"]
    assert run_inprocess(capsys, *args, "--output-dir", tmp_path / "a")[0] == 0
    code, stdout, _ = run_inprocess(capsys, *args, "--output-dir", tmp_path / "b", "--exit-after-epochs", "1")
    assert code == 0 and "rerun to resume" in stdout and load(tmp_path / "b" / "checkpoint-last.pth")["epoch"] == 1
    code, stdout, _ = run_inprocess(capsys, *args, "--output-dir", tmp_path / "b")
    assert code == 0 and "resuming" in stdout
    a, b = load(tmp_path / "a" / "checkpoint-last.pth"), load(tmp_path / "b" / "checkpoint-last.pth")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 4
    for key in ("model", "decoder"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.manual_seed(0)
    init = common.create_vit("vit_t16", img_size=32, patch_size=8).state_dict()
    assert not torch.equal(a["model"]["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])  # it trained
    code, stdout, _ = run_inprocess(capsys, *args, "--output-dir", tmp_path / "a")
    assert code == 0 and "nothing to do" in stdout


# ----------------------------------------------------------------------------------------------
# bad input -> one line, exit code 2
# ----------------------------------------------------------------------------------------------
def test_bad_input_gives_one_line_errors(tmp_path, capsys):
    out = ["--output-dir", tmp_path / "o", "--epochs", "1"]
    # as a user sees it (subprocess): an unreadable image (read first for the reconstruction figure)
    bad = write_image_folder(tmp_path / "bad", classes=("a",), per_class=8, splits=("train",))
    (bad / "train" / "a" / "0.png").write_bytes(b"this is not a png" * 10)
    assert_one_line_error(run_script("mae.py", *E2E, *out, "--data", bad, check=False, env=ONE_THREAD), "cannot read image")
    # met inside the training loop instead: the progress bar is already on stderr, the error is its last line
    code, _, stderr = run_inprocess(capsys, *E2E, *out, "--data", bad, "--vis-images", "0")
    assert code == 2 and stderr.strip().splitlines()[-1].startswith("error: cannot read image")
    assert "Traceback" not in stderr
    # the others through the same entry point (common.run_main) in-process
    empty = write_image_folder(tmp_path / "e", classes=("a",), per_class=8, splits=("train",))
    (empty / "train" / "b").mkdir()
    ck = tmp_path / "s16.pth"
    write_mae_release_checkpoint(ck, model_name="vit_s16", patch_size=8)
    syn = ["--data", "synthetic:16:4"]
    for extra, needle in [(["--data", tmp_path / "missing"], "does not exist"),
                          (["--data", empty], "contain no images"),
                          ([*syn, "--init", ck], "dim 384"),
                          ([*syn, "--accum-steps", "3"], "--accum-steps"),
                          ([*syn, "--mask-ratio", "1.0"], "--mask-ratio"),
                          ([*syn, "--mask-ratio", "0"], "--mask-ratio"),
                          ([*syn, "--mask-ratio", "0.99"], "keeps 0 of 16"),
                          ([*syn, "--decoder-dim", "30", "--decoder-heads", "4"], "--decoder-heads"),
                          ([*syn, "--batch-size", "64"], "fewer than one"),
                          ([*syn, "--init", tmp_path / "nope.pth"], "does not exist")]:
        code, _, stderr = run_inprocess(capsys, *E2E, *out, *extra)
        assert code == 2 and stderr.startswith("error:") and len(stderr.strip().splitlines()) == 1, (extra, stderr)
        assert needle in stderr, (extra, stderr)
    assert not (tmp_path / "o" / "checkpoint-last.pth").exists()
    code, stdout, _ = run_inprocess(capsys, "--help")
    assert code == 0 and stdout.count("--") > 30 and "Table 1d" in stdout  # every field's docstring renders
