"""Sharded data parallel (--fsdp of mae.py and mim_refiner.py): PyTorch's FSDP2 (fully_shard), an optional
neighbour of common.py. Without this file every default command still runs; `--fsdp` then says to add it, and
the memory plan (memplan.py) does not choose FSDP.

ZeRO-3 style: every parameter (and hence its gradient and AdamW moments) lives as a dim-0 shard (a DTensor) on
each of the W processes; a transformer block's full weights are all-gathered just before its forward/backward
and freed after. Per-GPU static memory drops from 16 B/param (DDP) to 16/W B/param, which is what makes
ViT-2B/14 fit (`--plan`, docs/memory.md). Checkpoints are gathered back to the plain single-process format
("model" stays timm-loadable, eval_knn.py reads it), so a run trained with --fsdp resumes with or without it and
its files load anywhere. common.full_state_dict / full_optimizer_state_dict / load_optimizer_state_dict call the
functions here for a sharded module.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

import common


def shard(module: nn.Module, units=(), forward_methods=()) -> nn.Module:
    """Shard `module` in place with `fully_shard`: each module in `units` (e.g. transformer blocks) becomes
    one all-gather unit, then `module` itself the unit of its remaining parameters. Call it on every rank
    after loading weights and moving to the device; build the optimizer afterwards (over the sharded
    parameters). forward_methods: methods other than forward that are called from outside (e.g.
    "forward_features"), so that FSDP all-gathers the root parameters for them too.

    Precision: FSDP's default policy, fp32 parameters gathered and gradients reduced in fp32, with the
    scripts' bf16 autocast around the step exactly as under DDP, so both parallelisms compute the same
    numbers (tests/test_cuda_dtypes.py). A bf16 `param_dtype` would halve the all-gather volume but run the
    residual stream and the frozen sin-cos tables in bf16 (other numerics than DDP), and FSDP2 fixes a group's
    dtypes at its lazy initialisation from the trainable parameters: none in MIM-Refiner's stage "heads",
    so the bf16 gradients of stage "refine" would later be assigned to fp32 shards (a crash)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    # the mesh lives where the module does (the default would pick CUDA whenever it is visible, even under --device cpu)
    device_type = next(module.parameters()).device.type
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for name in forward_methods:
        register_fsdp_forward_method(module, name)
    return module


def shard_vit(encoder: common.VisionTransformer) -> common.VisionTransformer:
    """shard for our ViT: one unit per block, the stem + final norm in the root unit, forward_features
    registered (the scripts call it rather than forward)."""
    return shard(encoder, list(encoder.blocks), forward_methods=("forward_features",))


def full_state_dict(module: nn.Module) -> dict:
    """The plain state dict of a sharded module, a collective (call it on EVERY rank): rank 0 gets the full
    tensors on CPU, the other ranks an empty dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return common.clean_state_dict(sd)


def full_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """A collective returning, on rank 0, the gathered optimizer state of a sharded `module` (the module holding
    every parameter of `optimizer`) keyed by parameter name (torch.distributed.checkpoint format; {} on the
    other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _optimizer_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index i of optimizer.state_dict() is the i-th name."""
    name = {id(p): n for n, p in module.named_parameters()}
    return [name[id(p)] for g in optimizer.param_groups for p in g["params"]]


def load_optimizer_state_dict(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict):
    """Either format (numbered by position, as optimizer.state_dict(); keyed by name, as full_optimizer_state_dict)
    into either kind of module: every rank passes the full dict read from the checkpoint and keeps its own
    shard, so a run saved under DDP resumes under FSDP and the other way round (the memory plan may choose
    either)."""
    groups = state.get("param_groups") or [{"params": [0]}]
    named = isinstance((groups[0]["params"] or [0])[0], str)
    sharded = common.is_sharded(module)
    if named != sharded:
        names = _optimizer_names(module, optimizer)
        if named:  # -> numbered, for a plain module
            index = {n: i for i, n in enumerate(names)}
            state = {"state": {index[k]: v for k, v in state["state"].items()},
                     "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in state["param_groups"]]}
        else:  # -> named, for a sharded module
            state = {"state": {names[k]: v for k, v in state["state"].items()},
                     "param_groups": [{**g, "params": [names[p] for p in g["params"]]} for g in state["param_groups"]]}
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
