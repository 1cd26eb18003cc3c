"""The one way this project times llama.cpp: wall seconds of decode calls at a chosen KV-cache depth.

`recover-lora bench` (runtime/bench.py) and every device probe (devices/probe.py, matvec.py,
attention.py) time through `LlamaTimer`, on a model loaded by `runtime.llama.load_llama`, so a
tokens/s figure means the same wherever it comes from: wall clock around llama.cpp's decode of
some tokens at positions depth.., followed by `llama_synchronize`, so GPU back ends are timed to
completion.

It drives llama-cpp-python's public `Llama.eval`, which decodes its tokens (in n_batch chunks) at
positions n_tokens.. after dropping every cached row from n_tokens on: setting n_tokens rewinds
the KV cache to that depth and keeps the rows before it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from recover_lora.runtime.llama import LoadedModel

# Stored in bench records (settings.timer): what the seconds are.
TIMER = "wall_clock_llama_decode"


class LlamaTimer:
    """Times llama.cpp decode calls of one loaded model at the KV-cache depth it is rewound to.

    Example:
        timer = LlamaTimer(load_llama("w4.gguf", options=LlamaOptions(n_ctx=512, threads=2)))
        timer.decode([timer.any_token] * 128)              # fill the cache: 128 tokens deep
        seconds = timer.decode([timer.any_token] * 64)     # one 64-token batch at depth 128
        timer.rewind(128)
        steps = timer.decode_steps([timer.any_token] * 8)  # 8 single-token steps from depth 128
    """

    def __init__(self, loaded: LoadedModel):
        import llama_cpp

        self._synchronize = llama_cpp.llama_synchronize
        self.llm = loaded.llm

    @property
    def depth(self) -> int:
        """Tokens in the KV cache: the position the next decode starts at."""
        return self.llm.n_tokens

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    @property
    def any_token(self) -> int:
        """A valid token id; which one does not change the work of a decode step."""
        bos = self.llm.token_bos()
        return bos if bos >= 0 else 0

    def rewind(self, depth: int) -> None:
        """Keep the first `depth` cached tokens; the next decode overwrites the rest from position `depth`."""
        if not 0 <= depth <= self.llm.n_tokens:
            raise ValueError(f"cannot rewind a {self.llm.n_tokens}-token KV cache to depth {depth}")
        self.llm.n_tokens = depth

    def decode(self, tokens: Sequence[int]) -> float:
        """Decode `tokens` as one batch at the current depth; wall seconds until llama.cpp finished."""
        start = time.perf_counter()
        self.llm.eval(list(tokens))
        self._synchronize(self.llm.ctx)
        return time.perf_counter() - start

    def decode_steps(self, tokens: Sequence[int]) -> list[float]:
        """Decode `tokens` one at a time from the current depth, as generation does; wall seconds of each step."""
        return [self.decode([token]) for token in tokens]
