"""The lm-evaluation-harness model type ``caote``: a causal LM whose KV cache keeps a bounded budget per layer and KV
head (:class:`~caote.cache.EvictingCache`), prompts read block by block.

Install ``pip install 'caote[lm-eval]'``, then::

    caote-lm-eval --model caote --model_args pretrained=PATH,budget=512,method=snapkv+caote,block_size=128 \\
        --tasks TASKS

``caote-lm-eval`` is lm-eval's own command line (``lm_eval``) with this module imported first: importing it runs
lm-eval's ``@register_model("caote")``, which is how lm-eval 0.4.13, its newest release, learns a model type (it reads
no plugin entry points). caote also declares the entry point ``caote = "caote.integrations.lm_eval:CaoteLM"`` in
lm-eval's plugin group ``lm_eval.models``, so an lm-eval that reads that group resolves ``lm_eval --model caote``
itself. From Python: ``import caote.integrations.lm_eval`` then ``lm_eval.simple_evaluate(model="caote", ...)``, or
pass a :class:`CaoteLM` instance as ``model=``. Nothing of lm-eval or transformers is patched.

``model_args`` (lm-eval's ``key=value,...``):

* ``pretrained`` -- a model folder, a hub id in the local cache, or one of caote's offline models
  (``smollm2-135m``, the default; ``gemma-3-270m``, :func:`caote.load_model`). From Python also a loaded model, with
  ``tokenizer=``.
* ``method`` -- a caote method name (default ``snapkv+caote``; ``full`` keeps everything), ``budget`` -- entries per
  layer and KV head (default 512) or a share of each request's prompt such as ``12.5%`` (rounded up),
  ``block_size`` -- prompt tokens per prefill step (default 128), and any other
  :class:`~caote.policy.EvictionConfig` option (``sink_tokens``, ``recent_window``, ``snapkv_window``, ...).
* ``dtype`` (``float32`` default, ``bfloat16``, ``float16``), ``device`` (``auto`` default: CUDA, else MPS, else
  CPU). On lm-eval's command line use ``--device``: it always passes one (``cuda:0`` when not told), so ``device=``
  in ``model_args`` clashes with it there. A device this machine lacks falls back to ``auto`` with a warning, as in
  lm-eval's ``hf``.
* ``max_length`` -- the longest input in tokens (default: the model's ``max_position_embeddings``, as lm-eval's
  ``hf``); longer inputs are cut from the left as ``hf`` cuts them. Raise it to read longer prompts under the same
  budget (positions past the model's trained window are the model's problem, not the cache's).
* ``max_gen_toks`` (default 256, ``hf``'s), ``add_bos_token`` (as ``hf``'s).
* ``question_tokens`` -- the question-aware mode (:mod:`caote.question`, labelled as such in the results'
  ``caote_protocol``): the last N tokens of every prompt (``generate_until``) or context (``loglikelihood``) act as
  the question that steers eviction while the prompt is read. Off by default.

One request at a time (``batch_size`` other than 1 is ignored with a warning), except that the continuations of one
context (a multiple-choice question's choices) share one read of that context, as batch rows. Greedy decoding only
(``do_sample=True`` is refused).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

import jinja2
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import lm_eval.models  # noqa: F401  (lm-eval's own model names, before "caote": see the note above CaoteLM)
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text, resolve_max_length)

import caote
from caote import hf
from caote.cache import EvictingCache
from caote.generation import prefill
from caote.models import DEFAULT_MODEL, load_model, load_tokenizer
from caote.policy import EvictionConfig
from caote.question import QuestionAware
from caote.validation import check_budget, check_device, check_method, check_positive_int, resolve_budget

logger = logging.getLogger(__name__)

DEFAULT_METHOD = "snapkv+caote"
DEFAULT_BUDGET = 512
DEFAULT_BLOCK_SIZE = 128
DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's ``hf`` default."""
DEFAULT_MAX_LENGTH = 2048
"""lm-eval's ``hf`` default where neither the config nor the tokenizer gives a length."""
_GRID_FIELDS = ("budget", "method", "block_size")


