"""Memory plan of a training run (--plan GPUSxGB, --grad-checkpointing auto): an optional neighbour of common.py.

Without this file every default command still runs: `auto` checkpointing then takes common.py's static per-model
choice and says so in one line, and `--plan` says to add this file.

Each script hands `plan_memory` a `build(k)` that constructs the configured run with k checkpointed blocks
(models, heads, decoder, queues, EMA copies, optimizer, random inputs of the per-GPU batch) and returns its
one-update `step()`. It is built and run once per k on FakeTensorMode CPU tensors (no memory, no data, no
init checkpoint) under bf16 CPU autocast (the CUDA run's dtypes, common.cuda_dtypes); MemTracker gives the peak
per kind ("raw"). The fake step is one process's view: no collective runs and its loss, which has no values,
is not checked (`_one_process_view`). Sharding (FSDP) cannot run on fake tensors in one process; it is
modelled: (weights + gradients + optimizer states + EMA) / GPUS + the measured activations + the gathered
working set (2 blocks of fp32 weights with their fp32 gradients, 8 B/param, and the root unit unsharded in
fp32 with its gradient and autocast copy, 10 B/param). FSDP gathers fp32 parameters and autocasts as DDP does
(fsdp.py), so the measured activations are its own.
What the fake run cannot see is added item by item (docs/memory.md has the figures):
  fragmentation of the caching allocator: x1.05 with expandable segments (set by init_distributed unless the
    user configured the allocator), x1.12 without (3-12 % measured with fixed shapes);
  the flash-attention backward's fp32 dq accumulator, 4 B x batch x ceil128(N) x heads x ceil32(head_dim) for the
    largest attention call of the step, live at the peak (the backward);
  NCCL communicators and their buffers: 1.6 GiB on more than one GPU (0.7-1.6 GiB seen on 4 GPUs);
  lazily loaded CUDA kernels, cuBLAS/cuDNN workspaces: 0.5 GiB;
  with --plan (no GPU to ask), the CUDA context, 0.5 GiB, out of the capacity the card reports: a card sold as
    "80 GB" reports 79.1-79.25 GiB (A100), "40 GB" about 39.5 GiB, i.e. CARD_USABLE x the nominal figure.
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import types
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import common

GiB = 2**30
FRAGMENTATION = 1.05
FRAGMENTATION_NO_EXPANDABLE = 1.12
NCCL_BYTES = 1.6 * GiB
KERNEL_BYTES = 0.5 * GiB
CUDA_CONTEXT_BYTES = 0.5 * GiB
CARD_USABLE = 0.988


def expandable_segments() -> bool:
    """Whether the CUDA caching allocator runs with expandable segments: init_distributed turns them on unless
    the user configured the allocator (PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF)."""
    conf = [os.environ[e] for e in common.ALLOC_CONF_ENVS if e in os.environ]
    return not conf or any("expandable_segments:true" in c.replace(" ", "").lower() for c in conf)


def parse_plan(spec: str) -> tuple[int, float]:
    """`--plan GPUSxGB` -> (gpus, bytes per GPU for the run): GB as the card is named (A100-40GB: 40), of which
    CARD_USABLE is reported by the card, less the CUDA context."""
    try:
        g, gb = spec.lower().split("x")
        gpus, cap = int(g), float(gb)
        assert gpus >= 1 and cap > 0
    except (ValueError, AssertionError):
        raise common.UserError(f"--plan {spec!r}: expected GPUSxGB, e.g. --plan 4x80 (4 GPUs of 80 GB)") from None
    return gpus, CARD_USABLE * cap * GiB - CUDA_CONTEXT_BYTES


@contextlib.contextmanager
def _one_process_view():
    """While the fake step runs: no collective (a plan is one process's view: common's collectives see no process
    group) and no check of a loss that has no values (common.check_finite)."""
    is_initialized, check_finite = dist.is_initialized, common.check_finite
    dist.is_initialized, common.check_finite = (lambda: False), (lambda *a, **kw: None)
    try:
        yield
    finally:
        dist.is_initialized, common.check_finite = is_initialized, check_finite


@contextlib.contextmanager
def _cuda_dtypes(on: bool):
    """The CUDA run's dtypes on the CPU (common.cuda_dtypes: bf16 CPU autocast) while the step runs."""
    env, old = common.CUDA_DTYPES_ENV, os.environ.get(common.CUDA_DTYPES_ENV)
    os.environ[env] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[env]
        else:
            os.environ[env] = old


