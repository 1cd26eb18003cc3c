"""Roofline model of llama.cpp decode and prefill speed: bytes and FLOPs per token, per op group.

Per decode token (one new token, `ctx` tokens already in the KV cache):
- weights group: every weight tensor is read once at its ggml type's real size
  (`gguf.GGML_QUANT_SIZES`: bytes per block of weights), except the token embedding, of which
  only one row is read (a lookup), unless it doubles as the output matrix (tied embeddings);
  plus the LoRA adapter's A and B matrices. FLOPs = 2 x every matmul weight (+ adapter).
- attention group: the whole KV cache is read, n_layers x 2 (K and V) x n_kv_heads x head_dim
  elements per cached token (F16 by default); FLOPs = 4 x n_heads x head_dim x ctx per layer
  (q.K^T and softmax.V, 2 FLOPs per multiply-add).
- time per group = max(bytes / bandwidth, FLOPs / compute); the groups run one after the other.
  The weights group's compute rate is the device's quantized dot-product rate (int8 on CPU and
  CUDA back ends) where the profile has one; attention runs in float.
Prefill is taken as compute-bound: the same FLOPs per token (at that depth) over the same rates.
Left out on purpose: activations, norms' arithmetic, softmax, sampling and kernel-launch
overheads; they are small for 4B-20B models and make the model an upper bound on speed.
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

    def cost(self, tensors: tuple[TensorInfo, ...]) -> tuple[int, int]:
        """(bytes read, matmul weights) per decode token for a base model with these tensors."""
        elements = self.matrix_elements(tensors)
        return tensor_bytes(elements, self.ggml_type), elements


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

    def cost(self, tensors: tuple[TensorInfo, ...]) -> tuple[int, int]:
        lora = [t for t in self.tensors if t.name.endswith((".lora_a", ".lora_b"))]
        return sum(tensor_bytes(t.n_elements, t.ggml_type) for t in lora), sum(t.n_elements for t in lora)


@dataclass(frozen=True)
class OpGroup:
    """Bytes moved and FLOPs done for one token by one group of ops."""

    name: str
    bytes: float
    flops: float

    def seconds(self, bandwidth_bytes_per_s: float, compute_flop_per_s: float) -> float:
        return max(self.bytes / bandwidth_bytes_per_s, self.flops / compute_flop_per_s)

    def bound(self, bandwidth_bytes_per_s: float, compute_flop_per_s: float) -> str:
        return "memory" if self.bytes / bandwidth_bytes_per_s >= self.flops / compute_flop_per_s else "compute"


def kv_bytes_per_token(config: ModelConfig, kv_type: T = T.F16) -> int:
    """KV-cache bytes per cached token: K and V rows of n_kv_heads x head_dim per layer."""
    return config.num_layers * 2 * tensor_bytes(config.num_kv_heads * config.head_dim, kv_type)


def weight_bytes_per_token(tensors: tuple[TensorInfo, ...]) -> int:
    """Weight bytes one decode step reads: all tensors, but one row of an untied token embedding."""
    tied = not any(t.name == OUTPUT for t in tensors)
    total = 0
    for t in tensors:
        if t.name == TOKEN_EMBEDDING and not tied:
            total += tensor_bytes(t.row_length, t.ggml_type)  # get_rows reads one row
        else:
            total += tensor_bytes(t.n_elements, t.ggml_type)
    return total


def matmul_weight_elements(tensors: tuple[TensorInfo, ...]) -> int:
    """Weights that take part in a matrix-vector product (2-D tensors; the embedding only if tied)."""
    tied = not any(t.name == OUTPUT for t in tensors)
    return sum(t.n_elements for t in tensors if len(t.shape) == 2 and (t.name != TOKEN_EMBEDDING or tied))


@dataclass(frozen=True)
class TokenCost:
    """The op groups of one decode token of `policy` at depth `ctx`."""

    policy: str
    ctx: int
    weights: OpGroup
    attention: OpGroup
    config: ModelConfig  # as exported under the policy (padded if it needed padding)

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
    adapter_bytes, adapter_elements = adapter.cost(tensors) if adapter else (0, 0)
    weights = OpGroup(
        "weights",
        bytes=weight_bytes_per_token(tensors) + adapter_bytes,
        flops=2 * (matmul_weight_elements(tensors) + adapter_elements),
    )
    attention = OpGroup(
        "attention",
        bytes=kv_bytes_per_token(config, kv_type) * ctx,
        flops=4 * config.num_heads * config.head_dim * ctx * config.num_layers,
    )
    name = policy if isinstance(policy, str) else policy.name
    return TokenCost(policy=name, ctx=ctx, weights=weights, attention=attention, config=config)


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
    decode_bound: str  # which limit set each group: "weights:memory, attention:memory"
    prefill_tokens_per_s: float
    ratio_to_w4: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def estimate(cost: TokenCost, profile: DeviceProfile, adapter_included: bool = False) -> Estimate:
    """Decode tokens/s = 1 / sum over groups of max(bytes/bandwidth, FLOPs/compute); prefill compute-bound."""
    bandwidth = profile.bandwidth_bytes_per_s
    rates = {"weights": profile.quantized_compute_flop_per_s, "attention": profile.compute_flop_per_s}
    groups = (cost.weights, cost.attention)
    seconds = sum(g.seconds(bandwidth, rates[g.name]) for g in groups)
    prefill_seconds = sum(g.flops / rates[g.name] for g in groups)
    return Estimate(
        policy=cost.policy,
        ctx=cost.ctx,
        weight_bytes_per_token=cost.weights.bytes,
        kv_bytes_per_token=cost.attention.bytes,
        adapter_included=adapter_included,
        flops_per_token=cost.flops,
        decode_tokens_per_s=1.0 / seconds,
        decode_bound=", ".join(f"{g.name}:{g.bound(bandwidth, rates[g.name])}" for g in groups),
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
