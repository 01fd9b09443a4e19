"""What every default command of mae.py, mae_ct.py, mim_refiner.py, lut.py, conmim.py and eval_knn.py needs: 1 flags,
2 one-line user errors, 3 distributed set-up and dtypes, 4 the ViT (timm / official-MAE names), 5 data, 6 schedules,
AdamW groups and EMA, 7 checkpoints, 8 logging, 9 the k-NN monitor, 9b the run control. Losses, heads, masking and
steps stay in the method files. Optional neighbours, imported where their flag is used (`neighbour`): memplan.py
(--plan), fsdp.py (--fsdp), longrun.py (saves inside an epoch, stop signals, the output lock), synthetic.py
(--data synthetic), foreign.py (other codebases' checkpoint layouts).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import datetime
import errno
import gc
import importlib
import inspect
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image, ImageFilter, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# 1. Command line -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Valid interval of a numeric flag, declared in its type (`Annotated[float, Range(0, lo_open=True)]` or an alias
    below) and checked by `check_args`."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""
    """the reason for a bound that is not obvious, shown in the error"""

    def contains(self, v) -> bool:
        return ((v > self.lo if self.lo_open else v >= self.lo) and (v < self.hi if self.hi_open else v <= self.hi))

    def __str__(self):
        lo, hi = f"{self.lo:g}", f"{self.hi:g}"
        if self.hi == math.inf:
            return f"be {'>' if self.lo_open else '>='} {lo}"
        if self.lo == -math.inf:
            return f"be {'<' if self.hi_open else '<='} {hi}"
        return f"lie in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"


PosInt = Annotated[int, Range(1)]
NonNegInt = Annotated[int, Range(0)]
PosFloat = Annotated[float, Range(0, lo_open=True)]
NonNegFloat = Annotated[float, Range(0)]
Prob = Annotated[float, Range(0, 1)]  # probabilities, EMA momenta, [0, 1]
OpenUnit = Annotated[float, Range(0, 1, lo_open=True, hi_open=True)]  # mask ratios, (0, 1)
PosUnit = Annotated[float, Range(0, 1, lo_open=True)]  # crop area scales, layer decay, (0, 1]


def _field_docs(cls) -> dict[str, str]:
    """Docstrings written under dataclass fields (cleanrl/tyro style), read from the source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _field_spec(tp) -> tuple[object, bool, bool, list]:
    """Type hint -> (base type, optional, is_list, [Range / Literal choices ...]). Annotated and Literal may sit
    inside Optional and list."""
    meta: list = []
    optional = False
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp, *extra = typing.get_args(tp)
            meta += extra
        elif origin is typing.Union and type(None) in typing.get_args(tp):
            optional = True
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        else:
            break
    is_list = typing.get_origin(tp) in (list, tuple)
    if is_list:
        tp = typing.get_args(tp)[0]
        while typing.get_origin(tp) is typing.Annotated:
            tp, *extra = typing.get_args(tp)
            meta += extra
    if typing.get_origin(tp) is typing.Literal:
        meta.append(tuple(typing.get_args(tp)))
        tp = type(typing.get_args(tp)[0])
    return tp, optional, is_list, meta


def check_args(args) -> None:
    """One UserError `--flag VALUE: must ...` for the first field of `args` outside its Range or Literal choices, or a
    non-finite float."""
    hints = typing.get_type_hints(type(args), include_extras=True)
    for f in dataclasses.fields(args):
        tp, optional, is_list, meta = _field_spec(hints[f.name])
        value = getattr(args, f.name)
        flag = "--" + f.name.replace("_", "-")
        if value is None and optional:
            continue
        for v in (value if is_list else [value]):
            shown = " ".join(map(str, value)) if is_list else v
            if tp is float and isinstance(v, (int, float)) and not math.isfinite(v):
                raise UserError(f"{flag} {shown}: must be a finite number")
            for m in meta:
                if isinstance(m, Range) and isinstance(v, (int, float)) and not m.contains(v):
                    raise UserError(f"{flag} {shown}: must {m}" + (" (or none)" if optional else "")
                                    + (f" ({m.why})" if m.why else ""))
                if isinstance(m, tuple) and v not in m:
                    raise UserError(f"{flag} {shown!r}: choose one of {', '.join(map(str, m))}")


class Flags:
    """Base of a script's `Args`: checked against its field types when made (command line, `Args(...)`, replace)."""

    def __post_init__(self):
        check_args(self)


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        _fail(f"{message}; see {self.prog} --help")


def parse_args(cls, argv=None):
    """`--field-name value` flags -> the Flags dataclass `cls`. bool fields are `--flag/--no-flag`, list fields take
    several values, Optional ones accept `none`; the help is the docstring under each field, its default and range."""
    hints = typing.get_type_hints(cls, include_extras=True)
    docs = _field_docs(cls)
    parser = _ArgumentParser(description=(sys.modules[cls.__module__].__doc__ or "").split("\n")[0],
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional, is_list, meta = _field_spec(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        doc = docs.get(f.name, "") + "".join(f" [must {m}]" for m in meta if isinstance(m, Range))
        kw = dict(default=default, help=doc.replace("%", "%%"), dest=f.name)  # argparse %-formats help
        def none_or(s, tp=tp):  # an Optional field's `none` is None
            return None if s.lower() == "none" else tp(s)
        none_or.__name__ = tp.__name__  # argparse's "invalid int value" names it
        conv = none_or if optional else tp
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            parser.add_argument(flag, type=conv, **({"nargs": "+"} if is_list else {}), **kw)
    ns = parser.parse_args(argv)
    try:
        return cls(**{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(ns).items()})
    except UserError as e:
        _fail(str(e))


# 2. Errors a user can cause -> one line that names the fix -----------------------------------------------------------
class UserError(Exception):
    """An error caused by input or flags; printed as one line, no traceback."""


def neighbour(name: str, need: str):
    """The optional neighbour module `name`, or one UserError saying that `need` needs its file."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise UserError(f"{need} needs {name}.py beside common.py (copy it from the mimref repository)") from None


# errno values of a filesystem the user must fix (full, read-only, no permission, quota): one line, no traceback
_USER_OS_ERRORS = (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR)


def run_main(main, args_cls):
    """Parse args and run `main(args)`; a UserError (also from a data-loader worker) is one line from the rank that met
    it and exit status 2; the other ranks, blocked in a collective with it, stop with status 2 and no traceback. A
    training script's rank 0 claims OUTPUT_DIR (creates it, takes longrun.OutputLock) before `main` reads anything
    in it; a run that fails before its first checkpoint removes the folder only if it created it."""
    args = parse_args(args_cls)
    out = getattr(args, "output_dir", None)
    lock, created = None, False
    try:
        try:
            if out is not None and getattr(args, "plan", None) is None:  # --plan reads and writes nothing
                lock, created = _claim_output_dir(out)
            main(args)
        except BaseException:
            _kill_loader_workers()
            raise
    except UserError as e:  # from a DataLoader worker it arrives with the worker's traceback in it
        _remove_failed_output_dir(out, created)
        _fail(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1])
    except (OSError, RuntimeError) as e:
        err = _os_error(e)
        flag = getattr(err, "mimref_flag", None)  # set by write_atomic: the write failed, the old file is intact
        if err is not None and (flag or err.errno in _USER_OS_ERRORS):  # the filesystem refused: the user's to fix
            _remove_failed_output_dir(out, created)
            kept = ("; the previous file is unchanged" if getattr(err, "mimref_previous", False) else
                    "; nothing was written there") if flag else ""
            _fail(f"cannot write {flag + ' ' if flag else ''}{err.filename or out} ({err.strerror or err}){kept}: free "
                  f"space or pass another {flag or '--output-dir'}")
        if isinstance(e, OSError):
            raise
        if "DataLoader worker" in str(e):  # killed, most often by the kernel's out-of-memory killer
            _remove_failed_output_dir(out, created)
            _fail(f"a data-loading worker died ({str(e).splitlines()[0][:160]}); usually out of memory: lower "
                  f"--num-workers or --batch-size")
        note = _collective_note(e) if _in_process_group() else None  # a peer died, or the backend failed
        if note is None:
            raise
        _remove_failed_output_dir(out, created)
        print(f"[rank {dist.get_rank()}] stopped: {note}", file=sys.stderr, flush=True)
        os._exit(2)  # the group is broken: tearing it down (and interpreter exit with live gloo threads) can hang
    finally:
        if lock is not None:
            lock.release()
        if _in_process_group():
            # free DDP wrappers (kept alive by reference cycles) while their group exists: a gloo group torn down
            # at interpreter exit aborts now and then ("terminate called without an active exception")
            gc.collect()
            dist.destroy_process_group()


def _claim_output_dir(output_dir: str):
    """On rank 0: (longrun.OutputLock or None without longrun.py, whether this run created the folder). The lock is
    taken before the run reads the resume checkpoint: a second run never resumes a state its predecessor is still
    replacing, and only the run that created a new folder may remove it."""
    if int(os.environ.get("RANK", 0)) != 0:
        return None, False
    check_output_path(output_dir, "--output-dir", folder=True)
    try:
        os.makedirs(output_dir)
        created = True
    except FileExistsError:  # an existing folder, or one a racing run created first
        created = False
    try:
        longrun = neighbour("longrun", "the output lock")
    except UserError:  # without longrun.py no lock (run_control says so)
        return None, created
    return longrun.OutputLock(output_dir), created


def _kill_loader_workers():
    """On an error exit: DataLoader workers ignore the stop signals (`_ignore_stop_signals`), so the terminate() of
    the exit path cannot end them and multiprocessing's exit hook would wait for them forever."""
    import multiprocessing
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would turn each kill into a RuntimeError
    for p in workers:
        p.kill()
    for p in workers:
        p.join(timeout=10)


def _remove_failed_output_dir(output_dir: str | None, created_by_this_run: bool):
    """A failed run that created its output folder and saved nothing removes it, so the rerun does not append to it."""
    if (created_by_this_run and os.path.isdir(output_dir) and not os.path.exists(checkpoint_path(output_dir))):
        import shutil
        shutil.rmtree(output_dir, ignore_errors=True)


def _in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def _collective_note(e: RuntimeError) -> str | None:
    """What a rank whose collective failed prints, or None when `e` is not such a failure. A peer that exited (gloo:
    connection closed / reset, broken pipe) prints its own error line; any other backend error (a misconfigured
    NCCL fails on every rank at once) is named here, as no other line says why."""
    text = str(e).lower()
    if any(s in text for s in ("connection closed by peer", "connection reset by peer", "broken pipe")):
        return "another process failed (its error line says why)"
    if (type(e).__name__ in ("DistBackendError", "DistNetworkError", "DistError")
            or any(s in text for s in ("gloo", "nccl", "socket"))):
        return f"a collective failed ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})"
    return None


def _fail(msg):
    """Print `error: msg` (`[rank R] error:` under torchrun, by the first rank to meet it) and exit with status 2."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        if not _first_to_report(msg):
            sys.exit(2)
        msg = f"\n[rank {rank}] error: {msg}"  # own line: rank 0's progress bar may hold the cursor mid-line
    else:
        msg = f"error: {msg}"
    print(msg, file=sys.stderr, flush=True)
    sys.exit(2)


def _first_to_report(msg: str) -> bool:
    """True for the first rank to count `msg` in torchrun's rendezvous store (held by the launcher, it outlives the
    workers); every rank when no store is reachable."""
    try:
        import hashlib
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=5))
        return store.add("mimref_error/" + hashlib.sha1(msg.encode()).hexdigest(), 1) == 1
    except Exception:
        return True


# 3. Distributed ------------------------------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def in_group(self) -> bool:  # launched by torchrun, at any world size: what FSDP needs
        return _in_process_group()


def init_distributed(device: str = "auto") -> DistInfo:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), else one process; nccl on CUDA, gloo on CPU."""
    if not any(e in os.environ for e in ALLOC_CONF_ENVS):  # before CUDA starts: less fragmentation (docs/memory.md)
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    # under torchrun a process group exists at any world size (FSDP on one process runs the sharded code path)
    if (world > 1 or "MASTER_ADDR" in os.environ) and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local, dev)


