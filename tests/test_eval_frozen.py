"""eval_linear.py and eval_frozen.py: the grid equals separately trained heads, cluster metrics equal
scikit-learn's and a brute-force ACC, the logistic regression equals the reference solver, end to end as
scripts, torchrun 2 processes = 1 process, saved features = checkpoint, and one-line errors."""
import importlib
import itertools
import math
import sys
import types

import numpy as np
import pytest
import torch

import common
import eval_frozen
import eval_linear
from conftest import TINY, read_json, run_inprocess, run_script, write_image_folder, write_mae_release_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


# ---------------------------------------------------------------------------------------------
# linear probing grid
# ---------------------------------------------------------------------------------------------
def _train(specs, protocol, enc, ds, epochs=2, batch=8, warmup=0):
    args = eval_linear.Args(checkpoint="none", protocol=protocol, epochs=epochs, batch_size=batch, num_workers=0, seed=3)
    grid = eval_linear.LinearGrid(specs, enc.dim, 10, seed=args.seed)
    n_last = 4 if protocol == "dinov2" else 1
    losses = eval_linear.train_grid(enc, grid, ds, args, common.DistInfo(), 1.5, warmup, n_last, log=lambda *a: None)
    return grid, losses


@pytest.mark.parametrize("protocol", ["dinov2", "maect"])
def test_grid_heads_equal_separately_trained_heads(protocol):
    torch.manual_seed(0)
    enc = common.create_vit("vit_t16", img_size=32, patch_size=4).eval().requires_grad_(False)
    ds = common.build_dataset("synthetic:24:8", "train", None, img_size=32)  # PIL images, 10 classes
    specs = eval_linear.grid_specs(protocol, [0.5, 0.05])
    assert len(specs) == (8 if protocol == "dinov2" else 2)
    grid, losses = _train(specs, protocol, enc, ds, warmup=1 if protocol == "maect" else 0)
    for i in ([0, 3, 5, 7] if protocol == "dinov2" else [1]):
        alone, alone_loss = _train([specs[i]], protocol, enc, ds, warmup=1 if protocol == "maect" else 0)
        start = eval_linear.LinearGrid([specs[i]], enc.dim, 10, seed=3).heads[0]
        for p_grid, p_alone, p0 in zip(grid.heads[i].parameters(), alone.heads[0].parameters(), start.parameters()):
            assert not torch.allclose(p_grid, p0)  # it trained
            torch.testing.assert_close(p_grid, p_alone, atol=1e-5, rtol=0)
        assert losses[i] == pytest.approx(alone_loss[0], abs=1e-6)
        if protocol == "maect":
            torch.testing.assert_close(grid.bn.running_var, alone.bn.running_var)


def test_maect_head_lrs_are_table9_lrs_times_batch_over_256(setup, capsys, monkeypatch):
    """The official probe (ml-jku/MAE-CT yamls/probe.yaml: lr 0.1 ... 0.01, 10% linear warmup, cosine;
    optimizers/__init__.py: the default linear_lr_scaler, divisor 256; trainers/base/trainer_base.py: scaled by the
    effective batch) trains head h at step t with lr_h * batch / 256 * warmup-cosine(t): recorded at every step."""
    seen = []

    class Recording(torch.optim.SGD):
        def step(self, *a, **k):
            seen.append([g["lr"] for g in self.param_groups])
            return super().step(*a, **k)
    monkeypatch.setattr(torch.optim, "SGD", Recording)
    d, lrs, batch, epochs, warmup_epochs = setup, [0.1, 0.03], 8, 3, 1
    code, out, err = run_inprocess(capsys, eval_linear, "--checkpoint", d / "ck.pth", "--data", d / "imgs", *TINY,
                                   "--protocol", "maect", "--lrs", *lrs, "--batch-size", batch, "--epochs", epochs,
                                   "--warmup-epochs", warmup_epochs)
    assert code == 0, err
    per_epoch = 24 // batch  # 4 classes x 6 train images
    total, warm = per_epoch * epochs, per_epoch * warmup_epochs
    assert len(seen) == total
    for t, got in enumerate(seen):
        shape = t / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / (total - warm)))
        assert got == pytest.approx([lr * batch / 256 * shape for lr in lrs], rel=1e-12, abs=0), t
    assert seen[warm] == pytest.approx([0.1 * 8 / 256, 0.03 * 8 / 256])  # the peak


