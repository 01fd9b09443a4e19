"""The CUDA configuration on the CPU (MIMREF_CUDA_DTYPES=1): bf16 autocast, FSDP's CUDA policy, fused AdamW and
activation checkpointing, under torchrun with gloo. A CPU run in fp32 does not take these paths; this one does:
FSDP through MIM-Refiner's two stages (the encoder frozen in stage "heads", trained in "refine") and MAE's one,
at world sizes 1 and 2, killed inside each stage and resumed, bit-identical to the uninterrupted run; FSDP
computes what DDP computes (the same numerics for a 4 x 40 GB and a 4 x 80 GB user), both away from fp32."""
import json

import pytest
import torch

from conftest import ONE_THREAD, TINY, load, run_script, tensors, write_mae_release_checkpoint

CUDA_DTYPES = {**ONE_THREAD, "MIMREF_CUDA_DTYPES": "1"}
FP32 = {**ONE_THREAD, "MIMREF_CUDA_DTYPES": "0"}

REFINER = [*TINY, "--patch-size", 8, "--data", "synthetic:32:20", "--batch-size", 16, "--queue-size", 48,
           "--local-crops", 2, "--head-hidden", 32, "--pred-hidden", 32, "--head-blocks", 10, 11, "--warmup-epochs", 1,
           "--blr", 1e-3, "--head-blr", 1e-3, "--head-epochs", 2, "--epochs", 2, "--grad-checkpointing", "on",
           "--save-every", 0]
MAE = [*TINY, "--patch-size", 8, "--decoder-dim", 32, "--decoder-depth", 1, "--decoder-heads", 2, "--batch-size", 8,
       "--warmup-epochs", 1, "--blr", 1e-3, "--vis-images", 0, "--data", "synthetic:16:8", "--epochs", 3,
       "--grad-checkpointing", "on", "--save-every", 0]


def losses(out):
    return [json.loads(x)["train/loss"] for x in open(out / "log.jsonl") if "train/loss" in x]


def segmented(script, args, out, stops, nproc):
    """Run `script` killed after each epoch count in `stops` (--exit-after-epochs), then to the end."""
    for stop in stops:
        run_script(script, *args, "--exit-after-epochs", stop, "--output-dir", out, nproc=nproc, env=CUDA_DTYPES)
    p = run_script(script, *args, "--output-dir", out, nproc=nproc, env=CUDA_DTYPES)
    assert "resuming" in p.stdout
    return p


def assert_equal_states(a, b, keys):
    ta, tb = tensors({k: a[k] for k in keys}), tensors({k: b[k] for k in keys})
    assert ta.keys() == tb.keys() and len(ta) > 50
    bad = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not bad, bad[:5]


def max_diff(a, b, key):
    ta, tb = tensors(a[key]), tensors(b[key])
    return max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)


def l2_diff(a, b, key):
    ta, tb = tensors(a[key]), tensors(b[key])
    return sum(((ta[k].double() - tb[k].double()) ** 2).sum() for k in ta).sqrt().item()


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "mae.pth"
    write_mae_release_checkpoint(path, patch_size=8)
    return path


@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp_mim_refiner_both_stages_resumed_inside_each_equals_uninterrupted(tmp_path, init, nproc):
    """Stage "heads" (encoder frozen when FSDP initialises) -> "refine" under the CUDA policy; killed after epoch 1
    (inside "heads") and after epoch 3 (inside "refine"): the final state equals the uninterrupted run's bit for bit.
    (FSDP2 once recorded no dtypes for groups without trainable parameters and crashed at the first refine step.)"""
    args = [*REFINER, "--init", init, "--fsdp"]
    p = run_script("mim_refiner.py", *args, "--output-dir", tmp_path / "u", nproc=nproc, env=CUDA_DTYPES)
    assert "bf16 CPU autocast" in p.stdout and "stage 'refine'" in p.stdout
    segmented("mim_refiner.py", args, tmp_path / "s", (1, 3), nproc)
    u, s = load(tmp_path / "u" / "checkpoint-last.pth"), load(tmp_path / "s" / "checkpoint-last.pth")
    assert u["epoch"] == s["epoch"] == 4 and u["stage"] == "refine"
    assert_equal_states(u, s, ("model", "model_online", "heads", "queues", "optimizer"))
    assert losses(tmp_path / "u") == losses(tmp_path / "s")[-len(losses(tmp_path / "u")):]


def test_fsdp_and_ddp_compute_the_same_numbers_under_the_cuda_dtypes(tmp_path, init):
    """MIM-Refiner x2: FSDP (fp32 parameters gathered, bf16 autocast) and DDP + bf16 autocast give the same losses
    while the weights agree (the 4 head-stage updates and the first refine update, to 1e-5), then stay closer to each
    other than to the fp32 run (reduction-order rounding, amplified by AdamW's normalised steps, bf16 and the
    discrete nearest-neighbour picks, is all that separates them). A bf16 parameter policy differs from DDP already
    at step 0."""
    args = [*REFINER, "--init", init]
    runs = {"fsdp": (["--fsdp"], CUDA_DTYPES), "ddp": ([], CUDA_DTYPES), "fp32": ([], FP32)}
    for name, (extra, env) in runs.items():
        run_script("mim_refiner.py", *args, *extra, "--output-dir", tmp_path / name, nproc=2, env=env)
    ck = {n: load(tmp_path / n / "checkpoint-last.pth") for n in runs}
    lo = {n: losses(tmp_path / n) for n in runs}
    assert len(lo["fsdp"]) == 8
    assert lo["fsdp"][:5] == pytest.approx(lo["ddp"][:5], abs=1e-5)
    assert max(abs(a - b) for a, b in zip(lo["ddp"], lo["fp32"])) > 1e-3  # the bf16 path did run
    for key in ("model_online", "heads"):  # L2 distance of the weights (AdamW moves a near-zero gradient by +-lr)
        assert l2_diff(ck["fsdp"], ck["ddp"], key) < l2_diff(ck["ddp"], ck["fp32"], key), key


@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp_mae_resumed_equals_uninterrupted_and_ddp(tmp_path, nproc):
    p = run_script("mae.py", *MAE, "--fsdp", "--output-dir", tmp_path / "u", nproc=nproc, env=CUDA_DTYPES)
    assert "bf16 CPU autocast" in p.stdout
    segmented("mae.py", [*MAE, "--fsdp"], tmp_path / "s", (1,), nproc)
    u, s = load(tmp_path / "u" / "checkpoint-last.pth"), load(tmp_path / "s" / "checkpoint-last.pth")
    assert_equal_states(u, s, ("model", "decoder", "optimizer"))
    if nproc == 2:
        run_script("mae.py", *MAE, "--output-dir", tmp_path / "ddp", nproc=2, env=CUDA_DTYPES)
        d = load(tmp_path / "ddp" / "checkpoint-last.pth")
        assert max_diff(u, d, "model") < 1e-5
