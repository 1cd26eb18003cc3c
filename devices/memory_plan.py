"""How much host RAM, GPU memory and disk each pipeline step needs, from a model's shape alone.

No weights are read: a model's sizes (`devices.memory_sizes`, from `devices.shapes`), the preset's sizes
and the training settings give every term. Each step is what its code holds at its peak:

  synth    the teacher (bf16 on CUDA, fp32 elsewhere) + its KV cache while it samples a batch
  imatrix  the width-padded teacher in fp32 + one batch of activations (no gradients)
  export   llama.cpp's quantizer on a full-precision work GGUF: streams tensors, but the work file
           (F32 up to 2B linear parameters, else F16) and the output sit on disk together; then
           GPTQ codes (where the preset asks): the imatrix's teacher + the Q2_K inputs' Gram matrices
  train    student (dequantized) + teacher (or its top-k cache) + LoRA, AdamW moments, activations
           and [tokens, vocab] logits; the frozen student weights shard over N GPUs (FSDP)
  recover  the same with the Q2_K block scales, then a merge (an export of the teacher + deltas)
  heldout  student and teacher in fp32 and one batch of logits
  eval     the teacher in torch (lm-eval, fp32), each GGUF in llama.cpp (file + KV cache + logits)
  bench    llama.cpp on the largest GGUF at the deepest context
  report   a few plots

Where a GPU does the torch work (`gpus > 0`), its memory is the constraint for teacher and
student; the host still builds each model on the CPU before moving it (`export.torch_model`).
The constants below were checked against `make bench-memory` (devices/results/memory-bench.json);
`memory_check` compares a plan with a machine and words the refusals.

Example:
    plan = plan_memory(model_sizes(load_model_shape("qwen3-4b")), plan_settings("paper"), Available(gpus=1, gpu_bytes=24 * GiB))
    {s.step: s.gpu_bytes / GiB for s in plan.steps}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import gguf

from recover_lora.devices.memory_sizes import (
    ModelSizes,
    block_scale_tensors,
    embedding_params,
    file_bytes,
    kv_elements_per_token,
    largest_tensor,
    layer_params,
    lora_targets,
    n_params,
    teacher_reading,
    work_file_bytes,
    work_is_f32,
)
from recover_lora.errors import RecoverLoraError
from recover_lora.export.model import ModelConfig
from recover_lora.manifest import STEPS
from recover_lora.recovery.train_config import DTYPES

GiB = 1 << 30
MiB = 1 << 20

# -- Fixed costs (measured here with `make bench-memory`, but the CUDA allowance: no GPU was available) -------
TORCH_PROCESS_BYTES = 400 * MiB  # RSS of a torch step before any model: python, torch, transformers, peft, typer
LLAMA_PROCESS_BYTES = 150 * MiB  # RSS of a llama.cpp step (export, eval, bench) before any model
CUDA_CONTEXT_BYTES = 1 * GiB  # CUDA context, cuBLAS workspace and caching-allocator slack per GPU process
# gguf.quants.dequantize of a whole K-quant tensor holds ~1.5 float32 copies of it at its peak, and building the
# student leaves ~0.5 of one to Python's cycle collector while the teacher loads (measured: a Q6_K embedding).
DEQUANTIZE_FP32_COPIES = 1.5
DEQUANTIZE_LEFTOVER_FP32_COPIES = 0.5
# -- Torch-side byte counts per element --------------------------------------------------------------------
ADAMW_BYTES_PER_PARAM = 16  # trainable fp32: the value, its gradient, AdamW's exp_avg and exp_avg_sq
CHECKPOINT_BYTES_PER_PARAM = 12  # checkpoint.pt: the value and both AdamW moments (recovery/checkpoint.py)
# Per [position, vocab] element of the student's logits in the KL step (recovery/losses.py): the logits and
# their masked rows in the compute dtype (2 x act), then fp32 copies: .float(), / temperature, log_softmax
# (kept for backward), the KL's p * (log p - log q) terms, and the gradient flowing back: about 6 x 4 bytes.
STUDENT_LOGIT_FP32_COPIES = 6
STUDENT_TOPK_LOGIT_FP32_COPIES = 4  # with a top-k teacher the KL runs over k + 1 buckets: no full-vocab terms
TEACHER_LOGIT_FP32_COPIES = 4  # no gradient: .float(), / temperature, log_softmax, exp
HELDOUT_LOGIT_FP32_COPIES = 5  # recovery/heldout.py: teacher logits, log-probs and exp; student logits and log-probs
SYNTH_LOGIT_BYTES = 32  # per [batch, vocab] element while sampling: fp32 logits, probs, sorted probs, int64 order, cumsum
EVAL_TORCH_BATCH = 8  # runtime/evaluate.py EvalSettings.batch_size
EVAL_REQUEST_TOKENS = 512  # longest context + continuation of a batch of lm-eval requests (quick3 / paper12 tasks)
EVAL_LOGIT_FP32_COPIES = 3  # lm-eval's HFLM: logits, log_softmax, the gathered copy
LLAMA_EVAL_N_CTX = 2048  # runtime/lm_llamacpp.py default n_ctx: llama-cpp-python keeps a [n_ctx, vocab] fp32 score array
LLAMA_N_UBATCH = 512  # llama.cpp's default micro-batch: its compute buffer holds [ubatch, vocab] logits
KV_CACHE_BYTES_PER_ELEMENT = 2  # llama.cpp's default F16 K and V
# Of a sharded model each GPU holds its shard plus the unit being all-gathered and the next one (prefetch).
FSDP_GATHERED_UNITS = 2
COVARIANCE_BUDGET_BYTES = 2 * GiB  # recovery/lora_init.py: eora's input covariances (float64)
ADAPTER_GGUF_BYTES_PER_PARAM = {"f32": 4, "f16": 2, "q8_0": 1}  # adapter.gguf (q8_0: 34 bytes per 32)
TOPK_BYTES_PER_ENTRY = 8  # teacher_topk.safetensors: fp32 log-prob + int32 id
SAMPLE_DISK_BYTES_PER_TOKEN = 5  # samples.safetensors: int32 id + uint8 mask
SAMPLE_RAM_BYTES_PER_TOKEN = 9  # in torch: int64 id + bool mask
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class TrainPlan:
    """The training settings memory depends on (a TrainConfig's, with the preset's sizes filled in)."""

    batch_size: int
    seq_len: int
    n_samples: int
    rank: int = 16
    targets: str = "low-bit"
    block_scales: bool = False
    top_k: int | None = None
    loss_chunk: int | None = None
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    init: str = "zero"
    init_samples: int = 64
    adapter_dtype: str = "f16"
    with_teacher: bool = True  # kl_weight > 0

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise RecoverLoraError(f"--dtype {self.dtype!r} is unknown; use one of: {', '.join(DTYPES)}")
        for name in ("batch_size", "seq_len", "n_samples", "rank", "top_k", "loss_chunk"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise RecoverLoraError(f"--{name.replace('_', '-')}={value} must be > 0")

    @classmethod
    def from_settings(cls, settings: Mapping, n_samples: int, seq_len: int) -> "TrainPlan":
        """From TrainConfig fields (a TrainConfig's `vars`, a preset recipe), missing ones at TrainConfig's defaults."""
        from recover_lora.recovery.train_config import TrainConfig

        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
        value = {**defaults, **{k: v for k, v in settings.items() if v is not None}}.get
        return cls(batch_size=value("batch_size"), seq_len=min(value("seq_len") or seq_len, seq_len),
                   n_samples=min(value("max_samples") or n_samples, n_samples), rank=value("rank"), targets=value("targets"),
                   block_scales=bool(value("block_scales")), top_k=value("top_k"), loss_chunk=value("loss_chunk"),
                   gradient_checkpointing=bool(value("gradient_checkpointing")), dtype=value("dtype") or "auto",
                   init=value("init"), init_samples=value("init_samples"), adapter_dtype=value("adapter_dtype"),
                   with_teacher=value("kl_weight") > 0)


@dataclass(frozen=True)
class PlanSettings:
    """Every size the plan reads: the preset's step sizes and the train / recover recipes."""

    preset: str
    train: TrainPlan
    recover: TrainPlan
    synth_samples: int
    synth_seq_len: int
    synth_batch_size: int
    imatrix_samples: int
    gptq_codes: bool = False  # the export step then re-chooses the Q2_K codes (recovery/gptq.py)
    heldout_window: int = 256  # recovery/heldout.py defaults, as the pipeline calls it
    heldout_batch: int = 4
    bench_n_ctx: int = 2048 + 64
    policies: tuple[str, ...] = ("w4", "gateup")
    steps: tuple[str, ...] = STEPS
    baseline_presets: tuple[str, ...] = ()  # llama.cpp presets of the baselines step
    autoround_baselines: tuple[str, ...] = ()  # AutoRound files of the autoround step ("scheme@iters")
    reconstruct_samples: int = 128  # calibration windows of the reconstruct step
    reconstruct_weighting: str = "mse"  # its ReconstructSettings.weighting
    reconstruct_head: bool = True  # its ReconstructSettings.head: the output head's phase after the blocks
    kltune: bool = True  # whether the preset runs the kltune step
    kltune_groups: int = 1  # its tensor groups, tuned one after another
    kltune_batch_size: int = 8  # its windows per step


def plan_settings(preset: str = "cpu-demo", overrides: Mapping | None = None, policies: tuple[str, ...] = ("w4", "gateup"),
                  steps: tuple[str, ...] = STEPS, skip: tuple[str, ...] = ()) -> PlanSettings:
    """A preset's sizes, with TrainConfig overrides (`top_k`, `loss_chunk`, ...) applied to train and recover alike, and
    the steps a run leaves out (`pipeline --skip`) planned as such."""
    from recover_lora.presets import get_preset

    p = get_preset(preset, skip)
    extra = dict(overrides or {})
    n, seq = p.synth_samples, p.synth_seq_len
    return PlanSettings(
        preset=p.name, train=TrainPlan.from_settings({**p.train, **extra}, n, seq),
        recover=TrainPlan.from_settings({**p.recover, **extra}, n, seq), synth_samples=n, synth_seq_len=seq,
        synth_batch_size=p.synth_batch_size, imatrix_samples=p.imatrix_samples, gptq_codes=p.gptq_codes,
        bench_n_ctx=max(p.bench_depths) + p.bench_n_gen + LLAMA_N_UBATCH, policies=policies, steps=steps,
        baseline_presets=p.baseline_presets, autoround_baselines=p.autoround_baselines,
        reconstruct_samples=p.reconstruct_samples, reconstruct_weighting=p.reconstruct_weighting, reconstruct_head=p.reconstruct_head,
        kltune=p.kltune, kltune_groups=p.kltune_groups, kltune_batch_size=p.kltune_batch_size)


@dataclass(frozen=True)
class Available:
    """What the machine offers; None = not known (that resource is not checked). gpus = 0: torch runs on the CPU."""

    host_bytes: int | None = None
    gpu_bytes: int | None = None  # per GPU
    disk_bytes: int | None = None
    gpus: int = 0
    measured: tuple[str, ...] = ()  # of "host", "gpu", "disk": read from this machine, not given (--host-memory, ...)

    def __post_init__(self) -> None:
        if self.gpus < 0:
            raise RecoverLoraError(f"--gpus {self.gpus} must be >= 0 (0 = the CPU)")
        for name, flag in (("host_bytes", "--host-memory"), ("gpu_bytes", "--gpu-memory"), ("disk_bytes", "--disk")):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise RecoverLoraError(f"{flag} must be > 0 GiB")


@dataclass(frozen=True)
class StepMemory:
    """One step's peak: host RAM and GPU memory (per GPU) as named parts; disk = the run folder at the step's peak."""

    step: str
    host: dict[str, int]
    gpu: dict[str, int]
    disk_bytes: int
    note: str = ""

    @property
    def host_bytes(self) -> int:
        return sum(self.host.values())

    @property
    def gpu_bytes(self) -> int:
        return sum(self.gpu.values())

    def to_dict(self) -> dict:
        return {"step": self.step, "host_bytes": self.host_bytes, "gpu_bytes": self.gpu_bytes, "disk_bytes": self.disk_bytes,
                "host_parts": dict(self.host), "gpu_parts": dict(self.gpu), "note": self.note}


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    settings: PlanSettings
    available: Available
    steps: tuple[StepMemory, ...]
    problems: tuple[str, ...] = ()  # one refusal line per step that does not fit (memory_check.checked_plan)

    @property
    def fits(self) -> bool:
        return not self.problems

    def check(self) -> None:
        """Raise the first refusal (one line: the step, need vs available, the setting to change)."""
        if self.problems:
            raise RecoverLoraError(self.problems[0])

    def to_dict(self) -> dict:
        return {"model": self.model, "preset": self.settings.preset, "gpus": self.available.gpus,
                "available": dataclasses.asdict(self.available), "train": dataclasses.asdict(self.settings.train),
                "steps": [s.to_dict() for s in self.steps], "fits": self.fits, "problems": list(self.problems)}


# -- Per step -----------------------------------------------------------------------------------------------------
def weight_bytes(dtype: str, on_gpu: bool) -> int:
    """Bytes per frozen weight, and per activation too: auto = bf16 on CUDA, fp32 on the CPU; bf16 weights run under
    bf16 autocast, fp32 ones in fp32 (recovery/distill.autocast_for)."""
    return DTYPE_BYTES[("bfloat16" if on_gpu else "float32") if dtype == "auto" else dtype]


def _place(host: dict, gpu: dict, on_gpu: bool, **parts: int) -> None:
    """Put model-side parts on the GPU when there is one, else on the host."""
    (gpu if on_gpu else host).update({k.replace("_", " "): v for k, v in parts.items()})


def synth_memory(sizes: ModelSizes, s: PlanSettings, gpus: int) -> tuple[dict, dict, int, int]:
    c, on_gpu = sizes.teacher, gpus > 0
    weight = weight_bytes("auto", on_gpu)  # recovery.teacher_source.pick_device_and_dtype
    host, gpu = {"process": TORCH_PROCESS_BYTES, **teacher_reading(sizes)}, {}
    if on_gpu:
        host["teacher staged"] = n_params(c) * weight
        gpu["CUDA context"] = CUDA_CONTEXT_BYTES
    batch = min(s.synth_batch_size, s.synth_samples)
    _place(host, gpu, on_gpu, teacher=n_params(c) * weight,
           KV_cache=batch * s.synth_seq_len * kv_elements_per_token(c) * weight,
           sampling_logits=batch * c.vocab_size * SYNTH_LOGIT_BYTES)
    written = s.synth_samples * s.synth_seq_len * SAMPLE_DISK_BYTES_PER_TOKEN
    return host, gpu, written, written  # the shards, then the merged file beside them


def imatrix_memory(sizes: ModelSizes, s: PlanSettings, gpus: int) -> tuple[dict, dict, int, int]:
    c, on_gpu = sizes.student, gpus > 0  # padded widths, as the export
    host, gpu = {"process": TORCH_PROCESS_BYTES, **teacher_reading(sizes)}, {}
    if on_gpu:
        host["teacher staged"] = n_params(c) * 4
        gpu["CUDA context"] = CUDA_CONTEXT_BYTES
    tokens = 8 * s.synth_seq_len  # compute_imatrix's batch_size
    _place(host, gpu, on_gpu, teacher_fp32=n_params(c) * 4,
           activations=tokens * (3 * c.intermediate_size + 4 * c.hidden_size) * 4)
    linears = [t for t in sizes.policy_tensors.get("gateup", sizes.student_tensors) if len(t.shape) == 2]
    return host, gpu, sum(t.row_length * 4 for t in linears), 0


def export_memory(sizes: ModelSizes, policy: str, mapped_source: bool) -> tuple[dict, int, int]:
    """(host parts, bytes written, temporary bytes) of one `export_model` call: the source streams tensor by tensor
    (a GGUF source is memory-mapped: its pages stay resident until the export ends), then llama.cpp's quantizer
    reads each tensor of the work file into a buffer (F16 ones widened to F32) beside its quantized output."""
    c = sizes.student
    out = file_bytes(sizes.policy_tensors[policy])
    work = work_file_bytes(c)
    width = 4 if work_is_f32(c) else 2
    largest = largest_tensor(c)
    # write_gguf holds one source tensor as float32 (from a bf16 checkpoint: both; from a GGUF: the dequantized copy)
    written = largest * (4 if mapped_source else 6)
    quantizing = largest * (width + (0 if width == 4 else 4) + 1)  # llama.cpp: the tensor read, widened to F32, its output
    # ... and llama_cpp_load_check maps the output (prefetched: resident) while the source is still mapped.
    host = {"process": LLAMA_PROCESS_BYTES, "largest tensor in flight, or the output mapped": max(written, quantizing, out),
            "teacher source mapped": sizes.teacher_file_bytes if mapped_source else 0}
    return host, out, work


# llama.cpp linear kinds of one block that read the same tensor.
SHARED_INPUT = {"attn_q": "attention input", "attn_k": "attention input", "attn_v": "attention input",
                "ffn_gate": "ffn input", "ffn_up": "ffn input"}


def gram_bytes(tensors) -> int:
    """float64 XᵀX of these linears' inputs as recovery/activations.py holds them: one in² array per input tensor."""
    inputs = {(t.name.split(".")[1], SHARED_INPUT.get(t.name.split(".")[2], t.name)): t.row_length for t in tensors}
    return sum(width ** 2 * 8 for width in inputs.values())


def gptq_memory(sizes: ModelSizes, s: PlanSettings, gpus: int) -> tuple[dict, dict]:
    """(host, GPU) of `recovery.gptq.refine_codes` after each export: the padded fp32 teacher runs over the samples
    as in imatrix, and the input Gram matrix (float64, in²) of every Q2_K linear is held until the codes are chosen:
    one per input tensor (recovery/activations.py: gate and up, or q, k and v, of a block share theirs)."""
    host, gpu, _, _ = imatrix_memory(sizes, s, gpus)
    q2k = [t for t in sizes.policy_tensors.get("gateup", []) if t.ggml_type == gguf.GGMLQuantizationType.Q2_K]
    host["Gram matrices (float64)"] = gram_bytes(q2k)
    # target, scale, min, the working copy (float64) and the codes of one tensor at a time
    host["GPTQ of one tensor"] = max((t.n_elements for t in q2k), default=0) * (4 * 8 + 1)
    return host, gpu


def train_phases(sizes: ModelSizes, t: TrainPlan, gpus: int) -> tuple[dict[str, tuple[dict, dict]], int, int]:
    """({phase: (host parts, GPU parts)}, bytes written, temporary bytes) of recovery/distill.train, phase by phase: the two models built on the host, the LoRA init (eora: a second,
    fp32 teacher), the top-k cache, the training steps. With N GPUs (recovery/distributed.py) each process holds
    a teacher replica, its shard of the student's decoder layers (embeddings and head whole) and 1/N of the batch."""
    on_gpu, shards = gpus > 0, max(gpus, 1)
    weight = act = weight_bytes(t.dtype, on_gpu)
    label = "bf16" if weight == 2 else "fp32"
    teacher, student = sizes.teacher, sizes.student
    vocab, hidden = student.vocab_size, student.hidden_size
    tokens = math.ceil(t.batch_size / shards) * t.seq_len  # this process's share of the global batch
    logit_rows = min(tokens, t.loss_chunk) if t.loss_chunk else tokens
    blocks = block_scale_tensors(sizes) if t.block_scales else []
    block_weights = sum(b.n_elements for b in blocks)
    n_blocks = block_weights // 256
    targets = lora_targets(sizes, t.targets)
    lora = sum(t.rank * sum(x.shape) for x in targets)
    trainable = lora + 34 * n_blocks  # Q2_K: d, dmin and 16 + 16 sub-block codes per 256 weights (block_scales.py)
    # Block-scaled tensors keep their 1-byte codes (+ fp32 d, dmin) instead of the dequantized weights.
    frozen = (n_params(student) - block_weights) * weight + block_weights + 8 * n_blocks
    whole = embedding_params(student) * weight  # FSDP leaves the frozen embeddings and head whole on every GPU
    student_part = whole + (frozen - whole) // shards
    gather = FSDP_GATHERED_UNITS * layer_params(student) * weight if shards > 1 else 0
    teacher_bytes = n_params(teacher) * weight if t.with_teacher else 0
    # Saved for backward per token and layer: the norms' inputs and outputs (and RMSNorm's fp32 upcast), q/k/v
    # before and after rope, the attention output, the MLP's gate, up, act(gate) and their product: more than
    # autograd keeps for a frozen base (a hand count with torch's saved_tensors_hooks on Qwen3-4B's widths found
    # ~57 % of this), a margin for backward's temporaries. With checkpointing: each layer's input, plus one
    # layer recomputed at a time.
    per_layer = act * (4 * hidden + (2 * student.num_heads + 4 * student.num_kv_heads) * student.head_dim
                       + student.num_heads * student.head_dim + 4 * student.intermediate_size) + 16 * hidden
    layers = student.num_layers
    activations = tokens * (layers * hidden * act + per_layer if t.gradient_checkpointing else layers * per_layer)
    # A block-scaled linear rebuilds its weight each forward and keeps its fp32 codes and weight (and the cast
    # to the compute dtype) for backward: every layer's, or one layer's with checkpointing.
    rebuilt = block_weights * (8 + (act if act != 4 else 0)) // (layers if t.gradient_checkpointing else 1)
    copies = STUDENT_TOPK_LOGIT_FP32_COPIES if t.top_k else STUDENT_LOGIT_FP32_COPIES
    student_logits = logit_rows * vocab * (2 * act + 4 * copies)
    teacher_logits = logit_rows * vocab * (2 * act + 4 * TEACHER_LOGIT_FP32_COPIES) if t.with_teacher and not t.top_k else 0
    cache = t.n_samples * t.seq_len * t.top_k * TOPK_BYTES_PER_ENTRY if t.with_teacher and t.top_k else 0

    process = {"process": TORCH_PROCESS_BYTES, "samples": t.n_samples * t.seq_len * SAMPLE_RAM_BYTES_PER_TOKEN}
    # Measured: a GGUF teacher's mapping outlives build_teacher (held in a reference cycle until Python's cycle
    # collector runs, which training rarely triggers), so its pages stay resident through the later phases.
    later = {**process, "teacher GGUF still mapped": sizes.teacher_file_bytes if t.with_teacher else 0}
    context = {"CUDA context": CUDA_CONTEXT_BYTES} if on_gpu else {}
    student_name = f"student {label}" + (f" (layers /{shards})" if shards > 1 else "")
    resident = {student_name: student_part, "FSDP all-gather": gather}
    host_student = {f"student {label}": n_params(student) * weight}
    # build_student (its GGUF mapped while it dequantizes), then build_teacher, both on the host.
    phases = {"load student": ({**process, **host_student, "student GGUF mapped": file_bytes(sizes.student_tensors),
                                "dequantizing the largest tensor": int(largest_tensor(student) * 4 * DEQUANTIZE_FP32_COPIES)}, {}),
              "load teacher": ({**process, **host_student, **teacher_reading(sizes), f"teacher {label}": teacher_bytes,
                                "student build leftovers": int(largest_tensor(student) * 4 * DEQUANTIZE_LEFTOVER_FP32_COPIES)}, {})}
    if t.init != "zero" and lora:  # lora_init: per linear W_teacher - W_student and its SVD in float64
        host, gpu = {**later, **host_student, "SVD of one linear (float64)": max(x.n_elements for x in targets) * 8 * 4}, dict(context)
        (gpu if on_gpu else host)[f"teacher {label}"] = teacher_bytes
        if t.init == "eora":  # ... weighted by input statistics from a second teacher, in fp32, beside the first
            if on_gpu:
                host["eora teacher staged"] = n_params(teacher) * 4
            _place(host, gpu, on_gpu, eora_teacher_fp32=n_params(teacher) * 4,
                   covariances=min(COVARIANCE_BUDGET_BYTES, gram_bytes(targets)))
        phases["LoRA init"] = host, gpu
    if cache:  # teacher_cache.build_topk: the teacher over every sample, a (global) batch at a time; slices concatenated
        host, gpu = {**later, "top-k cache x 2": 2 * cache}, dict(context)
        rows = min(t.batch_size * t.seq_len, t.loss_chunk) if t.loss_chunk else t.batch_size * t.seq_len
        _place(host, gpu, on_gpu, **resident, **{f"teacher {label}": teacher_bytes},
               teacher_logits=rows * vocab * (act + 4 * TEACHER_LOGIT_FP32_COPIES))
        phases["top-k cache"] = host, gpu
    host, gpu = {**later, "top-k cache": cache}, dict(context)
    _place(host, gpu, on_gpu, **resident, **{f"teacher {label}": 0 if t.top_k else teacher_bytes},
           **{"LoRA + AdamW": trainable * ADAMW_BYTES_PER_PARAM,
              "activations" + (" (checkpointed)" if t.gradient_checkpointing else ""): activations,
              "student logits" + (f" (chunks of {t.loss_chunk})" if t.loss_chunk else ""): student_logits,
              "teacher logits": teacher_logits, "block-scale weights rebuilt": rebuilt})
    phases["steps"] = host, gpu
    if shards > 1:  # one process per GPU, each building its models on the host
        phases = {name: ({f"{k} x {shards}": v * shards for k, v in host.items()}, gpu) for name, (host, gpu) in phases.items()}
    checkpoint = trainable * CHECKPOINT_BYTES_PER_PARAM
    adapter = lora * (4 + ADAPTER_GGUF_BYTES_PER_PARAM.get(t.adapter_dtype, 2))  # adapter/ (fp32) + adapter.gguf
    return phases, cache + checkpoint + adapter + n_blocks * 36, checkpoint  # + the new checkpoint's temporary file


def train_memory(sizes: ModelSizes, t: TrainPlan, gpus: int) -> tuple[dict, dict, int, int, str]:
    """The peak of `train_phases`: (host parts, GPU parts, written, temporary, a note naming the peak phase)."""
    phases, written, temporary = train_phases(sizes, t, gpus)
    host = max(phases, key=lambda name: sum(phases[name][0].values()))
    gpu = max(phases, key=lambda name: sum(phases[name][1].values()))
    peak = gpu if gpus else host
    tokens = math.ceil(t.batch_size / max(gpus, 1))
    note = f"peak while {peak}; {tokens} x {t.seq_len} tokens per {'GPU' if gpus else 'step'}"
    return phases[host][0], phases[gpu][1], written, temporary, note


def heldout_memory(sizes: ModelSizes, s: PlanSettings, gpus: int) -> tuple[dict, dict]:
    on_gpu = gpus > 0
    host, gpu = {"process": TORCH_PROCESS_BYTES, **teacher_reading(sizes)}, {}
    models = {"student fp32": n_params(sizes.student) * 4, "teacher fp32": n_params(sizes.teacher) * 4}
    if on_gpu:  # each built on the host and moved before the next is built (recovery/heldout.py)
        host["one model staged fp32"] = max(models.values())
        gpu["CUDA context"] = CUDA_CONTEXT_BYTES
    rows = s.heldout_batch * s.heldout_window
    _place(host, gpu, on_gpu, **{k.replace(" ", "_"): v for k, v in models.items()},
           logits=rows * sizes.student.vocab_size * 4 * HELDOUT_LOGIT_FP32_COPIES)
    return host, gpu


def search_memory(sizes: ModelSizes, s: PlanSettings, available: Available) -> tuple[dict, dict, int, int, str]:
    """export.type_search at the larger of its two peaks. The Fisher diagonal (recovery/fisher.py): the teacher in torch
    (fp32), the finished Fisher arrays, and one group of weights with a gradient and a sum each: all weights in one
    group when their gradients fit what is `available`, else as few even groups as fit (a pass over the windows each,
    so the plan needs what fisher.weight_groups would choose on that machine). Then, the teacher gone, one tensor at a
    time through every candidate type (its float32 copy, the round trip and the sensitivity)."""
    from recover_lora.recovery.fisher import weight_groups, window_bytes

    on_gpu = available.gpus > 0
    teacher = n_params(sizes.teacher) * 4
    shapes = [shape for shape in sizes.teacher.arch.hf_tensor_shapes(sizes.teacher).values() if len(shape) == 2]
    gradients = [math.prod(shape) * 4 for shape in shapes]  # each weight's gradient, and its sum as many bytes
    fisher = sum(gradients)
    host = {"process": TORCH_PROCESS_BYTES, **teacher_reading(sizes), "Fisher diagonal (numpy)": fisher}
    held = {"teacher fp32": teacher, "one window's activations and logits": window_bytes(sizes.teacher, s.synth_seq_len)}
    if on_gpu:  # the teacher built on the host, then moved; each group's sums come back to the host as its Fisher
        host["teacher staged"] = teacher
        gpu = {"CUDA context": CUDA_CONTEXT_BYTES, **held}
        room = available.gpu_bytes - sum(gpu.values()) if available.gpu_bytes else None
    else:  # the sums are the Fisher arrays (already counted): a group adds its gradients
        host, gpu = {**host, **held}, {}
        room = 2 * (available.host_bytes - sum(host.values())) if available.host_bytes else None
    groups = weight_groups([2 * g for g in gradients], max(room, 1) if room is not None else 2 * fisher)
    largest = max(sum(gradients[i] for i in group) for group in groups)
    label = "gradients fp32" + (f" (the largest of {len(groups)} groups)" if len(groups) > 1 else "")
    (gpu if on_gpu else host)[label] = largest
    if on_gpu:
        gpu["Fisher sums fp32"] = largest
    note = f"the Fisher in {len(groups)} passes over the windows, a group of weights each" if len(groups) > 1 else ""
    quantizing = {"process": TORCH_PROCESS_BYTES, "teacher source mapped": sizes.teacher_file_bytes,
                  "Fisher diagonal (numpy)": fisher, "tensor being searched": 4 * largest_tensor(sizes.student) * 4}
    host = max(host, quantizing, key=lambda parts: sum(parts.values()))
    return host, gpu, file_bytes(sizes.policy_tensors["w4"]), work_file_bytes(sizes.student), note


def reconstruct_memory(sizes: ModelSizes, s: PlanSettings, gpus: int) -> tuple[dict, dict, int, int, str]:
    """recovery.reconstruct: teacher and student in fp32 on the host (one block of each on a GPU at a time), every window's block input,
    target and output cached on the host (fp32: the teacher's and the student's inputs, the targets, the outputs and the
    tuned outputs), and one block's weights being tuned (the teacher's copy, the offsets, their gradient and the best
    snapshot) with one batch's activations, or, at the end, the output head being tuned with both models' heads and a
    step's logits (each resource at its larger phase); then the file is rewritten (a copy of the base) beside a per-block
    checkpoint."""
    from recover_lora.recovery.reconstruct import DEFAULT_BATCH_SIZE

    on_gpu = gpus > 0
    c, windows = sizes.teacher, min(s.reconstruct_samples, s.synth_samples)
    models = {"student fp32": n_params(sizes.student) * 4, "teacher fp32": n_params(c) * 4}
    activations = windows * s.synth_seq_len * c.hidden_size * 4  # one fp32 [windows, seq, hidden] array
    host = {"process": TORCH_PROCESS_BYTES, **teacher_reading(sizes), **models,
            "block inputs, targets and outputs": 5 * activations,
            # --weighting fisher: every block output's Fisher diagonal, held through the run
            "block output Fisher": c.num_layers * activations if s.reconstruct_weighting == "fisher" else 0}
    block_weights = (n_params(sizes.student) - sizes.student.vocab_size * sizes.student.hidden_size) // max(1, c.num_layers)
    per_token = 8 * c.hidden_size + 4 * c.intermediate_size + 2 * c.num_heads * s.synth_seq_len  # incl. attention scores
    # The models stay on the host; a GPU holds one block of each, the weights being tuned and a batch's activations.
    gpu = {"CUDA context": CUDA_CONTEXT_BYTES, "teacher and student block fp32": 2 * block_weights * 4} if on_gpu else {}
    head_phase = reconstruct_head_phase(sizes, host, models, on_gpu) if s.reconstruct_head else None
    _place(host, gpu, on_gpu, block_being_tuned=5 * block_weights * 4,
           batch_activations=DEFAULT_BATCH_SIZE * s.synth_seq_len * per_token * 4 * 3)
    if head_phase:
        host, gpu = _larger_phase_per_resource((host, gpu), head_phase)
    written = file_bytes(sizes.policy_tensors["w4"])
    return host, gpu, written, written, "a checkpoint of the finished blocks beside the output"


def reconstruct_head_phase(sizes: ModelSizes, blocks_host: dict, models: dict, on_gpu: bool) -> tuple[dict, dict]:
    """reconstruct's last phase (recovery/output_head.py), from `blocks_host`, the blocks' phase's host parts before a
    block's tuning state is placed: the teacher keeps its embedding and head, the student too unless the head is tied
    (its verdict runs every block), their blocks freed; the head is tuned as kl-tune tunes a tensor, on a step's logits
    of both sides."""
    from recover_lora.recovery.output_head import HEAD_STEP_LOGITS

    c = sizes.teacher
    host = {k: v for k, v in blocks_host.items() if k not in models}
    host["teacher embedding and head fp32"] = embedding_params(c) * 4
    host["student fp32" if c.tie_word_embeddings else "student embedding and head fp32"] = (
        models["student fp32"] if c.tie_word_embeddings else embedding_params(sizes.student) * 4)
    gpu = {"CUDA context": CUDA_CONTEXT_BYTES} if on_gpu else {}
    head = sizes.student.vocab_size * sizes.student.hidden_size
    _place(host, gpu, on_gpu, output_head_being_tuned=head * KLTUNE_BYTES_PER_WEIGHT, teacher_and_student_head_fp32=2 * head * 4,
           head_step_logits=HEAD_STEP_LOGITS * 4 * KLTUNE_LOGIT_FP32_COPIES)
    return host, gpu


def _larger_phase_per_resource(*phases: tuple[dict, dict]) -> tuple[dict, dict]:
    """A step's peak of each resource over its phases, each resource's parts from the phase that peaks there: one phase
    may need more host RAM and another more GPU memory, and either can be the one that does not fit."""
    total = lambda parts: sum(parts.values())
    return max((h for h, _ in phases), key=total), max((g for _, g in phases), key=total)


# recovery/kl_tune.py, bytes per weight of a tensor being tuned: the teacher's copy (target), the rounding offset, its
# gradient, the codes and in-range mask autograd keeps, the weight the forward computes, and the best snapshot.
KLTUNE_BYTES_PER_WEIGHT = 4 + 4 + 4 + 4 + 1 + 4 + 4
KLTUNE_LOGIT_FP32_COPIES = 6  # teacher log-probs and their exp, student logits and log-softmax, the KL terms, a gradient


def kltune_memory(sizes: ModelSizes, s: PlanSettings, gpus: int) -> tuple[dict, dict, int, int, str]:
    """recovery.kl_tune: teacher and student in fp32 (built on the host, then both on the device), every quantized weight as
    a QuantizedWeight, and one batch's forward and backward through the whole model (every layer's activations, the
    logits of both models); the checkpoint holds the current and the best offsets in fp32.

    Measured on the default model, 2 CPU cores, batch 8 x 128: 10.5 GiB peak resident; this plan says 13.2 GiB (its
    activations are an upper bound)."""
    if not s.kltune:
        return {"process": TORCH_PROCESS_BYTES}, {}, MiB, 0, "skipped by the preset"
    on_gpu = gpus > 0
    c, student = sizes.teacher, sizes.student
    weights = n_params(student)  # the quantized tensors: all but the norms, a rounding error here
    # With groups, one group's state at a time: a share of the weights, plus at most one tensor past the share's edge.
    largest = max(student.vocab_size, student.intermediate_size) * student.hidden_size
    tuned = weights if s.kltune_groups <= 1 else min(weights, weights // s.kltune_groups + largest)
    models = {"student fp32": n_params(student) * 4, "teacher fp32": n_params(c) * 4}
    host = {"process": TORCH_PROCESS_BYTES, **teacher_reading(sizes)}
    gpu = {"CUDA context": CUDA_CONTEXT_BYTES} if on_gpu else {}
    if on_gpu:
        host.update(models)  # both built on the host before they move
    tokens = s.kltune_batch_size * s.synth_seq_len
    per_token = 8 * c.hidden_size + 4 * c.intermediate_size + 2 * c.num_heads * s.synth_seq_len  # incl. attention scores
    _place(host, gpu, on_gpu, **{k.replace(" ", "_"): v for k, v in models.items()},
           weights_being_tuned=tuned * KLTUNE_BYTES_PER_WEIGHT,
           batch_activations=tokens * c.num_layers * per_token * 4 * 3,
           logits=tokens * student.vocab_size * 4 * KLTUNE_LOGIT_FP32_COPIES)
    host["checkpointed offsets"] = 2 * tuned * 4  # current and best, copied to the host at each snapshot
    written = file_bytes(sizes.policy_tensors["w4"])
    # The checkpoint also holds the finished groups' bytes: at most the file's.
    checkpoint = 2 * tuned * 4 + (written if s.kltune_groups > 1 else 0)
    return host, gpu, written, written + checkpoint, "a checkpoint of the current and best offsets beside the output"


def autoround_memory(sizes: ModelSizes, s: PlanSettings, gpus: int) -> tuple[dict, dict, int, int, str]:
    """export.autoround: the teacher saved as a Hugging Face folder (a temporary copy on disk, fp32 up to the work file's
    limit), loaded back by AutoRound, which caches every calibration window's block input and output (fp32) and tunes
    one block at a time on a copy of its weights; then its GGUF converter holds the quantized model once more."""
    on_gpu = gpus > 0
    teacher = n_params(sizes.teacher) * (4 if work_is_f32(sizes.teacher) else 2)
    block_io = 2 * s.imatrix_samples * s.synth_seq_len * sizes.teacher.hidden_size * 4
    host, gpu = {"process": TORCH_PROCESS_BYTES, **teacher_reading(sizes), "teacher (AutoRound's copy)": teacher,
                 "block inputs and outputs": block_io, "GGUF being written": file_bytes(sizes.policy_tensors["w4"])}, {}
    if on_gpu:
        gpu |= {"CUDA context": CUDA_CONTEXT_BYTES, "block being tuned": 3 * teacher // max(1, sizes.teacher.num_layers),
                "block inputs and outputs": block_io}
        del host["block inputs and outputs"]
    written = len(s.autoround_baselines) * file_bytes(sizes.policy_tensors["w4"])
    return host, gpu, written, teacher, f"{len(s.autoround_baselines)} AutoRound files, a teacher folder on disk while each is made"


def llama_cpp_host(config: ModelConfig, file_size: int, n_ctx: int, all_logits: bool) -> dict:
    """llama.cpp on the CPU: the mapped file, the F16 KV cache, its compute buffer and (eval) the [n_ctx, vocab] scores."""
    parts = {"process": LLAMA_PROCESS_BYTES, "GGUF mapped": file_size,
             "KV cache": n_ctx * kv_elements_per_token(config) * KV_CACHE_BYTES_PER_ELEMENT,
             "compute buffer": LLAMA_N_UBATCH * (config.vocab_size + 3 * config.intermediate_size) * 4}
    if all_logits:
        parts["scores"] = n_ctx * config.vocab_size * 4
    return parts


def eval_memory(sizes: ModelSizes, largest_file: int, gpus: int) -> tuple[dict, dict]:
    on_gpu = gpus > 0
    teacher = {"process": TORCH_PROCESS_BYTES, **teacher_reading(sizes)}
    gpu = {"CUDA context": CUDA_CONTEXT_BYTES} if on_gpu else {}
    if on_gpu:
        teacher["teacher fp32 staged"] = n_params(sizes.teacher) * 4
    _place(teacher, gpu, on_gpu, teacher_fp32=n_params(sizes.teacher) * 4,
           logits=EVAL_TORCH_BATCH * EVAL_REQUEST_TOKENS * sizes.teacher.vocab_size * 4 * EVAL_LOGIT_FP32_COPIES)
    llama = llama_cpp_host(sizes.student, largest_file, LLAMA_EVAL_N_CTX, all_logits=True)
    return max(teacher, llama, key=lambda d: sum(d.values())), gpu


def plan_memory(sizes: ModelSizes, settings: PlanSettings, available: Available) -> MemoryPlan:
    """Each step's peak host RAM, GPU memory (per GPU) and run-folder size (`memory_check` compares them with `available`).

    Example:
        plan = plan_memory(model_sizes(load_model_shape("qwen3-4b")), plan_settings("paper"), Available(gpus=1, gpu_bytes=80 * GiB))
        [(s.step, s.gpu_bytes / GiB) for s in plan.steps]
    """
    gpus = available.gpus
    largest_file = max((file_bytes(ts) for ts in sizes.policy_tensors.values()), default=file_bytes(sizes.student_tensors))

    def export() -> tuple:
        exports = [export_memory(sizes, p, mapped_source=sizes.teacher_file_bytes > 0) for p in settings.policies]
        work = max(tmp for _, _, tmp in exports)
        host, gpu = max((h for h, _, _ in exports), key=lambda d: sum(d.values())), {}
        if settings.gptq_codes:
            gptq_host, gpu = gptq_memory(sizes, settings, gpus)
            host = max(host, gptq_host, key=lambda d: sum(d.values()))
        return (host, gpu, sum(w for _, w, _ in exports), work,
                f"a {work / GiB:.1f} GiB full-precision work file on disk during each export")

    def recover() -> tuple:
        host, gpu, written, tmp, note = train_memory(sizes, settings.recover, gpus)
        # merge_run: every LoRA delta (fp32, one per adapted linear) in RAM, then an export of teacher + deltas
        merge_host, merged, merge_tmp = export_memory(sizes, "gateup", mapped_source=sizes.teacher_file_bytes > 0)
        merge_host["LoRA deltas fp32"] = sum(x.n_elements * 4 for x in lora_targets(sizes, settings.recover.targets))
        if sum(merge_host.values()) > sum(host.values()):
            host = merge_host
        return host, gpu, written + merged, max(tmp, merge_tmp + merged), note + "; then the merge (an export)"

    builders = {
        "synth": lambda: synth_memory(sizes, settings, gpus),
        "imatrix": lambda: imatrix_memory(sizes, settings, gpus),
        "export": export,
        # llama.cpp presets on the model's own widths: an export each, about a w4 file apiece.
        "baselines": lambda: (*export_memory(sizes, "w4", mapped_source=sizes.teacher_file_bytes > 0)[:1], {},
                              len(settings.baseline_presets) * file_bytes(sizes.policy_tensors["w4"]),
                              work_file_bytes(sizes.student)),
        "autoround": lambda: autoround_memory(sizes, settings, gpus),
        "search": lambda: search_memory(sizes, settings, available),
        "reconstruct": lambda: reconstruct_memory(sizes, settings, gpus),
        "kltune": lambda: kltune_memory(sizes, settings, gpus),
        "train": lambda: train_memory(sizes, settings.train, gpus),
        "recover": recover,
        "heldout": lambda: (*heldout_memory(sizes, settings, gpus), MiB),
        "eval": lambda: (*eval_memory(sizes, largest_file, gpus), MiB),
        "bench": lambda: (llama_cpp_host(sizes.student, largest_file, settings.bench_n_ctx, all_logits=False), {}, MiB),
        "report": lambda: ({"process": TORCH_PROCESS_BYTES}, {}, 4 * MiB),
    }
    folder, steps = 0, []
    for step in (s for s in STEPS if s in settings.steps):
        result = builders[step]()
        host, gpu, written, temporary, note = result + (0, "")[len(result) - 3:]
        steps.append(StepMemory(step, _nonzero(host), _nonzero(gpu), folder + written + temporary, note))
        folder += written
    return MemoryPlan(sizes.name, settings, available, tuple(steps))


def _nonzero(parts: dict) -> dict:
    return dict(sorted(((k, int(v)) for k, v in parts.items() if v), key=lambda kv: -kv[1]))