def _group_size() -> int:
    return dist.get_world_size() if _in_process_group() else 1


def _gather(x: torch.Tensor) -> torch.Tensor:  # (B, ...) of every rank in rank order -> (W*B, ...)
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients over ranks and returns this rank's slice: with DDP's gradient
    averaging, exactly the single-process gradient of a mean over the global batch (tests/test_common.py)."""

    @staticmethod
    def forward(ctx, x):
        return _gather(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def all_gather_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) of every rank in rank order -> (W*B, ...), keeping the gradient."""
    return x if _group_size() == 1 else _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (the same shape on every rank) in rank order, no gradient (queues, features, labels)."""
    return x if _group_size() == 1 else _gather(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if _group_size() == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / dist.get_world_size()


def gather_per_rank(dist_info: DistInfo, obj) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere (all_gather_object: call it on every rank)."""
    objs = [obj]
    if _group_size() > 1:
        objs = [None] * dist_info.world_size
        dist.all_gather_object(objs, obj)
    return objs if dist_info.is_main else None


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one (epoch, rank): reseeded at each epoch start, a resumed run draws the masks of an uninterrupted one;
    ranks draw their own (as MAE's seed + rank)."""
    return seed + 1_000_003 * epoch + 7919 * rank


class GatheredBatchNorm1d(nn.BatchNorm1d):
    """nn.SyncBatchNorm's maths for CPU/gloo (torch's runs on CUDA only): in training, mean and biased variance
    over the rows of ALL ranks (fp32, two passes, differentiable through both, as SyncBatchNorm's backward), the
    running variance unbiased with the global count; so N ranks with B/N rows equal one process with B rows.
    Evaluation uses the running statistics (per sample, nothing to gather), as nn.BatchNorm1d."""

    def forward(self, x):  # (B, C) or (B, C, L)
        if not self.training and self.running_mean is not None:
            return super().forward(x)
        dims, shape = (0, *range(2, x.dim())), (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float()  # statistics in fp32 under bf16 autocast too, as SyncBatchNorm's CUDA kernels
        # sums over all ranks, differentiable: the gather's backward sums every rank's gradient of its share
        sums = all_gather_grad(torch.cat([xf.sum(dims), xf.new_full((1,), x.numel() / x.shape[1])])[None]).sum(0)
        n = sums[-1].detach()  # global rows (x positions), one collective with the sums
        mean = sums[:-1] / n
        var = all_gather_grad(((xf - mean.view(shape)) ** 2).sum(dims)[None]).sum(0) / n  # biased
        if self.running_mean is not None:  # nn.BatchNorm1d's update: momentum None = cumulative average
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), f)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), f)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def _gathered_batchnorm(m: nn.Module) -> nn.Module:
    if type(m) is nn.BatchNorm1d:  # the same parameter and buffer objects (as convert_sync_batchnorm): same keys
        new = GatheredBatchNorm1d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        for name, t in (*m._parameters.items(), *m._buffers.items()):
            setattr(new, name, t)
        return new.train(m.training)
    for name, child in m.named_children():
        setattr(m, name, _gathered_batchnorm(child))
    return m


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm statistics over the global batch (the official MAE-CT, MIM-Refiner and LUT runs, MoCo v3's
    SyncBN), so that N processes equal one: nn.SyncBatchNorm on CUDA; on CPU/gloo every BatchNorm1d becomes a
    GatheredBatchNorm1d; in one process `module` unchanged (plain BatchNorm, bit for bit). State-dict keys
    stay the same in all three cases."""
    if _group_size() == 1:
        return module
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _gathered_batchnorm(module)


CUDA_DTYPES_ENV = "MIMREF_CUDA_DTYPES"
ALLOC_CONF_ENVS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")  # the user configured the CUDA allocator


def cuda_dtypes(device: torch.device) -> bool:
    """The CUDA run's dtypes and policies (bf16 autocast, FSDP's policy): on CUDA, and on the CPU under
    MIMREF_CUDA_DTYPES=1, so that the CUDA path runs without a GPU."""
    return device.type == "cuda" or os.environ.get(CUDA_DTYPES_ENV, "0") == "1"


def autocast(device: torch.device):
    """bf16 autocast (no grad scaler needed) where `cuda_dtypes`, else fp32."""
    if cuda_dtypes(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# 4. Vision Transformer -----------------------------------------------------------------------------------------------
def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> torch.Tensor:
    """Fixed 2-D sin-cos table of official MAE (util/pos_embed.py), in float64: token i*W + j gets [sin(j w), cos(j w)]
    then [sin(i w), cos(i w)], w_k = 10000^(-k/(dim/4)); a zero CLS row first. (1 + H*W, dim) or (H*W, dim)."""
    assert dim % 4 == 0, "sin-cos pos_embed needs dim divisible by 4"
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    ii, jj = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")

    def emb(pos):
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([emb(jj), emb(ii)], axis=1)  # (H*W, dim): column first, as MAE
    if cls_token:
        table = np.concatenate([np.zeros([1, dim]), table], axis=0)
    return torch.from_numpy(table).float()


def resize_pos_embed(pos_embed: torch.Tensor, grid_h: int, grid_w: int, num_prefix: int = 1) -> torch.Tensor:
    """The patch part of a (1, prefix + h*w, D) table bicubically resized to (grid_h, grid_w), the CLS row kept (MAE
    util/pos_embed.interpolate_pos_embed; MIM-Refiner's local crops alike)."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    n = grid.shape[1]
    old = int(math.isqrt(n))
    if old * old != n:
        raise UserError(f"pos_embed has {n} patch rows, not a square grid; cannot interpolate")
    if (old, old) == (grid_h, grid_w):
        return pos_embed
    d = grid.shape[-1]
    grid = grid.reshape(1, old, old, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, d).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, H, W) -> (B, N, D), row-major patch order
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise UserError(f"image size {tuple(x.shape[-2:])} is not divisible by the patch size "
                            f"{self.patch_size}; choose --img-size (and crop sizes) as multiples of it")
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, attn_bias=None):  # x (B, N, D); attn_bias None or additive (h, N, N) / (B, h, N, N)
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if attn_bias is not None:
            attn_bias = attn_bias.to(qkv.dtype)  # SDPA wants the mask in the query dtype (bf16 autocast)
        q, k, v = qkv.unbind(0)  # views: indexing qkv[i] would zero-fill and copy a qkv-sized gradient three times
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)  # (B, h, N, D/h), scale (D/h)^-0.5
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as timm/MAE
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x, p: float, training: bool, keep: torch.Tensor | None = None):
    """Stochastic depth per sample (timm semantics); `keep` (B,): the multipliers (0 or 1 / (1 - p)) drawn by the
    caller (finetune.py draws them from the step's seed, so that N processes draw what one does)."""
    if keep is not None:
        return x * keep.to(x.dtype).view(-1, *(1,) * (x.ndim - 1))
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Block(nn.Module):
    """Pre-norm transformer block (timm names). `post_norm=True` gives data2vec 2.0's block:
    x = norm1(x + attn(x)); x = norm2(x + mlp(x))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0, post_norm=False):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x, attn_bias=None, keep=None):  # keep: None or (2, B) multipliers, attention then MLP branch
        p, t = self.drop_path, self.training
        k1, k2 = (None, None) if keep is None else keep
        if self.post_norm:
            x = self.norm1(x + drop_path(self.attn(x, attn_bias), p, t, k1))
            return self.norm2(x + drop_path(self.mlp(x), p, t, k2))
        x = x + drop_path(self.attn(self.norm1(x), attn_bias), p, t, k1)
        return x + drop_path(self.mlp(self.norm2(x)), p, t, k2)


class RelativePositionBias(nn.Module):
    """BEiT's shared relative position bias (Bao et al. 2022, Sec. 2.5; timm `beit.RelativePositionBias` names): one
    learned scalar per head and offset (dy, dx), plus CLS->patch, patch->CLS and CLS->CLS entries, zero-initialised,
    added to every block's attention logits. ConMIM's backbone, in place of the absolute position embedding."""

    def __init__(self, grid: int, num_heads: int):
        super().__init__()
        num_rel = (2 * grid - 1) ** 2 + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rel, num_heads))  # ((2G-1)^2+3, h)
        coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)  # (2, N)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)  # (N, N, 2) in [0, 2G-2]
        index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)  # (1+N, 1+N)
        index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
        index[0, 1:], index[1:, 0], index[0, 0] = num_rel - 3, num_rel - 2, num_rel - 1
        self.register_buffer("relative_position_index", index, persistent=False)  # as timm: not in the state dict

    def forward(self, keep_idx=None) -> torch.Tensor:
        """(h, 1+N, 1+N); with keep_idx (B, n) the rows/columns of [CLS; kept patches]: (B, h, 1+n, 1+n)."""
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)  # (h, 1+N, 1+N)
        if keep_idx is None:
            return bias
        idx = torch.cat([keep_idx.new_zeros(keep_idx.shape[0], 1), keep_idx + 1], dim=1)  # (B, 1+n)
        bias = bias[:, idx].permute(1, 0, 2, 3)  # (B, h, 1+n, 1+N)
        return torch.gather(bias, 3, idx[:, None, None, :].expand(-1, bias.shape[1], bias.shape[2], -1))


class VisionTransformer(nn.Module):
    """ViT encoder with timm / official MAE parameter names; the state dict loads strictly into timm's
    `VisionTransformer(num_classes=0)`. `pos_embed` (1, 1+N, D) is the fixed sin-cos table as a frozen nn.Parameter
    (as MAE), interpolated for other resolutions (local crops). `rel_pos_bias=True`: BEiT's scheme (ConMIM), no
    `pos_embed`, one shared RelativePositionBias, fixed resolution; loads into timm's `Beit` after
    conmim.timm_beit_state_dict."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, drop_path_rate=0.0, post_norm=False, grad_checkpointing: int = 0, rel_pos_bias=False):
        super().__init__()
        self.img_size, self.patch_size, self.dim, self.depth = img_size, patch_size, dim, depth
        self.num_heads, self.post_norm = num_heads, post_norm
        if isinstance(grad_checkpointing, bool):  # a block count: True would silently mean 1
            raise TypeError("grad_checkpointing is a number of blocks, not a bool")
        self.grad_checkpointing = grad_checkpointing
        self.grid = img_size // patch_size
        self.num_patches = self.grid ** 2
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if rel_pos_bias:
            self.register_parameter("pos_embed", None)
            self.rel_pos_bias = RelativePositionBias(self.grid, num_heads)
        else:
            self.pos_embed = nn.Parameter(sincos_pos_embed_2d(dim, self.grid, self.grid)[None], requires_grad=False)
            self.rel_pos_bias = None
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio, dpr[i], post_norm) for i in range(depth)])
        if post_norm:  # data2vec 2.0: LN on the embedded tokens, none after the last block
            self.embed_norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self):  # official MAE initialize_weights
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def config(self) -> dict:
        """Plain-type description stored in checkpoints (`encoder_config`)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, dim=self.dim, depth=self.depth,
                    num_heads=self.num_heads, post_norm=self.post_norm, rel_pos_bias=self.rel_pos_bias is not None)

    def embed(self, x, keep_idx=None, mask=None, mask_token=None):
        """[CLS; patches] with positions, (B, 1+n, D). keep_idx (B, n) long: only these patches (MAE's visible ones);
        mask (B, N) bool: these patches replaced by `mask_token` (1, 1, D) before the positions (BEiT/ConMIM)."""
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.patch_embed(x)  # (B, N, D)
        if mask is not None:
            x = torch.where(mask[..., None], mask_token.to(x.dtype).expand_as(x), x)
        cls = self.cls_token
        if self.rel_pos_bias is None:
            pos = self.pos_embed if (gh, gw) == (self.grid, self.grid) else resize_pos_embed(self.pos_embed, gh, gw)
            x, cls = x + pos[:, 1:], cls + pos[:, :1]
        elif (gh, gw) != (self.grid, self.grid):  # positions enter through the attention bias only
            raise UserError(f"a relative-position-bias ViT runs at its {self.img_size} px only, got {gh * self.patch_size}x"
                            f"{gw * self.patch_size} px; pass --img-size {self.img_size}")
        if keep_idx is not None:
            x = torch.gather(x, 1, keep_idx[..., None].expand(-1, -1, x.shape[-1]))
        cls = cls.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return self.embed_norm(x) if self.post_norm else x

    def forward_features(self, x, keep_idx=None, mask=None, mask_token=None, return_blocks=None):
        """All tokens after the final norm, (B, 1+n, D); with `return_blocks` (0-based, negatives allowed) also the raw
        residual stream after those blocks, a list of (B, 1+n, D) in the order asked."""
        x = self.embed(x, keep_idx, mask, mask_token)
        bias = None if self.rel_pos_bias is None else self.rel_pos_bias(keep_idx)  # shared by all blocks (BEiT)
        want = {} if return_blocks is None else {b % self.depth: i for i, b in enumerate(return_blocks)}
        outs = [None] * len(want)
        ckpt = self.checkpointed_blocks() if torch.is_grad_enabled() else ()
        for i, blk in enumerate(self.blocks):
            if i in ckpt:
                x = torch.utils.checkpoint.checkpoint(blk, x, bias, use_reentrant=False)
            else:
                x = blk(x, bias)
            if i in want:
                outs[want[i]] = x
        if not self.post_norm:
            x = self.norm(x)
        return x if return_blocks is None else (x, outs)

    def checkpointed_blocks(self) -> list[int]:
        """The first `grad_checkpointing` (an int) of the trainable blocks run under activation checkpointing (the
        plan checkpoints only as many as it must); a frozen block stores nothing for backward (MIM-Refiner 2B/14)."""
        trainable = [i for i, b in enumerate(self.blocks) if any(p.requires_grad for p in b.parameters())]
        return trainable[:self.grad_checkpointing]

    def forward(self, x):  # CLS token after the final norm, (B, D), as timm with num_classes=0
        return self.forward_features(x)[:, 0]


# name -> (dim, depth, heads, patch). MAE Table/official factories; ViT-2B/14 as in MIM-Refiner Table 10.
VIT_CONFIGS = {
    "vit_t16": (192, 12, 3, 16),
    "vit_s16": (384, 12, 6, 16),
    "vit_b16": (768, 12, 12, 16),
    "vit_l16": (1024, 24, 16, 16),
    "vit_h14": (1280, 32, 16, 14),
    "vit_h16": (1280, 32, 16, 16),
    "vit_2b14": (2560, 24, 32, 14),
}


def vit_config(name: str) -> tuple[int, int, int, int]:
    """(dim, depth, heads, patch) of a registered ViT."""
    if name not in VIT_CONFIGS:
        raise UserError(f"unknown --model {name!r}; choose one of {', '.join(VIT_CONFIGS)}")
    return VIT_CONFIGS[name]


def create_vit(name: str, img_size: int | None = None, patch_size: int | None = None, **overrides) -> VisionTransformer:
    """A registered ViT (img_size 224 and its own patch size by default); `overrides` go to the constructor."""
    dim, depth, heads, patch = vit_config(name)
    kw = dict(img_size=img_size or 224, patch_size=patch_size or patch, dim=dim, depth=depth, num_heads=heads)
    kw.update(overrides)
    if kw["img_size"] % kw["patch_size"]:
        raise UserError(f"--img-size {kw['img_size']} is not a multiple of the patch size {kw['patch_size']}")
    return VisionTransformer(**kw)


def describe_vit(cfg: dict) -> str:
    name = next((n for n, c in sorted(VIT_CONFIGS.items(), key=lambda nc: nc[1][3] != cfg["patch_size"])
                 if c[:3] == (cfg["dim"], cfg["depth"], cfg.get("num_heads"))), "custom")  # the preset's patch first
    return f"{name} (dim {cfg['dim']}, depth {cfg['depth']}, heads {cfg.get('num_heads', '?')}, patch {cfg['patch_size']})"


# Activation checkpointing without memplan.py: every trainable block of these models on CUDA, none of the others
# (the papers' per-GPU batches of ViT-L and larger exceed a 40 GB card without it, docs/memory.md).
STATIC_CHECKPOINTED = ("vit_l16", "vit_h14", "vit_2b14")


def plan_run(args, device: torch.device, world: int, n_blocks: int, plan_fn, log_print=print):
    """(checkpointed blocks k of n_blocks, fsdp), or None once `--plan` printed its line: memplan.py's measured plan
    (`plan_fn(gpus, capacity, mode)`); without it `auto` is STATIC_CHECKPOINTED on CUDA (said in a line), else off."""
    try:
        memplan = neighbour("memplan", "--plan")
    except UserError:
        if args.plan is not None:
            raise
        if args.grad_checkpointing != "auto":
            return (n_blocks if args.grad_checkpointing == "on" else 0), getattr(args, "fsdp", False)
        k = n_blocks if device.type == "cuda" and args.model in STATIC_CHECKPOINTED else 0
        if device.type == "cuda":
            log_print(f"memplan.py is not beside common.py: --grad-checkpointing auto checkpoints {k} of {n_blocks} "
                      f"blocks of {args.model} (a static choice); add memplan.py for the measured plan")
        return k, getattr(args, "fsdp", False)
    return memplan.apply_memory_plan(args, device, world, n_blocks, plan_fn, log_print)


# 5. Data -------------------------------------------------------------------------------------------------------------
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# modes that convert("RGB") maps faithfully (palette lookup, alpha dropped, CMYK/YCbCr/HSV colour transforms)
_RGB_CONVERTIBLE = ("RGB", "L", "1", "P", "RGBA", "RGBX", "RGBa", "LA", "PA", "CMYK", "YCbCr", "HSV")


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """8-bit RGB; 16-bit grey (PNG/TIFF `I;16*`, PNG `I`) scaled 65535 -> 255 (convert("RGB") would clip it to white);
    modes without a faithful mapping refused."""
    if img.mode in _RGB_CONVERTIBLE:
        return img.convert("RGB")
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):  # PNG stores 16-bit grey as I
        arr = np.asarray(img).astype(np.float64)
        grey = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)  # 65535 / 255 = 257
        return Image.fromarray(grey, "L").convert("RGB")
    raise UserError(f"cannot convert image {path} (mode {img.mode}) to 8-bit RGB faithfully; convert it to an "
                    f"8-bit RGB or grey PNG/JPEG, or remove it")


def _pil_loader(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except Exception as e:  # corrupt, truncated or non-image file
        raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace the file") from None
    return _to_rgb(img, path)


class FlatImageFolder(torch.utils.data.Dataset):
    """A folder of images without class subfolders (unlabelled; label -1). For training only."""

    def __init__(self, root: str, transform=None):
        self.samples = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
        if not self.samples:
            raise UserError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}; point --data at your image folder")
        self.transform, self.classes, self.targets = transform, [], [-1] * len(self.samples)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        img = _pil_loader(self.samples[i])
        return (self.transform(img) if self.transform else img), -1


def is_synthetic(data: str) -> bool:
    """`--data synthetic[:N_TRAIN[:N_VAL]]` (synthetic.py) rather than a folder (also one named synthetic_photos/)."""
    return data == "synthetic" or data.startswith("synthetic:")


def build_dataset(data: str, split: str, transform, img_size: int = 32, seed: int = 0,
                  require_labels: bool = False) -> torch.utils.data.Dataset:
    """`--data synthetic[:N_TRAIN[:N_VAL]]` (synthetic.py, rendered at `img_size`) or ROOT with ROOT/train and ROOT/val
    as ImageFolders; for training (not `require_labels`) ROOT/train, or ROOT, may be a flat folder of images."""
    from torchvision.datasets import ImageFolder

    if is_synthetic(data):
        return neighbour("synthetic", "--data synthetic").dataset(data, split, transform, img_size, seed)
    root = Path(data)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass --data ROOT with ROOT/train and ROOT/val "
                        f"(ImageFolder layout) or --data synthetic (synthetic.py)")
    folder = root / split
    if not folder.is_dir():
        if split == "train" and not require_labels:
            folder = root
        else:
            raise UserError(f"{folder} does not exist; kNN evaluation needs {root}/train and {root}/val, "
                            f"each with one subfolder per class")
    subdirs = [d for d in folder.iterdir() if d.is_dir()]
    if not subdirs:
        if require_labels:
            raise UserError(f"{folder} has no class subfolders; evaluation needs labels: put each class's images "
                            f"in {folder}/<class_name>/")
        return FlatImageFolder(str(folder), transform)
    empty = [d.name for d in subdirs if not any(p.suffix.lower() in IMG_EXTENSIONS for p in d.rglob("*"))]
    if empty:
        raise UserError(f"class folder(s) {', '.join(sorted(empty)[:5])} in {folder} contain no images "
                        f"({', '.join(IMG_EXTENSIONS)}); add images or remove the folder(s)")
    _refuse_symlink_loops(folder)
    return ImageFolder(str(folder), transform=transform, loader=_pil_loader)


def _refuse_symlink_loops(folder: Path):
    """ImageFolder follows symlinks: a link to a folder above it would list its images down to the path limit."""
    for dirpath, dirnames, _ in os.walk(folder, followlinks=True):
        here = os.path.realpath(dirpath)
        for d in dirnames:
            link = os.path.join(dirpath, d)
            target = os.path.realpath(link)
            if os.path.islink(link) and (here == target or here.startswith(target + os.sep)):
                raise UserError(f"{link} is a symlink to {target}, a folder that contains it: its images would be "
                                f"listed again and again; remove the link")


class WithIndex(torch.utils.data.Dataset):
    """(x, label, dataset index): the index keys the queue's self-exclusion and places the kNN bank's rows."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        x, y = self.ds[i]
        return x, y, i


def _tv():
    import torchvision.transforms as T
    return T


def normalize_transform():
    T = _tv()
    return T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def mae_train_transform(img_size: int, scale=(0.2, 1.0)):
    """MAE pre-training: RandomResizedCrop(scale 0.2-1, bicubic) + horizontal flip (MAE Sec. 4 / A.1)."""
    T = _tv()
    return T.Compose([T.RandomResizedCrop(img_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), normalize_transform()])


def eval_resize(img_size: int) -> int:
    """Short side before the center crop, floor(img_size * 256 / 224) in integers (facebookresearch/mae
    util/datasets.py, DINO's Resize(256), timm's crop_pct 0.875): 256 at 224, 36 at 32."""
    return img_size * 256 // 224


def eval_transform(img_size: int):
    """Standard evaluation: resize the short side to eval_resize(img_size) (bicubic), center crop img_size."""
    T = _tv()
    return T.Compose([T.Resize(eval_resize(img_size), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), normalize_transform()])


class GaussianBlur:
    """With probability p a PIL Gaussian blur of radius ~ U[lo, hi] (BYOL/DINO: [0.1, 2.0] at 224 px) x size/224."""

    def __init__(self, p: float, size: int, lo: float = 0.1, hi: float = 2.0):
        self.p, self.lo, self.hi = p, lo * size / 224, hi * size / 224

    def __call__(self, img):
        if torch.rand(()) >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(()).uniform_(self.lo, self.hi))))


