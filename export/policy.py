"""Per-tensor quantization policies: one pure function from GGUF tensor name to ggml type.

The same function drives the exporter (which types llama.cpp is asked for), the check after
quantizing (which types the file must hold) and the roofline model (bytes per decode token),
so the files and the predictions agree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gguf import GGMLQuantizationType as T

from recover_lora.errors import RecoverLoraError

# The linear layers of a block, by their llama.cpp tensor names (gguf-py's MODEL_TENSOR names).
# attn_qkv is a fused q/k/v projection (Phi-3); Phi-3's ffn_up holds gate and up rows together.
ATTENTION_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output")
MLP_LINEARS = ("ffn_gate", "ffn_up", "ffn_down")
BLOCK_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
# The token embedding and the output projection (the same tensor when embeddings are tied).
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")

_BLOCK_LINEAR_RE = re.compile(r"blk\.(\d+)\.(" + "|".join(BLOCK_LINEARS) + r")\.weight")

# Named recipes: which block linears go to 2 bits; every other block linear is Q4_K.
# "gateup" is the paper's W4/W2-GateUp policy.
POLICY_LOW_BIT_LINEARS: dict[str, tuple[str, ...]] = {
    "w4": (),
    "gateup": ("ffn_gate", "ffn_up"),
    "gate": ("ffn_gate",),
    "up": ("ffn_up",),
    "down": ("ffn_down",),
    "mlp": MLP_LINEARS,
    "w2": BLOCK_LINEARS,
}
HIGH_BITS_TYPE = T.Q4_K
LOW_BITS_TYPE = T.Q2_K
# llama.cpp's K-quant mixes keep the output tensor at Q6_K; we set it (and the token embedding)
# explicitly and identically for every policy, so `w4` and `gateup` differ only in gate/up.
DEFAULT_EMBEDDING_TYPE = T.Q6_K


def parse_ggml_type(name: str) -> T:
    """'q4_k' / 'Q4_K' -> GGMLQuantizationType.Q4_K, with the valid names in the error."""
    try:
        return T[name.strip().upper()]
    except KeyError:
        valid = ", ".join(t.name for t in T)
        raise RecoverLoraError(f"unknown ggml type {name!r}; use one of: {valid}") from None


def is_block_linear(tensor_name: str) -> bool:
    return _BLOCK_LINEAR_RE.fullmatch(tensor_name) is not None


def is_quantizable(tensor_name: str) -> bool:
    """Tensors a policy assigns a type to: block linears, token embedding, output. Norms,
    biases and rope factors stay F32, as llama.cpp keeps every 1-D tensor."""
    return is_block_linear(tensor_name) or tensor_name in EMBEDDING_TENSORS


@dataclass(frozen=True)
class TensorTypeRule:
    """`--tensor-type REGEX=TYPE`: a full-match pattern over GGUF tensor names."""

    pattern: str
    ggml_type: T

    @classmethod
    def parse(cls, spec: str) -> "TensorTypeRule":
        if "=" not in spec:
            raise RecoverLoraError(f"--tensor-type {spec!r} must look like REGEX=TYPE, e.g. 'blk\\.0\\.ffn_down\\.weight=Q6_K'")
        pattern, type_name = spec.rsplit("=", 1)
        try:
            re.compile(pattern)
        except re.error as e:
            raise RecoverLoraError(f"--tensor-type pattern {pattern!r} is not a valid regex: {e}") from None
        return cls(pattern, parse_ggml_type(type_name))

    def matches(self, tensor_name: str) -> bool:
        # Anchored: a rule names whole tensors, never a substring of one.
        return re.fullmatch(self.pattern, tensor_name) is not None


@dataclass(frozen=True)
class Policy:
    """A named recipe plus user rules on top (first matching rule wins).

    Example:
        policy = Policy.named("gateup", rules=[TensorTypeRule.parse(r"blk\\.0\\..*=Q4_K")])
        policy.type_for("blk.3.ffn_gate.weight")  # GGMLQuantizationType.Q2_K
    """

    name: str
    rules: tuple[TensorTypeRule, ...] = ()
    embedding_type: T = DEFAULT_EMBEDDING_TYPE
    # The type of the recipe's low-bit linears: Q2_K, or e.g. IQ2_XS (which needs an importance matrix).
    low_bit_type: T = LOW_BITS_TYPE
    low_bit_linears: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        if self.name not in POLICY_LOW_BIT_LINEARS:
            raise RecoverLoraError(f"unknown policy {self.name!r}; choose one of: {', '.join(POLICY_LOW_BIT_LINEARS)}")
        object.__setattr__(self, "low_bit_linears", POLICY_LOW_BIT_LINEARS[self.name])

    @classmethod
    def named(cls, name: str, rules=(), embedding_type: T = DEFAULT_EMBEDDING_TYPE, low_bit_type: T = LOW_BITS_TYPE) -> "Policy":
        return cls(name=name, rules=tuple(rules), embedding_type=embedding_type, low_bit_type=low_bit_type)

    def type_for(self, tensor_name: str) -> T | None:
        """The ggml type this policy asks for, or None for tensors that stay F32 (norms, biases)."""
        for rule in self.rules:
            if rule.matches(tensor_name):
                return rule.ggml_type
        if tensor_name in EMBEDDING_TENSORS:
            return self.embedding_type
        match = _BLOCK_LINEAR_RE.fullmatch(tensor_name)
        if match is None:
            return None
        return self.low_bit_type if match.group(2) in self.low_bit_linears else HIGH_BITS_TYPE

    def resolve(self, tensor_names: list[str]) -> dict[str, T]:
        """Types for every tensor that gets one; refuses a user rule that matches no tensor."""
        for rule in self.rules:
            if not any(rule.matches(n) for n in tensor_names):
                raise RecoverLoraError(
                    f"--tensor-type pattern {rule.pattern!r} matches no tensor "
                    f"(names look like 'blk.0.ffn_gate.weight'; run `recover-lora inspect` to list them)"
                )
        types = {}
        for name in tensor_names:
            ggml_type = self.type_for(name)
            if ggml_type is not None:
                types[name] = ggml_type
        return types


def policy_names() -> list[str]:
    return list(POLICY_LOW_BIT_LINEARS)


def describe_written_types(policy: Policy, written: dict[str, str]) -> str:
    """Name what a file holds: "policy gateup" only if every tensor a policy types has the type the recipe
    gives it (with the policy's own low-bit and embedding types, named when not the default); otherwise
    "custom types (...)" with counts per written type.

    Example:
        describe_written_types(Policy.named("gateup"), {"blk.0.ffn_gate.weight": "F32", ...})
        # "custom types (15 F32; from policy gateup with --tensor-type/--embedding-type overrides)"
    """
    recipe = Policy.named(policy.name, embedding_type=policy.embedding_type, low_bit_type=policy.low_bit_type)
    typed = {name: type_name for name, type_name in written.items() if is_quantizable(name)}
    if all(recipe.type_for(name).name == type_name for name, type_name in typed.items()):
        options = [f"low-bit {policy.low_bit_type.name}"] if policy.low_bit_type != LOW_BITS_TYPE and policy.low_bit_linears else []
        if policy.embedding_type != DEFAULT_EMBEDDING_TYPE:
            options.append(f"embeddings {policy.embedding_type.name}")
        return f"policy {policy.name}" + (f" ({', '.join(options)})" if options else "")
    counts: dict[str, int] = {}
    for type_name in typed.values():
        counts[type_name] = counts.get(type_name, 0) + 1
    listed = ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return f"custom types ({listed}; from policy {policy.name} with --tensor-type/--embedding-type overrides)"
