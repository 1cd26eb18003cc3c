"""Roofline model of llama.cpp decode and prefill speed: bytes and FLOPs per token, per op group.

Per decode token (one new token, `ctx` tokens already in the KV cache):
- weights group: every weight tensor is read once at its ggml type's real size
  (`gguf.GGML_QUANT_SIZES`: bytes per block of weights), except the token embedding, of which
  only one row is read (a lookup), unless it doubles as the output matrix (tied embeddings);
  plus the LoRA adapter's A and B matrices. FLOPs = 2 x every matmul weight (+ adapter).
  The group is kept per ggml type (`TokenCost.weight_parts`), because the cost of a weight in
  llama.cpp's matrix-vector kernels depends on its type, not only on its bytes: on a CPU, a
  Q2_K weight can take as long to unpack and multiply as a Q4_K one, so fewer bytes need not
  mean a faster token.
- attention group: the whole KV cache is read, n_layers x 2 (K and V) x n_kv_heads x head_dim
  elements per cached token (F16 by default); FLOPs = 4 x n_heads x head_dim x ctx per layer
  (q.K^T and softmax.V, 2 FLOPs per multiply-add).
- time per group = max(bytes / bandwidth, compute time); the groups run one after the other.
  Compute time of a weight part whose type has a measured matrix-vector rate in the profile
  (`matvec_weights_per_s`, from `devices probe`) is matmul weights / that rate, and the part is
  its own group. The other weight parts stay together as one "weights" group whose compute time
  is FLOPs / the quantized dot-product rate (int8 on CPU and CUDA back ends) where the profile
  has one, else the float peak; so a profile without per-type rates gives exactly the one-group
  model. The attention group's compute time is its FLOPs / llama.cpp's measured decode attention
  rate where the profile has one (`attention_compute_TFLOP_per_s`, from `devices probe`: on a
  small CPU its per-head F16 dot products and softmax take several times the KV bytes' memory
  time), else FLOPs / the float peak; a profile without it gives exactly the older numbers.
Prefill is taken as compute-bound: the same FLOPs per token (at that depth) over the FLOP rates
(the per-type and attention rates are single-token decode rates, which do not describe batched
prompt processing).
Left out on purpose: activations, norms' arithmetic, softmax (a measured attention rate includes
it), sampling and kernel-launch overheads; they are small for 4B-20B models and make the model
an upper bound on speed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import gguf
from gguf import GGMLQuantizationType as T

from recover_lora.devices.profiles import DeviceProfile
from recover_lora.devices.shapes import FILE_POLICY, ModelShape, TensorInfo, padded_shape, tensors_for_policy
from recover_lora.errors import RecoverLoraError
from recover_lora.export.model import ModelConfig
from recover_lora.export.policy import BLOCK_LINEARS, Policy

TOKEN_EMBEDDING = "token_embd.weight"
OUTPUT = "output.weight"
# Per-type rates are measured on a file streamed from DRAM (devices/matvec.py), so the rate of a
# type whose probe ran at (nearly) full bandwidth only reproduces its memory time. Such a part is
# labelled compute-bound only when its compute time exceeds its memory time by more than this.
RATED_COMPUTE_MARGIN = 1.1


def tensor_bytes(n_elements: int, ggml_type: T) -> int:
    """Bytes of `n_elements` weights stored as `ggml_type` (whole blocks, as in ggml-common.h)."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
    if n_elements % block:
        raise RecoverLoraError(f"{n_elements} weights do not fill whole {ggml_type.name} blocks of {block}")
    return n_elements // block * block_bytes


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter of rank `rank` on the given block linears (llama.cpp names), stored as `ggml_type`."""

    rank: int
    modules: tuple[str, ...] = ("ffn_gate", "ffn_up")
    ggml_type: T = T.F16

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise RecoverLoraError(f"adapter rank {self.rank} must be positive")
        unknown = [m for m in self.modules if m not in BLOCK_LINEARS]
        if unknown or not self.modules:
            raise RecoverLoraError(f"adapter modules {unknown or '(none)'} invalid; choose from: {', '.join(BLOCK_LINEARS)}")
        if self.ggml_type not in (T.F16, T.F32, T.BF16):
            raise RecoverLoraError(f"adapter type {self.ggml_type.name} must be F16, BF16 or F32 (llama.cpp LoRA)")

    def matrix_elements(self, tensors: tuple[TensorInfo, ...]) -> int:
        """r x (in + out) per adapted linear: lora_a is (r, in), lora_b is (out, r)."""
        total = 0
        for t in tensors:
            parts = t.name.split(".")
            if parts[0] == "blk" and parts[2] in self.modules and parts[-1] == "weight":
                out_features, in_features = t.shape
                total += self.rank * (in_features + out_features)
        return total

    def cost_by_type(self, tensors: tuple[TensorInfo, ...]) -> dict[T, tuple[int, int]]:
        """{ggml type: (bytes read, matmul weights)} per decode token for a base model with these tensors."""
        elements = self.matrix_elements(tensors)
        return {self.ggml_type: (tensor_bytes(elements, self.ggml_type), elements)}


@dataclass(frozen=True)
class AdapterFile:
    """A real llama.cpp LoRA adapter GGUF: every lora_a/lora_b tensor is read once per token."""

    path: str
    tensors: tuple[TensorInfo, ...]

    @classmethod
    def read(cls, path) -> "AdapterFile":
        from recover_lora.export.gguf_io import field_value, open_gguf

        reader = open_gguf(path)
        if field_value(reader, gguf.Keys.General.TYPE) != "adapter":
            raise RecoverLoraError(f"{path} is not a LoRA adapter GGUF (general.type is not 'adapter')")
        tensors = tuple(
            TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), T(int(t.tensor_type))) for t in reader.tensors
        )
        return cls(str(path), tensors)

    def cost_by_type(self, tensors: tuple[TensorInfo, ...]) -> dict[T, tuple[int, int]]:
        """{ggml type: (bytes read, matmul weights)} of the lora_a/lora_b matrices."""
        by_type: dict[T, tuple[int, int]] = {}
        for t in self.tensors:
            if t.name.endswith((".lora_a", ".lora_b")):
                n_bytes, n_weights = by_type.get(t.ggml_type, (0, 0))
                by_type[t.ggml_type] = (n_bytes + tensor_bytes(t.n_elements, t.ggml_type), n_weights + t.n_elements)
        return by_type


@dataclass(frozen=True)
class OpGroup:
    """Bytes moved and FLOPs done for one token by one group of ops (for a weight part, stored as `ggml_type`)."""

    name: str
    bytes: float
    flops: float
    ggml_type: T | None = None

    @property
    def matvec_weights(self) -> float:
        """Weights in matrix-vector products: one multiply-add, 2 FLOPs, each."""
        return self.flops / 2


def kv_bytes_per_token(config: ModelConfig, kv_type: T = T.F16) -> int:
    """KV-cache bytes per cached token: K and V rows of n_kv_heads x head_dim per layer."""
    return config.num_layers * 2 * tensor_bytes(config.num_kv_heads * config.head_dim, kv_type)


def _is_tied(tensors: tuple[TensorInfo, ...]) -> bool:
    return not any(t.name == OUTPUT for t in tensors)


def _read_elements(t: TensorInfo, tied: bool) -> int:
    """Weights of `t` one decode step reads: all, but one row of an untied token embedding (get_rows)."""
    return t.row_length if t.name == TOKEN_EMBEDDING and not tied else t.n_elements


def _matvec_elements(t: TensorInfo, tied: bool) -> int:
    """Weights of `t` in a matrix-vector product: 2-D tensors, the token embedding only if tied."""
    return t.n_elements if len(t.shape) == 2 and (t.name != TOKEN_EMBEDDING or tied) else 0


def matmul_weight_elements(tensors: tuple[TensorInfo, ...]) -> int:
    """Weights that take part in a matrix-vector product (2-D tensors; the embedding only if tied)."""
    tied = _is_tied(tensors)
    return sum(_matvec_elements(t, tied) for t in tensors)


def weight_parts(tensors: tuple[TensorInfo, ...], adapter: AdapterSpec | AdapterFile | None = None) -> tuple[OpGroup, ...]:
    """The weights group split by ggml type: bytes read and matmul weights of each type per decode
    token (the adapter's matrices under their own type). The parts add up to the group's totals.

    Example:
        [(p.name, p.matvec_weights) for p in weight_parts(tensors_for_policy(shape, "gateup"))]
    """
    tied = _is_tied(tensors)
    counts: dict[T, list[int]] = {}  # type -> [bytes, FLOPs]
    for t in tensors:
        count = counts.setdefault(t.ggml_type, [0, 0])
        count[0] += tensor_bytes(_read_elements(t, tied), t.ggml_type)
        count[1] += 2 * _matvec_elements(t, tied)
    for ggml_type, (n_bytes, n_weights) in (adapter.cost_by_type(tensors) if adapter else {}).items():
        count = counts.setdefault(ggml_type, [0, 0])
        count[0] += n_bytes
        count[1] += 2 * n_weights
    return tuple(OpGroup(f"weights {t.name}", *counts[t], t) for t in sorted(counts))


def _merged(name: str, parts: tuple[OpGroup, ...] | list[OpGroup]) -> OpGroup:
    return OpGroup(name, sum(p.bytes for p in parts), sum(p.flops for p in parts))


@dataclass(frozen=True)
class TokenCost:
    """The op groups of one decode token of `policy` at depth `ctx`."""

    policy: str
    ctx: int
    weight_parts: tuple[OpGroup, ...]  # the weights group, one part per ggml type
    attention: OpGroup
    config: ModelConfig  # as exported under the policy (padded if it needed padding)

    @property
    def weights(self) -> OpGroup:
        """All weight parts as one group."""
        return _merged("weights", self.weight_parts)

    @property
    def bytes(self) -> float:
        return self.weights.bytes + self.attention.bytes

    @property
    def flops(self) -> float:
        return self.weights.flops + self.attention.flops


def token_cost(
    shape: ModelShape,
    policy: Policy | str,
    ctx: int,
    adapter: AdapterSpec | AdapterFile | None = None,
    kv_type: T = T.F16,
) -> TokenCost:
    """Bytes and FLOPs of one decode token. Example: token_cost(load_model_shape("qwen3-4b"), "w4", 4096)."""
    if ctx < 0:
        raise RecoverLoraError(f"context {ctx} must be >= 0")
    if isinstance(policy, str) and policy != FILE_POLICY:
        policy = Policy.named(policy)
    tensors = tensors_for_policy(shape, policy)
    config = shape.config if policy == FILE_POLICY else padded_shape(shape, policy).config
    attention = OpGroup(
        "attention",
        bytes=kv_bytes_per_token(config, kv_type) * ctx,
        flops=4 * config.num_heads * config.head_dim * ctx * config.num_layers,
    )
    name = policy if isinstance(policy, str) else policy.name
    return TokenCost(policy=name, ctx=ctx, weight_parts=weight_parts(tensors, adapter), attention=attention, config=config)


@dataclass(frozen=True)
class Estimate:
    """Predicted speed of one policy at one context depth on one device."""

    policy: str
    ctx: int
    weight_bytes_per_token: float
    kv_bytes_per_token: float
    adapter_included: bool
    flops_per_token: float
    decode_tokens_per_s: float
    decode_bound: str  # which limit set each group: "weights:memory, attention:memory", per type with rates ("weights Q2_K:compute, ...")
    prefill_tokens_per_s: float
    ratio_to_w4: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GroupTime:
    """One op group's memory and compute seconds for one decode token on one device."""

    name: str
    memory_s: float
    compute_s: float
    compute_margin: float = 1.0  # compute_s must exceed memory_s by this factor to be the label

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s)

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s > self.memory_s * self.compute_margin else "memory"


