"""Frozen-feature evaluations beside k-NN: 1/2/5-shot logistic regression and k-means cluster metrics.

Protocol papers
  - MIM-Refiner, Alkin et al., arXiv:2402.10093: App. C.5 and Table 2 (1/2/5-shot: L2-regularised logistic
    regression with cyanure on the [CLS] of the last block, average over the three MSN splits); Sec. 5.3,
    Table 3 and App. C.12 (mini-batch k-means with k = number of classes on the L2-normalised val [CLS]
    features, 100 runs, the run with the lowest k-means loss; ACC, NMI, AMI, ARI, Davies-Bouldin and
    silhouette w.r.t. the ground truth; App. Table 9: the average over the runs).
  - MAE-CT, Lehner et al., arXiv:2304.10520: App. B (1/2/5-shot as above), Sec. 4.3 Table 2 and App. E
    (k-means cluster accuracy, silhouette score w.r.t. the ground truth in parentheses; the embedding is
    standardised with its mean and std: `--cluster-norm standardize`).
  - MSN, Assran et al., arXiv:2204.07141, official logistic_eval.py: the features of train and test are
    centred and L2-normalised row by row (cyanure preprocess centering=True, normalize=True, columns=False),
    cyanure multiclass-logistic, penalty l2, no intercept, lambda = 0.00025 / n_train, tol 1e-3, at most 300
    epochs, the duality gap checked every 10 epochs (it0=10), seed 0. Splits (one image file name per line):
    imagenet_subsets{1,2,3}/{1,2}imgs_class.txt and imagenet_subsets{1,2}/5imgs_class.txt; split 3's five-shot
    list is imagenet_subsets3/3imgs_class.txt (5 images per class despite its name).

Equations
  preprocessing (few-shot)   x <- (x - mean_j x_j) / |x - mean_j x_j|            (per row, MSN)
  logistic regression        min_W 1/n sum_i CE(W x_i, y_i) + lambda/2 |W|^2,  lambda = 0.00025 / n
                             (scikit-learn: C = 1 / (lambda n) gives the same objective)
  cluster accuracy (ACC)     max over one-to-one maps m of 1/n sum_i [m(c_i) = y_i]   (Hungarian, ClustPy)
  silhouette (ground truth)  mean_i (b_i - a_i) / max(a_i, b_i), a/b = mean distance to own / nearest other class
  ACC, NMI, AMI, ARI and silhouette are reported x 100 as in the papers.

Features: either `--checkpoint` (extracted with eval_knn.py's code: same encoder loading, `--block`,
`--pool`, `--final-norm`, `--ema`; only the train images of the few-shot splits are encoded) or `--features`,
a file of `eval_knn.py --save-features` (pooled features of the evaluated block, before any normalisation,
ImageFolder order; `--data` is then only needed to map `--split-file` names to images).

Launch (ImageNet-1K, 8 GPUs for the extraction; the solvers run on rank 0's CPU):
  MIM-Refiner Table 2 1/2/5-shot with MSN's splits (EMA weights; cyanure; nine files):
    torchrun --nproc_per_node=8 eval_frozen.py --checkpoint CKPT --ema --data /imagenet \
        --split-file msn/imagenet_subsets{1,2,3}/{1,2}imgs_class.txt msn/imagenet_subsets{1,2}/5imgs_class.txt \
        msn/imagenet_subsets3/3imgs_class.txt --output-json lowshot.json
  MIM-Refiner Table 3 / App. Table 9 k-means (L2-normalised val [CLS], 100 runs):
    torchrun --nproc_per_node=8 eval_frozen.py --checkpoint CKPT --ema --data /imagenet --cluster \
        --output-json cluster.json
  MAE-CT Table 2 (standardised embedding; ACC and silhouette):
    torchrun --nproc_per_node=8 eval_frozen.py --checkpoint CKPT --ema --data /imagenet --cluster \
        --cluster-norm standardize
  From saved features (no encoder pass):
    python eval_knn.py --checkpoint CKPT --data /imagenet --save-features feats.pth
    python eval_frozen.py --features feats.pth --few-shot 1 2 5 --cluster

Deviations, each deliberate:
  - without `--split-file` the splits are drawn per class with seeds seed..seed+shot_seeds-1
    (eval_knn.low_shot_indices, nested across n) and the output says so: not MSN's lists;
  - `--solver sklearn` (or auto without cyanure installed) uses scikit-learn's multinomial
    LogisticRegression (lbfgs, C = 1/(lambda n), no intercept, tol 1e-6 on the gradient): the same objective
    solved by another algorithm and stopping rule, so the accuracies can differ in rare near-tie cases;
  - MIM-Refiner's official callback preprocesses only the train features; MSN (followed here) both;
  - the silhouette score may be computed on a seeded sample of `--silhouette-sample` images (scikit-learn
    sample_size; the full ImageNet val set needs 50k x 50k distances, computed in chunks but slowly).
"""
from __future__ import annotations

import importlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch

import common
from common import UserError, build_dataset, run_main


@dataclass
class Args(common.Flags):
    checkpoint: str = ""
    """Encoder weights to extract features from (as eval_knn.py; `none` = random init with --model). Give
    this or --features."""
    features: Optional[str] = None
    """A file written by `eval_knn.py --save-features` (train/val features and labels). Give this or --checkpoint."""
    model: Optional[str] = None
    """ViT preset (vit_t16 ... vit_2b14). Default: inferred from the checkpoint."""
    img_size: Optional[common.PosInt] = None
    """Evaluation crop size (resize floor(S*256/224) + center crop). Default: the checkpoint's, else 224."""
    patch_size: Optional[common.PosInt] = None
    """Patch size. Default: the checkpoint's, else the preset's."""
    data: str = "data/imagenet"
    """ROOT with ROOT/train and ROOT/val ImageFolders, or synthetic[:N_TRAIN[:N_VAL]] (synthetic.py); paper: ImageNet-1K."""
    pool: Literal["cls", "avg"] = "cls"
    """cls: the [CLS] token (both papers); avg: mean over patch tokens (MAE-CT's ViT-B clustering)."""
    block: Optional[int] = None
    """Block whose output is evaluated (0-based; -1 = last). Default: last (both papers)."""
    final_norm: bool = True
    """Final LayerNorm on the last block's features (as eval_knn.py). MIM-Refiner's numbers use --no-final-norm."""
    ema: bool = False
    """Use the EMA/momentum encoder (MIM-Refiner and MAE-CT evaluate their EMA encoder)."""
    few_shot: list[common.PosInt] = field(default_factory=list)
    """Images per class for the logistic regression (papers: 1 2 5), seeded splits. Default: off, unless
    --split-file is given."""
    split_file: list[str] = field(default_factory=list)
    """MSN split files (UTF-8, one train image name per line, `n01440764_10026.JPEG` or `class/name`); n is read
    from each file, files with the same n are averaged (MSN: 3 splits per n; split 3's 5-shot file is
    imagenet_subsets3/3imgs_class.txt)."""
    shot_seeds: common.PosInt = 3
    """Seeded splits per n when no split file is given (MSN/MIM-Refiner: 3 splits)."""
    lambd: common.PosFloat = 0.00025
    """L2 strength before the division by n_train (MSN logistic_eval --lambd 0.00025; lambda = lambd / n)."""
    solver: Literal["auto", "cyanure", "sklearn"] = "auto"
    """auto: cyanure if installed (the papers), else scikit-learn."""
    max_epochs: common.PosInt = 300
    """Solver iteration cap (MSN: cyanure max_epochs 300; scikit-learn max_iter)."""
    tol: common.PosFloat = 1e-3
    """cyanure relative duality-gap tolerance (MSN: 1e-3)."""
    cluster: bool = False
    """k-means on the val features (k = number of classes): ACC (Hungarian), NMI, AMI and ARI of the lowest-loss
    run and their mean over the runs, and the silhouette and Davies-Bouldin scores of the ground-truth classes."""
    kmeans_runs: common.PosInt = 100
    """Mini-batch k-means restarts (both papers: 100; report the lowest-loss run and the mean)."""
    kmeans_batch_size: common.PosInt = 1024
    """MiniBatchKMeans batch_size (scikit-learn default 1024; the papers use scikit-learn's defaults)."""
    cluster_norm: Literal["l2", "standardize", "none"] = "l2"
    """Embedding preprocessing before k-means and the silhouette: l2 (MIM-Refiner App. C.12), standardize
    (mean/std of the val embedding, MAE-CT App. E) or none."""
    silhouette_sample: Optional[common.PosInt] = None
    """Compute the silhouette on a seeded sample of this many val images. Default: all."""
    batch_size: common.PosInt = 256
    """GLOBAL extraction batch (no effect on results)."""
    num_workers: common.NonNegInt = 8
    """DataLoader workers per process."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto (CUDA if visible), cpu or cuda (extraction only)."""
    seed: int = 0
    """Seed of the seeded splits, the solvers and the k-means runs (run r uses seed + r)."""
    output_json: Optional[str] = None
    """Write {protocol, few_shot, cluster} to this file."""


