"""Memory plan (memplan.py, the optional neighbour of common.py): the fake-tensor measurement against a real CPU step, the automatic choice of
checkpointed blocks against a faked free memory, and `--plan` / `benchmarks/gpu_check.py` from the command line."""
import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import common
import memplan
import mim_refiner as mr
from conftest import TINY, run_inprocess, run_script, write_mae_release_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# a tiny MIM-Refiner run: 16 patches, 2 heads, 2 local views
TINY_MR = dict(model="vit_t16", img_size=32, patch_size=8, batch_size=8, local_crops=2, head_blocks=[10, 11],
               head_hidden=64, pred_hidden=64, head_dim=32, queue_size=64, topk=1)
TINY_MR_FLAGS = ["--model", "vit_t16", "--img-size", "32", "--patch-size", "8", "--batch-size", "8", "--local-crops", "2",
                 "--head-blocks", "10", "11", "--head-hidden", "64", "--pred-hidden", "64", "--head-dim", "32",
                 "--queue-size", "64", "--topk", "1"]


def tiny_args(**kw):
    return mr.resolve_args(mr.Args(**{**TINY_MR, **kw}), post_norm=False)


@pytest.mark.parametrize("k", [0, 12])
def test_fake_measurement_equals_real_cpu_step(k):
    """The same train_step measured on fake tensors and on real CPU tensors (fp32 both: a CPU build has no bf16
    reference of the CUDA kernels): every kind agrees to 1 %, and the static part is exactly the parameter and
    AdamW-state bytes counted by hand. The real run also confirms the activation term by counting the bytes of
    the tensors autograd saves (saved_tensors_hooks): they are what checkpointing trades away."""
    build = mr.plan_builder(tiny_args(), False, n=8)
    fake = memplan.step_memory(build, k, fake=True, bf16=False)
    real = memplan.step_memory(build, k, fake=False, bf16=False)
    for key in ("peak", "act", "weights", "opt", "buffers"):
        assert fake[key] == pytest.approx(real[key], rel=0.01), (key, fake[key], real[key])
    modules, optimizers, _, _ = build(k)
    params = {id(p): p for m in modules for p in m.parameters()}.values()
    trainable = sum(p.numel() for p in params if p.requires_grad)
    assert real["weights"] == 4 * sum(p.numel() for p in params)
    assert real["opt"] == pytest.approx(8 * trainable, abs=64 * len(optimizers[0].param_groups) + 4096)  # m, v (+ steps)
    # the bytes autograd saves for backward (real tensors, unique storages, parameters excluded) lie within the
    # measured activation peak: MemTracker's ACT/TEMP kinds are the saved tensors plus transient buffers
    modules, optimizers, step, _ = build(k)
    param_ptrs = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    if k == 0:  # without checkpointing the activation peak is the saved forward plus the backward's first buffers
        assert 0.7 * real["act"] < sum(saved.values()) <= real["act"], (sum(saved.values()), real["act"])


def test_checkpointing_halves_activations_of_the_tiny_run():
    """k = 12 of 12 blocks stores a block input instead of the block's internals: the measured activations fall
    by a factor > 2 and the need is monotone in k (what the interpolation of plan_memory relies on)."""
    build = mr.plan_builder(tiny_args(), False, n=8)
    acts = [memplan.step_memory(build, k)["act"] for k in (0, 6, 12)]
    assert acts[0] > acts[1] > acts[2] and acts[0] > 2 * acts[2], acts


def test_auto_plan_checkpoints_exactly_the_blocks_needed_and_the_run_uses_them(tmp_path, capsys, monkeypatch):
    """Free memory faked (memplan.device_free_memory, the torch.cuda.mem_get_info call) between the needs at k = 0
    and k = 12: the run prints the plan line, checkpoints the smallest k that fits (k - 1 would not) and its encoder
    runs exactly k blocks under torch.utils.checkpoint. More free memory than the need at k = 0: no checkpointing;
    less than at k = 12: one error line naming --accum-steps. No free-memory figure (CPU): off, nothing measured."""
    # 128 images: activations (not the optimizer update) make the peak, as in the paper runs
    flags = [*TINY_MR_FLAGS, "--local-crops", "0", "--head-blocks", "11", "--batch-size", "128"]
    args = tiny_args(local_crops=0, head_blocks=[11], batch_size=128)
    off = mr.memory_plan(args, False, 1, None, "off").need
    on = mr.memory_plan(args, False, 1, None, "on").need
    assert on < off
    free = (off + on) / 2
    monkeypatch.setattr(memplan, "device_free_memory", lambda device: free)
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(fn, x, *a, **kw):  # the training run's calls (the plan's fake steps checkpoint too)
        calls.extend([] if isinstance(x, FakeTensor) else [1])
        return real_checkpoint(fn, x, *a, **kw)
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    write_mae_release_checkpoint(tmp_path / "mae.pth", img_size=32, patch_size=8)
    code, out, err = run_inprocess(capsys, mr, *flags, "--num-workers", 0, "--device", "cpu", "--data", "synthetic:128:8",
                                   "--init", tmp_path / "mae.pth", "--head-epochs", 0, "--epochs", 1,
                                   "--output-dir", tmp_path / "run")
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("plan:"))
    k = int(line.split("checkpointing ")[1].split(" of 12")[0])
    assert 0 < k < 12 and "single process" in line
    assert len(calls) == k  # one update, one encoder call (global views; no local views)
    build = mr.plan_builder(args, False, 128)
    assert memplan.plan_need(memplan.step_memory(build, k), 1, False) <= free
    assert memplan.plan_need(memplan.step_memory(build, k - 1), 1, False) > free
    cpu, plan = torch.device("cpu"), lambda g, c, m: mr.memory_plan(args, False, g, c, m)
    monkeypatch.setattr(memplan, "device_free_memory", lambda device: off + 1)
    assert memplan.apply_memory_plan(args, cpu, 1, 12, plan) == (0, False)
    monkeypatch.setattr(memplan, "device_free_memory", lambda device: on - 1)
    with pytest.raises(common.UserError, match="does NOT fit.*--accum-steps"):
        memplan.apply_memory_plan(args, cpu, 1, 12, plan)
    monkeypatch.setattr(memplan, "device_free_memory", lambda device: None)
    assert memplan.apply_memory_plan(args, cpu, 1, 12, None) == (0, False)


