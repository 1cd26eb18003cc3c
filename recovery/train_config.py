"""`TrainConfig`: every setting of a Recover-LoRA training run, checked before any model loads.

Its own module, free of torch, so the CLI can show the defaults declared here (and the presets can
be checked against these fields) without importing the training code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from recover_lora.errors import RecoverLoraError

if TYPE_CHECKING:
    from recover_lora.recovery.losses import LossConfig

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16")
# Fields that do not change the trained weights; everything else must match to --resume. Gradient
# checkpointing and the loss chunk change memory, not the math: a run that ran out of memory can
# resume with them. (The resolved dtype does count: `train` puts it in the trajectory.)
_NOT_TRAJECTORY = ("output", "resume", "force", "progress", "checkpoint_every", "adapter_dtype", "device",
                   "gradient_checkpointing", "loss_chunk")


@dataclass
class TrainConfig:
    """Everything `train` needs; checks itself before any model is loaded.

    Exactly one of `samples` (a `recover-lora synth` folder) and `data` (a labeled JSONL) is given.
    """

    base: Path  # the quantized GGUF = the student
    output: Path  # run folder: checkpoint, log, adapter/, adapter.gguf, summary.json
    samples: Path | None = None
    data: Path | None = None
    teacher: str | None = None  # HF folder / GGUF of the full-precision model; None = default model
    targets: str = "low-bit"  # see student.target_tensor_names; "none" = no LoRA (with block_scales)
    # DWQ-style: also train the Q2_K block scales of the low-bit linears (recovery/block_scales.py).
    block_scales: bool = False
    block_scales_lr: float = 1e-3  # d/dmin multipliers; the 4-bit codes take CODE_LR_MULTIPLIER times it
    rank: int = 16
    alpha: float | None = None  # None = 2 * rank
    dropout: float = 0.0
    init: str = "zero"  # zero (step 0 = the quantized model) | svd | eora: see lora_init.py
    init_samples: int = 64  # eora: training samples its activation statistics come from
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 8
    seq_len: int | None = None  # cut samples to this length (labeled data: pad/cut, default 256)
    max_samples: int | None = None
    loss: str = "forward"  # forward | reverse | mix
    temperature: float = 1.0
    mix_weight: float = 0.5
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    top_k: int | None = None  # cache the teacher's top-k log-probs once instead of running it every step
    # lm_head and the loss over at most this many token positions at a time (student, teacher and the
    # top-k cache): [batch, seq, vocab] logits never exist whole; same loss, recomputed in backward.
    loss_chunk: int | None = None
    # Frozen teacher and student weights: auto = bfloat16 on a CUDA GPU that supports it, else float32.
    # In bfloat16 the student's weights are no longer exactly the GGUF's dequantized values (rounded to
    # bf16): the price of fitting a 4-8B teacher and student. LoRA and block scales train in float32.
    dtype: str = "auto"
    gradient_checkpointing: bool = False  # recompute layer activations in backward: less memory, same math
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    adapter_dtype: str = "f16"
    resume: bool = False
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.base, self.output = Path(self.base), Path(self.output)
        if (self.samples is None) == (self.data is None):
            raise RecoverLoraError("give exactly one training set: --samples DIR (synthetic) or --data FILE.jsonl (labeled)")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        positive = {"rank": self.rank, "lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size,
                    "checkpoint_every": self.checkpoint_every, "alpha": self.alpha, "block_scales_lr": self.block_scales_lr}
        for name, value in positive.items():
            if not value > 0:
                raise RecoverLoraError(f"--{name.replace('_', '-')}={value} must be > 0")
        for name in ("max_steps", "seq_len", "max_samples", "top_k", "loss_chunk"):
            value = getattr(self, name)
            # --max-steps 0 writes the initial adapter: with --init svd|eora, the correction without training.
            if value is not None and (value < 0 if name == "max_steps" else value <= 0):
                raise RecoverLoraError(f"--{name.replace('_', '-')}={value} must be {'>= 0' if name == 'max_steps' else '> 0'}")
        if not 0.0 <= self.dropout < 1.0:
            raise RecoverLoraError(f"--dropout={self.dropout} must be in [0, 1)")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.grad_clip <= 0:
            raise RecoverLoraError(
                f"--warmup-steps={self.warmup_steps} must be >= 0, min_lr_ratio={self.min_lr_ratio} in [0, 1], "
                f"--grad-clip={self.grad_clip} > 0"
            )
        from recover_lora.recovery.lora_init import INIT_METHODS

        if self.targets == "none" and not self.block_scales:
            raise RecoverLoraError("--targets none trains nothing; add --block-scales or name the linears to put LoRA on")
        if self.init not in INIT_METHODS or self.init_samples <= 0:
            raise RecoverLoraError(f"--init {self.init!r} must be one of {', '.join(INIT_METHODS)} and --init-samples={self.init_samples} > 0")
        if self.device not in DEVICES:
            raise RecoverLoraError(f"--device {self.device!r} is unknown; use one of: {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            raise RecoverLoraError(f"--dtype {self.dtype!r} is unknown; use one of: {', '.join(DTYPES)}")
        self.loss_config()  # validates loss kind, temperature, weights
        from recover_lora.recovery.adapter_gguf import ADAPTER_DTYPES

        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise RecoverLoraError(f"--adapter-dtype {self.adapter_dtype!r} is unknown; use one of: {', '.join(ADAPTER_DTYPES)}")

    def loss_config(self) -> LossConfig:
        from recover_lora.recovery.losses import LossConfig

        return LossConfig(self.loss, self.temperature, self.mix_weight, self.ce_weight, self.kl_weight)

    def trajectory(self) -> dict:
        """The settings the trained weights depend on (compared on --resume)."""
        values = dataclasses.asdict(self)
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if k not in _NOT_TRAJECTORY}
