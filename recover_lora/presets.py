"""Named recipes for a whole run: the synthetic set, the training recipe, and how big each pipeline step is.

One preset per name serves `recover-lora pipeline --preset` (every field) and `recover-lora train
--preset` (its `train` recipe, where any option given on the command line wins). Torch-free: the
CLI reads it to build its help.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.train_config import TrainConfig

# TrainConfig's field types, the types a recipe's values are checked against.
TRAIN_CONFIG_TYPES = typing.get_type_hints(TrainConfig)


@dataclass(frozen=True)
class TrainRecipe(Mapping):
    """A preset's training settings: TrainConfig fields; None leaves TrainConfig's own default.

    A Mapping of the fields it sets, so `TrainConfig(base=..., output=..., **recipe)` takes it as keywords.
    """

    targets: str | None = None
    block_scales: bool | None = None
    block_scales_lr: float | None = None
    rank: int | None = None
    alpha: float | None = None
    lr: float | None = None
    batch_size: int | None = None
    epochs: float | None = None
    max_steps: int | None = None
    warmup_steps: int | None = None
    checkpoint_every: int | None = None
    init: str | None = None
    # Memory only (the same math): what lets a large teacher's run fit (`recover-lora plan`).
    loss_chunk: int | None = None
    gradient_checkpointing: bool | None = None

    def __post_init__(self) -> None:
        for name, value in self.items():
            expected = TRAIN_CONFIG_TYPES[name]
            if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
                kind = getattr(expected, "__name__", expected)
                raise RecoverLoraError(f"train recipe {name}={value!r} must be {kind}, the type of TrainConfig.{name}; fix the preset")

    def __getitem__(self, name: str):
        value = getattr(self, name, None) if name in RECIPE_FIELDS else None
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in RECIPE_FIELDS if getattr(self, name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)


RECIPE_FIELDS = tuple(f.name for f in dataclasses.fields(TrainRecipe))
# Checked at import: a recipe field TrainConfig does not have would only fail when a run starts.
_unknown = [name for name in RECIPE_FIELDS if name not in TRAIN_CONFIG_TYPES]
if _unknown:
    raise RecoverLoraError(f"TrainRecipe.{_unknown[0]} is not a TrainConfig field; rename or remove it")


@dataclass(frozen=True)
class Preset:
    """One named recipe; checks itself when the table below is built."""

    name: str
    description: str
    synth_samples: int  # `recover-lora synth --n-samples`
    synth_seq_len: int  # `recover-lora synth --seq-len`
    synth_batch_size: int  # samples the teacher generates together (the pipeline's synth step)
    train: TrainRecipe  # the adapter on gateup's 2-bit linears (`train` step)
    heldout_tokens: int
    eval_tasks: str
    eval_limit: int | None  # documents per task; None = all
    bench_depths: tuple[int, ...]
    bench_repeats: int
    bench_n_gen: int
    roofline_contexts: tuple[int, ...]
    probe_array_mib: int = 256  # STREAM arrays of the bandwidth probe: far larger than any cache
    matvec_layers: int = 2  # layers of the per-type matrix-vector probe models (devices/matvec.py); 0 = skip
    attention_layers: int = 8  # layers of the attention-rate probe model (devices/attention.py); 0 = skip
    # Synthetic samples the importance matrix is computed from (the first ones of synth/; never held-out text).
    # Past measurement (a hand test, issue 11): 128 x 128 tokens took the default model's gateup KL from 1.38 to 0.60.
    imatrix_samples: int = 128
    # After llama.cpp's quantizer, re-choose the Q2_K codes by GPTQ on those same samples' activations
    # (recovery/gptq.py): same bytes and speed. Measured on the default model (README "GPTQ codes"):
    # gateup's held-out KL 0.412 -> 0.354 with no training.
    gptq_codes: bool = True
    # llama.cpp's stock presets made as baselines (`baselines` step: the model's own widths, the run's importance
    # matrix, no overrides), and the one whose bytes and decode rate cap the type search (`search` step).
    baseline_presets: tuple[str, ...] = ("Q4_K_M", "Q3_K_M", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_XXS", "Q2_K")
    search_reference: str = "IQ4_XS"
    # AutoRound's own GGUF files, the other baseline (`autoround` step): "scheme@iters", iters 0 = its optimized RTN,
    # 200 = its default tuning. Calibrated on the importance matrix's windows. Measured on the default model
    # (`make baselines`, a busy 2-core machine): q4_k_m / q3_k_m at iters 0 took 4.3 / 2.2 min, q2_k_s at iters 0
    # ~40 min (its 2-bit scale search), q3_k_m at iters 200 ~30 min; `make baselines` makes q2_k_s too.
    autoround_baselines: tuple[str, ...] = ("q4_k_m@0", "q3_k_m@0", "q3_k_m@200")
    # Calibration windows (the first synthetic samples) of the search's Fisher diagonal (README "Type search" sets
    # its predicted KL beside the held-out one).
    search_samples: int = 32
    # Block-wise reconstruction of the searched file (`reconstruct` step): calibration windows (the first synthetic
    # samples) and signed-gradient steps per block (README "Block-wise reconstruction" gives the default model's time).
    reconstruct_samples: int = 128
    reconstruct_iters: int = 100
    reconstruct_weighting: str = "mse"
    # Whether reconstruct's last stage tunes the output head (recovery/output_head.py): its state is ~29 bytes per
    # head weight on the device, more than a block's for a large vocabulary (`recover-lora plan` says when).
    reconstruct_head: bool = True
    # End-to-end KL tuning of the reconstructed file's codes (`kltune` step, recovery/kl_tune.py): whether it runs,
    # its calibration windows (the first synthetic samples; the last kltune_held_out of them judge its snapshots) and
    # passes over the rest, and its tensor groups. One group's tuning state is held at a time, ~29 bytes per weight
    # beside both models in fp32 (`recover-lora plan`): 10.5 GiB for the default model in one group; a 4B model needs
    # groups (each costs a whole schedule of forward and backward passes).
    kltune: bool = True
    kltune_samples: int = 128
    kltune_epochs: int = 2
    kltune_held_out: int = 16
    kltune_groups: int = 1
    kltune_batch_size: int = 8  # windows per step: a step's activations through the whole model are held for its backward
    # Rate of the Q2_K block scales in the `recover` step. Measured on the default model (README "One file"):
    # 1e-3 is stable; 3e-3 drifted upwards and 1e-2 diverged within the cpu-demo schedule.
    recover_block_scales_lr: float = 1e-3

    @property
    def recover(self) -> TrainRecipe:
        """The one-file recovered model's recipe (`recover` step, then `recover-lora merge`): `train`'s schedule,
        with the Q2_K block scales of gate/up and a LoRA on the 4-bit linears, merged and re-quantized into them."""
        return dataclasses.replace(self.train, targets="high-bit", block_scales=True, block_scales_lr=self.recover_block_scales_lr)

    def __post_init__(self) -> None:
        positive = ("synth_samples", "synth_seq_len", "synth_batch_size", "heldout_tokens", "bench_repeats", "bench_n_gen",
                    "probe_array_mib", "imatrix_samples", "recover_block_scales_lr", "search_samples",
                    "reconstruct_samples", "reconstruct_iters", "kltune_samples", "kltune_epochs", "kltune_held_out", "kltune_groups",
                    "kltune_batch_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise RecoverLoraError(f"preset {self.name}: {name}={getattr(self, name)} must be > 0")
        for name in ("matvec_layers", "attention_layers"):
            if getattr(self, name) < 0:
                raise RecoverLoraError(f"preset {self.name}: {name}={getattr(self, name)} must be >= 0 (0 skips that probe)")
        from recover_lora.export.autoround import AutoRoundBaseline

        for text in self.autoround_baselines:
            AutoRoundBaseline.parse(text)  # an unknown scheme fails here, not an hour into a run
        from recover_lora.recovery.reconstruct import WEIGHTING_CHOICES

        if self.reconstruct_weighting not in WEIGHTING_CHOICES:  # likewise, not when the reconstruct step starts
            raise RecoverLoraError(f"preset {self.name}: reconstruct_weighting {self.reconstruct_weighting!r} must be one of "
                                   f"{', '.join(WEIGHTING_CHOICES)}")
        if self.kltune_held_out >= min(self.kltune_samples, self.synth_samples):
            raise RecoverLoraError(f"preset {self.name}: kltune_held_out={self.kltune_held_out} leaves no window to train on "
                                   f"(kltune_samples {self.kltune_samples}, synth_samples {self.synth_samples})")
        if self.search_reference not in self.baseline_presets:
            raise RecoverLoraError(f"preset {self.name}: search_reference {self.search_reference!r} must be one of its baseline_presets")
        if self.eval_limit is not None and self.eval_limit <= 0:
            raise RecoverLoraError(f"preset {self.name}: eval_limit={self.eval_limit} must be > 0 or None (all documents)")
        for name in ("bench_depths", "roofline_contexts"):
            values = getattr(self, name)
            if not values or any(v < 0 for v in values):
                raise RecoverLoraError(f"preset {self.name}: {name}={values} must be one or more token counts >= 0")


PRESETS: dict[str, Preset] = {
    # The default model on 2 CPU cores. `make demo` (recover-lora pipeline --preset cpu-demo) measures it:
    # its report.md gives each step's time, the held-out KL and perplexity. Past measurements, on a 2-core box
    # shared with other jobs: synth 512 x 128 in 31 min, 96 training steps in ~13 min (90-120 tokens/s),
    # held-out KL 0.93 -> 0.49 and perplexity 20.2 -> 12.2 (teacher 8.1); synth batch 128 decoded ~2.8x
    # faster than 32 there.
    "cpu-demo": Preset(
        name="cpu-demo",
        description="a quick CPU run: 512 x 128 synthetic tokens, r16 LoRA on the 2-bit linears, 96 steps of 8 x 128",
        synth_samples=512, synth_seq_len=128, synth_batch_size=128,
        train=TrainRecipe(rank=16, alpha=32.0, lr=1e-3, batch_size=8, max_steps=96, warmup_steps=6, checkpoint_every=16,
                          init="eora"),
        heldout_tokens=8192, eval_tasks="quick3", eval_limit=200,
        bench_depths=(0, 512, 2048), bench_repeats=3, bench_n_gen=32, roofline_contexts=(0, 512, 1024, 2048, 4096),
    ),
    # The paper's scale (~10k synthetic samples of 256 tokens, the 12-task suite), meant for a GPU. Past
    # measurement (a hand prototype, not a command of this repository): r64 for two epochs recovered ~85 % of
    # the default model's perplexity gap; `recover-lora pipeline --preset paper` measures it on a GPU.
    "paper": Preset(
        name="paper",
        description="the paper's scale for a GPU: 10,000 x 256 synthetic tokens, r64 LoRA, 2 epochs",
        synth_samples=10_000, synth_seq_len=256, synth_batch_size=128,
        train=TrainRecipe(rank=64, alpha=128.0, lr=5e-4, batch_size=32, epochs=2.0, warmup_steps=30, checkpoint_every=100,
                          init="eora", loss_chunk=1024, gradient_checkpointing=True),
        recover_block_scales_lr=5e-4,
        # 4B: all at once its tuning state alone is > 100 GiB; in 8 groups, 2 windows a step, it fits one 80 GB GPU.
        kltune_groups=8, kltune_batch_size=2,
        heldout_tokens=32768, eval_tasks="paper12", eval_limit=1000,
        bench_depths=(0, 512, 2048, 4096), bench_repeats=5, bench_n_gen=64, roofline_contexts=(0, 1024, 4096, 16384, 32768),
    ),
    # Seconds, not minutes: checks the wiring on any model (and is what the tests run on stories260K).
    # Its numbers mean nothing.
    "smoke": Preset(
        name="smoke",
        description="a wiring check in seconds: 8 x 32 synthetic tokens, r4 LoRA, 4 steps of 2",
        synth_samples=8, synth_seq_len=32, synth_batch_size=8,
        train=TrainRecipe(rank=4, alpha=8.0, lr=1e-3, batch_size=2, max_steps=4, warmup_steps=0, checkpoint_every=2,
                          init="eora"),
        heldout_tokens=512, eval_tasks="quick3", eval_limit=4,
        bench_depths=(0,), bench_repeats=1, bench_n_gen=4, roofline_contexts=(0, 256),
        probe_array_mib=16, matvec_layers=0, attention_layers=0, imatrix_samples=4,
        baseline_presets=("Q4_K_M", "IQ4_XS"), search_samples=4, autoround_baselines=("q4_k_m@0",),
        reconstruct_samples=4, reconstruct_iters=4, kltune_samples=8, kltune_epochs=1, kltune_held_out=2,
    ),
}


# Steps a run may leave out (`pipeline --skip STEP`): nothing later reads their files, only the tables list them.
SKIPPABLE_STEPS = {"autoround": {"autoround_baselines": ()}, "kltune": {"kltune": False}}


def get_preset(name: str, skip: tuple[str, ...] = ()) -> Preset:
    """A preset by name; `skip` leaves out those of SKIPPABLE_STEPS (e.g. kltune where its tuning state does not fit)."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise RecoverLoraError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    bad = [step for step in skip if step not in SKIPPABLE_STEPS]
    if bad:
        raise RecoverLoraError(f"--skip {bad[0]!r}: only {', '.join(SKIPPABLE_STEPS)} can be left out (later steps read the others' files)")
    changes = {k: v for step in skip for k, v in SKIPPABLE_STEPS[step].items()}
    return dataclasses.replace(preset, **changes) if changes else preset