class Solarize:
    def __init__(self, p: float, threshold: int = 128):
        self.p, self.threshold = p, threshold

    def __call__(self, img):
        return ImageOps.solarize(img, self.threshold) if torch.rand(()) < self.p else img


def byol_view(size: int, scale=(0.08, 1.0), blur_p: float = 0.5, solarize_p: float = 0.0,
              jitter=(0.4, 0.4, 0.2, 0.1), jitter_p: float = 0.8, gray_p: float = 0.2):
    """One BYOL view (Grill et al. 2020, Table 6): bicubic RandomResizedCrop, flip, colour jitter (p 0.8), grayscale
    (p 0.2), blur and solarize (BYOL's pair: blur 1.0 / solarize 0, blur 0.1 / solarize 0.2), normalise."""
    T = _tv()
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(*jitter)], p=jitter_p),
        T.RandomGrayscale(p=gray_p),
        GaussianBlur(blur_p, size),
        Solarize(solarize_p),
        normalize_transform(),
    ])


class MultiView:
    """Apply each transform to the same image; returns a list of views (multi-crop when sizes differ)."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, img):
        return [t(img) for t in self.transforms]


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of item `index`'s augmentation in `epoch`: alike whichever rank, worker or resumed position loads it."""
    return (epoch_seed(seed, epoch, 0) * 2_654_435_761 + index) % 2**63