def test_grid_features_and_batchnorm():
    torch.manual_seed(0)
    enc = common.create_vit("vit_t16", img_size=32, patch_size=8).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        f = eval_linear.grid_features(enc, x, 4, final_norm=True)
        tokens = enc.forward_features(x)  # (B, 1+N, D) after the final LN
        _, raw = enc.forward_features(x, return_blocks=[8, 9, 10, 11])
    assert torch.allclose(f[(1, False)], enc(x), atol=1e-5)
    assert torch.allclose(f[(1, True)][:, 192:], tokens[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(f[(4, False)], torch.cat([enc.norm(r)[:, 0] for r in raw], 1), atol=1e-5)
    assert f[(4, True)].shape == (3, 5 * 192)
    bn, ref = eval_linear.GlobalBatchNorm(6), torch.nn.BatchNorm1d(6, affine=False)
    v = torch.randn(10, 6) * 3 + 1
    torch.testing.assert_close(bn(v), ref(v))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(v), ref(v))


# ---------------------------------------------------------------------------------------------
# cluster metrics, logistic regression
# ---------------------------------------------------------------------------------------------
def test_cluster_metrics_equal_sklearn_and_brute_force_acc():
    from sklearn import metrics
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    pred = np.where(rng.random(60) < 0.6, (y + 1) % 4, rng.integers(0, 4, 60))  # permuted, noisy clusters
    res = eval_frozen.cluster_metrics(y, pred)
    brute = max(np.mean(np.array(p)[pred] == y) for p in itertools.permutations(range(4)))
    assert res["acc"] == pytest.approx(100 * brute) and res["acc"] > 50
    assert res["nmi"] == pytest.approx(100 * metrics.normalized_mutual_info_score(y, pred))
    assert res["ami"] == pytest.approx(100 * metrics.adjusted_mutual_info_score(y, pred))
    assert res["ari"] == pytest.approx(100 * metrics.adjusted_rand_score(y, pred))
    assert eval_frozen.cluster_accuracy(y, (y + 2) % 4) == 100.0
    # separable blobs: k-means finds the classes; the silhouette is scikit-learn's
    centers = rng.normal(size=(4, 8)) * 10
    x = centers[y] + rng.normal(size=(60, 8))
    args = eval_frozen.Args(kmeans_runs=3, cluster_norm="none", seed=1)
    out = eval_frozen.evaluate_clusters(x, y, 4, args)
    assert out["best_run"]["acc"] == 100.0 and out["runs"] == 3
    assert out["silhouette"] == pytest.approx(100 * metrics.silhouette_score(x, y))
    assert out["davies_bouldin"] == pytest.approx(metrics.davies_bouldin_score(x, y))


def test_logistic_regression_equals_reference_solver():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(0)
    C, D = 5, 16
    centers = rng.normal(size=(C, D))
    ytr, yte = np.repeat(np.arange(C), 2), np.repeat(np.arange(C), 40)
    xtr = centers[ytr] + 1.2 * rng.normal(size=(len(ytr), D))
    xte = centers[yte] + 1.2 * rng.normal(size=(len(yte), D))
    p = eval_frozen.msn_preprocess(xtr)
    assert np.allclose(p.mean(1), 0) and np.allclose(np.linalg.norm(p, axis=1), 1)
    # reference: the objective 1/n sum CE + lambda/2 |W|^2, lambda = 0.00025/n, solved to high precision
    n = len(ytr)
    ref = LogisticRegression(C=1 / (0.00025 / n * n), fit_intercept=False, tol=1e-10, max_iter=100000).fit(p, ytr)
    ref_acc = 100 * np.mean(ref.predict(eval_frozen.msn_preprocess(xte)) == yte)
    assert 40 < ref_acc < 100  # neither trivial nor chance
    solvers = ["sklearn"] + (["cyanure"] if eval_frozen.have_cyanure() else [])
    for solver in solvers:
        acc = eval_frozen.logistic_accuracy(xtr, ytr, xte, yte, 0.00025, solver, max_epochs=1000, tol=1e-6)
        assert acc == pytest.approx(ref_acc), solver
    if "cyanure" in solvers:
        from cyanure.data_processing import preprocess
        q = xtr.copy()
        preprocess(q, centering=True, normalize=True, columns=False)
        assert np.allclose(q, p)
        clf = eval_frozen.fit_logistic(p, ytr, 0.00025, "cyanure", max_epochs=1000, tol=1e-8)
        w = clf.coef_.T if clf.coef_.shape != ref.coef_.shape else clf.coef_
        assert np.abs(w - ref.coef_).max() < 1e-3 * np.abs(ref.coef_).max()


def test_cyanure_gets_msns_arguments(monkeypatch):
    """facebookresearch/msn logistic_eval.py: MultiClassifier(loss='multiclass-logistic', penalty='l2',
    fit_intercept=False).fit(it0=10, lambd=lambd/n, tol=1e-3, solver='auto', seed=0, max_epochs=300); cyanure >= 1.0
    names it0 duality_gap_interval (default 5). A fake cyanure records the arguments (it need not be installed)."""
    calls = {}

    class Classifier:
        def __init__(self, **kw):
            calls.update(kw)

        def fit(self, x, y):
            calls["n"] = len(x)
    estimators = types.ModuleType("cyanure.estimators")
    estimators.Classifier = Classifier
    package = types.ModuleType("cyanure")
    package.estimators = estimators
    monkeypatch.setitem(sys.modules, "cyanure", package)
    monkeypatch.setitem(sys.modules, "cyanure.estimators", estimators)
    eval_frozen.fit_logistic(np.eye(4), np.arange(4), 0.00025, "cyanure", max_epochs=300, tol=1e-3, seed=0)
    assert {k: calls.get(k) for k in ("loss", "penalty", "fit_intercept", "lambda_1", "duality_gap_interval",
                                      "tol", "solver", "random_state", "max_iter", "n")} == {
        "loss": "multiclass-logistic", "penalty": "l2", "fit_intercept": False, "lambda_1": 0.00025 / 4,
        "duality_gap_interval": 10, "tol": 1e-3, "solver": "auto", "random_state": 0, "max_iter": 300, "n": 4}


def test_help_and_docs_say_what_the_code_does(capsys):
    """--help names the cluster metrics; the MSN split files named exist in facebookresearch/msn (split 3's five-shot
    list is 3imgs_class.txt); docs/miniature.md gives mim_refiner.py's --exclude-self default; mae_ct.py's docstring
    gives the value find_nn writes over the own entry (-inf: never picked, also where the official -1 would tie)."""
    import re
    from pathlib import Path
    import mae_ct
    import mim_refiner
    with pytest.raises(SystemExit):
        common.parse_args(eval_frozen.Args, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--cluster, --no-cluster")  # the flag's entry, up to the next flag's
    cluster = text[start:text.index("--kmeans-runs KMEANS_RUNS", start)]
    for metric in ("ACC", "NMI", "AMI", "ARI", "silhouette", "Davies-Bouldin"):
        assert metric in cluster, (metric, cluster)
    msn = {f"imagenet_subsets{s}/{n}imgs_class.txt" for s, ns in ((1, "125"), (2, "125"), (3, "123")) for n in ns}
    docs = Path(common.__file__).parent / "docs"
    for text in (eval_frozen.__doc__, (docs / "methods.md").read_text()):
        named = set()
        for m in re.finditer(r"imagenet_subsets(\{[\d,]+\}|\d)/(\{[\d,]+\}|\d)imgs_class\.txt", text):
            subsets, shots = (g.strip("{}").split(",") for g in m.groups())
            named |= {f"imagenet_subsets{s}/{n}imgs_class.txt" for s in subsets for n in shots}
        assert named and named <= msn, named - msn
    row = next(ln for ln in (docs / "miniature.md").read_text().splitlines() if ln.startswith("| `--queue-size`"))
    now = row.split("|")[3].split(",")  # the "now" column: the flags the miniature runs with
    assert len(now) == 3 and now[2].split()[0] == ("on" if mim_refiner.Args().exclude_self else "off"), row
    q = mae_ct.NNQueue(2, 2)
    q.queue.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # the sample's own entry (cosine 1), one at cosine -1
    q.ids.copy_(torch.tensor([7, 3]))
    _, idx = q.find_nn(torch.tensor([[1.0, 0.0]]), 1, torch.tensor([7]))
    assert idx.item() == 1 and "-inf" in mae_ct.__doc__


# ---------------------------------------------------------------------------------------------
# end to end, torchrun, errors
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("frozen")
    write_image_folder(d / "imgs", classes=("a", "b", "c", "d"), per_class=6)
    write_mae_release_checkpoint(d / "ck.pth")
    return d


def _grid_numbers(path):
    res = read_json(path)
    return [(r["name"], r["top1"], r["train_loss"]) for r in res["grid"]], res


def test_eval_linear_end_to_end_and_torchrun_equals_one_process(setup):
    d = setup
    common_args = ["--checkpoint", d / "ck.pth", "--data", d / "imgs", *TINY, "--epochs", "2", "--batch-size", "8",
                   "--lrs", "0.5", "0.01"]
    for protocol, extra in (("dinov2", []), ("maect", ["--warmup-epochs", "1"])):
        args = [*common_args, "--protocol", protocol, *extra]
        p1 = run_script("eval_linear.py", *args, "--output-json", d / f"l1_{protocol}.json")
        assert "best linear probe" in p1.stdout and "linear probing protocol" in p1.stdout
        one, res = _grid_numbers(d / f"l1_{protocol}.json")
        assert len(one) == (8 if protocol == "dinov2" else 2) and res["best"]["top1"] == max(r[1] for r in one)
        assert res["protocol"]["lr_scale"] == 8 / 256  # both protocols: lr x batch / 256
        run_script("eval_linear.py", *args, "--output-json", d / f"l2_{protocol}.json", nproc=2)
        two, res2 = _grid_numbers(d / f"l2_{protocol}.json")
        assert res2["protocol"]["world_size"] == 2
        for a, b in zip(one, two):  # same heads, accuracies and losses (batch 8 = 2 x 4)
            assert a[0] == b[0] and a[1] == b[1] and a[2] == pytest.approx(b[2], rel=1e-4, abs=1e-6)


def test_eval_frozen_end_to_end_torchrun_and_saved_features(setup):
    d = setup
    base = ["--data", d / "imgs", *TINY, "--few-shot", "1", "2", "--cluster", "--kmeans-runs", "2"]
    p = run_script("eval_frozen.py", "--checkpoint", d / "ck.pth", *base, "--output-json", d / "f1.json")
    assert "seeded splits, not MSN's lists" in p.stdout and "k-means (k=4" in p.stdout
    one = read_json(d / "f1.json")
    assert set(one["few_shot"]) == {"1", "2"} and len(one["few_shot"]["1"]["runs"]) == 3
    assert 0 <= one["cluster"]["best_run"]["acc"] <= 100 and one["cluster"]["silhouette"] is not None
    run_script("eval_frozen.py", "--checkpoint", d / "ck.pth", *base, "--output-json", d / "f2.json", nproc=2)
    two = read_json(d / "f2.json")
    for n in ("1", "2"):
        assert one["few_shot"][n]["mean"] == pytest.approx(two["few_shot"][n]["mean"])
    for k in ("acc", "nmi", "ari"):
        assert one["cluster"]["best_run"][k] == pytest.approx(two["cluster"]["best_run"][k], abs=1e-6)
    # the same numbers from eval_knn.py --save-features
    run_script("eval_knn.py", "--checkpoint", d / "ck.pth", "--data", d / "imgs", *TINY, "--k", "1",
               "--save-features", d / "feats.pth")
    run_script("eval_frozen.py", "--features", d / "feats.pth", "--few-shot", "1", "2", "--cluster",
               "--kmeans-runs", "2", "--num-workers", "0", "--output-json", d / "f3.json")
    three = read_json(d / "f3.json")
    for n in ("1", "2"):
        assert one["few_shot"][n]["mean"] == pytest.approx(three["few_shot"][n]["mean"])
    assert one["cluster"]["best_run"]["acc"] == pytest.approx(three["cluster"]["best_run"]["acc"])


def test_split_files(setup, tmp_path, capsys):
    d = setup
    good = tmp_path / "1imgs_class.txt"
    good.write_text("a/0.png\nb/3.png\nc/1.png\nd/5.png\n")
    code, out, err = run_inprocess(capsys, eval_frozen, "--checkpoint", d / "ck.pth", "--data", d / "imgs", *TINY,
                                   "--split-file", good, "--output-json", tmp_path / "s.json")
    assert code == 0, err
    res = read_json(tmp_path / "s.json")
    assert list(res["few_shot"]) == ["1"] and res["few_shot"]["1"]["runs"][0]["split"] == f"split file {good}"
    ambiguous = tmp_path / "amb.txt"
    ambiguous.write_text("0.png\n1.png\n")  # MSN-style bare names, but every class folder has a 0.png
    code, _, err = run_inprocess(capsys, eval_frozen, "--checkpoint", d / "ck.pth", "--data", d / "imgs", *TINY,
                                 "--split-file", ambiguous)
    assert code == 2 and "4 images are named '0.png'" in err and len(err.strip().splitlines()) == 1
    uneven = tmp_path / "uneven.txt"
    uneven.write_text("a/0.png\na/1.png\nb/3.png\nc/1.png\nd/5.png\n")
    code, _, err = run_inprocess(capsys, eval_frozen, "--checkpoint", d / "ck.pth", "--data", d / "imgs", *TINY,
                                 "--split-file", uneven)
    assert code == 2 and "same number" in err


def test_one_line_errors(setup, tmp_path, capsys, monkeypatch):
    d = setup
    small = write_image_folder(tmp_path / "small", classes=("a", "b"), per_class=3)
    cases = [
        (eval_frozen, ["--checkpoint", tmp_path / "missing.pth", "--data", d / "imgs", *TINY, "--cluster"],
         "does not exist"),
        (eval_frozen, ["--checkpoint", d / "ck.pth", "--data", small, *TINY, "--few-shot", "5"],
         "--few-shot 5: class 'a' has only 3 train image(s)"),
        (eval_frozen, ["--data", d / "imgs", "--cluster"], "pass either --checkpoint"),
        (eval_frozen, ["--checkpoint", "none", "--data", d / "imgs", "--cluster"], "needs --model"),
        (eval_frozen, ["--checkpoint", d / "ck.pth", "--data", d / "imgs", *TINY], "nothing to evaluate"),
        (eval_frozen, ["--features", d / "ck.pth", "--cluster"], "not a file of eval_knn.py --save-features"),
        (eval_linear, ["--checkpoint", d / "ck.pth", "--data", small, *TINY, "--batch-size", "64"],
         "--batch-size 64 is larger than the train set (6 images"),
        (eval_linear, ["--checkpoint", tmp_path / "missing.pth", "--data", small, *TINY], "does not exist"),
        (eval_linear, ["--checkpoint", d / "ck.pth", "--data", small, *TINY, "--protocol", "svm"], "choose one of"),
    ]
    for module, argv, msg in cases:
        code, out, err = run_inprocess(capsys, module, *argv)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert err.startswith("error: ")
    real = importlib.import_module

    def no_sklearn(name, *a, **k):
        if name.split(".")[0] == "sklearn":
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", no_sklearn)
    code, _, err = run_inprocess(capsys, eval_frozen, "--checkpoint", d / "ck.pth", "--data", d / "imgs", *TINY, "--cluster")
    assert code == 2 and err.strip() == "error: eval_frozen.py needs scikit-learn: pip install scikit-learn"


@pytest.mark.parametrize("script", ["mim_refiner", "mae_ct"])
def test_the_training_scripts_closing_lines_run_as_printed(tmp_path, capsys, script):
    """The "to evaluate as the paper" lines name k-NN, the linear probe and 1/2/5-shot + k-means with the paper's
    protocol flags, and each printed command runs on the run's checkpoint (shortened for the test by flags
    appended after the printed ones)."""
    import importlib
    init = tmp_path / "mae.pth"
    write_mae_release_checkpoint(init, patch_size=8)
    t = [*TINY, "--patch-size", "8", "--data", "synthetic:24:12", "--batch-size", "8", "--queue-size", "16",
         "--topk", "1", "--init", init, "--head-epochs", "1", "--epochs", "1", "--output-dir", tmp_path / "run"]
    t += (["--local-crops", "1", "--head-hidden", "32", "--pred-hidden", "32", "--head-blocks", "11"]
          if script == "mim_refiner" else ["--proj-hidden", "32", "--pred-hidden", "32", "--proj-dim", "16"])
    code, out, err = run_inprocess(capsys, importlib.import_module(script), *t)
    assert code == 0, err
    lines = out[out.index("to evaluate as the paper"):].splitlines()[:3]
    cmds = [line.split(": ", 1 if i else 2)[-1] for i, line in enumerate(lines)]
    protocol = "dinov2" if script == "mim_refiner" else "maect"
    assert cmds[0].startswith("python eval_knn.py") and "--k 10" in cmds[0]
    assert cmds[1].startswith("python eval_linear.py") and f"--protocol {protocol}" in cmds[1]
    assert cmds[2].startswith("python eval_frozen.py") and "--few-shot 1 2 5 --cluster" in cmds[2]
    short = {"eval_knn.py": [], "eval_linear.py": ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--lrs", "0.1"],
             "eval_frozen.py": ["--few-shot", "1", "--kmeans-runs", "1"]}
    for cmd in cmds:
        argv = cmd.split()[1:]
        p = run_script(argv[0], *argv[1:], "--num-workers", "0", "--device", "cpu", *short[argv[0]])
        assert {"eval_knn.py": "k-NN on", "eval_linear.py": "best linear probe",
                "eval_frozen.py": "k-means (k="}[argv[0]] in p.stdout, p.stdout[-2000:]