def test_plan_flag_prints_the_line_and_exits_0():
    p = run_script("mim_refiner.py", *TINY_MR_FLAGS, "--plan", "4x80")
    lines = [x for x in p.stdout.splitlines() if x.startswith("plan:")]
    assert len(lines) == 1 and "checkpointing 0 of 12 blocks" in lines[0] and "DDP" in lines[0], p.stdout
    assert "2 images x (2 + 2) views per GPU" in lines[0]  # batch 8 over 4 GPUs


def test_gpu_check_without_cuda_says_so_and_exits_0():
    p = run_script("benchmarks/gpu_check.py")
    assert p.stdout.strip().splitlines() == ["gpu_check: no CUDA device visible; nothing measured"], p.stdout


@pytest.mark.parametrize("script", ["mae.py", "mae_ct.py", "lut.py", "conmim.py"])
def test_every_script_plans_its_own_step(script):
    """--plan on each script's tiny configuration: one plan line naming the method, the per-GPU batch of
    4 GPUs and a positive measured peak (ConMIM's masked-token loss included: no data-dependent shape)."""
    p = run_script(script, *TINY, "--batch-size", "16", "--plan", "4x80")
    lines = [x for x in p.stdout.splitlines() if x.startswith("plan:")]
    assert len(lines) == 1 and "4 images" in lines[0] and "checkpointing 0 of" in lines[0], p.stdout
    raw = float(lines[0].split("(raw ")[1].split(" x")[0])
    need = float(lines[0].split("; need ")[1].split(" GiB")[0])
    assert 0.1 < raw < 80 and need >= raw + 2.0  # something was measured; kernels (0.5) and NCCL (1.6) added


def test_a_failing_measurement_never_stops_a_run_that_could_train(tmp_path, capsys, monkeypatch):
    """The plan relies on torch internals (MemTracker's hooks, FakeTensorMode): forced to fail, the run prints one
    warning line naming the torch version, checkpoints every trainable block and trains; `--plan` asked explicitly
    ends in one error line."""
    def broken(*a, **kw):
        raise AttributeError("'MemTracker' object has no attribute '_param_to_grad_hook_handles'")
    monkeypatch.setattr(memplan, "step_memory", broken)
    monkeypatch.setattr(memplan, "device_free_memory", lambda device: 80 * memplan.GiB)
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **kw: calls.append(1) or real_checkpoint(*a, **kw))
    write_mae_release_checkpoint(tmp_path / "mae.pth", img_size=32, patch_size=8)
    code, out, err = run_inprocess(capsys, mr, *TINY_MR_FLAGS, "--local-crops", 0, "--head-blocks", 11, "--num-workers", 0,
                                   "--device", "cpu", "--data", "synthetic:8:8", "--init", tmp_path / "mae.pth",
                                   "--head-epochs", 0, "--epochs", 1, "--output-dir", tmp_path / "run")
    assert code == 0, err
    warn = [x for x in out.splitlines() if x.startswith("warning: the memory plan failed")]
    assert len(warn) == 1 and torch.__version__ in warn[0] and "AttributeError" in warn[0], out
    assert "checkpointing every trainable block" in warn[0]
    assert len(calls) == 12  # one update, one encoder call, all 12 blocks checkpointed
    assert torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)["epoch"] == 1
    code, _, err = run_inprocess(capsys, mr, *TINY_MR_FLAGS, "--plan", "4x80")
    assert code == 2 and err.startswith("error: the memory plan could not be measured with torch") and \
        len(err.strip().splitlines()) == 1, err


def test_gpu_check_parts_run_on_cpu_and_its_reference_loss_is_current(tmp_path):
    """benchmarks/gpu_check.py on the CPU where it can: the 1-rank DDP step it times (gloo, a tiny model), and the
    CPU fp32 step-0 loss it stores as the reference for CUDA (rewrite it with --write-reference when the maths or
    the data pipeline change)."""
    import json
    import subprocess
    import sys
    code = ("import sys, torch; sys.path.insert(0, 'benchmarks'); import gpu_check, mim_refiner as mr; "
            "a = mr.resolve_args(mr.Args(model='vit_t16', img_size=32, patch_size=8, batch_size=8, local_crops=2, "
            "head_blocks=[10, 11], head_hidden=32, pred_hidden=32, queue_size=32, topk=1), False); "
            "print(gpu_check.measure_step(a, 4, 3, torch.device('cpu'), warmup=1, iters=1))")
    p = subprocess.run([sys.executable, "-c", code], cwd=common.Path(common.__file__).parent, capture_output=True,
                       text=True, timeout=120, env={**common.os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    r = eval(p.stdout.strip().splitlines()[-1])
    assert r["step_s"] > 0 and r["images_s"] > 0
    sys.path.insert(0, str(common.Path(common.__file__).parent / "benchmarks"))
    import gpu_check
    gpu_check.write_init(tmp_path / "init.pth")
    ref = json.loads(gpu_check.REFERENCE.read_text())
    assert ref["flags"] == gpu_check.TINY_REFINER
    assert gpu_check.tiny_loss("cpu", tmp_path, tmp_path / "init.pth") == pytest.approx(ref["loss"], rel=1e-5)