def decode_times(cost: TokenCost, profile: DeviceProfile) -> list[GroupTime]:
    """Memory and compute seconds of each op group of one decode token on `profile`.

    A weight part whose type has a matrix-vector rate in the profile is its own group, with compute
    seconds = matmul weights / rate. The other weight parts form one group checked against the
    quantized FLOP rate, named "weights" when no part has a rate (the one-group model, unchanged).
    The attention group's compute seconds are its FLOPs / the profile's attention rate (the
    measured llama.cpp rate where probed, else the float peak, as before).
    """
    bandwidth, rates = profile.bandwidth_bytes_per_s, profile.matvec_weights_per_s
    rated = [p for p in cost.weight_parts if p.ggml_type in rates]
    rest = [p for p in cost.weight_parts if p.ggml_type not in rates]
    times = [GroupTime(p.name, p.bytes / bandwidth, p.matvec_weights / rates[p.ggml_type], RATED_COMPUTE_MARGIN) for p in rated]
    if rest:
        weights = _merged("weights " + "+".join(p.ggml_type.name for p in rest) if rated else "weights", rest)
        times.append(GroupTime(weights.name, weights.bytes / bandwidth, weights.flops / profile.quantized_compute_flop_per_s))
    times.append(GroupTime("attention", cost.attention.bytes / bandwidth, cost.attention.flops / profile.attention_flop_per_s))
    return times


