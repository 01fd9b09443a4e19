"""eval_knn.py: the weighted vote by hand, toy problems with known answers, chunking, low-shot subsets,
per-block features, foreign checkpoint layouts, end to end (official MAE release file, our format),
torchrun 2 processes = 1 process, and one-line errors."""
import math
import re
from pathlib import Path

import pytest
import torch

import common
import eval_knn
from conftest import ONE_THREAD, TINY, read_json, run_script, write_image_folder, write_mae_release_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def _cls_features(enc, ds):
    """Reference: CLS after the final norm of every image of `ds`, computed directly."""
    enc.eval()
    with torch.no_grad():
        return torch.cat([enc(ds[i][0][None]) for i in range(len(ds))])


# ---------------------------------------------------------------------------------------------
# classifier
# ---------------------------------------------------------------------------------------------
def test_hand_worked_weighted_vote():
    # train: t0 (class 0) at angle 0; t1, t2 (class 1) at cosine 0.9 to the query (scaled: cosine ignores norm)
    s = math.sqrt(1 - 0.81)
    train = torch.tensor([[1.0, 0.0], [0.9 * 5, s * 5], [0.9, -s]])
    train_y = torch.tensor([0, 1, 1])
    q = torch.tensor([[2.0, 0.0]])
    for T in (0.07, 1.0):
        w0, w1 = math.exp(1.0 / T), 2 * math.exp(0.9 / T)  # score_c = sum exp(s_i/T) over class-c neighbours
        expected = 0 if w0 > w1 else 1
        res = eval_knn.knn_classify(train, train_y, q, torch.tensor([expected]), [1, 3], T, num_classes=2)
        assert res["top1"][3] == 100.0, (T, w0, w1)
        assert res["top1"][1] == (100.0 if expected == 0 else 0.0)  # 1-NN is t0
        assert res["top5"] == {}  # 2 classes: no top-5
    # T = 0.07: 1.6e6 vs 2 x 3.8e5 -> class 0 although the majority of the 3 neighbours is class 1
    assert math.exp(1 / 0.07) > 2 * math.exp(0.9 / 0.07) and 2 * math.exp(0.9) > math.exp(1.0)


def _reference_knn(train, train_y, test, test_y, k, T, C):
    """Explicit loops: DINO's vote, top-5 among classes with votes."""
    tr = torch.nn.functional.normalize(train.double(), dim=1)
    te = torch.nn.functional.normalize(test.double(), dim=1)
    c1 = c5 = 0
    for i in range(len(te)):
        sims = [(float(te[i] @ tr[j]), int(train_y[j])) for j in range(len(tr))]
        sims.sort(key=lambda t: -t[0])
        score = [0.0] * C
        for sim, lab in sims[:min(k, len(tr))]:
            score[lab] += math.exp(sim / T)
        order = sorted(range(C), key=lambda c: -score[c])
        c1 += order[0] == int(test_y[i])
        c5 += int(test_y[i]) in [c for c in order[:5] if score[c] > 0]
    return 100.0 * c1 / len(te), 100.0 * c5 / len(te)


def test_matches_explicit_loops_and_chunking_is_exact():
    g = torch.Generator().manual_seed(0)
    C = 8
    train, test = torch.randn(120, 6, generator=g), torch.randn(37, 6, generator=g)
    train_y, test_y = torch.randint(0, C, (120,), generator=g), torch.randint(0, C, (37,), generator=g)
    ks = [1, 7, 20, 500]  # 500 > N: clipped to 120
    res = eval_knn.knn_classify(train, train_y, test, test_y, ks, 0.1, C, chunk=5)
    for k in ks:
        t1, t5 = _reference_knn(train, train_y, test, test_y, k, 0.1, C)
        assert res["top1"][k] == pytest.approx(t1) and res["top5"][k] == pytest.approx(t5), k
    assert res == eval_knn.knn_classify(train, train_y, test, test_y, ks, 0.1, C, chunk=10_000)
    # tiny temperature: no overflow (weights are exp((s - s_max)/T))
    small = eval_knn.knn_classify(train, train_y, test, test_y, [20], 0.001, C)
    assert small["top1"][20] == eval_knn.knn_classify(train, train_y, test, test_y, [1], 0.07, C)["top1"][1]


