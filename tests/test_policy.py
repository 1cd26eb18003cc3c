import pytest
from gguf import GGMLQuantizationType as T

from recover_lora.errors import RecoverLoraError
from recover_lora.export.policy import Policy, TensorTypeRule, parse_ggml_type, policy_names

LINEARS = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
NAMES = [f"blk.{i}.{k}.weight" for i in range(3) for k in LINEARS] + ["token_embd.weight", "output.weight"]


@pytest.mark.parametrize(
    "policy, low_bit",
    [
        ("w4", set()),
        ("gateup", {"ffn_gate", "ffn_up"}),
        ("gate", {"ffn_gate"}),
        ("up", {"ffn_up"}),
        ("down", {"ffn_down"}),
        ("mlp", {"ffn_gate", "ffn_up", "ffn_down"}),
        ("w2", set(LINEARS)),
    ],
)
def test_named_policies_type_every_linear(policy, low_bit):
    types = Policy.named(policy).resolve(NAMES)
    assert set(types) == set(NAMES)
    for name, ggml_type in types.items():
        kind = name.split(".")[2] if name.startswith("blk") else None
        if kind is None:
            assert ggml_type == T.Q6_K  # embeddings: identical across policies
        else:
            assert ggml_type == (T.Q2_K if kind in low_bit else T.Q4_K), name


def test_w4_and_gateup_differ_only_in_gate_and_up():
    w4, gateup = Policy.named("w4").resolve(NAMES), Policy.named("gateup").resolve(NAMES)
    differing = {n for n in NAMES if w4[n] != gateup[n]}
    assert differing == {n for n in NAMES if ".ffn_gate." in n or ".ffn_up." in n}


def test_norms_and_biases_stay_full_precision():
    policy = Policy.named("w2")
    for name in ["blk.0.attn_norm.weight", "output_norm.weight", "blk.0.attn_q.bias", "rope_freqs.weight"]:
        assert policy.type_for(name) is None


def test_user_rules_win_and_are_anchored():
    rule = TensorTypeRule.parse(r"blk\.1\.ffn_(gate|up)\.weight=q8_0")
    policy = Policy.named("gateup", rules=[rule])
    assert policy.type_for("blk.1.ffn_gate.weight") == T.Q8_0
    assert policy.type_for("blk.0.ffn_gate.weight") == T.Q2_K
    assert policy.type_for("blk.11.ffn_gate.weight") == T.Q2_K  # anchored: blk.1 is not blk.11
    assert not TensorTypeRule.parse("ffn_gate=Q8_0").matches("blk.0.ffn_gate.weight")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("blk.0.ffn_gate.weight", "REGEX=TYPE"),
        ("blk.0.ffn_gate.weight=Q9_K", "unknown ggml type"),
        ("blk.(0.weight=Q4_K", "not a valid regex"),
    ],
)
def test_bad_rules_are_refused(spec, message):
    with pytest.raises(RecoverLoraError, match=message):
        TensorTypeRule.parse(spec)


def test_rule_that_matches_nothing_is_refused():
    policy = Policy.named("w4", rules=[TensorTypeRule.parse(r"blk\.99\..*=Q8_0")])
    with pytest.raises(RecoverLoraError, match="matches no tensor"):
        policy.resolve(NAMES)


def test_unknown_policy_lists_choices():
    with pytest.raises(RecoverLoraError, match="gateup"):
        Policy.named("w3")
    assert "gateup" in policy_names()
    assert parse_ggml_type("q2_k") == T.Q2_K
