"""Lets the registry's torchvision import next to a CPU-only build of torch (CI and CPU machines).

PyPI ships torchvision built against the CUDA build of torch. Next to the CPU build its compiled
ops (`torchvision._C`) cannot load, which torchvision tolerates, except that
`torchvision/_meta_registrations.py` registers fake kernels for `torchvision::nms` and
`torchvision::qnms` without checking, so `import torchvision` fails with
"operator torchvision::nms does not exist". Declaring the two schemas before torchvision is
imported is enough: the detection ops stay unavailable (mimref uses none of them), datasets,
transforms and utils work.

`make venv` installs this file into the virtual environment (with a .pth line that imports it)
only when a plain `import torchvision` fails there; no mimref script imports it.
"""
import importlib.abc
import sys

_LIBS = []  # keep the Library objects alive: their schemas are removed when they are collected


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        _LIBS.append(lib)
        return None  # the regular finders import torchvision itself


sys.meta_path.insert(0, _DeclareTorchvisionOps())
