"""finetune.py: MAE's layer-wise lr decay grouping and lr schedule transcribed from facebookresearch/mae and checked
parameter by parameter and step by step; mixup / cutmix equal to timm's Mixup on the same draws; stochastic depth per
sample, the same for any number of processes; the classifier equal to timm's VisionTransformer / Beit (strict load,
same logits); labelled subsets; torchrun x2 equal to x1; every bad input one line."""
import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import finetune
from conftest import TINY, load, read_json, run_inprocess, run_script, write_image_folder, write_mae_release_checkpoint


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "mae_t8.pth"
    write_mae_release_checkpoint(path, patch_size=8)
    return path


def ft_flags(init, out, data="synthetic:32:16"):
    """Tiny fine-tuning: ViT-T/8 at 32 px, 4 updates per epoch, the mae recipe otherwise (RandAugment, random
    erasing, mixup, cutmix, drop path, layer decay)."""
    return ["--init", init, "--data", data, "--device", "cpu", "--num-workers", "0", "--epochs", "2",
            "--warmup-epochs", "1", "--batch-size", "8", "--blr", "1e-2", "--output-dir", out]


# ---------------------------------------------------------------------------------------------
# facebookresearch/mae util/lr_decay.py and util/lr_sched.py, transcribed
# ---------------------------------------------------------------------------------------------
def mae_param_groups_lrd(model, weight_decay, no_weight_decay_list, layer_decay):
    """util/lr_decay.param_groups_lrd: {parameter name: (lr_scale, weight_decay)}."""
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        this_decay = 0.0 if (p.ndim == 1 or n in no_weight_decay_list) else weight_decay
        if n in ("cls_token", "pos_embed") or n.startswith("patch_embed"):
            layer_id = 0
        elif n.startswith("blocks"):
            layer_id = int(n.split(".")[1]) + 1
        else:
            layer_id = num_layers
        out[n] = (layer_scales[layer_id], this_decay)
    return out


