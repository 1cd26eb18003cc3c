"""What commands say matches what happened: the export summary line, and no git noise outside a checkout."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as T

from recover_lora.cli import main
from recover_lora.export.policy import Policy, TensorTypeRule, describe_written_types

from conftest import STORIES_DIR

BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
NAMES = ["token_embd.weight", "output_norm.weight"] + [f"blk.{i}.{kind}.weight" for i in range(2) for kind in BLOCK_TENSORS]


def written_by(policy: Policy) -> dict[str, str]:
    """Every tensor's written type name as the policy asks for it (norms stay F32)."""
    return {name: (policy.type_for(name).name if policy.type_for(name) else "F32") for name in NAMES}


@pytest.mark.parametrize("name", ["w4", "gateup", "mlp"])
def test_a_file_with_the_recipes_types_is_named_by_its_policy(name):
    assert describe_written_types(Policy.named(name), written_by(Policy.named(name))) == f"policy {name}"


def test_the_policys_own_options_are_named():
    policy = Policy.named("gateup", embedding_type=T.Q8_0, low_bit_type=T.IQ2_XS)
    assert describe_written_types(policy, written_by(policy)) == "policy gateup (low-bit IQ2_XS, embeddings Q8_0)"
    # A rule that changes nothing the recipe gives is no custom type.
    same = Policy.named("gateup", rules=[TensorTypeRule.parse(r"blk\.0\.ffn_down\.weight=Q4_K")])
    assert describe_written_types(same, written_by(same)) == "policy gateup"


def test_a_file_with_other_types_says_custom_with_counts():
    all_f32 = {name: "F32" for name in NAMES}
    assert describe_written_types(Policy.named("gateup", embedding_type=T.F32), all_f32) == (
        "custom types (15 F32; from policy gateup with --tensor-type/--embedding-type overrides)"
    )
    one_changed = written_by(Policy.named("gateup")) | {"blk.0.ffn_down.weight": "Q6_K"}
    assert describe_written_types(Policy.named("gateup"), one_changed).startswith("custom types (9 Q4_K, 4 Q2_K, 2 Q6_K;")


def test_export_all_f32_does_not_claim_the_gateup_policy(tmp_path, capsys):
    out = tmp_path / "f32.gguf"
    with pytest.raises(SystemExit) as info:
        main(["export", str(STORIES_DIR), "-o", str(out), "--tensor-type", ".*=F32", "--embedding-type", "F32", "--threads", "2"])
    assert info.value.code in (0, None)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("custom types (") and " F32; from policy gateup" in last and "policy gateup:" not in last
    assert last.endswith(f": wrote {out}")


def test_git_hash_outside_a_checkout_is_unknown_and_silent(tmp_path, monkeypatch, capfd):
    from recover_lora.runtime.evaluate import quiet_git_hash

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # never find a checkout above tmp_path
    assert quiet_git_hash() == "unknown"
    assert capfd.readouterr().err == ""