@contextlib.contextmanager
def _deepcopy_by_clone(cls):
    """Within the block, deepcopy of a `cls` tensor is a clone: copying the EMA/momentum modules of a fake run
    otherwise fails on BatchNorm's num_batches_tracked (a fake tensor that holds a real constant)."""
    def clone(self, memo):
        if id(self) not in memo:
            t = self.detach().clone()
            memo[id(self)] = nn.Parameter(t, self.requires_grad) if isinstance(self, nn.Parameter) else t
        return memo[id(self)]
    cls.__deepcopy__ = clone
    try:
        yield
    finally:
        del cls.__deepcopy__


@contextlib.contextmanager
def _flash_workspace(record: list):
    """Record, for every attention call that will run a backward, the flash-attention backward's fp32 dq
    accumulator (B, ceil128(N), h, ceil32(d)) x 4 B (flash-attention 2's padded tiles)."""
    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *a, **kw):  # q (B, h, N, d)
        if torch.is_grad_enabled() and q.requires_grad:
            B, h, N, d = q.shape
            record.append(4 * B * (-(-N // 128) * 128) * h * (-(-d // 32) * 32))
        return real(q, k, v, *a, **kw)
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def step_memory(build, k: int, fake: bool = True, bf16: bool = True) -> dict:
    """Run `build(k)`'s step() once, on fake CPU tensors (real ones with fake=False: tests), with bf16 CPU
    autocast where the script autocasts on CUDA (fp32 with bf16=False); bytes per GPU by kind. The peak is for
    the steady state: optimizer states exist from the second update on, so the first step's peak gets the states
    it had not yet allocated added (an upper bound wherever the peak falls)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker
    flash: list[int] = []
    with FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext(), warnings.catch_warnings(), \
            _deepcopy_by_clone(FakeTensor):
        warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor")  # deepcopy of a fake module (EMA)
        modules, optimizers, step, blocks = build(k)
        class PeakTracker(MemTracker):
            """MemTracker with the global peak only (its per-module peaks loop over every module at every op:
            minutes for ViT-H), plus the peak of the non-static kinds (activations and temporaries)."""
            act_peak = None

            def _pre_fw_hook(self, module, inputs):
                try:
                    super()._pre_fw_hook(module, inputs)
                except NotImplementedError:  # a top-level module called again (MAE-CT's g_m once per view): it
                    pass  # is tracked already, and only its per-module statistics (unused here) would differ

            def _update_peak_stats(self, peak_state):
                for dev, snap in self._curr_mem_snap.items():
                    snap = {str(kind).split(".")[-1]: v for kind, v in snap.items()}
                    if snap["Total"] > self._peak_mem.get(dev, 0):
                        self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], snap
                    act = snap["Total"] - snap["PARAM"] - snap["BUFFER"] - snap["GRAD"] - snap["OPT"]
                    self.act_peak = max(self.act_peak or 0, act)

        tracker = PeakTracker()
        # MemTracker hooks every parameter's gradient and fails on frozen ones: give those an inert handle
        inert = (types.SimpleNamespace(remove=lambda: None),) * 2
        for m in modules:
            for p in m.parameters():
                if not p.requires_grad:
                    tracker._param_to_grad_hook_handles[p] = inert
        tracker.track_external(*modules, *optimizers)
        with tracker, _flash_workspace(flash), _one_process_view(), _cuda_dtypes(bf16):
            step()
        at_peak = tracker._peak_mem_snap[torch.device("cpu")]  # bytes by kind when the total peaked
        params = {id(p): p for m in modules for p in m.parameters()}.values()
        buffers = {id(b): b for m in modules for b in m.buffers()}.values()
        trainable = sum(p.numel() for p in params if p.requires_grad)
        opt = sum(t.nbytes for o in optimizers for st in o.state.values() for t in st.values() if torch.is_tensor(t))
        block_params = [sum(p.numel() for p in b.parameters()) for b in blocks]
        trainable_in_blocks = sum(p.numel() for b in blocks for p in b.parameters() if p.requires_grad)
        return dict(peak=at_peak["Total"] - at_peak["OPT"] + opt, weights=sum(p.nbytes for p in params),
                    buffers=sum(b.nbytes for b in buffers), grads=4 * trainable, opt=opt, trainable=trainable,
                    act=tracker.act_peak,  # at its own peak: under FSDP it can be the overall one
                    working=2 * max(block_params, default=0) * 8 + (trainable - trainable_in_blocks) * 10,
                    flash=max(flash, default=0))


def plan_terms(m: dict, gpus: int, fsdp: bool) -> dict:
    """Bytes per GPU by term: the measured "raw" need (DDP: the fake run's peak + one fp32 gradient bucket copy per
    trainable parameter for gpus > 1; FSDP: the model above), then what the fake run cannot see; "need" the sum."""
    if fsdp:
        raw = (m["weights"] + m["grads"] + m["opt"]) / gpus + m["buffers"] + m["act"] + m["working"]
    else:
        raw = m["peak"] + (4 * m["trainable"] if gpus > 1 else 0)
    frag = FRAGMENTATION if expandable_segments() else FRAGMENTATION_NO_EXPANDABLE
    t = dict(raw=raw, fragmentation=(frag - 1) * raw, flash=m.get("flash", 0), nccl=NCCL_BYTES if gpus > 1 else 0.0,
             kernels=KERNEL_BYTES)
    t["need"] = sum(t.values())
    return t


def plan_need(m: dict, gpus: int, fsdp: bool) -> float:
    return plan_terms(m, gpus, fsdp)["need"]


@dataclass
class MemPlan:
    what: str  # model and per-GPU batch/views
    gpus: int
    capacity: float | None  # bytes per GPU the run may use, None: no limit known (CPU)
    checkpointed: int  # k of n trainable blocks under activation checkpointing
    n_blocks: int
    fsdp: bool
    terms: dict  # plan_terms: raw, fragmentation, flash, nccl, kernels, need
    fits: bool
    fix: str = ""  # what would fit, when it does not

    @property
    def need(self) -> float:
        return self.terms["need"]

    def line(self) -> str:
        t = self.terms
        cap = f" of {self.capacity / GiB:.1f} GiB usable" if self.capacity else ""
        frag = FRAGMENTATION if expandable_segments() else FRAGMENTATION_NO_EXPANDABLE
        parts = f"raw {t['raw'] / GiB:.1f} x {frag:g} fragmentation + flash {t['flash'] / GiB:.2f}"
        parts += (f" + NCCL {t['nccl'] / GiB:.1f}" if t["nccl"] else "") + f" + kernels {t['kernels'] / GiB:.1f}"
        return (f"plan: {self.what} on {self.gpus} GPU(s); checkpointing {self.checkpointed} of {self.n_blocks} blocks; "
                f"{'FSDP' if self.fsdp else 'DDP' if self.gpus > 1 else 'single process'}; need "
                f"{self.need / GiB:.1f} GiB{cap} per GPU ({parts}; bf16 autocast, fp32 weights)"
                + ("" if self.fits else " -- does NOT fit"))


def plan_memory(build, what: str, n_blocks: int, gpus: int, capacity: float | None, mode: str = "auto",
                fsdp: bool = False, fsdp_supported: bool = False, accum_note: str = "") -> MemPlan:
    """Choose the number k of checkpointed blocks (and DDP or FSDP) so that the planned need fits `capacity`.
    mode on/off fixes k = n / 0 (measured once); auto: k = 0 if that fits, else the smallest k that fits (the
    need falls linearly in k: every block stores the same activations; interpolated from k = 0 and k = n, then
    confirmed by a measurement at k). DDP first; if even k = n does not fit, FSDP where the script supports it
    (`fsdp_supported`: the script has --fsdp and the run allows it). capacity None (CPU): auto = off."""
    fsdp_supported = fsdp_supported and importlib.util.find_spec("fsdp") is not None  # fsdp.py is optional
    cache = {}

    def terms(k, sharded):
        if k not in cache:
            cache[k] = step_memory(build, k)
        return plan_terms(cache[k], gpus, sharded)

    def need(k, sharded):
        return terms(k, sharded)["need"]

    def make(k, sharded, fits, fix=""):
        return MemPlan(what, gpus, capacity, k, n_blocks, sharded, terms(k, sharded), fits, fix)

    if mode != "auto" or capacity is None:
        k = n_blocks if mode == "on" else 0
        return make(k, fsdp, capacity is None or need(k, fsdp) <= capacity)
    for sharded in ([fsdp] if fsdp or not (fsdp_supported and gpus > 1) else [False, True]):
        if need(0, sharded) <= capacity:
            return make(0, sharded, True)
        hi, lo = need(n_blocks, sharded), need(0, sharded)
        if hi > capacity:
            continue
        k = min(n_blocks, max(1, math.ceil(n_blocks * (lo - capacity) / max(lo - hi, 1.0))))
        while need(k, sharded) > capacity and k < n_blocks:
            k += 1
        while k > 1 and need(k - 1, sharded) <= capacity:  # the interpolation may overshoot: the smallest k
            k -= 1
        return make(k, sharded, True)
    fix = ["more GPUs (a smaller per-GPU batch, the same maths)" + ("" if fsdp_supported else "; this run has no --fsdp"),
           f"--accum-steps 2 or more ({accum_note or 'the same maths'})"]
    return make(n_blocks, fsdp or (fsdp_supported and gpus > 1), False, "; ".join(fix))


def device_free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device (torch.cuda.mem_get_info); None on CPU (no limit known: auto = off)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def apply_memory_plan(args, device: torch.device, world: int, n_blocks: int, plan_fn, log_print=print):
    """common.plan_run with this file present. `--plan GPUSxGB`: print the plan line and return None (the caller
    exits 0). Otherwise returns (k of the n_blocks trainable blocks checkpointed, fsdp): auto on CUDA measures
    against the smallest free memory over the ranks (torch.cuda.mem_get_info), so every rank takes the same
    decision; on CPU auto is off. Every start measures anew (a resume too: the GPUs may differ); checkpointing
    does not change the maths, and a checkpoint resumes under DDP or FSDP alike. A run that cannot fit stops here
    with one line naming what would. If the measurement itself fails (it relies on torch internals: MemTracker,
    FakeTensorMode), the run checkpoints every trainable block and says so. `plan_fn(gpus, capacity, mode)` ->
    MemPlan."""
    mode, fsdp = args.grad_checkpointing, getattr(args, "fsdp", False)
    if getattr(args, "plan", None):
        gpus, cap = parse_plan(args.plan)
        try:
            plan = plan_fn(gpus, cap, mode)
        except common.UserError:
            raise
        except Exception as e:
            raise common.UserError(f"the memory plan could not be measured with torch {torch.__version__} "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
        print(plan.line() + (f"; would fit: {plan.fix}" if not plan.fits else ""), flush=True)
        return None
    free = device_free_memory(device) if mode == "auto" else None
    if free is None:
        return (n_blocks if mode == "on" else 0), fsdp
    free = torch.tensor(float(free), dtype=torch.float64, device=device)  # float32 would round bytes away
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    try:
        plan = plan_fn(world, free.item(), mode)
    except common.UserError:
        raise
    except Exception as e:  # never stop a run that could train: the safe choice instead, said in one line
        log_print(f"warning: the memory plan failed with torch {torch.__version__} ({type(e).__name__}: "
                  f"{(str(e).splitlines() or [''])[0][:120]}); checkpointing every trainable block, "
                  f"{'FSDP' if fsdp else 'DDP'} as asked")
        return n_blocks, fsdp
    if not plan.fits:
        raise common.UserError(f"{plan.line()}; the paper batch needs one of: {plan.fix}")
    log_print(plan.line() + ("; FSDP chosen by the plan (DDP does not fit)" if plan.fsdp and not fsdp else ""))
    return plan.checkpointed, plan.fsdp