def mae_adjust_learning_rate(epoch, lr, min_lr, warmup_epochs, epochs):
    """util/lr_sched.adjust_learning_rate (before the per-group lr_scale)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def timm_vit(num_classes, pool):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=num_classes,
                             global_pool="avg" if pool == "avg" else "token", fc_norm=pool == "avg" or None,
                             qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))


def test_layer_decay_groups_equal_maes_grouping_parameter_by_parameter():
    torch.manual_seed(0)
    model = finetune.Classifier(common.create_vit("vit_t16", 32, 8), 7, "avg")
    groups = finetune.layer_decay_groups(model, 0.05, 0.65)
    names = {id(p): n.removeprefix("encoder.") for n, p in model.named_parameters()}
    ours = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    ref = timm_vit(7, "avg")
    ref.load_state_dict(finetune.timm_state_dict(model))  # the same names: that is the point
    want = mae_param_groups_lrd(ref, 0.05, ref.no_weight_decay(), 0.65)
    assert ours.keys() == want.keys() and len(ours) == 4 + 12 * 12 + 4
    for n in want:
        assert ours[n][0] == pytest.approx(want[n][0], rel=1e-12) and ours[n][1] == want[n][1], (n, ours[n], want[n])
    assert len({s for s, _ in ours.values()}) == 14  # every block its own scale: layer decay is on
    assert "pos_embed" in ours and ours["pos_embed"] == (0.65 ** 13, 0.0)  # trained, no weight decay


def test_the_lr_of_every_group_at_every_step_equals_util_lr_sched(tmp_path, capsys, init, monkeypatch):
    seen = []
    real = common.set_lr

    def record(opt, lr, wd=None):
        real(opt, lr, wd)
        seen.append([(g["lr"], g["lr_scale"]) for g in opt.param_groups])
    monkeypatch.setattr(common, "set_lr", record)
    args = [*ft_flags(init, tmp_path / "run"), "--epochs", "3", "--min-lr", "1e-4", "--layer-decay", "0.75"]
    code, out, err = run_inprocess(capsys, finetune, *args)
    assert code == 0, err[-2000:]
    spe, peak = 4, 1e-2 * 8 / 256
    assert len(seen) == 1 + 3 * spe  # make_adamw's own call, then one per update
    seen = seen[1:]
    for step, groups in enumerate(seen):
        base = mae_adjust_learning_rate(step / spe, peak, 1e-4, 1, 3)  # called at each update with epoch fraction
        assert len(groups) == 28
        for lr, scale in groups:
            assert lr == pytest.approx(base * scale, rel=1e-9, abs=1e-15), (step, lr, base, scale)
    assert seen[0][0][0] == 0.0  # warmup starts at 0
    assert "layer-wise lr decay 0.75" in out and " 13  x1 " in out


# ---------------------------------------------------------------------------------------------
# mixup / cutmix and stochastic depth
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mixup,cutmix", [(0.8, 1.0), (0.8, 0.0), (0.0, 1.0)])
def test_mixing_equals_timm_mixup_on_the_same_draws(mixup, cutmix):
    from timm.data import Mixup
    kinds = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(6, 3, 16, 12, generator=g), torch.randint(0, 5, (6,), generator=g)
        np.random.seed(seed)
        ref = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, num_classes=5)
        x_ref, t_ref = ref(x.clone(), y)
        rng = np.random.RandomState(seed)
        x_ours, t_ours = finetune.mix_batch(x, y, rng, mixup=mixup, cutmix=cutmix, smoothing=0.1, num_classes=5,
                                            partner=lambda t: t.flip(0))
        assert torch.equal(x_ours, x_ref) and torch.allclose(t_ours, t_ref, rtol=0, atol=1e-7), seed
        assert torch.allclose(t_ours.sum(1), torch.ones(6))
        kinds.add("cutmix" if (x_ours == x).any() else "mixup")  # mixup changes every pixel, cutmix one box
    assert kinds == ({"cutmix", "mixup"} if mixup and cutmix else {"mixup"} if mixup else {"cutmix"})


def test_stochastic_depth_is_drawn_per_sample_alike_for_any_number_of_processes():
    rates = [0.1 * i / 11 for i in range(12)]
    one = finetune.drop_path_keep(rates, 8, torch.Generator().manual_seed(5), common.DistInfo(), "cpu")
    two = [finetune.drop_path_keep(rates, 4, torch.Generator().manual_seed(5), common.DistInfo(rank=r, world_size=2),
                                   "cpu") for r in (0, 1)]
    assert one[0] is None and all(k is not None for k in one[1:])
    for i in range(1, 12):  # rank r holds the global positions j * 2 + r
        assert torch.equal(one[i][:, 0::2], two[0][i]) and torch.equal(one[i][:, 1::2], two[1][i])
        assert set(one[i].unique().tolist()) <= {0.0, (torch.ones(()) / (1 - rates[i])).item()}  # fp32, as timm
    big = finetune.drop_path_keep([0.3], 100_000, torch.Generator().manual_seed(0), common.DistInfo(), "cpu")[0]
    assert (big == 0).float().mean().item() == pytest.approx(0.3, abs=0.01)  # Bernoulli(1 - p) / (1 - p)
    assert big.mean().item() == pytest.approx(1.0, abs=0.02)


def test_randaugment_at_magnitude_10_posterizes_to_black_instead_of_raising():
    """rand-m9-mstd0.5-inc1 reaches magnitude 10, where timm's PosterizeIncreasing keeps 0 bits: Pillow >= 13 raises
    (ValueError), Pillow < 13 gave a black image. The transform finetune.py builds gives the black image."""
    from PIL import Image
    args = finetune.Args(rand_aug="rand-m10-mstd0-inc1", reprob=0.0)
    tf = finetune.train_transform(args, 32)
    ops = [op for t in tf.transforms for op in getattr(t, "ops", []) if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    ops[0].prob = 1.0
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8))
    out = ops[0](img)
    assert out.mode == "RGB" and out.size == img.size and np.asarray(out).max() == 0
    ops[0].magnitude = 5  # 2 bits kept: Pillow's own posterize, unchanged
    assert np.array_equal(np.asarray(ops[0](img)), np.asarray(img) & 0b11000000)
    for _ in range(100):  # the whole transform: posterize at 0 bits in about 1 image of 15
        assert tf(img).shape == (3, 32, 32)



# ---------------------------------------------------------------------------------------------
# the classifier against timm
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_classifier_equals_timm_vision_transformer(pool):
    torch.manual_seed(1)
    model = finetune.Classifier(common.create_vit("vit_t16", 32, 8), 7, pool).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # the head and fc_norm away from their init
    ref = timm_vit(7, pool).eval()
    ref.load_state_dict(finetune.timm_state_dict(model), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    assert ("norm.weight" in finetune.timm_state_dict(model)) == (pool == "cls")


def test_conmim_classifier_has_a_position_bias_per_block_and_equals_timm_beit():
    import conmim
    from timm.models.beit import Beit
    torch.manual_seed(2)
    enc = common.create_vit("vit_t16", 32, 8, rel_pos_bias=True)
    with torch.no_grad():
        enc.rel_pos_bias.relative_position_bias_table.normal_()
        shared = enc.rel_pos_bias.relative_position_bias_table.clone()
    model = finetune.Classifier(enc, 5, "avg").eval()
    sd = finetune.timm_state_dict(model)
    tables = [k for k in sd if "relative_position_bias_table" in k]
    assert tables == [f"blocks.{i}.attn.relative_position_bias_table" for i in range(12)]
    assert all(torch.equal(sd[k], shared) for k in tables)  # BEiT: the shared table copied into every block
    with torch.no_grad():
        for i, blk in enumerate(model.encoder.blocks):
            blk.attn.relative_position_bias_table.add_(0.1 * i)  # from here on they differ
    ref = Beit(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=5, use_abs_pos_emb=False,
               use_rel_pos_bias=True, init_values=None, global_pool="avg").eval()
    ref.load_state_dict(conmim.timm_beit_state_dict(finetune.timm_state_dict(model)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    groups = finetune.layer_decay_groups(model, 0.05, 0.65)
    scale = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert scale[id(model.encoder.blocks[3].attn.relative_position_bias_table)] == (0.65 ** 9, 0.0)  # layer 4


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def test_end_to_end_writes_last_and_best_and_the_model_drops_into_timm(tmp_path, capsys, init):
    out = tmp_path / "run"
    code, stdout, err = run_inprocess(capsys, finetune, *ft_flags(init, out), "--output-json", out / "r.json")
    assert code == 0, err[-2000:]
    r = read_json(out / "r.json")
    assert {"top1_last", "top1_best", "epoch_last", "epoch_best", "top5_last", "protocol"} <= r.keys()
    assert r["epoch_last"] == 1 and r["top1_best"] >= r["top1_last"] and r["protocol"]["recipe"] == "mae"
    assert r["protocol"]["layer_decay"] == 0.65 and r["protocol"]["mixup"] == 0.8  # the ViT-B row, said so
    assert "recipe mae, ViT-B row (no ViT-T row)" in stdout
    assert f"last epoch (1) {r['top1_last']:.2f}, best epoch ({r['epoch_best']}) {r['top1_best']:.2f}" in stdout
    ck = load(out / "checkpoint-last.pth")
    best = load(out / "checkpoint-best.pth")
    assert best["top1"] == r["top1_best"] and best["epoch"] == r["epoch_best"]
    ref = timm_vit(len(ck["classes"]), "avg").eval()
    ref.load_state_dict(ck["model"], strict=True)
    # the val top-1 again, from timm's model on the same val images
    val = common.build_dataset("synthetic:32:16", "val", common.eval_transform(32), img_size=32)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        top1 = 100.0 * (ref(x).argmax(1) == y).float().mean().item()
    assert top1 == pytest.approx(r["top1_last"])
    assert not torch.equal(ck["model"]["pos_embed"], load(init)["model"]["pos_embed"])  # trained


def test_resumed_after_an_epoch_equals_the_uninterrupted_run(tmp_path, capsys, init):
    args = ft_flags(init, tmp_path / "u")
    assert run_inprocess(capsys, finetune, *args)[0] == 0
    args_s = ft_flags(init, tmp_path / "s")
    assert run_inprocess(capsys, finetune, *args_s, "--exit-after-epochs", "1")[0] == 0
    code, out, _ = run_inprocess(capsys, finetune, *args_s)
    assert code == 0 and "resuming" in out
    a, b = load(tmp_path / "u" / "checkpoint-last.pth"), load(tmp_path / "s" / "checkpoint-last.pth")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["best"] == b["best"]


def test_torchrun_two_processes_equal_one(tmp_path, init):
    """Half the batch on each of 2 processes (gloo): the same images, augmentations, mixing partners, mixing draws and
    stochastic depth as one process, so the same losses and weights to reduction-order rounding."""
    for n in (1, 2):
        run_script("finetune.py", *ft_flags(init, tmp_path / f"x{n}"), "--epochs", "1", nproc=n)
    loss = [[json.loads(x)["train/loss"] for x in open(tmp_path / f"x{n}" / "log.jsonl") if "train/loss" in x]
            for n in (1, 2)]
    assert len(loss[0]) == 4 and loss[0] == pytest.approx(loss[1], rel=1e-5)
    a, b = (load(tmp_path / f"x{n}" / "checkpoint-last.pth")["model"] for n in (1, 2))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_label_subsets_from_a_split_file_or_a_fraction(tmp_path, capsys, init):
    data = write_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=8, size=32)
    split = tmp_path / "split.txt"
    split.write_text("a/0.png\na/3.png\na/5.png\nb/1.png\nb/2.png\nc/7.png\nc/0.png\nc/4.png\n")  # 3 / 2 / 3 per class
    base = [*ft_flags(init, tmp_path / "r1", data=str(data)), "--epochs", "1", "--batch-size", "4"]
    code, out, err = run_inprocess(capsys, finetune, *base, "--train-subset", split)
    assert code == 0, err[-2000:]
    assert f"trained on the 8 images of {split}" in out
    idx = finetune.read_subset(str(split), common.build_dataset(str(data), "train", None, require_labels=True))
    assert len(idx) == 8
    picked = finetune.fraction_subset([0] * 10 + [1] * 20 + [2] * 7, 0.5, seed=3)
    counts = np.bincount([([0] * 10 + [1] * 20 + [2] * 7)[i] for i in picked])
    assert counts.tolist() == [5, 10, 4] and picked == finetune.fraction_subset([0] * 10 + [1] * 20 + [2] * 7, 0.5, 3)
    code, out, _ = run_inprocess(capsys, finetune, *base[:-2], "--output-dir", tmp_path / "r2", "--batch-size", "4",
                                 "--label-fraction", "0.5")
    assert code == 0 and "not the papers' split" in out


# ---------------------------------------------------------------------------------------------
# bad inputs: one line, exit status 2
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_end_in_one_line(tmp_path, capsys, init, monkeypatch):
    data = write_image_folder(tmp_path / "d", classes=("a", "b"), per_class=4, size=32)
    other = write_image_folder(tmp_path / "o", classes=("a", "b"), per_class=4, size=32, splits=("train",))
    write_image_folder(other, classes=("a", "x"), per_class=2, size=32, splits=("val",))
    (tmp_path / "ambiguous.txt").write_text("0.png\n")
    (tmp_path / "imagenet.txt").write_text("n01440764_10026.JPEG\nn01440764_10027.JPEG\n")
    (tmp_path / "latin1.txt").write_bytes("a/0.png caf\xe9\n".encode("latin-1"))
    base = ["--device", "cpu", "--num-workers", "0", "--epochs", "1", "--output-dir", tmp_path / "out"]
    ok = ["--init", init, "--data", data, "--batch-size", "4", *base]
    cases = [
        ([*base], "pass --init CHECKPOINT"),
        (["--init", "none", *base], "needs --model"),
        (["--init", init, "--model", "vit_s16", "--data", data, *base], "but the model is a vit_s16"),
        (["--init", init, "--patch-size", "16", "--data", data, *base], "patch"),
        (["--init", init, "--data", other, *base], "different classes"),
        ([*ok, "--train-subset", tmp_path / "imagenet.txt"], "2 of 2 names are not in the train data"),
        ([*ok, "--train-subset", tmp_path / "ambiguous.txt"], "write it as class/0.png"),
        ([*ok, "--train-subset", tmp_path / "latin1.txt"], "not a UTF-8 text file"),
        ([*ok, "--train-subset", tmp_path / "missing.txt"], "does not exist"),
        ([*ok, "--train-subset", tmp_path / "imagenet.txt", "--label-fraction", "0.5"], "pass one"),
        ([*ok[:-len(base)], "--batch-size", "1", *base], "global micro-batch of 1"),
        ([*ok, "--recipe", "lowshot-1pct"], "--train-subset FILE (google-research/simclr imagenet_subsets/1percent.txt)"),
        ([*ok, "--encoder", "model_ema"], "has no encoder 'model_ema'"),
        ([*ok, "--batch-size", "64"], "fewer than one global batch"),
        ([*ok, "--smoothing", "1"], "--smoothing 1"),
    ]
    for argv, needle in cases:
        code, _, err = run_inprocess(capsys, finetune, *argv)
        lines = [x for x in err.splitlines() if "error:" in x]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (argv, err[-1500:])
        assert not (tmp_path / "out").exists(), argv
    monkeypatch.setitem(__import__("sys").modules, "timm.data", None)  # timm not installed
    code, _, err = run_inprocess(capsys, finetune, *ok)
    assert code == 2 and "pip install timm" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_inprocess(capsys, finetune, *ok, "--rand-aug", "off", "--reprob", "0")  # crop and flip: no timm
    assert code == 0, err[-2000:]


TRAIN = {  # tiny 1-epoch runs of the five scripts (ViT-T/8, 32 px), for their closing lines
    "mae": ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--batch-size", "8",
            "--warmup-epochs", "0", "--vis-images", "0", "--epochs", "1"],
    "lut": ["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2", "--head-hidden-dim", "32",
            "--pred-hidden-dim", "32", "--head-out-dim", "16", "--warmup-epochs", "0", "--batch-size", "8",
            "--epochs", "1"],
    "conmim": ["--head-hidden-dim", "32", "--head-out-dim", "16", "--warmup-epochs", "0", "--batch-size", "8",
               "--epochs", "1"],
    "mae_ct": ["--queue-size", "16", "--proj-hidden", "32", "--pred-hidden", "32", "--proj-dim", "16",
               "--batch-size", "8", "--topk", "1", "--head-epochs", "1", "--epochs", "1", "--init", "INIT"],
    "mim_refiner": ["--batch-size", "8", "--queue-size", "16", "--topk", "1", "--local-crops", "1", "--head-hidden",
                    "32", "--pred-hidden", "32", "--head-blocks", "11", "--warmup-epochs", "0", "--head-epochs", "1",
                    "--epochs", "1", "--init", "INIT"],
}
WEIGHTS = {"mae": "'model'", "lut": "'model'", "conmim": "'model_ema'", "mae_ct": "'model'", "mim_refiner": "'model'"}


@pytest.mark.parametrize("script", TRAIN)
def test_the_training_scripts_print_their_papers_fine_tuning_and_it_runs_as_printed(tmp_path, capsys, init, script):
    """Each script's closing lines name the fine-tuning of its paper (MAE Table 3, LUT Table 1, ConMIM Tables 1-3 on
    the momentum teacher, MAE-CT / MIM-Refiner 1 % and 10 % of the labels); each printed command runs on the
    script's own checkpoint (shortened by flags appended after the printed ones)."""
    import importlib
    argv = [*TINY, "--patch-size", "8", "--data", "synthetic:32:16", "--output-dir", tmp_path / "run",
            *[init if a == "INIT" else a for a in TRAIN[script]]]
    code, out, err = run_inprocess(capsys, importlib.import_module(script), *argv)
    assert code == 0, err[-2000:]
    cmds = [line[line.index("python finetune.py"):] for line in out[out.index("to evaluate as the paper"):].splitlines()
            if "python finetune.py" in line]
    want = {"mae": ["--recipe mae"], "lut": ["--recipe lut"], "conmim": ["--recipe conmim"],
            "mae_ct": ["--recipe lowshot-1pct", "--recipe lowshot-10pct"],
            "mim_refiner": ["--recipe lowshot-1pct", "--recipe lowshot-10pct", "--recipe mae --pool cls"]}[script]
    assert len(cmds) == len(want) and all(w in c for w, c in zip(want, cmds)), cmds
    for cmd in cmds[:2]:
        parts = cmd.split()
        assert parts[:2] == ["python", "finetune.py"]
        code, out, err = run_inprocess(capsys, finetune, *parts[2:], "--epochs", "1", "--batch-size", "4",
                                       "--num-workers", "0", "--device", "cpu", "--output-dir", tmp_path / "ft")
        assert code == 0, (cmd, err[-2000:])
        assert f"{tmp_path / 'run' / 'checkpoint-last.pth'}: {WEIGHTS[script]}" in out
        if "lowshot" in cmd:
            assert "--label-fraction 0.01" in cmds[0] and "not the papers' split" in out
        import shutil
        shutil.rmtree(tmp_path / "ft")