class SeededSamples(torch.utils.data.Dataset):
    """`dataset` whose item i draws its augmentation from torch's CPU, `random` and numpy generators seeded with
    sample_seed(seed, epoch, i), the caller's states restored after (--num-workers 0 loads in the training process)."""

    def __init__(self, dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        s = sample_seed(self.seed, self.epoch, i)
        torch.default_generator.manual_seed(s)  # the CPU generator only (torch.manual_seed would reseed CUDA too)
        random.seed(s)
        np.random.seed(s % 2**32)
        try:
            return self.dataset[i]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def _ignore_stop_signals(worker_id: int):
    """Workers leave SIGTERM/SIGUSR1/SIGINT (SLURM and terminals signal the process group) to the training process."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def build_loader(dataset, batch_size: int, dist_info: DistInfo, shuffle: bool, drop_last: bool,
                 num_workers: int, seed: int = 0, epoch: int = 0, skip: int = 0):
    """This rank's shard of one epoch, `batch_size` per rank, its order a function of (seed, epoch) and each item's
    augmentation of (seed, epoch, index): resumed after `skip` of this rank's samples, the same batches and
    augmentations as an uninterrupted run, with any --num-workers."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                                  shuffle=shuffle, seed=seed, drop_last=drop_last)
    sampler.set_epoch(epoch)
    g = torch.Generator()
    g.manual_seed(epoch_seed(seed, epoch, dist_info.rank))  # the DataLoader's own draws (worker base seed)
    return torch.utils.data.DataLoader(SeededSamples(dataset, seed, epoch), batch_size=batch_size,
                                       sampler=neighbour("longrun", "resuming inside an epoch").SkipSampler(
                                           sampler, skip) if skip else sampler,
                                       num_workers=num_workers, pin_memory=dist_info.device.type == "cuda",
                                       drop_last=drop_last, generator=g,
                                       worker_init_fn=_ignore_stop_signals if num_workers > 0 else None)


def per_rank_batch(global_batch: int, accum_steps: int, world_size: int) -> int:
    """Global batch = per-rank micro-batch x accum_steps x world_size (MAE's effective batch)."""
    if global_batch % (accum_steps * world_size):
        raise UserError(f"--batch-size {global_batch} (global) is not divisible by --accum-steps {accum_steps} x "
                        f"{world_size} processes; choose a multiple of {accum_steps * world_size}")
    return global_batch // (accum_steps * world_size)


# 6. Optimisation: schedules (pure functions of the step), parameter groups, EMA --------------------------------------
def cosine_schedule(step: int, total_steps: int, base: float, final: float = 0.0, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> float:
    """Linear warmup `warmup_start` -> `base` over `warmup_steps`, then half-cosine to `final` at `total_steps` (MAE
    util/lr_sched.py, per iteration)."""
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    t = min(max(step - warmup_steps, 0) / max(total_steps - warmup_steps, 1), 1.0)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * t))


