"""The training scripts' k-NN monitor (eval_knn.KnnMonitor, built by common.knn_monitor) equals eval_knn.py on the same
checkpoint, bank and k (every script, and under torchrun x2); --save-every files load in eval_knn.py and strictly into timm; the
official self-exclusion is the default of MAE-CT and MIM-Refiner; the paper's evaluation command is printed;
the evaluation resize follows timm's (floor(S / crop_pct))."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import common
import mae_ct
import mim_refiner as mr
from conftest import ONE_THREAD, TINY, read_json, run_script, write_image_folder, write_mae_release_checkpoint

SUBSET = "0.5"  # half of the train split as the bank: the seeded subset is exercised

# one tiny configuration per script (patch 8: 16 tokens), 2 epochs of 2 updates; the bank (16 of 32) and the
# val split (13: an odd size, so that 2 ranks pad a duplicate) are small, k = 20 clips to the bank
DATA = ["--data", "synthetic:32:13"]
SCRIPTS = {
    "mae.py": ["--decoder-dim", 32, "--decoder-depth", 1, "--decoder-heads", 2, "--batch-size", 16,
               "--warmup-epochs", 1, "--epochs", 2, "--vis-images", 0],
    "mae_ct.py": ["--queue-size", 16, "--proj-hidden", 32, "--pred-hidden", 32, "--proj-dim", 16, "--batch-size", 16,
                  "--topk", 3, "--head-epochs", 1, "--epochs", 1, "--init", "MAE"],
    "mim_refiner.py": ["--batch-size", 16, "--queue-size", 48, "--local-crops", 2, "--head-hidden", 32, "--pred-hidden", 32,
                       "--head-blocks", 10, 11, "--warmup-epochs", 1, "--head-epochs", 1, "--epochs", 1, "--init", "MAE"],
    "lut.py": ["--decoder-dim", 32, "--decoder-depth", 1, "--decoder-heads", 2, "--head-hidden-dim", 64,
               "--pred-hidden-dim", 64, "--head-out-dim", 32, "--warmup-epochs", 1, "--batch-size", 16, "--epochs", 2],
    "conmim.py": ["--head-hidden-dim", 32, "--head-out-dim", 16, "--warmup-epochs", 1, "--batch-size", 16, "--epochs", 2],
}
BLOCKS = {"mim_refiner.py": [10, 11]}  # the refined blocks; every other script: the last block
POOL = {"mae_ct.py": "avg"}  # MAE-CT's ViT-T uses the ViT-B column (mean-patch pooling)


def knn_logs(out):
    return [json.loads(line) for line in open(out / "log.jsonl") if "knn/seconds" in line]


def eval_knn_top1(ckpt, tmp_path, blocks, pool="cls", data="synthetic:32:13"):
    """eval_knn.py at k = 20 on the monitor's bank (same subset and seed), per block."""
    out = tmp_path / f"knn_{ckpt.stem}.json"
    run_script("eval_knn.py", "--checkpoint", ckpt, "--data", data, "--k", 20, "--train-subset", SUBSET,
               "--seed", 0, "--pool", pool, "--blocks", *blocks, "--num-workers", 0, "--device", "cpu",
               "--output-json", out, env=ONE_THREAD)
    res = read_json(out)
    return {int(b): r["top1"]["20"] for b, r in res["per_block"].items()}


def run_training(script, out, tmp_path, nproc=1):
    args = [a if a != "MAE" else tmp_path / "mae.pth" for a in SCRIPTS[script]]
    if "MAE" in SCRIPTS[script]:
        write_mae_release_checkpoint(tmp_path / "mae.pth", patch_size=8)
    return run_script(script, *TINY, "--patch-size", 8, *DATA, *args, "--knn-every", 1, "--knn-subset", SUBSET,
                      "--save-every", 1, "--output-dir", out, nproc=nproc, env=ONE_THREAD)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_monitor_equals_eval_knn(script, tmp_path):
    """Every epoch logs a k-NN top-1 per trained block; the last one equals eval_knn.py on the kept checkpoint of
    that epoch (and on checkpoint-last.pth); the run ends with the paper's evaluation command."""
    out = tmp_path / "run"
    p = run_training(script, out, tmp_path)
    logs = knn_logs(out)
    assert len(logs) == 2  # one per epoch
    blocks = BLOCKS.get(script, [11])
    kept = out / "checkpoint-epoch002.pth"
    ref = eval_knn_top1(kept, tmp_path, blocks, POOL.get(script, "cls"))
    assert {b: logs[-1][f"knn/top1_block{b}"] for b in blocks} == ref
    last = torch.load(out / "checkpoint-last.pth", weights_only=True)
    small = torch.load(kept, weights_only=True)
    assert set(small) == {"model", "encoder_config", "model_is_ema", "epoch"} and small["epoch"] == 2
    assert small["model_is_ema"] == last["model_is_ema"] == (script in ("mae_ct.py", "mim_refiner.py"))
    assert small["model"].keys() == last["model"].keys()
    assert all(torch.equal(small["model"][k], last["model"][k]) for k in small["model"])
    assert (out / "checkpoint-epoch001.pth").is_file()
    assert "k-NN top-1 (k=20" in p.stdout
    assert "to evaluate as the paper:" in p.stdout and f"--checkpoint {out / 'checkpoint-last.pth'}" in p.stdout


