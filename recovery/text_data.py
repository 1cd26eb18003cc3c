"""Text files -> token tensors: labeled training data (`--data FILE.jsonl`) and held-out text.

Tokenization uses llama.cpp's own tokenizer for the base GGUF (`llama_cpp.Llama(vocab_only=True)`):
the ids are exactly the ones the deployed model sees, with the GGUF's BOS rule, and no Hugging
Face tokenizer folder is needed (the student is only a GGUF).

JSONL rows may be {"text"}, {"prompt", "response"} or GSM8K's {"question", "answer"}. A prompt
is context only: the loss covers the response (and the EOS that ends it); plain text is all target.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recover_lora.errors import RecoverLoraError
from recover_lora.fileio import read_jsonl

ROW_FORMATS = (("prompt", "response"), ("question", "answer"))
PROMPT_SEPARATOR = "\n"  # between a prompt and its response: a plain, template-free pairing


def read_jsonl_pairs(path: str | Path) -> list[tuple[str, str]]:
    """[(prompt, response)] from a JSONL file; plain {"text"} rows have an empty prompt."""
    path = Path(path)
    if not path.is_file():
        raise RecoverLoraError(f"data file {path} does not exist")
    pairs = []
    for line_number, row in read_jsonl(path):
        if not isinstance(row, dict):
            raise RecoverLoraError(f"{path}:{line_number} is not a JSON object")
        if isinstance(row.get("text"), str):
            pairs.append(("", row["text"]))
            continue
        for prompt_key, response_key in ROW_FORMATS:
            if isinstance(row.get(prompt_key), str) and isinstance(row.get(response_key), str):
                pairs.append((row[prompt_key], row[response_key]))
                break
        else:
            raise RecoverLoraError(
                f"{path}:{line_number} has keys {sorted(row)}; expected 'text', 'prompt'+'response' or 'question'+'answer'"
            )
    if not pairs:
        raise RecoverLoraError(f"{path} has no rows")
    return pairs


class GGUFTokenizer:
    """llama.cpp's tokenizer of a GGUF (vocabulary only, no weights loaded)."""

    def __init__(self, gguf_path: str | Path):
        import llama_cpp

        try:
            self._llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
        except ValueError as e:
            raise RecoverLoraError(f"llama.cpp cannot read the tokenizer of {gguf_path}: {e}") from None
        self.eos_id = int(self._llm.token_eos())
        self.vocab_size = int(self._llm.n_vocab())

    def encode(self, text: str, add_bos: bool) -> list[int]:
        # add_bos=True adds BOS only where the GGUF's tokenizer says so (tokenizer.ggml.add_bos_token).
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))

    def close(self) -> None:
        self._llm.close()

    def __enter__(self) -> "GGUFTokenizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def labeled_samples(path: str | Path, base_gguf: str | Path, seq_len: int, max_samples: int | None = None):
    """Tokenize a labeled JSONL into `SyntheticSamples` (right-padded to seq_len, masked).

    loss_mask[t] = 1 where token t + 1 belongs to the response (or its closing EOS), as for
    synthetic samples. Rows longer than seq_len are cut; rows whose prompt fills it are refused.

    Example:
        samples = labeled_samples("gsm8k/train.jsonl", "smollm2.gateup.gguf", seq_len=256)
    """
    from recover_lora.recovery.samples import SyntheticSamples

    if seq_len < 2:
        raise RecoverLoraError(f"seq_len={seq_len} must be at least 2")
    pairs = read_jsonl_pairs(path)[:max_samples]
    with GGUFTokenizer(base_gguf) as tokenizer:
        input_ids = torch.full((len(pairs), seq_len), tokenizer.eos_id, dtype=torch.long)
        loss_mask = torch.zeros((len(pairs), seq_len), dtype=torch.bool)
        for row, (prompt, response) in enumerate(pairs):
            context = tokenizer.encode(prompt + PROMPT_SEPARATOR if prompt else "", add_bos=True)
            answer = tokenizer.encode(response, add_bos=False) + [tokenizer.eos_id]
            tokens = (context + answer)[:seq_len]
            if len(context) >= len(tokens):
                raise RecoverLoraError(f"{path} row {row + 1}: the prompt alone fills seq_len={seq_len}; raise --seq-len")
            input_ids[row, : len(tokens)] = torch.tensor(tokens)
            # The prediction at position t targets token t + 1: the first target is the response's first token.
            start = max(len(context) - 1, 0)
            loss_mask[row, start : len(tokens) - 1] = True
    manifest = {
        "kind": "labeled",
        "source": str(path),
        "tokenizer": {"gguf": str(base_gguf), "vocab_size": tokenizer.vocab_size},
        "counts": {"n_samples": len(pairs), "seq_len": seq_len, "target_tokens": int(loss_mask.sum())},
    }
    return SyntheticSamples(input_ids, loss_mask, manifest)


def text_windows(path: str | Path, encode, window: int, max_tokens: int, what: str = "text file", knob: str = "--window") -> torch.Tensor:
    """A text file (documents split at blank lines) or JSONL (any `read_jsonl_pairs` row, prompt and
    response joined) as non-overlapping token windows [W, window]; `encode(document)` -> token ids."""
    path = Path(path)
    if path.suffix == ".jsonl" and path.is_file():
        documents = [f"{p}{PROMPT_SEPARATOR}{r}" if p else r for p, r in read_jsonl_pairs(path)]
    elif path.is_file():
        documents = [d for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    else:
        raise RecoverLoraError(f"{what} {path} does not exist")
    stream: list[int] = []
    for document in documents:
        stream += encode(document)
        if len(stream) >= max_tokens:
            break
    n_windows = min(len(stream), max_tokens) // window
    if n_windows == 0:
        raise RecoverLoraError(f"{path} has {len(stream)} tokens, fewer than one window of {window}; lower {knob}")
    return torch.tensor(stream[: n_windows * window], dtype=torch.long).view(n_windows, window)


def heldout_windows(path: str | Path, base_gguf: str | Path, window: int, max_tokens: int) -> torch.Tensor:
    """Held-out text as non-overlapping token windows [W, window] (documents joined, each with BOS),
    tokenized by the base GGUF's own tokenizer."""
    with GGUFTokenizer(base_gguf) as tokenizer:
        return text_windows(path, lambda document: tokenizer.encode(document, add_bos=True), window, max_tokens, "held-out text")
