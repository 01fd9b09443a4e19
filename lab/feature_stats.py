"""Spectrum of frozen features: is an encoder's representation dominated by one direction, and is that
direction image brightness? (How the LUT miniature was diagnosed; README "Miniature reproduction".)

Reads the `--save-features` files of eval_knn.py (train features of the evaluated block) and prints, per
file: the mean pairwise cosine, the effective rank exp(H(p)) of the centred, L2-normalised features
(p = normalised squared singular values; Roy & Vetterli 2007), the share of the top principal
component, and, for `--data synthetic...`, the correlation of the top two components with each image's
mean grey level (the synthetic data's nuisance factor).

    python eval_knn.py --checkpoint runs/lut/checkpoint-last.pth ... --save-features lut.pth
    python lab/feature_stats.py lut.pth mae.pth --data synthetic:2000:500 --img-size 32
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import synthetic  # noqa: E402


def spectrum(x: torch.Tensor) -> dict:
    """x (M, D) features -> mean cosine, effective rank, top-PC share, the top two components (M, 2)."""
    xn = torch.nn.functional.normalize(x.double(), dim=1)
    u, s, _ = torch.linalg.svd(xn - xn.mean(0), full_matrices=False)
    p = s ** 2 / (s ** 2).sum()
    return {"mean_cos": float((xn @ xn.T).mean()), "eff_rank": float(torch.exp(-(p * torch.log(p + 1e-12)).sum())),
            "top_share": float(p[0]), "pcs": u[:, :2].numpy()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("features", nargs="+", help="files written by eval_knn.py --save-features")
    ap.add_argument("--data", default=None, help="synthetic[:N_TRAIN[:N_VAL]]: also correlate with brightness")
    ap.add_argument("--img-size", type=int, default=32)
    a = ap.parse_args(argv)
    brightness = None
    if a.data and synthetic.parse_synthetic(a.data):
        n_train, _ = synthetic.parse_synthetic(a.data)
        ds = synthetic.SyntheticShapes(n_train, a.img_size, "train")
        brightness = np.array([ds.render(i)[0].mean() for i in range(n_train)])
    print("| features | mean cos | effective rank | top PC share | corr(PC1, brightness) | corr(PC2, brightness) |")
    print("|---|---|---|---|---|---|")
    for f in a.features:
        x = torch.load(f, map_location="cpu", weights_only=True)["train_features"].float()
        r = spectrum(x)
        corr = ["-", "-"]
        if brightness is not None and len(brightness) == len(x):
            corr = [f"{np.corrcoef(r['pcs'][:, i], brightness)[0, 1]:+.2f}" for i in range(2)]
        print(f"| {Path(f).name} | {r['mean_cos']:.3f} | {r['eff_rank']:.1f} | {r['top_share']:.2f} | {corr[0]} | {corr[1]} |")


if __name__ == "__main__":
    main()