def test_toy_problems_known_answers():
    g = torch.Generator().manual_seed(1)
    C, D = 10, 32
    centers = torch.randn(C, D, generator=g)
    ytr, yva = torch.arange(C).repeat(50), torch.arange(C).repeat(20)
    tr = centers[ytr] + 0.05 * torch.randn(len(ytr), D, generator=g)
    va = centers[yva] + 0.05 * torch.randn(len(yva), D, generator=g)
    res = eval_knn.knn_classify(tr, ytr, va, yva, [10, 20, 100, 200], 0.07, C, chunk=64)
    assert all(v == 100.0 for v in res["top1"].values()) and all(v == 100.0 for v in res["top5"].values())
    # fp16 bank (as --half-features): same answer
    assert eval_knn.knn_classify(tr.half(), ytr, va, yva, [20], 0.07, C)["top1"][20] == 100.0
    # random labels: chance level (10 %; 1000 val images -> std ~1 %)
    rtr, rva = torch.randn(2000, D, generator=g), torch.randn(1000, D, generator=g)
    rytr, ryva = torch.randint(0, C, (2000,), generator=g), torch.randint(0, C, (1000,), generator=g)
    rnd = eval_knn.knn_classify(rtr, rytr, rva, ryva, [20], 0.07, C)
    assert 6.0 < rnd["top1"][20] < 14.0 and 40.0 < rnd["top5"][20] < 60.0


def test_standardize_stats_match_torch():
    x = torch.randn(300, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0, 100.0]) + 7
    mean, std = eval_knn.standardize_stats(x, chunk=64)
    assert torch.allclose(mean, x.mean(0), atol=1e-4) and torch.allclose(std, x.std(0) + 1e-6, rtol=1e-5)


def test_low_shot_subset_exact_count_and_reproducible():
    labels = torch.tensor([0] * 5 + [1] * 7 + [2] * 9)[torch.randperm(21, generator=torch.Generator().manual_seed(0))]
    for n in (1, 2, 5):
        idx = eval_knn.low_shot_indices(labels, n, seed=3, num_classes=3)
        assert torch.bincount(labels[idx], minlength=3).tolist() == [n, n, n]
        assert len(set(idx.tolist())) == 3 * n
        assert torch.equal(idx, eval_knn.low_shot_indices(labels, n, seed=3, num_classes=3))
    draws = {tuple(eval_knn.low_shot_indices(labels, 2, seed=s, num_classes=3).tolist()) for s in range(6)}
    assert len(draws) > 1  # seeds give different subsets
    one, two = (set(eval_knn.low_shot_indices(labels, n, 4, 3).tolist()) for n in (1, 2))
    assert one <= two  # nested across n for one seed
    with pytest.raises(common.UserError, match="class 'a' has only 5"):
        eval_knn.low_shot_indices(labels, 6, 0, 3, class_names=["a", "b", "c"])


# ---------------------------------------------------------------------------------------------
# features
# ---------------------------------------------------------------------------------------------
def test_per_block_features_one_pass_and_last_block_equals_default():
    torch.manual_seed(0)
    enc = common.create_vit("vit_t16", img_size=32, patch_size=8).eval()
    ds = common.build_dataset("synthetic:13:5", "train", common.eval_transform(32), img_size=32)
    kw = dict(batch_size=5, num_workers=0, pool="cls")
    info = common.DistInfo()
    default, y = eval_knn.extract_features(enc, ds, [11], info, **kw)
    multi, y2 = eval_knn.extract_features(enc, ds, [3, 11], info, **kw)
    ref = _cls_features(enc, ds)
    assert torch.allclose(default[11], ref, atol=1e-5) and torch.equal(multi[11], default[11])
    assert torch.equal(y, torch.tensor(ds.targets)) and torch.equal(y, y2)
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        _, (b3, b11) = enc.forward_features(x, return_blocks=[3, -1])
    assert torch.allclose(multi[3], b3[:, 0], atol=1e-5)  # raw block output, no LN
    raw, _ = eval_knn.extract_features(enc, ds, [11], info, **{**kw, "pool": "avg"}, final_norm=False)
    assert torch.allclose(raw[11], b11[:, 1:].mean(1), atol=1e-5) and not torch.allclose(raw[11], ref[:, :192], atol=1e-2)