def eviction_options() -> dict[str, Any]:
    """The :class:`~caote.policy.EvictionConfig` options ``model_args`` may set besides method, budget and block size,
    with their defaults."""
    return {f.name: f.default for f in dataclasses.fields(EvictionConfig) if f.init and f.name not in _GRID_FIELDS}


@dataclass
class EvictionStats:
    """What the caches of one :class:`CaoteLM` held, over every request it served (reported by
    :meth:`CaoteLM.get_model_info`, so lm-eval's results carry it under ``config``)."""

    requests: int = 0
    """Caches built: one per context (its continuations share it), rolling window or generation."""
    longest_input_tokens: int = 0
    """Longest context, window or prompt read."""
    prefill_peak_tokens: int = 0
    """Most entries per layer and KV head held while a context or prompt was read: at most ``budget + block_size``
    in the budgeted layers (plus the question in the question-aware mode; a sliding-window layer of a hybrid model
    holds up to its window plus a block)."""
    peak_tokens: int = 0
    """Most entries per layer and KV head held at any time: the prefill's, or the context's survivors plus a
    continuation's own entries (kept while scored), or the budget plus the token being generated."""
    evicted_tokens: int = 0
    """Entries evicted per KV head, summed over layers and requests."""

    def add(self, cache: EvictingCache, input_tokens: int, prefill_peak: int) -> None:
        """Count one finished cache that read ``input_tokens`` tokens with ``prefill_peak`` entries at most."""
        self.requests += 1
        self.longest_input_tokens = max(self.longest_input_tokens, input_tokens)
        self.prefill_peak_tokens = max(self.prefill_peak_tokens, prefill_peak)
        self.peak_tokens = max(self.peak_tokens, cache.peak_stored_tokens)
        self.evicted_tokens += cache.evicted_tokens


def _available_device(device: str | torch.device | None) -> torch.device:
    """``device`` if this machine has it, else ``auto`` (CUDA, else MPS, else CPU) with a warning, as lm-eval's ``hf``
    falls back: lm-eval's command line passes ``cuda:0`` when ``--device`` is not given."""
    try:
        return check_device(device)
    except ValueError as error:
        fallback = check_device("auto")
        logger.warning("%s; using %s instead", error, fallback)
        return fallback