def estimate(cost: TokenCost, profile: DeviceProfile, adapter_included: bool = False) -> Estimate:
    """Decode tokens/s = 1 / sum over groups of max(memory seconds, compute seconds) (`decode_times`);
    prefill compute-bound: FLOPs over the quantized rate (weights) and the float rate (attention)."""
    times = decode_times(cost, profile)
    seconds = sum(t.seconds for t in times)
    prefill_seconds = cost.weights.flops / profile.quantized_compute_flop_per_s + cost.attention.flops / profile.compute_flop_per_s
    return Estimate(
        policy=cost.policy,
        ctx=cost.ctx,
        weight_bytes_per_token=cost.weights.bytes,
        kv_bytes_per_token=cost.attention.bytes,
        adapter_included=adapter_included,
        flops_per_token=cost.flops,
        decode_tokens_per_s=1.0 / seconds,
        decode_bound=", ".join(f"{t.name}:{t.bound}" for t in times),
        prefill_tokens_per_s=1.0 / prefill_seconds,
    )


def roofline_table(
    shape: ModelShape,
    profile: DeviceProfile,
    policies: list[Policy | str],
    contexts: list[int],
    adapter: AdapterSpec | AdapterFile | None = None,
    kv_type: T = T.F16,
    baseline: str = "w4",
) -> list[Estimate]:
    """Estimates for every (context, policy), each with its decode ratio to `baseline` (always computed).

    Example:
        rows = roofline_table(load_model_shape("qwen3-4b"), get_profile("m2"), ["w4", "gateup"], [0, 4096])
        rows[1].ratio_to_w4   # ~1.21: GateUp decodes ~21 % faster at ctx 0
    """
    rows = []
    for ctx in contexts:
        base = estimate(token_cost(shape, baseline, ctx, adapter, kv_type), profile, adapter is not None)
        for policy in policies:
            row = estimate(token_cost(shape, policy, ctx, adapter, kv_type), profile, adapter is not None)
            rows.append(replace(row, ratio_to_w4=row.decode_tokens_per_s / base.decode_tokens_per_s))
    return rows