def _perturbed_encoder(seed=0):
    torch.manual_seed(seed)
    enc = common.create_vit("vit_t16", img_size=32, patch_size=4).eval()
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if n != "pos_embed":
                p.add_(0.05 * torch.randn_like(p))
    return enc


def test_foreign_layouts_load_to_identical_features(tmp_path):
    enc = _perturbed_encoder()
    sd = {k: v.clone() for k, v in enc.state_dict().items()}
    maect = {k: v for k, v in sd.items()}
    maect["pos_embed"] = sd["pos_embed"][:, 1:]  # (1, N, D), no CLS row
    refiner = {k: v for k, v in sd.items() if k not in ("cls_token", "pos_embed")}
    refiner["cls_tokens.tokens"] = sd["cls_token"]
    refiner["pos_embed.embed"] = sd["pos_embed"][:, 1:].reshape(1, 8, 8, 192)  # (1, H, W, D)
    files = {"maect.th": {"state_dict": maect, "ctor_kwargs": {"dim": 192}}, "maect_ema.th": maect,
             "refiner.th": {"state_dict": refiner, "ema": 0.9999},
             "ours.pth": {"model": _perturbed_encoder(1).state_dict(), "model_ema": sd, "model_is_ema": False,
                          "encoder_config": enc.config()}}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = enc.forward_features(x)
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        loaded, desc = eval_knn.build_encoder(eval_knn.Args(checkpoint=str(tmp_path / name), ema=name == "ours.pth"))
        assert loaded.config() == enc.config(), name  # architecture inferred without --model
        with torch.no_grad():
            assert torch.allclose(loaded.eval().forward_features(x), ref, atol=1e-6), name


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def test_end_to_end_mae_release_checkpoint(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=5)  # 15 train / 15 val, 3 colour classes
    write_mae_release_checkpoint(tmp_path / "mae.pth", with_decoder=True)
    out = tmp_path / "knn.json"
    p = run_script("eval_knn.py", "--checkpoint", tmp_path / "mae.pth", "--data", root, *TINY, "--k", "1", "20",
                   "--shots", "1", "2", "--shot-seeds", "2", "--blocks", "5", "-1", "--output-json", out, env=ONE_THREAD)
    assert p.stdout.lstrip().startswith("k-NN protocol:")
    assert ("warning: --k 20 is more than the 15 images of the train bank: every image votes there (k = 15; the "
            "table shows 'k (used)')") in p.stderr
    assert re.search(r"^ +20 +100\.00 +- \(15\)$", p.stdout, re.M), p.stdout
    r = read_json(out)
    proto = r["protocol"]
    assert proto["n_train"] == 15 and proto["n_val"] == 15 and proto["num_classes"] == 3
    assert proto["k_effective"] == [1, 15] and proto["final_norm"] is True and proto["block"] == 11
    assert r["top1"] == {"1": 100.0, "20": 100.0} and r["top5"] == {}  # flat colours: separable
    assert set(r["per_block"]) == {"5", "11"} and r["per_block"]["11"]["top1"] == r["top1"]
    assert set(r["low_shot"]) == {"1", "2"} and len(r["low_shot"]["1"]["top1"]["1"]["runs"]) == 2
    assert Path(r["per_block_plot"]).is_file()