# lm-eval's get_model() imports its own model modules only while its registry is empty; importing lm_eval.models above
# registers lm-eval's names (lazily) before "caote", so `--model hf` still resolves after this module is imported.
@register_model("caote")
class CaoteLM(TemplateLM):
    """lm-eval model type ``caote``: every request read under caote's bounded KV cache (see the module docstring for
    ``model_args``).

    * ``loglikelihood``: the context (cut from the left to ``max_length`` with the continuation, as ``hf`` cuts it) is
      read block by block under the budget, evicting after every block; the continuation is then scored in one
      forward with its own entries **kept** (no eviction after the context: caote's ppl ``continuation`` protocol,
      kvpress's). The context's last logits score the continuation's first token. The continuations of one context
      share its read, as batch rows.
    * ``loglikelihood_rolling``: lm-eval's rolling windows of ``max_length`` tokens (as ``hf``); each window is read
      block by block through the evicting cache and every token is scored with the cache as evicted so far (caote's
      ppl ``bounded`` protocol, :func:`caote.eval.runner.evicted_nll`).
    * ``generate_until``: the prompt (cut from the left to ``max_length - max_gen_toks``, as ``hf``) is read block
      by block under the budget, then greedy decoding evicts back to the budget after every token, until a stop
      sequence, an end-of-sequence token or ``max_gen_toks``.

    With a budget that holds everything (or ``method=full``) the scores and generations are those of lm-eval's ``hf``
    model on the same checkpoint (up to float rounding).
    """

    def __init__(
        self,
        pretrained: str | os.PathLike | Any | None = DEFAULT_MODEL,
        method: str = DEFAULT_METHOD,
        budget: int | float | str | None = DEFAULT_BUDGET,
        block_size: int = DEFAULT_BLOCK_SIZE,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device | None = "auto",
        max_length: int | None = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        question_tokens: int | None = None,
        add_bos_token: bool | None = None,
        tokenizer: str | os.PathLike | Any | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.method = check_method(method)
        self.budget = None if self.method == "full" else check_budget(budget)
        self.block_size = check_positive_int(block_size, "block_size", DEFAULT_BLOCK_SIZE)
        known = eviction_options()
        unknown = sorted(set(options) - set(known))
        if unknown:
            valid = ("pretrained", "method", "budget", "block_size", "dtype", "device", "max_length", "max_gen_toks",
                     "question_tokens", "add_bos_token", "tokenizer", *known)
            raise ValueError(f"caote model_args: unknown {', '.join(unknown)}; valid: {', '.join(valid)}")
        self.options = dict(options)
        self.question_tokens = (None if question_tokens in (None, 0, False)
                                else check_positive_int(question_tokens, "question_tokens", 64))
        if self.question_tokens and self.budget is None:
            raise ValueError("question_tokens (the question-aware mode) needs an evicting method, not 'full'")
        if isinstance(self.budget, int):  # a fixed budget is checked now; a share of the prompt per request
            EvictionConfig(budget=self.budget, method=self.method, block_size=self.block_size, **self.options)
        self._max_length = None if max_length is None else check_positive_int(max_length, "max_length", 4096)
        self._max_gen_toks = check_positive_int(max_gen_toks, "max_gen_toks", DEFAULT_MAX_GEN_TOKS)
        self.add_bos_token = add_bos_token
        if str(batch_size).strip() not in ("1", "None"):
            logger.warning("caote reads one request at a time (the choices of one context share its read as batch "
                           "rows); batch_size=%s is ignored", batch_size)

        if pretrained is None or isinstance(pretrained, (str, os.PathLike)):
            self.model, self.tokenizer = load_model(pretrained, dtype=dtype, device=_available_device(device))
            self.pretrained = str(pretrained or DEFAULT_MODEL)
        else:  # a loaded model (Python API)
            if tokenizer is None:
                raise ValueError("pretrained is a loaded model: pass its tokenizer= too")
            self.model, self.tokenizer = pretrained.eval(), None
            self.pretrained = str(getattr(pretrained.config, "_name_or_path", "") or type(pretrained).__name__)
        if tokenizer is not None:
            self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        self._device = self.model.device
        self.stats = EvictionStats()

    # ------------------------------------------------------------------------------------------ lm-eval's interface
    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by (``hf``'s choice: BOS, else EOS)."""
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return resolve_max_length(self.model.config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return 1

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """Token ids of ``string``, special tokens as ``hf`` adds them (none added when the string already starts with
        the prefix token)."""
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template over ``chat_history`` (``--apply_chat_template``), as ``hf`` applies it."""
        def render(history: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=not add_generation_prompt)
        try:
            return render(chat_history)
        except jinja2.exceptions.TemplateError:
            logger.warning("the chat template failed; retrying without the system message")
            return render([message for message in chat_history if message["role"] != "system"])

    def get_model_info(self) -> dict[str, Any]:
        """caote's settings and what its caches held, merged into lm-eval's ``results["config"]``."""
        return {
            "caote_version": caote.__version__,
            "caote_pretrained": self.pretrained,
            "caote_method": self.method,
            "caote_budget": self.budget,
            "caote_block_size": self.block_size,
            "caote_options": self.options,
            "caote_protocol": "question-aware" if self.question_tokens else "bounded",
            "caote_question_tokens": self.question_tokens,
            "caote_max_length": self.max_length,
            "model_dtype": str(self.model.dtype).removeprefix("torch."),
            "caote_stats": dataclasses.asdict(self.stats),
        }

    # ------------------------------------------------------------------------------------------------- loglikelihood
    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` per ``(request, context ids, continuation ids)``; the requests
        that share a context (after the cut to ``max_length``) share one read of it."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context_ids, continuation_ids) in enumerate(requests):
            if not continuation_ids:
                raise ValueError("loglikelihood: the continuation has no tokens")
            if len(continuation_ids) > self.max_length:
                raise ValueError(f"loglikelihood: the continuation has {len(continuation_ids)} tokens, more than "
                                 f"max_length={self.max_length}")
            whole = (context_ids + continuation_ids)[-(self.max_length + 1):]
            groups.setdefault(tuple(whole[: -len(continuation_ids)]), []).append(index)
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="caote loglikelihood", disable=disable_tqdm) as bar:
            for context, indices in groups.items():
                scored = self._score_continuations(list(context), [requests[i][2] for i in indices])
                for index, answer in zip(indices, scored):
                    answers[index] = answer
                    if requests[index][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[index][0], answer)
                bar.update(len(indices))
        return answers  # type: ignore[return-value]

    def _score_continuations(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """Read ``context`` under the budget once, then score every continuation (one batch row each, its own
        entries kept). Rows are right-padded: a padded position comes after the row's last scored one, so the causal
        mask keeps it out of what is scored."""
        ids = torch.tensor([context], device=self._device)
        longest = max(len(continuation) for continuation in continuations)
        with torch.inference_mode():
            cache, last, prefill_peak = self._read(ids)
            cache.stop_evicting()
            step_logits = None
            if longest > 1:
                if len(continuations) > 1:
                    cache.batch_repeat_interleave(len(continuations))
                pad = continuations[0][0]  # any id: only positions after a row's last scored one see it
                inputs = torch.tensor([c[:-1] + [pad] * (longest - len(c)) for c in continuations], device=self._device)
                step_logits = hf.forward(self.model, inputs, cache, logits_to_keep=0).logits
            self.stats.add(cache, len(context), prefill_peak)
            answers = []
            for row, continuation in enumerate(continuations):
                parts = [last]
                if len(continuation) > 1:
                    parts.append(step_logits[row, : len(continuation) - 1])
                logits = torch.cat(parts).float()  # (C, V): the logits that predict each continuation token
                target = torch.tensor(continuation, device=logits.device)
                logprob = F.log_softmax(logits, dim=-1).gather(1, target[:, None]).sum()
                answers.append((float(logprob), bool((logits.argmax(dim=-1) == target).all())))
        return answers

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Summed log-probability of each whole string (perplexity tasks): lm-eval's rolling windows of
        ``max_length`` tokens after the prefix token, as ``hf`` makes them; each window read block by block under the
        budget, every token scored with the cache as evicted so far."""
        results = []
        for request in tqdm(requests, desc="caote loglikelihood_rolling", disable=disable_tqdm):
            (string,) = request.args
            windows = map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1))
            total = sum(self._bounded_logprob(context + predicted[:-1], predicted) for context, predicted in windows)
            results.append(float(total))
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), float(total))
        return results

    def _bounded_logprob(self, inputs: list[int], targets: list[int]) -> float:
        """Read ``inputs`` block by block through an evicting cache; return the summed log-probability of
        ``targets``, the tokens that the last ``len(targets)`` positions predict."""
        ids = torch.tensor([inputs], device=self._device)
        first_scored = len(inputs) - len(targets)
        cache = self._new_cache(len(inputs))
        total = torch.zeros((), dtype=torch.float64)
        with torch.inference_mode():
            for start in range(0, len(inputs), self.block_size):
                end = min(start + self.block_size, len(inputs))
                if end <= first_scored:
                    hf.forward(self.model, ids[:, start:end], cache, logits_to_keep=1)
                    continue
                logits = hf.forward(self.model, ids[:, start:end], cache, logits_to_keep=0).logits[0].float()
                low = max(start, first_scored)
                target = torch.tensor(targets[low - first_scored: end - first_scored], device=logits.device)
                logprobs = F.log_softmax(logits[low - start:], dim=-1)
                total += logprobs.gather(1, target[:, None]).sum().double().cpu()
        self.stats.add(cache, len(inputs), cache.peak_stored_tokens)
        return float(total)

    # ---------------------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each prompt, cut at the first stop sequence (``until``; the end-of-sequence text
        added as ``hf`` adds it)."""
        eos_text = (self.tok_decode([self.eot_token_id], skip_special_tokens=False)
                    if self.eot_token_id is not None else None)
        results = []
        for request in tqdm(requests, desc="caote generate_until", disable=disable_tqdm):
            context, gen_kwargs = request.args
            settings = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(settings.pop("until", None), eos=eos_text)
            max_new = int(settings.pop("max_gen_toks"))
            if settings.get("do_sample"):
                raise ValueError("caote's lm-eval model decodes greedily; do_sample=True is not supported")
            room = self.max_length - max_new
            if room <= 0:
                raise ValueError(f"max_gen_toks={max_new} leaves no room for the prompt in max_length="
                                 f"{self.max_length}; raise max_length")
            text = self._generate(self._encode_prompt(context)[-room:], max_new, until)
            results.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return results

    def _encode_prompt(self, context: str) -> list[int]:
        """A generation prompt's ids, special tokens as ``hf``'s ``generate_until`` adds them."""
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        return self.tokenizer.encode(context, **special)

    def _eos_ids(self) -> set[int]:
        """End-of-sequence ids: the tokenizer's and the model's generation config's."""
        found: set[int] = set()
        for source in (self.tokenizer.eos_token_id,
                       getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)):
            if source is not None:
                found.update(source if isinstance(source, (list, tuple, set)) else [source])
        return found

    def _generate(self, prompt: list[int], max_new_tokens: int, until: list[str]) -> str:
        """Read ``prompt`` under the budget, then decode greedily (evicting after every token) until a stop
        sequence appears in the text, an end-of-sequence token or ``max_new_tokens``; the text before the first stop
        sequence."""
        eos_ids = self._eos_ids()
        stops = [stop for stop in until if stop]
        ids = torch.tensor([prompt], device=self._device)
        new_ids: list[int] = []
        with torch.inference_mode():
            cache, logits, prefill_peak = self._read(ids)
            next_id = int(logits[0].argmax())
            while True:
                new_ids.append(next_id)
                if next_id in eos_ids or len(new_ids) >= max_new_tokens:
                    break
                if stops and any(stop in self.tok_decode(new_ids) for stop in stops):
                    break
                step = torch.tensor([[next_id]], device=self._device)
                next_id = int(hf.forward(self.model, step, cache, logits_to_keep=1).logits[0, -1].argmax())
        self.stats.add(cache, len(prompt), prefill_peak)
        return postprocess_generated_text(self.tok_decode(new_ids), until, None)

    # ------------------------------------------------------------------------------------------------------- reading
    def _new_cache(self, prompt_tokens: int) -> EvictingCache:
        """A fresh cache for a prompt of ``prompt_tokens`` (a share-of-the-prompt budget resolves against it)."""
        return EvictingCache(self.model, budget=resolve_budget(self.budget, prompt_tokens), method=self.method,
                             block_size=self.block_size, **self.options)

    def _read(self, ids: torch.Tensor) -> tuple[EvictingCache, torch.Tensor, int]:
        """Read ``ids`` ``(1, L)`` block by block under the budget (the question-aware mode: its last
        ``question_tokens`` steer eviction); return the cache, the last position's logits ``(1, V)`` and the most
        entries held meanwhile."""
        cache = self._new_cache(ids.shape[1])
        question_ids = ids[:, -min(self.question_tokens, ids.shape[1]):] if self.question_tokens else None
        logits = prefill(self.model, ids, cache, self.block_size, logits_to_keep=1, question_ids=question_ids,
                         question_settings=QuestionAware() if question_ids is not None else None)
        return cache, logits[:, -1], cache.peak_stored_tokens