def momentum_schedule(step: int, total_steps: int, base: float, final: float = 1.0) -> float:
    """EMA momentum rising from `base` to `final` with a half-cosine (BYOL Sec. 3.2; LUT/ConMIM 0.996 -> 1)."""
    t = min(step / max(total_steps, 1), 1.0)
    return final - (final - base) * 0.5 * (1.0 + math.cos(math.pi * t))


def vit_layer_id(name: str, depth: int) -> int:
    """Layer of a parameter for layer-wise lr decay (BEiT/MAE util/lr_decay.py): stem 0, blocks.k k+1, after depth+1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "embed_norm", "mask_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, 1-D parameters (norms), tokens and position tables get no weight decay."""
    return p.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in (
        "cls_token", "pos_embed", "mask_token", "relative_position_bias_table")  # BEiT: no decay on the table


def param_groups(named_params, weight_decay: float, layer_decay: float | None = None, depth: int | None = None,
                 lr_scale: float = 1.0, tag: str = "") -> list[dict]:
    """AdamW groups of the trainable parameters, each with a name and `lr_scale` (set_lr multiplies it in): with
    `layer_decay`, layer l (vit_layer_id) gets layer_decay^(depth+1-l)."""
    groups: dict[tuple, dict] = {}
    for n, p in named_params:
        if not p.requires_grad:
            continue
        nwd = no_weight_decay(n, p)
        lid = vit_layer_id(n, depth) if layer_decay is not None else 0
        scale = lr_scale * (layer_decay ** (depth + 1 - lid) if layer_decay is not None else 1.0)
        key = (lid, nwd)
        if key not in groups:
            groups[key] = dict(params=[], weight_decay=0.0 if nwd else weight_decay, lr_scale=scale,
                               name=f"{tag}layer{lid}_{'no_wd' if nwd else 'wd'}")
        groups[key]["params"].append(p)
    return list(groups.values())


