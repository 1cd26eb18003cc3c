"""An lm-evaluation-harness model that runs in-process on llama-cpp-python (base + LoRA adapter).

Registered as `recover-lora-llamacpp`. Log-likelihoods come from the logits of every position
(`logits_all=True`), so a quantized GGUF is scored exactly as llama.cpp will run it on a device,
adapter included. Tokenization follows lm-eval's Hugging Face back end: the model's own
special-token rule (add BOS only if the GGUF says so), context + continuation encoded whole and
split at the context's length, inputs left-truncated to `max_length`. Requests are sorted so
that choices sharing a context reuse its KV cache (llama.cpp's prefix reuse).
"""

from __future__ import annotations

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from recover_lora.errors import RecoverLoraError
from recover_lora.runtime.llama import LlamaOptions, LoadedModel, load_llama

MODEL_NAME = "recover-lora-llamacpp"


def continuation_logprob(logits: np.ndarray, continuation: list[int]) -> tuple[float, bool]:
    """Sum of log-probabilities of `continuation` given the logits that predict each of its
    tokens (one row per token), and whether each token is the argmax (greedy).

    Example:
        continuation_logprob(np.array([[0.0, 0.0]]), [1])  # (-0.693..., False)
    """
    rows = logits.astype(np.float64)
    peak = rows.max(axis=1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
    picked = rows[np.arange(len(continuation)), continuation]
    greedy = bool(np.all(rows.argmax(axis=1) == np.asarray(continuation)))
    return float((picked - log_norm).sum()), greedy


@register_model(MODEL_NAME)
class LlamaCppLM(TemplateLM):
    """lm-eval model on llama.cpp.

    Example:
        lm = LlamaCppLM(model_path="gateup.gguf", lora_path="adapter.gguf", n_ctx=2048)
        lm_eval.simple_evaluate(model=lm, tasks=[...])
    """

    def __init__(
        self,
        model_path: str | None = None,
        lora_path: str | None = None,
        lora_scale: float = 1.0,
        n_ctx: int = 2048,
        threads: int | None = None,
        gpu_layers: int = 0,
        n_batch: int = 512,
        loaded: LoadedModel | None = None,
        batch_size=None,  # accepted for lm-eval's CLI; requests run one at a time
        **_ignored,
    ):
        super().__init__()
        if loaded is None:
            if model_path is None:
                raise RecoverLoraError("the llama.cpp evaluation back end needs a model GGUF path")
            options = LlamaOptions(
                n_ctx=int(n_ctx),
                threads=int(threads) if threads else None,
                gpu_layers=int(gpu_layers),
                n_batch=int(n_batch),
                n_ubatch=int(n_batch),
                lora_scale=float(lora_scale),
                logits_all=True,
            )
            loaded = load_llama(model_path, lora_path, options)
        if not loaded.options.logits_all:
            raise RecoverLoraError("the llama.cpp evaluation back end needs a model loaded with logits_all=True")
        self.loaded = loaded
        self.llm = loaded.llm
        self._max_length = self.llm.n_ctx() - 1
        bos = self.llm.token_bos()
        self._prefix_token = bos if bos >= 0 else self.llm.token_eos()

    # -- lm-eval plumbing --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.llm.token_eos()

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As lm-eval's HF back end: None means "the tokenizer's own rule" (llama.cpp adds BOS only
        # when the GGUF's tokenizer.ggml.add_bos_token says so).
        add_special = True if add_special_tokens is None else add_special_tokens
        return self.llm.tokenize(string.encode("utf-8"), add_bos=add_special, special=False)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    # -- scoring -----------------------------------------------------------------------------
    def _logits(self, tokens: list[int]) -> np.ndarray:
        """Logits for every position of `tokens` (row i predicts token i+1), reusing the KV
        cache for the prefix shared with the previous call."""
        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens]
        n = min(len(cached), len(tokens) - 1)
        same = np.asarray(cached[:n]) == np.asarray(tokens[:n], dtype=cached.dtype)
        n_common = int(n if same.all() else same.argmin())
        llm.n_tokens = n_common  # eval() drops the KV cache from this position on
        llm.eval(tokens[n_common:])
        return llm.scores[: len(tokens)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Sorted token sequences put the choices of one question next to each other.
        order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
        for i in tqdm(order, desc="llama.cpp log-likelihoods", disable=disable_tqdm):
            cache_key, context, continuation = requests[i]
            if not continuation:
                raise RecoverLoraError(f"empty continuation for context {str(cache_key)[:60]!r}")
            whole = (context + continuation)[-(self.max_length + 1) :]
            inputs = whole[:-1]
            if len(continuation) > len(inputs):
                raise RecoverLoraError(f"a continuation of {len(continuation)} tokens does not fit the context of {self.max_length}; raise --ctx")
            logits = self._logits(inputs)
            answer = continuation_logprob(logits[len(inputs) - len(continuation) :], continuation)
            results[i] = answer
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (text,) in tqdm([r.args for r in requests], desc="llama.cpp rolling", disable=disable_tqdm):
            windows = [
                (None,) + make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="llama.cpp generate", disable=disable_tqdm):
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = int(gen_kwargs.pop("max_gen_toks", 256))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            n_context = len(self.tok_encode(context))
            max_tokens = max(1, min(max_tokens, self.max_length - n_context))
            out = self.llm.create_completion(context, max_tokens=max_tokens, temperature=temperature, stop=until)
            text = out["choices"][0]["text"]
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, {"until": until}), text)
        return outputs

    def close(self) -> None:
        self.loaded.close()

    def get_model_info(self) -> dict:
        info = {"model_path": str(self.loaded.model.path), "backend": "llama.cpp"}
        if self.loaded.adapter is not None:
            info |= {"lora_path": str(self.loaded.adapter.path), "lora_scale": self.loaded.options.lora_scale}
        return info
