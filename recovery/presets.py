"""Named recipes for a whole Recover-LoRA run: how much synthetic data, and how to train on it.

A preset only fills in defaults; any option given on the command line wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recover_lora.errors import RecoverLoraError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    synth_samples: int  # `recover-lora synth` --samples
    synth_seq_len: int  # `recover-lora synth` --seq-len
    train: dict = field(default_factory=dict)  # TrainConfig field -> value


PRESETS: dict[str, Preset] = {
    # Sized from FACTS.md: ~190-200 training tokens/s for the default model on 2 free CPU cores, and
    # 384 x 128 tokens / 48 steps already took held-out KL 1.35 -> 0.81 there. 96 steps of 8 x 128
    # tokens = 98k tokens, ~9 minutes of training at that rate; synth of 512 x 128 adds a few more.
    # Measured here (2 cores shared with other jobs): 90-120 training tokens/s, 96 steps in ~13 min,
    # held-out KL 0.93 -> 0.49 and perplexity 20.2 -> 12.2 (teacher 8.1); synth 512 x 128 took 31 min.
    "cpu-demo": Preset(
        name="cpu-demo",
        description="a quick CPU run: 512 x 128 synthetic tokens, r16 LoRA on the 2-bit linears, 96 steps of 8 x 128",
        synth_samples=512,
        synth_seq_len=128,
        train=dict(rank=16, alpha=32.0, lr=1e-3, batch_size=8, max_steps=96, warmup_steps=6, checkpoint_every=16, init="eora"),
    ),
    # The paper's scale (~10k synthetic samples of 256 tokens), meant for a GPU; r64 for two epochs
    # recovered ~85 % of the perplexity gap of the default model in a hand prototype (FACTS.md).
    "paper": Preset(
        name="paper",
        description="the paper's scale for a GPU: 10,000 x 256 synthetic tokens, r64 LoRA, 2 epochs",
        synth_samples=10_000,
        synth_seq_len=256,
        train=dict(rank=64, alpha=128.0, lr=5e-4, batch_size=32, epochs=2.0, warmup_steps=30, checkpoint_every=100, init="eora"),
    ),
    # Seconds on any model: checks that every stage runs end to end; the result means nothing.
    "smoke": Preset(
        name="smoke",
        description="a wiring check in seconds: 8 x 32 synthetic tokens, r4 LoRA, 4 steps of 2",
        synth_samples=8,
        synth_seq_len=32,
        train=dict(rank=4, alpha=8.0, lr=1e-3, batch_size=2, max_steps=4, warmup_steps=0, checkpoint_every=2, init="eora"),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise RecoverLoraError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
