#!/usr/bin/env bash
# Creates .venv from requirements-dev.txt (called by `make venv`, hence by `make test` and `.ci/run`).
#
# torch: where pip's find-links hold a CPU build of torch for this Python (this project's CPU machines
# and its CI carry one), that build is installed: about 1.2 GB for the whole environment instead of
# the registry's CUDA build (several GB of nvidia packages), which once ran CI out of disk. Everywhere
# else requirements.txt's range decides (the registry's newest torch, CUDA on Linux).
# Set TORCH_SPEC to choose yourself, e.g. TORCH_SPEC='torch==2.5.1' make venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

spec=${TORCH_SPEC:-}
if [ -z "$spec" ]; then
  tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  links="${PIP_FIND_LINKS:-} $("$PY" -m pip config get global.find-links 2>/dev/null || true)"
  for d in $links; do
    d=${d#file://}
    [ -d "$d" ] || continue
    whl=$(ls "$d"/torch-*+cpu-"$tag"-"$tag"-*linux*_x86_64.whl 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$whl" ] && [ "$(uname -m)" = x86_64 ]; then
      v=$(basename "$whl" | cut -d- -f2)  # e.g. 2.13.0+cpu
      spec="torch==${v%+cpu}"
      echo "make_venv: using the local CPU build of torch ($whl)"
      break
    fi
  done
fi

"$PY" -m venv .venv
.venv/bin/pip install -q --no-cache-dir --upgrade pip
# --no-cache-dir: no second copy of every wheel in ~/.cache (disk is the scarce resource on CI)
.venv/bin/pip install -q --no-cache-dir $spec -r requirements-dev.txt

# The registry's torchvision is built against CUDA torch; next to a CPU build its import fails
# (.ci/torchvision_cpu_compat.py says why and what the fix does). Install the fix only when needed.
if ! .venv/bin/python -c "import torchvision" 2>/dev/null; then
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cp .ci/torchvision_cpu_compat.py "$site/_torchvision_cpu_compat.py"
  echo "import _torchvision_cpu_compat" > "$site/_torchvision_cpu_compat.pth"
  echo "make_venv: torchvision needed .ci/torchvision_cpu_compat.py (CUDA-built torchvision next to CPU torch)"
fi
.venv/bin/python -c "import torch, torchvision, timm, einops, tqdm; print('make_venv: torch', torch.__version__, '| torchvision', torchvision.__version__, '| timm', timm.__version__)"
