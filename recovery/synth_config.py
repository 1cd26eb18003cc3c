"""`SynthConfig`: the settings of one synthetic set, declared once.

Torch-free, so `recover-lora synth` shows these defaults and the pipeline starts from them
without importing the generator (synth.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from recover_lora.errors import RecoverLoraError

FIRST_TOKEN_MODES = ("random", "chat")
# "mask" (default): end a sample at the teacher's first EOS and mask what follows. The samples stay
# exactly what the teacher would write and the student still learns where the teacher stops; the
# cost is small: on SmolLM2-135M-Instruct, 17 % of random-start 128-token samples end early and
# 91 % of positions are still trained (64 samples, seed 0). "suppress": forbid EOS while sampling,
# so every position is trained, but the text after a would-be stop is off the teacher's own path.
EOS_POLICIES = ("mask", "suppress")


@dataclass(frozen=True)
class SynthConfig:
    """Settings of one synthetic set (all of them go into the manifest and must match on resume).

    These defaults are the only ones: `recover-lora synth` shows them and the pipeline starts from them.
    """

    n_samples: int = 10000
    seq_len: int = 256
    seed: int = 0
    batch_size: int = 32  # also the shard size: one shard per batch
    first_token: str = "random"  # "random" (LLM-QAT) or "chat" (a chat-template prompt)
    greedy_tokens: int = 3  # tokens after the start taken as the teacher's argmax
    temperature: float = 1.0
    top_p: float = 0.95
    eos: str = "mask"  # see EOS_POLICIES

    def __post_init__(self) -> None:
        for key in ("n_samples", "seq_len", "batch_size"):
            if getattr(self, key) <= 0:
                raise RecoverLoraError(f"{key}={getattr(self, key)} must be a positive integer")
        if self.seq_len < 2:
            raise RecoverLoraError(f"seq_len={self.seq_len} must be at least 2 (a start token and one generated)")
        if self.first_token not in FIRST_TOKEN_MODES:
            raise RecoverLoraError(f"first token mode {self.first_token!r} is unknown; use one of {', '.join(FIRST_TOKEN_MODES)}")
        if self.eos not in EOS_POLICIES:
            raise RecoverLoraError(f"eos policy {self.eos!r} is unknown; use one of {', '.join(EOS_POLICIES)}")
        if self.greedy_tokens < 0:
            raise RecoverLoraError(f"greedy_tokens={self.greedy_tokens} must be 0 or more")
        if not self.temperature > 0:
            raise RecoverLoraError(f"temperature={self.temperature} must be > 0 (use greedy_tokens for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise RecoverLoraError(f"top_p={self.top_p} must be in (0, 1]")

    @classmethod
    def from_settings(cls, settings: dict) -> SynthConfig:
        """From keywords (the rest keep their defaults); an unknown keyword is a one-line error."""
        unknown = sorted(set(settings) - set(cls.__dataclass_fields__))
        if unknown:
            raise RecoverLoraError(f"{unknown[0]!r} is not a synthetic-set setting; use: {', '.join(cls.__dataclass_fields__)}")
        return cls(**settings)

    @property
    def n_shards(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def shard_rows(self, shard: int) -> int:
        return min(self.batch_size, self.n_samples - shard * self.batch_size)