# ----------------------------------------------------------------------------------------------
# Optional packages (evaluation only; the training scripts do not import them)
# ----------------------------------------------------------------------------------------------
def need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"eval_frozen.py needs {package}: pip install {package}") from None


def have_cyanure() -> bool:
    try:
        importlib.import_module("cyanure.estimators")
        return True
    except ImportError:
        return False


# ----------------------------------------------------------------------------------------------
# Few-shot logistic regression (pure functions; tests import them)
# ----------------------------------------------------------------------------------------------
def msn_preprocess(x: np.ndarray) -> np.ndarray:
    """Centre each row and L2-normalise it (cyanure preprocess(centering=True, normalize=True, columns=False))."""
    x = np.asarray(x, dtype=np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_logistic(x: np.ndarray, y: np.ndarray, lambd: float, solver: str, max_epochs: int = 300,
                 tol: float = 1e-3, seed: int = 0):
    """L2 multinomial logistic regression without intercept, lambda = lambd / n (MSN logistic_eval).
    x (n, D) preprocessed, y (n,). Returns a fitted estimator with .predict."""
    n = x.shape[0]
    lam = lambd / n
    if solver == "cyanure":
        need("cyanure", "cyanure")
        from cyanure.estimators import Classifier
        # MSN logistic_eval.py fit(it0=10): cyanure >= 1.0 names it0 duality_gap_interval (default 5); the solver
        # stops at the first check with a gap below --tol, so the interval changes where it stops
        clf = Classifier(loss="multiclass-logistic", penalty="l2", fit_intercept=False, lambda_1=lam,
                         max_iter=max_epochs, tol=tol, solver="auto", random_state=seed, verbose=False,
                         duality_gap_interval=10, n_threads=max(1, torch.get_num_threads()))
        clf.fit(x, y)
        return clf
    need("sklearn", "scikit-learn")
    from sklearn.linear_model import LogisticRegression
    # sklearn minimises C sum_i CE_i + |W|^2 / 2 = C n (1/n sum_i CE_i + |W|^2 / (2 C n)): C = 1 / (lam n)
    clf = LogisticRegression(C=1.0 / (lam * n), fit_intercept=False, tol=1e-6, max_iter=max(max_epochs, 1000))
    clf.fit(x, y)
    return clf


def logistic_accuracy(train_x, train_y, test_x, test_y, lambd: float, solver: str, max_epochs: int = 300,
                      tol: float = 1e-3, seed: int = 0) -> float:
    """Top-1 (%) on the test features of the logistic regression fitted on the train features (both MSN-preprocessed)."""
    clf = fit_logistic(msn_preprocess(train_x), np.asarray(train_y), lambd, solver, max_epochs, tol, seed)
    pred = np.asarray(clf.predict(msn_preprocess(test_x))).reshape(-1)
    return 100.0 * float((pred == np.asarray(test_y)).mean())


def read_split_file(path: str, samples: list[tuple[str, int]], root: str) -> list[int]:
    """Train dataset indices of the images listed in an MSN split file. `samples` = ImageFolder.samples
    [(path, label)]. A line is a file name (MSN: `n01440764_10026.JPEG`) or a path relative to ROOT/train."""
    if not os.path.isfile(path):
        raise UserError(f"--split-file {path} does not exist; check the path")
    by_name, by_rel = {}, {}
    for i, (p, _) in enumerate(samples):
        by_name.setdefault(os.path.basename(p), []).append(i)
        by_rel[os.path.relpath(p, root).replace(os.sep, "/")] = i
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # MSN's lists are ASCII
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"--split-file {path} line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); pass MSN's "
                        f"imagenet_subsets*/*imgs_class.txt or save the file as UTF-8") from None
    idx = []
    for lineno, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if "/" in name:
            if name not in by_rel:
                raise UserError(f"--split-file {path} line {lineno}: {name!r} is not an image of {root}")
            idx.append(by_rel[name])
            continue
        hits = by_name.get(name, [])
        if not hits:
            raise UserError(f"--split-file {path} line {lineno}: no image named {name!r} in {root}")
        if len(hits) > 1:
            raise UserError(f"--split-file {path} line {lineno}: {len(hits)} images are named {name!r} in {root}; "
                            f"write the line as class/{name}")
        idx.append(hits[0])
    if not idx:
        raise UserError(f"--split-file {path} lists no images")
    return idx