@pytest.mark.parametrize("kind", ["data2vec2", "mim_refiner_release"])
def test_release_files_of_other_codebases_fine_tune(tmp_path, capsys, kind):
    """A fairseq data2vec 2.0 file (post-norm blocks, no final norm: avg pools the raw tokens into fc_norm) and a
    MIM-Refiner release ({"state_dict"}: no "model" key) fine-tune with every block of their encoder."""
    import test_foreign as tf
    if kind == "data2vec2":
        _, ckpt = tf.fairseq_model(12, 0)
    else:
        torch.manual_seed(0)
        ckpt = {"state_dict": tf._perturb(tf.RefinerVit(post=False), seed=3).state_dict(), "ctor_kwargs": {}}
    torch.save(ckpt, tmp_path / "release.pt")
    want = common.create_vit("vit_t16", 32, 4, post_norm=kind == "data2vec2")
    common.load_encoder(want, ckpt)
    code, out, err = run_inprocess(capsys, finetune, "--init", tmp_path / "release.pt", "--data", "synthetic:16:8",
                                   "--device", "cpu", "--num-workers", "0", "--epochs", "1", "--batch-size", "8",
                                   "--output-dir", tmp_path / "run", "--exit-after-epochs", "1")
    assert code == 0, err[-2000:]
    assert ("post-norm " if kind == "data2vec2" else "") + "vit_t16 (dim 192, depth 12" in out
    sd = load(tmp_path / "run" / "checkpoint-last.pth")["model"]
    assert ("embed_norm.weight" in sd) == (kind == "data2vec2") and "blocks.11.mlp.fc2.weight" in sd
    # trained from the release's weights: the first block moved only by the (layer-decayed) updates
    assert (sd["blocks.0.attn.qkv.weight"] - want.state_dict()["blocks.0.attn.qkv.weight"]).abs().max() < 1e-2


def test_a_nan_never_reaches_the_checkpoint(tmp_path, capsys, init, monkeypatch):
    """NaN weights after the last update of an epoch: the epoch-end save is refused in one line and the previous
    checkpoint stays the last good one."""
    from test_hardening import _inject_nan_on_step
    out = tmp_path / "run"
    assert run_inprocess(capsys, finetune, *ft_flags(init, out), "--exit-after-epochs", "1")[0] == 0
    before = (out / "checkpoint-last.pth").read_bytes()
    _inject_nan_on_step(monkeypatch, 4)  # the resumed epoch's 4th (last) update
    code, _, err = run_inprocess(capsys, finetune, *ft_flags(init, out))
    lines = [x for x in err.splitlines() if "error:" in x]
    assert code == 2 and len(lines) == 1 and "diverged" in lines[0] and "still holds the last good state" in lines[0]
    assert (out / "checkpoint-last.pth").read_bytes() == before