def test_monitor_under_torchrun_equals_eval_knn_and_kept_file_loads_into_timm(tmp_path):
    """2 gloo processes: each extracts its shard (13 val images: one padded duplicate), the gathered bank
    gives eval_knn.py's single-process top-1; the kept file loads strictly into timm and our ViT."""
    out = tmp_path / "run"
    run_training("mim_refiner.py", out, tmp_path, nproc=2)
    logs = knn_logs(out)
    assert len(logs) == 2
    ref = eval_knn_top1(out / "checkpoint-epoch002.pth", tmp_path, [10, 11])
    assert {b: logs[-1][f"knn/top1_block{b}"] for b in (10, 11)} == ref
    ck = torch.load(out / "checkpoint-epoch001.pth", weights_only=True)
    import timm.models.vision_transformer as tv
    t = tv.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=12, num_heads=3, num_classes=0)
    t.load_state_dict(ck["model"], strict=True)
    enc = common.create_vit("vit_t16", img_size=32, patch_size=8)
    enc.load_state_dict(ck["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t.eval()(x), enc.eval()(x), rtol=1e-5, atol=1e-5)


def _features_with_spread(seed=0, n_train=300, n_test=200, classes=6, dim=16):
    """Class means plus noise of the same scale: overlapping classes, top-1 well inside (0, 100)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g)
    ytr, yte = torch.arange(n_train) % classes, torch.arange(n_test) % classes
    tr = means[ytr] + 1.2 * torch.randn(n_train, dim, generator=g)
    te = means[yte] + 1.2 * torch.randn(n_test, dim, generator=g)
    return tr, ytr, te, yte, classes


def dino_knn_formula(train_f, train_y, test_f, test_y, k, T, classes):
    """DINO's weighted k-NN (eval_knn.py knn_classifier, Wu et al. 2018 Eq. 7-8), written out per query in
    float64: cosine similarity to every train feature, the k largest, class score sum of exp(s / T)."""
    tr = train_f.double() / train_f.double().norm(dim=1, keepdim=True)
    preds = []
    for q in test_f.double():
        s = tr @ (q / q.norm())  # (N,)
        order = sorted(range(len(s)), key=lambda i: -float(s[i]))[:k]
        score = [0.0] * classes
        for i in order:
            score[int(train_y[i])] += float(torch.exp(s[i] / T))
        preds.append(max(range(classes), key=lambda c: score[c]))
    preds = torch.tensor(preds)
    return 100.0 * (preds == test_y).double().mean().item(), preds


@pytest.mark.parametrize("k", [1, 10, 20])
def test_vote_matches_dino_formula(k):
    import eval_knn
    tr, ytr, te, yte, classes = _features_with_spread()
    ref, _ = dino_knn_formula(tr, ytr, te, yte, k, 0.07, classes)
    assert 30.0 < ref < 95.0  # spread: neither chance nor separable
    assert eval_knn.knn_classify(tr, ytr, te, yte, [k], 0.07, classes)["top1"][k] == pytest.approx(ref, abs=1e-9)
    full = eval_knn.knn_classify(F.normalize(tr, dim=1), ytr, te, yte, [k], 0.07, classes)
    assert full["top1"][k] == pytest.approx(ref, abs=1e-9)


def test_bank_subset_is_seeded_and_sized():
    import eval_knn
    a, b = eval_knn.knn_bank_indices(1000, 0.1, 3), eval_knn.knn_bank_indices(1000, 0.1, 3)
    assert torch.equal(a, b) and len(a) == 100 and len(set(a.tolist())) == 100 and torch.equal(a, a.sort().values)
    assert not torch.equal(a, eval_knn.knn_bank_indices(1000, 0.1, 4))
    assert torch.equal(eval_knn.knn_bank_indices(7, 1.0, 0), torch.arange(7))


class _Log:
    def __init__(self):
        self.lines = []

    def print(self, *a):
        self.lines.append(" ".join(map(str, a)))


def _monitor(log, **kw):
    base = dict(every=1, data=None, train_data="synthetic:8:4", subset=0.5, img_size=32, batch_size=8,
                num_workers=0, seed=0)
    return common.knn_monitor(common.DistInfo(), log, **{**base, **kw})


def test_monitor_off_without_labelled_val_and_errors(tmp_path):
    """Default --knn-data: the training root's val split; without one the monitor is off with a one-line note.
    An explicit --knn-data without labels is a UserError at start; a bad fraction is refused by the flag's type."""
    root = write_image_folder(tmp_path / "imgs", per_class=2, splits=("train",))
    log = _Log()
    mon = _monitor(log, train_data=str(root))
    assert mon.every == 0 and len(log.lines) == 1 and "k-NN monitor off" in log.lines[0] and "--knn-data" in log.lines[0]
    assert mon(1, common.create_vit("vit_t16", 32, 4), 0) is None
    with_val = write_image_folder(tmp_path / "full", per_class=2)
    mon = _monitor(_Log(), train_data=str(root), data=str(with_val))
    assert mon.every == 1 and len(mon.bank) == 3 and len(mon.val) == 6  # half of 6 train images, all 6 val
    with pytest.raises(common.UserError, match="val"):
        _monitor(_Log(), data=str(root))
    import mae
    with pytest.raises(common.UserError, match=r"--knn-subset 1.5: must lie in \(0, 1\]"):
        mae.Args(knn_subset=1.5)  # checked once, when the Args is made (common.Flags)
    ok = mae.Args(knn_subset=0.5)
    with pytest.raises(common.UserError, match=r"--knn-subset 0.0: must lie in \(0, 1\]"):
        dataclasses.replace(ok, knn_subset=0.0)


def test_self_exclusion_is_the_default_and_skips_the_own_entry():
    """MAE-CT and MIM-Refiner exclude a sample's own queue entry by default (official); --no-exclude-self gives
    the paper's literal lookup, which returns the own (identical) entry."""
    for mod in (mae_ct, mr):
        assert mod.Args().exclude_self is True
        assert common.parse_args(mod.Args, []).exclude_self is True
        assert common.parse_args(mod.Args, ["--no-exclude-self"]).exclude_self is False
    torch.manual_seed(0)
    z = F.normalize(torch.randn(4, 8), dim=1)  # (B, d)
    ids = torch.tensor([10, 11, 12, 13])
    # MIM-Refiner queue: entry 5 holds sample 11's own older projection (its exact vector), the rest random
    q = mr.NNQueue(16, 8)
    q.x[5], q.ids[5] = z[1], 11
    _, pos_lit = q.lookup(z, None, 1)
    _, pos_off = q.lookup(z, ids if mr.Args().exclude_self else None, 1)
    assert pos_lit[1] == 5 and pos_off[1] != 5
    assert torch.equal(pos_lit[[0, 2, 3]], pos_off[[0, 2, 3]])  # the others hold no own entry: unchanged
    qm = mae_ct.NNQueue(16, 8)
    qm.queue[7], qm.ids[7] = z[2], 12
    _, idx_lit = qm.find_nn(z, 1, None)
    _, idx_off = qm.find_nn(z, 1, ids if mae_ct.Args().exclude_self else None)
    assert idx_lit[2] == 7 and idx_off[2] != 7 and torch.equal(idx_lit[[0, 1, 3]], idx_off[[0, 1, 3]])


@pytest.mark.parametrize("size", [32, 96, 224])
def test_eval_transform_matches_timm(size):
    """common.eval_transform = timm's eval pipeline resolved with crop_pct 0.875, bicubic: same resize
    (floor(S / 0.875): 36 at 32, 109 at 96, 256 at 224), crop and normalisation, pixel for pixel."""
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    cfg = resolve_data_config({"input_size": (3, size, size), "crop_pct": 0.875, "interpolation": "bicubic",
                               "mean": common.IMAGENET_MEAN, "std": common.IMAGENET_STD})
    ref = create_transform(**cfg, is_training=False)
    assert common.eval_resize(size) == {32: 36, 96: 109, 224: 256}[size]
    rng = np.random.default_rng(size)
    img = Image.fromarray(rng.integers(0, 256, (size * 3 // 2 + 5, size + 9, 3), dtype=np.uint8))  # non-square
    ours = common.eval_transform(size)(img)
    assert ours.shape == (3, size, size)
    torch.testing.assert_close(ours, ref(img), rtol=0, atol=0)
    assert all(common.eval_resize(s) == int(s / 0.875) for s in range(8, 1025))