def make_adamw(groups, lr: float, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CUDA and CPU: the same update as the per-tensor loop to fp32 rounding, several
    times faster, benchmarks/bench_train.py)."""
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    set_lr(opt, lr)
    return opt


def set_lr(optimizer, lr: float, wd: float | None = None):
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
        if wd is not None and g["weight_decay"] > 0:
            g["weight_decay"] = wd


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, momentum: float, copy_buffers: bool = True):
    """ema <- m * ema + (1 - m) * online over all parameters (frozen ones stay equal); buffers are copied."""
    pe, po = list(ema.parameters()), [p.detach().to(e.dtype) for e, p in zip(ema.parameters(), online.parameters())]
    torch._foreach_lerp_(pe, po, 1.0 - momentum)  # one kernel launch per dtype/device group, not per tensor
    if copy_buffers:
        for be, bo in zip(ema.buffers(), online.buffers()):
            be.copy_(bo)


def check_finite(loss: torch.Tensor, step: int, output_dir: str):
    """Stop cleanly on a NaN/inf loss (MAE exits the same way) and say how to go on."""
    if not torch.isfinite(loss).all():
        raise UserError(f"loss is {loss.item()} at step {step}; {_last_good(output_dir)}: lower --blr/--lr or "
                        f"disable --compile, then rerun the same command")


def _last_good(output_dir: str) -> str:
    path = checkpoint_path(output_dir)
    if os.path.isfile(path):
        return (f"the last checkpoint {path} passed the divergence checks when it was saved (finite, weights within "
                f"{DIVERGED_GROWTH:g}x their starting RMS) and the rerun resumes from it")
    return f"no checkpoint was written yet ({path} does not exist; the rerun starts from scratch)"


# 7. Checkpoints ------------------------------------------------------------------------------------------------------
DIVERGED_GROWTH = 100.0  # weights' RMS this many times their starting RMS: an exploded (finite) run


def weights_rms(sd: dict) -> float:
    """Root mean square over the floating tensors of a state dict (the encoder's weights)."""
    total, count = 0.0, 0
    for v in sd.values():
        if torch.is_tensor(v) and v.is_floating_point():
            total, count = total + v.double().square().sum().item(), count + v.numel()
    return math.sqrt(total / max(count, 1))


def checked_cpu_copy(obj) -> tuple[object, str | None]:
    """(`obj`, nested dicts / lists of tensors and numbers, with every tensor on the CPU; the key path of its first
    nan / inf value, checked where the tensor lives, or None): one walk over the state."""
    bad: list[str] = []

    def walk(x, name):
        if isinstance(x, torch.Tensor):
            if not bad and (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
                bad.append(name)
            return x.cpu()
        if isinstance(x, float) and not bad and not math.isfinite(x):
            bad.append(name)
        if isinstance(x, dict):
            return {k: walk(v, f"{name}.{k}" if name else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v, f"{name}.{i}" if name else str(i)) for i, v in enumerate(x))
        return x
    out = walk(obj, "")
    return out, (bad[0] if bad else None)


def save_checkpoint(path: str, state: dict, weights_rms_start: float | None = None):
    """`state` with every tensor on the CPU (a file any machine loads), written atomically (write_atomic). Refused,
    the file at `path` kept as the last good one: nan/inf anywhere, or encoder weights ("model_online", else
    "model") over DIVERGED_GROWTH x `weights_rms_start` RMS."""
    path = str(path)
    prev = f"{path} still holds the last good state" if os.path.isfile(path) else f"no checkpoint was written yet ({path})"
    state, bad = checked_cpu_copy(state)
    if bad is not None:
        raise UserError(f"the training diverged: '{bad}' holds nan/inf, so it is not saved and {prev}; lower "
                        f"--blr/--lr, then rerun the same command")
    if weights_rms_start:
        rms = weights_rms(state.get("model_online", state["model"]))
        if rms > DIVERGED_GROWTH * weights_rms_start:
            raise UserError(f"the training diverged: the encoder weights' RMS is {rms:.3g}, {rms / weights_rms_start:.0f}x "
                            f"its start ({weights_rms_start:.3g}), so it is not saved and {prev}; lower --blr/--lr, "
                            f"then rerun the same command")
    write_atomic(path, lambda f: torch.save(state, f))


def write_atomic(path: str, write, mode: str = "wb", flag: str = "--output-dir"):
    """`write(file)` into PATH.tmp.<pid>, fsync, rename over `path`, fsync of the folder: a crash or a full disk leaves
    the previous file or the new one, never a truncated one. A failed write removes its temp file and re-raises its
    OSError naming `path` and `flag` (run_main prints it as one line)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        err = _os_error(e)
        if err is None and isinstance(e, RuntimeError) and ("write" in str(e) or "inline_container" in str(e)):
            err = OSError(errno.EIO, str(e).strip().splitlines()[-1][-120:])  # torch's writer without its OSError
            e = err
        if err is not None:  # name the file being replaced (intact), not the temp file
            err.filename, err.mimref_flag, err.mimref_previous = str(path), flag, os.path.isfile(path)
        raise e
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every filesystem)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: `e` or what it was raised from (torch's zip writer reports ENOSPC, EFBIG
    or EIO as a RuntimeError with the OSError as its context)."""
    return next((x for x in (e, e.__context__, e.__cause__) if isinstance(x, OSError)), None)


def remove_stale_temp_files(path: Path, folder: bool = False):
    """Delete the `*.tmp.<pid>` files (of `path`, or of every file in the folder `path`) whose writer is gone."""
    for tmp in (path.glob("*.tmp.*") if folder else path.parent.glob(path.name + ".tmp.*")):
        pid = tmp.name.rsplit(".", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # writer is dead
            with contextlib.suppress(OSError):
                tmp.unlink()
        except PermissionError:  # alive, another user's
            pass


def check_output_path(path: str, flag: str, folder: bool = False):
    """Before any heavy work, creating nothing: one UserError unless `path` (a folder if `folder`) can be written (an
    empty name, a dangling symlink on the way, a file where a folder belongs or the reverse, no write permission);
    then the temp files of writers killed there are removed (once per start)."""
    if not str(path).strip():
        raise UserError(f"{flag} is empty; pass the {'folder' if folder else 'file'} the run should write")
    p = Path(path).absolute()
    for q in (p, *p.parents):
        if q.is_symlink() and not q.exists():
            raise UserError(f"{flag} {path}: {q} is a symlink to {os.readlink(q)}, which does not exist; create its "
                            f"target or pass another path")
    if p.exists() and p.is_dir() != folder:
        raise UserError(f"{flag} {path} is {'a file' if folder else 'a folder'}, not {'a folder' if folder else 'a file'}; "
                        f"pass another path or move it away")
    probe = p if folder else p.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{flag} {path}: {probe} is a file, not a folder; pass another path or move the file away")
    import tempfile
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".write_test_")
        os.close(fd)
        os.remove(name)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {probe} ({e.strerror or e}); pass a writable path") from None
    if p.exists() or p.parent.exists():
        remove_stale_temp_files(p, folder)


def load_file(path: str) -> dict:
    """torch.load with weights_only=True (our checkpoints hold plain types only)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist; check the path")
    size = os.path.getsize(path)
    if size == 0:
        raise UserError(f"checkpoint {path} is empty (0 bytes: an interrupted copy or a full disk); delete it or "
                        f"replace it with a complete copy")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        _, unsafe, name = str(e).partition("Unsupported global: GLOBAL ")
        if unsafe:  # a complete file that pickles training state beside the weights (fairseq trainer checkpoints)
            out = f"{os.path.splitext(str(path))[0]}-weights.pth"
            raise UserError(f"{path} holds Python objects besides tensors ({name.split()[0]}), which a weights-only "
                            f"load refuses; if you trust its source, extract the weights once: python -c \"import torch; "
                            f"c = torch.load({str(path)!r}, weights_only=False); torch.save({{k: c[k] for k in ('model', "
                            f"'state_dict') if k in c}}, {out!r})\" and pass {out}") from None
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot load {path} ({size} bytes) as a weights-only torch checkpoint ({type(e).__name__}: "
                        f"{first}); is it a complete PyTorch .pth/.th/.pt file? Replace or delete it") from None


def clean_state_dict(sd: dict) -> dict:
    """Without wrapper prefixes (DDP `module.`, torch.compile `_orig_mod.`, `backbone.`, `encoder.`)."""
    out = {}
    for k, v in sd.items():
        for pre in ("module.", "_orig_mod.", "backbone.", "encoder."):
            while k.startswith(pre):
                k = k[len(pre):]
        out[k] = v
    return out


def encoder_state_dict(model: nn.Module) -> dict:
    """State dict of the unwrapped encoder, without `_orig_mod.`/`module.` (loadable either way)."""
    return clean_state_dict(unwrap(model).state_dict())


def convert_to_ours(sd: dict) -> dict:
    """Our (timm) key names without decoder, mask token, classifier (ours and official MAE have them; foreign.py maps
    the data2vec 2.0, MIM-Refiner and MAE-CT releases)."""
    sd = clean_state_dict(sd)
    layout = foreign_layout(sd)
    if layout:
        sd = neighbour("foreign", f"a {layout} checkpoint").to_ours(sd)
    return {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token", "head.", "fc_norm."))}


def foreign_layout(sd: dict) -> str | None:
    """The release whose key layout `sd` has (foreign.py maps it), or None for ours / official MAE."""
    if any(k.startswith(("modality_encoders.", "model.modality_encoders.")) for k in sd):  # pre-trained, fine-tuned
        return "data2vec 2.0 (fairseq)"
    if "cls_tokens.tokens" in sd or "pos_embed.embed" in sd:
        return "MIM-Refiner release"
    n = sd["pos_embed"].numel() // sd["pos_embed"].shape[-1] if "pos_embed" in sd else 0
    return "MAE-CT (pos_embed without a CLS row)" if n and math.isqrt(n) ** 2 == n else None


REL_POS_KEY = "rel_pos_bias.relative_position_bias_table"


def checkpoint_encoder_config(sd: dict) -> dict:
    """Infer (dim, depth, patch_size, post_norm, img_size, rel_pos_bias) from an encoder state dict."""
    w = sd.get("patch_embed.proj.weight")
    if w is None:
        raise UserError("the checkpoint holds no ViT encoder (no patch_embed.proj.weight key); "
                        "pass an MAE/MAE-CT/MIM-Refiner/data2vec 2.0 encoder or one of our checkpoints")
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    n = sd["pos_embed"].shape[1] - 1 if "pos_embed" in sd else None
    grid = math.isqrt(n) if n else None
    table = sd.get(REL_POS_KEY)
    if table is not None:  # (2G-1)^2 + 3 rows
        grid = (math.isqrt(table.shape[0] - 3) + 1) // 2
    return dict(dim=w.shape[0], depth=depth, patch_size=w.shape[-1], post_norm="embed_norm.weight" in sd,
                img_size=grid * w.shape[-1] if grid else None, rel_pos_bias=table is not None)


def select_weights(ckpt: dict, ema: bool = False) -> tuple[dict, str]:
    """(encoder state dict, description) of a loaded file: "model" (ours: the method's released encoder, EMA for MAE-CT
    and MIM-Refiner; official MAE; fairseq data2vec 2.0), "state_dict" (MAE-CT, MIM-Refiner), or a raw state dict.
    `ema`: "model_ema", or "model" where it is marked the EMA one."""
    if not isinstance(ckpt, dict):
        raise UserError("checkpoint is not a dict of tensors")
    if ema:
        if "model_ema" in ckpt:
            return ckpt["model_ema"], "EMA/momentum encoder ('model_ema')"
        if ckpt.get("model_is_ema"):
            return ckpt["model"], "EMA encoder ('model')"
        raise UserError("--ema was asked for but this checkpoint has no EMA/momentum encoder; drop --ema")
    for key in ("model", "state_dict", "teacher"):
        if key in ckpt and isinstance(ckpt[key], dict):
            desc = f"'{key}'" + (" (EMA encoder)" if key == "model" and ckpt.get("model_is_ema") else "")
            return ckpt[key], desc
    if all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return ckpt, "raw state dict"
    raise UserError(f"no encoder weights found in the checkpoint (keys: {', '.join(list(ckpt)[:8])})")


def preset_heads(cfg: dict) -> int | None:
    """The heads of the one preset of this width and depth (files of other codebases do not say), else None."""
    heads = {h for (d, L, h, _) in VIT_CONFIGS.values() if (d, L) == (cfg["dim"], cfg["depth"])}
    return heads.pop() if len(heads) == 1 else None


def _arch(cfg: dict, heads) -> str:
    """An encoder in words, for the one architecture-mismatch message."""
    pos = f"relative position bias at {cfg['img_size']} px" if cfg["rel_pos_bias"] else "absolute position embedding"
    return f"{'post-norm ' if cfg['post_norm'] else ''}{describe_vit({**cfg, 'num_heads': heads})}, {pos}"


def load_encoder(model: VisionTransformer, source, ema: bool = False, what: str = "checkpoint") -> str:
    """Encoder weights (path or loaded dict) into `model`, strictly, pos_embed interpolated to its resolution; another
    architecture (width, depth, heads, patch, pre-/post-norm, position scheme) is one line naming both."""
    ckpt = load_file(source) if isinstance(source, (str, Path)) else source
    sd, desc = select_weights(ckpt, ema)
    sd = convert_to_ours(sd)
    cfg, mine = checkpoint_encoder_config(sd), model.config()
    heads = (ckpt.get("encoder_config") or {}).get("num_heads") or preset_heads(cfg) or mine["num_heads"]
    keys = ("dim", "depth", "patch_size", "post_norm", "rel_pos_bias")
    if ([cfg[k] for k in keys], heads) != ([mine[k] for k in keys], mine["num_heads"]) or (
            cfg["rel_pos_bias"] and cfg["img_size"] != mine["img_size"]):
        fix = [f"--patch-size {cfg['patch_size']}"] * (cfg["patch_size"] != mine["patch_size"]) + [
            f"--img-size {cfg['img_size']}"] * (cfg["rel_pos_bias"] and cfg["img_size"] != mine["img_size"])
        raise UserError(f"{what} holds a {_arch(cfg, heads)} but the model is a {_arch(mine, mine['num_heads'])}; pass "
                        f"{' '.join(fix) or 'the matching --model'} (or no --model: the file tells)")
    if "pos_embed" in sd and model.pos_embed is not None and sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], model.grid, model.grid)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(f"{what} does not match the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return desc


def encoder_from_checkpoint(checkpoint: str, model: str | None = None, img_size: int | None = None,
                            patch_size: int | None = None, *, ema: bool = False, key: str | None = None, seed: int = 0,
                            ckpt: dict | None = None, **overrides) -> tuple[VisionTransformer, str]:
    """(encoder with the weights of `checkpoint`, their description). The architecture comes from `model` or the file
    ("encoder_config", else the weights' shapes); `img_size` defaults to the file's, else 224. `key` names the
    encoder entry to take (else select_weights(ckpt, ema)); `ckpt`: the file already loaded; `checkpoint` "none": a
    random encoder of `model` seeded `seed`. `overrides` go to the constructor (drop_path_rate)."""
    if checkpoint.lower() == "none":
        if ema or key:
            raise UserError("a random encoder (checkpoint none) has no EMA or other encoder to pick; drop that flag")
        if model is None:
            raise UserError("a random encoder (checkpoint none) needs --model, e.g. --model vit_b16")
        seed_everything(seed)  # the same random encoder on every rank
        return create_vit(model, img_size, patch_size, **overrides), f"random initialisation (seed {seed})"
    ckpt = load_file(checkpoint) if ckpt is None else ckpt
    if key is not None:
        if not isinstance(ckpt.get(key), dict):
            have = [k for k in ("model", "model_ema", "model_online") if isinstance(ckpt.get(k), dict)]
            raise UserError(f"{checkpoint} has no encoder '{key}' (it has {', '.join(have) or 'none of ours'}); pick "
                            f"one of those")
        ckpt = {"model": ckpt[key], **{k: ckpt[k] for k in ("encoder_config",) if isinstance(ckpt.get(k), dict)}}
    sd, _ = select_weights(ckpt, ema)
    found = checkpoint_encoder_config(convert_to_ours(sd))  # dim, depth, patch_size, post_norm, img_size
    heads = (ckpt.get("encoder_config") or {}).get("num_heads") or preset_heads(found)
    if model is None and heads is None:
        raise UserError(f"cannot infer the architecture of {checkpoint} (dim {found['dim']}, depth {found['depth']}); "
                        f"pass --model")
    # pre-/post-norm and the position scheme are properties of the weights (data2vec 2.0, ConMIM), not of a preset
    arch = dict(dim=found["dim"], depth=found["depth"], num_heads=heads) if model is None else {}
    enc = create_vit(model or "vit_b16", img_size or (ckpt.get("encoder_config") or {}).get("img_size")
                     or found["img_size"] or 224, patch_size or found["patch_size"], post_norm=found["post_norm"],
                     rel_pos_bias=found["rel_pos_bias"], **arch, **overrides)
    desc = load_encoder(enc, ckpt, ema=ema, what=f"checkpoint {checkpoint}")
    return enc, (f"'{key}'" if key else desc)


def checkpoint_path(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoint-last.pth")


def load_resume_state(output_dir: str) -> dict | None:
    """The state of OUTPUT_DIR/checkpoint-last.pth (automatic resume) or None (OUTPUT_DIR was checked and claimed by
    run_main on rank 0)."""
    if _group_size() > 1:  # rank 0 claimed OUTPUT_DIR before it got here (run_main): read nothing before that
        dist.barrier()
    path = checkpoint_path(output_dir)
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; the run writes its checkpoint there: move the folder away")
    if not os.path.isfile(path):
        return None
    try:
        state = load_file(path)
    except UserError as e:
        raise UserError(f"{e} (it is the resume checkpoint: delete it to start {output_dir} from scratch)") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a training checkpoint; pass another --output-dir")
    return state


# What a changed flag does to the checkpoint it resumes: ignore (neither the maths nor the data order; also flags a
# script no longer has, so that its older checkpoints resume), refuse (the saved state no longer fits) or warn.
SHAPES = "it changes parameter shapes or the optimizer's parameter groups"
RESUME_POLICY = {
    **{k: ("ignore", "") for k in ("output_dir", "device", "num_workers", "compile", "grad_checkpointing", "init",
                                   "exit_after_epochs", "log_every", "vis_images", "fsdp", "plan", "knn_every",
                                   "knn_data", "knn_subset", "save_every", "save_minutes")},
    **{k: ("refuse", SHAPES) for k in ("model", "img_size", "patch_size")},
    "batch_size": ("refuse", "it sets the steps per epoch and the lr (linear scaling rule), so the saved step and lr "
                             "schedule no longer line up"),
    "epochs": ("warn", "the lr/momentum schedules are re-stretched to the new length from the resumed step on"),
    "warmup_epochs": ("warn", "the warmup ends at another step than in the run so far"),
    "seed": ("warn", "the remaining epochs draw other crops/masks than the uninterrupted run would"),
    "data": ("warn", "the remaining epochs train on other data"),
}


def check_resume_args(state: dict, args, output_dir: str, state_keys=(), shape=(), refuse: dict | None = None):
    """Before any weights load: a checkpoint of another script (its flags or `state_keys`) or a flag that RESUME_POLICY,
    `shape` (SHAPES) or `refuse` ({flag: why}) refuses is a one-line UserError naming both values; other changed
    flags are warnings with their reason."""
    path = checkpoint_path(output_dir)
    script = os.path.basename(sys.argv[0]) or "this script"
    policy = {**RESUME_POLICY, **{k: ("refuse", SHAPES) for k in shape}, **{k: ("refuse", w) for k, w in (refuse or {}).items()}}
    stored = state.get("args")
    current = dataclasses.asdict(args)
    missing = [k for k in state_keys if k not in state]
    foreign = sorted(k for k in set(stored) - set(current) if policy.get(k, ("",))[0] != "ignore") \
        if isinstance(stored, dict) else []
    if not isinstance(stored, dict) or missing or foreign:
        why = (f"its flags --{', --'.join(f.replace('_', '-') for f in foreign[:4])} are not flags of {script}"
               if foreign else f"it has no {', '.join(repr(k) for k in (missing or ['args'])[:4])}")
        raise UserError(f"{path} was not written by {script} ({why}); pass another --output-dir (or move the file "
                        f"away to start from scratch)")
    for k, now in current.items():
        was = stored.get(k)
        kind, why = policy.get(k, ("warn", "the resumed run differs from the one the checkpoint started"))
        if kind == "ignore" or k not in stored or now is None or list_or(was) == list_or(now):
            continue  # None: resolved later from the same defaults
        flag = "--" + k.replace("_", "-")
        if kind == "refuse":
            raise UserError(f"{path} was trained with {flag} {list_or(was)} but this run asks for {flag} {list_or(now)}; "
                            f"{why}: rerun with {flag} {list_or(was)}, or pass another --output-dir to start a new run")
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"warning: resuming {path} with {flag} {list_or(now)} (it was trained with {list_or(was)}): {why}",
                  flush=True)


def list_or(v):
    return list(v) if isinstance(v, tuple) else v


# 7b. Sharded modules: --fsdp lives in fsdp.py (optional neighbour); the checkpoint writer calls it for them ----------
def is_sharded(module: nn.Module) -> bool:
    """True when `module` holds FSDP-sharded (DTensor) parameters."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict:
    """The plain single-process state dict: for an FSDP-sharded module a collective (every rank calls it)."""
    return neighbour("fsdp", "--fsdp").full_state_dict(module) if is_sharded(module) else encoder_state_dict(module)


def full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict(), or for a sharded `module` the gathered state (fsdp.full_optimizer_state_dict)."""
    return neighbour("fsdp", "--fsdp").full_optimizer_state_dict(module, optimizer) if is_sharded(module) else optimizer.state_dict()


def load_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict):
    """optimizer.load_state_dict, or fsdp.py's for a sharded module or a state saved by one (keyed by name)."""
    groups = state.get("param_groups") or [{"params": [0]}]
    if is_sharded(module) or isinstance((groups[0]["params"] or [0])[0], str):
        neighbour("fsdp", "--fsdp").load_optimizer_state_dict(module, optimizer, state)
    else:
        optimizer.load_state_dict(state)


def grad_sync(model: nn.Module, sync: bool):
    """Context of one accumulation micro-step: no gradient all-reduce / reduce-scatter unless `sync` (DDP, FSDP2)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


# 8. Logging ----------------------------------------------------------------------------------------------------------
def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


class Logger:
    """Rank-0 logging to stdout, log.jsonl, args.json and TensorBoard (OUTPUT_DIR/tb)."""

    def __init__(self, output_dir: str, args, dist_info: DistInfo, extra: dict | None = None):
        self.active = dist_info.is_main
        self.output_dir = output_dir
        self.tb = None
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        dev = dist_info.device
        precision = ("bf16 autocast, fp32 weights" if dev.type == "cuda" else "fp32" if not cuda_dtypes(dev) else
                     f"bf16 CPU autocast, fp32 weights ({CUDA_DTYPES_ENV}=1: the CUDA run's dtypes)")
        cfg = {**dataclasses.asdict(args), **(extra or {}), "git_sha": git_sha(), "world_size": dist_info.world_size,
               "precision": precision}
        args_json = os.path.join(output_dir, "args.json")
        if os.path.isfile(checkpoint_path(output_dir)) and os.path.isfile(args_json):  # a resume: the run so far
            with contextlib.suppress(OSError, ValueError), open(args_json) as f:
                before = json.load(f).get("precision")
            if before not in (None, cfg["precision"]):
                print(f"warning: {checkpoint_path(output_dir)} was trained with {before} and goes on with "
                      f"{cfg['precision']}: from here the numbers differ from an uninterrupted run", flush=True)
        with open(args_json, "w") as f:
            json.dump(cfg, f, indent=2, default=str)
        print(f"[{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] git {cfg['git_sha']}, {dist_info.world_size} process(es), "
              f"device {dev}, {precision}")
        print("\n".join(f"  {k}: {v}" for k, v in sorted(cfg.items())), flush=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(output_dir, "tb"))
        except Exception:  # tensorboard missing: jsonl only
            self.tb = None

    def print(self, *a):
        if self.active:
            print(*a, flush=True)

    def log(self, metrics: dict, step: int):
        if not self.active:
            return
        with open(os.path.join(self.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                                                for k, v in metrics.items()}}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1):
                    self.tb.add_scalar(k, float(v), step)

    def image(self, tag: str, img_chw: torch.Tensor, step: int):
        if self.active and self.tb is not None:
            self.tb.add_image(tag, img_chw, step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def progress(iterable, dist_info: DistInfo, **kw):
    """tqdm bar on rank 0 only (disabled elsewhere)."""
    from tqdm import tqdm
    # delay: a bar appears only after 1 s, so an error raised at once stays a one-line message
    return tqdm(iterable, disable=not dist_info.is_main, dynamic_ncols=True, delay=kw.pop("delay", 1.0), **kw)


# 9. During training: the k-NN monitor (eval_knn.py), kept checkpoints, the paper's evaluation command -----------
def knn_monitor(dist_info: DistInfo, log: "Logger", *, every: int, **kw):
    """eval_knn.KnnMonitor (k-NN top-1 every `every` epochs, the protocol of eval_knn.py) or, with `every` 0 or
    without eval_knn.py beside common.py, a monitor that does nothing (the latter says so in one line)."""
    try:
        eval_knn = neighbour("eval_knn", "the k-NN monitor") if every else None
    except UserError:
        log.print("k-NN monitor off: add eval_knn.py beside common.py")
        eval_knn = None
    return eval_knn.KnnMonitor(dist_info, log, every=every, **kw) if eval_knn else lambda epochs_done, enc, step: None


def save_kept(every: int, output_dir: str, dist_info: DistInfo, epochs_done: int, model_sd: dict,
              encoder_config: dict, model_is_ema: bool) -> str | None:
    """Every `every` epochs (0: never) rank 0 keeps OUTPUT_DIR/checkpoint-epochNNN.pth (NNN epochs done): the evaluated
    encoder only, for eval_knn.py and timm (checkpoint-last.pth is the resumable one)."""
    if not every or epochs_done % every or not dist_info.is_main:
        return None
    path = os.path.join(output_dir, f"checkpoint-epoch{epochs_done:03d}.pth")
    save_checkpoint(path, {"model": model_sd, "encoder_config": encoder_config, "model_is_ema": model_is_ema,
                           "epoch": epochs_done})
    return path


def paper_eval_command(args, flags: str = "", script: str = "eval_knn.py") -> str:
    """The `script` (an eval_*.py, or finetune.py into OUTPUT_DIR/finetune) command line for
    OUTPUT_DIR/checkpoint-last.pth on the run's labelled data, with `flags`."""
    data = args.knn_data or args.data
    seed = f" --seed {args.seed}" if is_synthetic(data) and args.seed else ""  # renders the same images
    ck = checkpoint_path(args.output_dir)
    src = (f"--init {ck} --output-dir {os.path.join(args.output_dir, 'finetune')}" if script == "finetune.py"
           else f"--checkpoint {ck}")
    return f"python {script} {src} --data {data}{seed} --img-size {args.img_size} {flags}".strip()


def label_split(args, percent: int) -> str:
    """finetune.py's flag for the papers' `percent` % labelled split (google-research/simclr imagenet_subsets/,
    MAE-CT Table 1, MIM-Refiner Table 2); on synthetic data, whose images have no file names, a class-balanced
    fraction."""
    if is_synthetic(args.knn_data or args.data):
        return f"--label-fraction {percent / 100:g}"
    return f"--train-subset imagenet_subsets/{percent}percent.txt"


# 9b. Long runs: saves inside an epoch and on stop signals live in longrun.py (optional neighbour) --------------------
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # data-loading workers leave them to the training process


class EpochEndSaves:
    """The run control without longrun.py: checkpoints at epoch ends only, a stop signal ends the process."""

    def at_update(self, update: int, steps_per_epoch: int) -> tuple[bool, bool]:
        return False, False  # (save, stop)

    def epoch_done(self, epochs_done: int):
        pass


def run_control(save_minutes: float | None, dist_info: DistInfo, log: "Logger"):
    """longrun.RunControl (saves inside an epoch, stop signals, exact resume), or without longrun.py EpochEndSaves and
    one line saying so (an explicit --save-minutes names the file)."""
    try:
        return neighbour("longrun", "--save-minutes").RunControl(save_minutes, dist_info, log)
    except UserError:
        if save_minutes:
            raise
    log.print("longrun.py is not beside common.py: checkpoints at epoch ends only, a stop signal ends the run, no lock "
              "keeps a second run out of --output-dir; add longrun.py for saves inside an epoch and on SIGTERM / "
              "SIGUSR1 and for the lock")
    return EpochEndSaves()


def epoch_start(seed: int, epoch: int, dist_info: DistInfo, position: dict | None, log=None) -> int:
    """The update `epoch` starts at: 0, this rank seeded for the epoch's start, or the updates already done of a
    mid-epoch `position` (longrun.py), the RNG states it saved restored."""
    if not position or not position["update"]:
        seed_everything(epoch_seed(seed, epoch, dist_info.rank))
        return 0
    longrun = neighbour("longrun", "the resume checkpoint was saved inside an epoch: resuming it")
    return longrun.restore_position(seed, epoch, dist_info, position, log)
