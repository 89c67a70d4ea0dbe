"""Integrations with other tools; each lives in its own module and is imported only on demand, so the core never
imports them.

* :mod:`caote.integrations.lm_eval` -- the lm-evaluation-harness model type ``caote`` (``pip install
  'caote[lm-eval]'``). :func:`lm_eval_main` is the ``caote-lm-eval`` command: lm-eval's own command line, with that
  model type registered first.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

LM_EVAL_INSTALL = "pip install 'caote[lm-eval]'"
"""The install command of the lm-eval integration (the optional extra)."""


def lm_eval_main() -> None:
    """``caote-lm-eval ARGS``: run lm-eval's command line (``lm_eval ARGS``) after importing
    :mod:`caote.integrations.lm_eval`, whose ``@register_model("caote")`` registers the model type.

    lm-eval releases up to 0.4.13 resolve ``--model`` only against models already imported, and read no plugin entry
    points; ``caote-lm-eval --model caote --model_args budget=512 --tasks ...`` is the command for them. (caote also
    declares the ``lm_eval.models`` entry point, so an lm-eval that reads it finds ``--model caote`` by itself.)
    Without lm-eval installed this prints one line naming the install command and exits with status 2.
    """
    if importlib.util.find_spec("lm_eval") is None:
        print(f"caote-lm-eval: error: lm-eval is not installed; install it with: {LM_EVAL_INSTALL}", file=sys.stderr)
        raise SystemExit(2)
    importlib.import_module("caote.integrations.lm_eval")  # registers the model type "caote"
    importlib.import_module("lm_eval.__main__").cli_evaluate()