def test_end_to_end_our_checkpoint_ema_and_features(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4, classes=("a", "b", "c", "d", "e", "f"))
    enc = _perturbed_encoder()
    ckpt = {"model": _perturbed_encoder(1).state_dict(), "model_ema": enc.state_dict(), "model_is_ema": False,
            "encoder_config": enc.config(), "epoch": 1}
    common.save_checkpoint(str(tmp_path / "ckpt.pth"), ckpt)
    args = eval_knn.Args(checkpoint=str(tmp_path / "ckpt.pth"), ema=True, data=str(root), num_workers=0, device="cpu",
                         k=[5, 20], standardize=True, save_features=str(tmp_path / "f.pt"),
                         output_json=str(tmp_path / "o.json"))
    eval_knn.main(args)  # in-process, no --model: architecture from "encoder_config"
    feats = torch.load(tmp_path / "f.pt")
    val = common.build_dataset(str(root), "val", common.eval_transform(32), require_labels=True)
    assert torch.allclose(feats["val_features"], _cls_features(enc, val), atol=1e-5)  # EMA weights, ImageFolder order
    assert feats["val_labels"].tolist() == val.targets
    r = read_json(tmp_path / "o.json")
    assert "EMA" in r["protocol"]["weights"] and r["protocol"]["standardize"].startswith("train mean/std")
    assert set(r["top5"]) == {"5", "20"}  # 6 classes -> top-5 reported
    # the JSON numbers are the vote on standardised features
    tr = feats["train_features"]
    mean, std = tr.mean(0), tr.std(0) + 1e-6
    ref = eval_knn.knn_classify((tr - mean) / std, feats["train_labels"], (feats["val_features"] - mean) / std,
                                feats["val_labels"], [5, 20], 0.07, 6)
    assert r["top1"] == pytest.approx({str(k): v for k, v in ref["top1"].items()})


def test_torchrun_two_processes_equal_one_process(tmp_path):
    enc = _perturbed_encoder()
    common.save_checkpoint(str(tmp_path / "c.pth"), {"model": enc.state_dict(), "encoder_config": enc.config()})
    common_flags = ["--checkpoint", tmp_path / "c.pth", "--data", "synthetic:41:23", "--k", "3", "10",
                    "--batch-size", "6", "--shots", "2", "--shot-seeds", "2", "--blocks", "7", "11", "--num-workers", "0",
                    "--device", "cpu"]
    eval_knn.main(common.parse_args(eval_knn.Args, [str(a) for a in common_flags] + [
        "--save-features", str(tmp_path / "f1.pt"), "--output-json", str(tmp_path / "o1.json")]))
    run_script("eval_knn.py", *common_flags, "--save-features", tmp_path / "f2.pt", "--output-json", tmp_path / "o2.json",
               nproc=2)
    a, b = torch.load(tmp_path / "f1.pt"), torch.load(tmp_path / "f2.pt")
    assert a["train_features"].shape == (41, 192) and a["val_features"].shape == (23, 192)
    for key in ("train_features", "val_features"):
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    for key in ("train_labels", "val_labels"):
        assert torch.equal(a[key], b[key]), key
    r1, r2 = read_json(tmp_path / "o1.json"), read_json(tmp_path / "o2.json")
    assert r2["protocol"]["world_size"] == 2
    for key in ("top1", "top5", "per_block", "low_shot"):
        assert r1[key] == r2[key], key


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_one_line_errors(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=2)
    write_mae_release_checkpoint(tmp_path / "mae.pth")
    flat = tmp_path / "flat" / "train"
    flat.mkdir(parents=True)
    (flat / "x.png").write_bytes((root / "train" / "a" / "0.png").read_bytes())
    (tmp_path / "flat" / "val").mkdir()

    def raises(match, **kw):
        with pytest.raises(common.UserError, match=match):  # a flag outside its range: when Args is made
            eval_knn.main(eval_knn.Args(**{"checkpoint": str(tmp_path / "mae.pth"), "data": str(root),
                                           "num_workers": 0, "device": "cpu", **kw}))

    raises("does not exist", checkpoint=str(tmp_path / "missing.pth"))
    raises("pass --checkpoint", checkpoint="")
    raises("vit_s16", model="vit_s16")  # wrong architecture names both
    raises("needs --model", checkpoint="none")
    raises("no EMA", ema=True)
    raises("no class subfolders", data=str(tmp_path / "flat"))
    raises("has only 2 train", shots=[3])
    raises("block 12 does not exist", block=12)
    raises("--pool", pool="max")
    raises("--k", k=[0])
    raises("--blocks", blocks=["x"])
    raises("--device", device="gpu")
    raises("--temperature", temperature=0.0)
    # as a user sees it: one line on stderr, exit code 2
    p = run_script("eval_knn.py", "--checkpoint", tmp_path / "missing.pth", "--data", root, *TINY, check=False, env=ONE_THREAD)
    assert p.returncode == 2 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert "Traceback" not in p.stderr