def split_shots(idx: list[int], labels: torch.Tensor, num_classes: int, path: str) -> int:
    """Images per class of a split (every class the same number of times), else a UserError."""
    counts = Counter(labels[idx].tolist())
    if len(set(idx)) != len(idx):
        raise UserError(f"--split-file {path} lists an image twice")
    values = {counts.get(c, 0) for c in range(num_classes)}
    if len(values) != 1 or 0 in values:
        raise UserError(f"--split-file {path}: classes have {min(values)}..{max(values)} images; a split needs the "
                        f"same number (1, 2, 5) for every class")
    return values.pop()


def check_few_shot(n: int, labels: torch.Tensor, num_classes: int, class_names) -> None:
    counts = torch.bincount(labels, minlength=num_classes)
    c = int(counts.argmin())
    if int(counts[c]) < n:
        name = class_names[c] if class_names else c
        raise UserError(f"--few-shot {n}: class {name!r} has only {int(counts[c])} train image(s); use a smaller "
                        f"--few-shot value or add images")


# ----------------------------------------------------------------------------------------------
# k-means cluster metrics (scikit-learn / scipy; tests compare with brute force)
# ----------------------------------------------------------------------------------------------
def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """ACC (%): accuracy under the best one-to-one cluster -> class map (Hungarian algorithm on the
    contingency table, as ClustPy unsupervised_clustering_accuracy)."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics.cluster import contingency_matrix
    m = contingency_matrix(y_true, y_pred)  # (classes, clusters)
    rows, cols = linear_sum_assignment(m, maximize=True)
    return 100.0 * m[rows, cols].sum() / len(y_true)


def cluster_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """ACC, NMI, AMI, ARI (x 100) of a clustering w.r.t. the ground-truth labels (scikit-learn defaults)."""
    from sklearn import metrics
    return {"acc": cluster_accuracy(y_true, y_pred),
            "nmi": 100.0 * metrics.normalized_mutual_info_score(y_true, y_pred),
            "ami": 100.0 * metrics.adjusted_mutual_info_score(y_true, y_pred),
            "ari": 100.0 * metrics.adjusted_rand_score(y_true, y_pred)}


def class_separation(x: np.ndarray, y: np.ndarray, sample: int | None, seed: int) -> dict:
    """Silhouette (x 100) and Davies-Bouldin score of the ground-truth classes in the embedding."""
    from sklearn import metrics
    if len(set(y.tolist())) < 2 or len(set(y.tolist())) >= len(y):
        return {"silhouette": None, "davies_bouldin": None}
    sil = metrics.silhouette_score(x, y, sample_size=sample if sample and sample < len(y) else None, random_state=seed)
    return {"silhouette": 100.0 * float(sil), "davies_bouldin": float(metrics.davies_bouldin_score(x, y))}


def cluster_preprocess(x: np.ndarray, how: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if how == "l2":  # MIM-Refiner App. C.12
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if how == "standardize":  # MAE-CT App. E: the embedding's own mean and std
        return (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x


def kmeans_runs(x: np.ndarray, k: int, runs: int, seed: int, batch_size: int) -> list[dict]:
    """`runs` mini-batch k-means fits (Sculley 2010; scikit-learn MiniBatchKMeans, run r seeded seed + r).
    Returns [{"inertia", "labels"}] (inertia = k-means loss on all points)."""
    from sklearn.cluster import MiniBatchKMeans
    out = []
    for r in range(runs):
        km = MiniBatchKMeans(n_clusters=k, random_state=seed + r, batch_size=batch_size, n_init=1)
        labels = km.fit_predict(x)
        out.append({"inertia": float(km.inertia_), "labels": labels})
    return out


def evaluate_clusters(x: np.ndarray, y: np.ndarray, k: int, args: Args) -> dict:
    """k-means with k clusters on the (preprocessed) val features; metrics of the lowest-loss run (MIM-Refiner
    Table 3, MAE-CT Table 2/18) and their mean and std over the runs (MIM-Refiner Table 9, MAE-CT Table 19)."""
    x = cluster_preprocess(x, args.cluster_norm)
    fits = kmeans_runs(x, k, args.kmeans_runs, args.seed, args.kmeans_batch_size)
    per_run = [cluster_metrics(y, f["labels"]) for f in fits]
    best = min(range(len(fits)), key=lambda r: fits[r]["inertia"])
    mean = {m: float(np.mean([p[m] for p in per_run])) for m in per_run[0]}
    std = {m: float(np.std([p[m] for p in per_run])) for m in per_run[0]}
    return {"best_run": {"run": best, "inertia": fits[best]["inertia"], **per_run[best]},
            "mean": mean, "std": std, "runs": len(fits),
            **class_separation(x, y, args.silhouette_sample, args.seed)}


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------
def load_saved_features(path: str) -> dict:
    """The file of eval_knn.py --save-features: {train_features (N, D), train_labels (N,), val_features,
    val_labels, protocol}."""
    obj = common.load_file(path)
    keys = ("train_features", "train_labels", "val_features", "val_labels")
    missing = [k for k in keys if not isinstance(obj, dict) or not torch.is_tensor(obj.get(k))]
    if missing:
        raise UserError(f"--features {path}: not a file of eval_knn.py --save-features (missing {', '.join(missing)})")
    for k in ("train_features", "val_features"):  # scikit-learn would stop with a traceback on the first nan
        t = obj[k]
        if not all(bool(torch.isfinite(c).all()) for c in t.split(65536)):  # in chunks: ImageNet's bank is GBs
            bad = int((~torch.isfinite(t)).reshape(len(t), -1).any(1).sum())
            raise UserError(f"--features {path}: '{k}' holds nan/inf in {bad} of {len(t)} rows; extract the features "
                            f"again with eval_knn.py --save-features from a checkpoint that gives finite ones")
    return obj


def main(args: Args):
    eval_knn = common.neighbour("eval_knn", "eval_frozen.py")  # its encoder loading, extraction and JSON writer
    if bool(args.checkpoint) == bool(args.features):
        raise UserError("pass either --checkpoint PATH (features are extracted) or --features FILE "
                        "(from eval_knn.py --save-features)")
    if not (args.few_shot or args.split_file or args.cluster):
        raise UserError("nothing to evaluate: pass --few-shot 1 2 5, --split-file FILE ... and/or --cluster")
    if args.output_json:
        common.check_output_path(args.output_json, "--output-json")
    # optional packages first, before any extraction
    need("sklearn", "scikit-learn")
    need("scipy", "scipy")
    solver = args.solver
    if args.few_shot or args.split_file:
        if solver == "cyanure":
            need("cyanure", "cyanure")
        elif solver == "auto":
            solver = "cyanure" if have_cyanure() else "sklearn"

    dist_info = common.init_distributed(args.device)
    few_shot = sorted(set(args.few_shot))

    # ---- data and labels (cheap: no image is decoded), the splits, then the features
    saved = load_saved_features(args.features) if args.features else None
    train_ds = val_ds = None
    if saved is None or args.split_file:
        img_size = args.img_size or 224
        encoder = weights = None
        if saved is None:
            encoder, weights = eval_knn.build_encoder(args)
            img_size = encoder.img_size
        tf = common.eval_transform(img_size)
        train_ds = build_dataset(args.data, "train", tf, img_size=img_size, seed=args.seed, require_labels=True)
        if saved is None:
            val_ds = build_dataset(args.data, "val", tf, img_size=img_size, seed=args.seed, require_labels=True)
            if len(val_ds) == 0 or list(train_ds.classes) != list(val_ds.classes):
                raise UserError(f"--data {args.data}: val needs images and the same class folders as train")
    if saved is not None:
        train_y, val_y = saved["train_labels"].long(), saved["val_labels"].long()
        class_names = list(train_ds.classes) if train_ds is not None else None
        if train_ds is not None and len(train_ds) != len(train_y):
            raise UserError(f"--features {args.features} holds {len(train_y)} train images but --data {args.data} has "
                            f"{len(train_ds)}; --split-file names need the --data the features were extracted from")
        if args.split_file and saved.get("protocol", {}).get("train_subset", 1.0) != 1.0:
            raise UserError(f"--features {args.features} was saved with --train-subset; split files need all of train")
        num_classes = int(max(train_y.max(), val_y.max())) + 1
    else:
        train_y = eval_knn.dataset_labels(train_ds)
        val_y = eval_knn.dataset_labels(val_ds)
        class_names = list(train_ds.classes)
        num_classes = len(class_names)
    if args.cluster and len(val_y) < num_classes:  # before the extraction; scikit-learn would raise a ValueError
        raise UserError(f"--cluster: k-means with {num_classes} clusters (one per class) needs at least {num_classes} "
                        f"val images, there are {len(val_y)} val images; add val images or drop --cluster")

    splits = {}  # n -> [(description, train indices)]
    for path in args.split_file:
        if not hasattr(train_ds, "samples"):
            raise UserError(f"--split-file needs an ImageFolder --data ROOT (image names), not {args.data}")
        idx = read_split_file(path, train_ds.samples, str(Path(args.data) / "train"))
        n = split_shots(idx, train_y, num_classes, path)
        splits.setdefault(n, []).append((f"split file {path}", torch.tensor(sorted(idx))))
    for n in few_shot:
        if n in splits:
            continue
        check_few_shot(n, train_y, num_classes, class_names)
        splits[n] = [(f"seeded split (seed {args.seed + s}, {n} per class; not MSN's lists)",
                      eval_knn.low_shot_indices(train_y, n, args.seed + s, num_classes, class_names))
                     for s in range(args.shot_seeds)]

    if saved is None:
        depth = encoder.depth
        block = eval_knn.resolve_block(args.block if args.block is not None else -1, depth)
        encoder.to(dist_info.device).eval()
        needed = torch.unique(torch.cat([i for runs in splits.values() for _, i in runs])) if splits else None
        kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, pool=args.pool, final_norm=args.final_norm)
        val_banks, val_y2 = eval_knn.extract_features(encoder, val_ds, [block], dist_info, desc="val features", **kw)
        train_f = None
        if needed is not None:  # only the few-shot images are encoded
            sub = torch.utils.data.Subset(train_ds, needed.tolist())
            banks, _ = eval_knn.extract_features(encoder, sub, [block], dist_info, desc="train features", **kw)
            if dist_info.is_main:
                train_f = torch.zeros(len(train_ds), encoder.dim)
                train_f[needed] = banks[block]
        if not dist_info.is_main:
            return
        val_f = val_banks[block]
        has_ln = not encoder.post_norm
        feature = (f"{'[CLS]' if args.pool == 'cls' else 'mean patch token'} of block {block} of {depth}"
                   + (" + final LayerNorm" if block == depth - 1 and args.final_norm and has_ln else " (raw)"))
        source = {"checkpoint": args.checkpoint, "weights": weights + ("; EMA (--ema)" if args.ema else ""),
                  "model": common.describe_vit(encoder.config()), "feature": feature, "img_size": encoder.img_size,
                  "transform": f"Resize({common.eval_resize(encoder.img_size)}, bicubic) + CenterCrop({encoder.img_size})"}
    else:
        if not dist_info.is_main:
            return
        train_f, val_f = saved["train_features"].float(), saved["val_features"].float()
        p = saved.get("protocol", {}) if isinstance(saved.get("protocol"), dict) else {}
        source = {"features": args.features, "feature": p.get("feature", "?"), "checkpoint": p.get("checkpoint", "?")}

    protocol = {**source, "data": args.data, "n_train": len(train_y), "n_val": len(val_y), "num_classes": num_classes,
                "world_size": dist_info.world_size, "seed": args.seed}
    if splits:
        protocol["few_shot"] = {"solver": solver, "model": "multinomial logistic regression, L2, no intercept (MSN)",
                                "lambda": f"{args.lambd} / n_train", "preprocessing": "per row: centre, L2 (MSN)",
                                "max_epochs": args.max_epochs, "tol": args.tol if solver == "cyanure" else 1e-6}
    if args.cluster:
        protocol["cluster"] = {"algorithm": "scikit-learn MiniBatchKMeans, k = number of classes", "runs": args.kmeans_runs,
                               "batch_size": args.kmeans_batch_size, "preprocessing": args.cluster_norm,
                               "silhouette": f"w.r.t. ground truth, {'all' if not args.silhouette_sample else args.silhouette_sample} images"}
    print("frozen-feature evaluation protocol:")
    for k, v in protocol.items():
        print(f"  {k}: {v}")
    print(flush=True)

    result = {"protocol": protocol, "few_shot": {}, "cluster": None}
    if splits:
        print(f"n-shot logistic regression top-1 on {len(val_y)} val images ({solver}):")
        for n in sorted(splits):
            runs = []
            for desc, idx in splits[n]:
                acc = logistic_accuracy(train_f[idx].numpy(), train_y[idx].numpy(), val_f.numpy(), val_y.numpy(),
                                        args.lambd, solver, args.max_epochs, args.tol, args.seed)
                runs.append({"split": desc, "top1": acc})
            accs = np.array([r["top1"] for r in runs])
            entry = {"mean": float(accs.mean()), "std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0, "runs": runs}
            result["few_shot"][str(n)] = entry
            kind = "MSN split files" if runs[0]["split"].startswith("split file") else "seeded splits, not MSN's lists"
            print(f"  {n}-shot: {entry['mean']:.2f} +- {entry['std']:.2f} over {len(runs)} split(s) ({kind})")
    if args.cluster:
        res = evaluate_clusters(val_f.numpy(), val_y.numpy(), num_classes, args)
        result["cluster"] = res
        b, m = res["best_run"], res["mean"]
        print(f"k-means (k={num_classes}, {res['runs']} runs, {args.cluster_norm}) on {len(val_y)} val images:")
        print(f"  lowest-loss run: ACC {b['acc']:.2f}  NMI {b['nmi']:.2f}  AMI {b['ami']:.2f}  ARI {b['ari']:.2f}")
        print(f"  mean over runs:  ACC {m['acc']:.2f}  NMI {m['nmi']:.2f}  AMI {m['ami']:.2f}  ARI {m['ari']:.2f}")
        if res["silhouette"] is not None:
            print(f"  class separation (ground truth): silhouette {res['silhouette']:.2f}  "
                  f"Davies-Bouldin {res['davies_bouldin']:.3f}")
    if args.output_json:
        eval_knn.write_json(args.output_json, result)


if __name__ == "__main__":
    run_main(main, Args)
