"""Synthetic data: the LLM-QAT recipe, determinism, resume, EOS masking, the on-disk format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recover_lora.errors import RecoverLoraError
from recover_lora.recovery.samples import SyntheticSamples, load_samples, train_holdout_split
from recover_lora.recovery.synth import duplicate_rate, generate_synthetic, shard_seed
from recover_lora.recovery.synth_tokenizer import CHAT_PROMPTS, TokenizerInfo

torch.set_num_threads(1)
VOCAB = 100
EXCLUDED = (0, 1, 2, 3)
TOKENS = TokenizerInfo(
    name="tiny", vocab_size=VOCAB, eos_ids=(2,), excluded_ids=EXCLUDED, decode=lambda ids: " ".join(map(str, ids))
)
# Ten EOS ids make about one step in ten end a sample, so early ends are certain in a short test.
MANY_EOS = TokenizerInfo(name="tiny-many-eos", vocab_size=VOCAB, eos_ids=(2, *range(10, 19)), excluded_ids=EXCLUDED)
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def teacher():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2,  # peaked logits: clear argmaxes
    )
    return LlamaForCausalLM(config).eval()


def make(teacher, out, tokenizer=TOKENS, **kwargs):
    settings = dict(n_samples=10, seq_len=16, batch_size=4, progress=False) | kwargs
    return generate_synthetic(teacher, out, tokenizer, **settings)


def test_output_files_shapes_and_manifest(teacher, tmp_path):
    manifest = make(teacher, tmp_path / "s")
    raw = load_file(str(tmp_path / "s" / "samples.safetensors"))
    assert raw["input_ids"].dtype == torch.int32 and raw["input_ids"].shape == (10, 16)
    assert raw["loss_mask"].dtype == torch.uint8 and raw["loss_mask"].shape == (10, 16)
    samples = load_samples(tmp_path / "s")
    assert samples.input_ids.dtype == torch.long and samples.loss_mask.dtype == torch.bool
    assert torch.equal(samples.input_ids, raw["input_ids"].long())
    assert samples.manifest == manifest == json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["counts"] == {
        "n_samples": 10, "seq_len": 16, "n_shards": 3, "n_tokens": 160,
        "n_loss_tokens": int(samples.loss_mask.sum()), "loss_token_fraction": float(samples.loss_mask.sum()) / 160,
    }
    assert manifest["settings"] == {
        "n_samples": 10, "seq_len": 16, "seed": 0, "batch_size": 4, "first_token": "random",
        "greedy_tokens": 3, "temperature": 1.0, "top_p": 0.95, "eos": "mask",
    }
    assert manifest["teacher"]["name"] == "LlamaForCausalLM" and len(manifest["teacher"]["state_dict_sha256"]) == 64
    assert manifest["tokenizer"]["eos_ids"] == [2] and manifest["tokenizer"]["vocab_size"] == VOCAB
    assert manifest["early_eos"]["count"] == int((~samples.loss_mask[:, -1]).sum())
    assert 0.0 <= manifest["duplicate_rate"] <= 1.0
    assert manifest["timing"]["generation_seconds"] > 0 and manifest["timing"]["device"] == "cpu"
    preview = [json.loads(line) for line in (tmp_path / "s" / "preview.jsonl").read_text().splitlines()]
    assert len(preview) == 10 and preview[0]["text"].split()[0] == str(int(samples.input_ids[0, 0]))
    assert not (tmp_path / "s" / ".partial").exists()


def test_first_token_random_then_greedy_then_sampled(teacher, tmp_path):
    make(teacher, tmp_path / "s", n_samples=48, batch_size=16, eos="suppress")
    ids = load_samples(tmp_path / "s").input_ids
    first = ids[:, 0]
    assert not torch.isin(first, torch.tensor(EXCLUDED)).any() and int(first.max()) < VOCAB
    assert len(set(first.tolist())) > 20  # uniform over 96 ids: 48 draws hit many
    with torch.no_grad():
        argmax = teacher(ids).logits.argmax(-1)  # argmax[:, t] predicts token t + 1
    assert torch.equal(ids[:, 1:4], argmax[:, 0:3])  # the three greedy tokens
    assert not torch.equal(ids[:, 4:], argmax[:, 3:-1])  # then sampled, not greedy


def test_bos_is_prepended_and_not_trained(teacher, tmp_path):
    with_bos = TokenizerInfo(name="tiny-bos", vocab_size=VOCAB, eos_ids=(2,), excluded_ids=EXCLUDED, bos_id=1)
    make(teacher, tmp_path / "s", tokenizer=with_bos, eos="suppress")
    samples = load_samples(tmp_path / "s")
    assert (samples.input_ids[:, 0] == 1).all() and not torch.isin(samples.input_ids[:, 1], torch.tensor(EXCLUDED)).any()
    assert not samples.loss_mask[:, 0].any() and samples.loss_mask[:, 1:].all()


def test_same_seed_same_samples(teacher, tmp_path):
    make(teacher, tmp_path / "a", seed=3)
    make(teacher, tmp_path / "b", seed=3)
    make(teacher, tmp_path / "c", seed=4)
    a, b, c = (load_samples(tmp_path / name) for name in "abc")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    assert not torch.equal(a.input_ids, c.input_ids)
    assert shard_seed(3, 0) != shard_seed(3, 1) != shard_seed(4, 1)


class Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted(teacher, tmp_path):
    make(teacher, tmp_path / "whole", tokenizer=MANY_EOS)
    written = []

    def kill_after_shard_1(shard):
        written.append(shard)
        if shard == 1:
            raise Killed

    with pytest.raises(Killed):
        make(teacher, tmp_path / "killed", tokenizer=MANY_EOS, on_shard_written=kill_after_shard_1)
    assert not (tmp_path / "killed" / "manifest.json").exists()
    with pytest.raises(RecoverLoraError, match="--resume"):
        make(teacher, tmp_path / "killed", tokenizer=MANY_EOS)
    with pytest.raises(RecoverLoraError, match="settings"):
        make(teacher, tmp_path / "killed", tokenizer=MANY_EOS, top_p=0.9, resume=True)
    make(teacher, tmp_path / "killed", tokenizer=MANY_EOS, resume=True, on_shard_written=written.append)
    assert written == [0, 1, 2]  # shards 0 and 1 were not made again
    whole, resumed = load_samples(tmp_path / "whole"), load_samples(tmp_path / "killed")
    assert torch.equal(whole.input_ids, resumed.input_ids) and torch.equal(whole.loss_mask, resumed.loss_mask)
    assert whole.manifest["early_eos"] == resumed.manifest["early_eos"]


def test_mask_is_zero_from_the_first_eos(teacher, tmp_path):
    manifest = make(teacher, tmp_path / "s", tokenizer=MANY_EOS, n_samples=16, seq_len=32)
    samples = load_samples(tmp_path / "s")
    eos = torch.tensor(MANY_EOS.eos_ids)
    ended = 0
    for ids, mask in zip(samples.input_ids, samples.loss_mask):
        hits = torch.isin(ids[1:], eos).nonzero()
        end = 1 + int(hits[0]) if len(hits) else 32  # index of the first EOS after the random start
        assert mask[:end].all() and not mask[end:].any()
        assert (ids[end + 1 :] == 2).all()  # padding after the EOS
        ended += end < 32
    assert ended > 0 and manifest["early_eos"]["count"] == ended


def test_suppress_never_samples_eos(teacher, tmp_path):
    manifest = make(teacher, tmp_path / "s", tokenizer=MANY_EOS, n_samples=16, seq_len=32, eos="suppress")
    samples = load_samples(tmp_path / "s")
    assert not torch.isin(samples.input_ids[:, 1:], torch.tensor(MANY_EOS.eos_ids)).any()
    assert samples.loss_mask.all() and manifest["early_eos"]["count"] == 0


def test_chat_prompts_of_different_lengths(teacher, tmp_path):
    prompts = ((5, 6, 7), (8, 9, 20, 21, 22, 23), (24, 25))
    chat = TokenizerInfo(name="tiny-chat", vocab_size=VOCAB, eos_ids=(2,), excluded_ids=EXCLUDED, chat_prompts=prompts)
    manifest = make(teacher, tmp_path / "s", tokenizer=chat, n_samples=12, first_token="chat", eos="suppress")
    samples = load_samples(tmp_path / "s")
    seen = set()
    for ids, mask in zip(samples.input_ids, samples.loss_mask):
        prompt = next(p for p in prompts if tuple(ids[: len(p)].tolist()) == p)
        seen.add(prompt)
        n = len(prompt)
        assert not mask[: n - 1].any() and mask[n - 1 :].all()
        with torch.no_grad():  # unpadded forward: left padding during generation must not change the argmax
            argmax = teacher(ids[None]).logits[0].argmax(-1)
        assert torch.equal(ids[n : n + 3], argmax[n - 1 : n + 2])
    assert len(seen) == 3 and manifest["tokenizer"]["n_chat_prompts"] == 3


def test_chat_mode_needs_prompts(teacher, tmp_path):
    with pytest.raises(RecoverLoraError, match="chat template"):
        make(teacher, tmp_path / "s", first_token="chat")


def test_existing_output_needs_force(teacher, tmp_path):
    make(teacher, tmp_path / "s", seed=0)
    with pytest.raises(RecoverLoraError, match="--force"):
        make(teacher, tmp_path / "s", seed=1)
    assert make(teacher, tmp_path / "s", seed=0, resume=True)["settings"]["seed"] == 0  # finished: nothing to do
    make(teacher, tmp_path / "s", seed=1, force=True)
    assert load_samples(tmp_path / "s").manifest["settings"]["seed"] == 1


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(first_token="prompt"), "first token mode"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(eos="keep"), "eos policy"),
        (dict(n_samples=0), "n_samples"),
        (dict(seq_len=1), "seq_len"),
    ],
)
def test_bad_settings_are_refused(teacher, tmp_path, bad, message):
    with pytest.raises(RecoverLoraError, match=message):
        make(teacher, tmp_path / "s", **bad)
    assert not (tmp_path / "s").exists()


def test_load_samples_errors(teacher, tmp_path):
    with pytest.raises(RecoverLoraError, match="manifest.json is missing"):
        load_samples(tmp_path / "nothing")
    make(teacher, tmp_path / "s")
    samples_file = tmp_path / "s" / "samples.safetensors"
    good = samples_file.read_bytes()
    samples_file.write_bytes(good[: len(good) // 2])
    with pytest.raises(RecoverLoraError, match="corrupt"):
        load_samples(tmp_path / "s")
    samples_file.unlink()
    with pytest.raises(RecoverLoraError, match="samples.safetensors is missing"):
        load_samples(tmp_path / "s")
    samples_file.write_bytes(good)
    manifest_file = tmp_path / "s" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["counts"]["n_samples"] = 11
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(RecoverLoraError, match="different runs"):
        load_samples(tmp_path / "s")
    manifest_file.write_text("{not json")
    with pytest.raises(RecoverLoraError, match="not valid JSON"):
        load_samples(tmp_path / "s")


def test_train_holdout_split_is_seeded_and_disjoint():
    ids = torch.arange(40).reshape(20, 2)
    samples = SyntheticSamples(ids, torch.ones_like(ids, dtype=torch.bool), {})
    train, holdout = train_holdout_split(samples, 0.25, seed=1)
    again, _ = train_holdout_split(samples, 0.25, seed=1)
    other, _ = train_holdout_split(samples, 0.25, seed=2)
    assert len(train) == 15 and len(holdout) == 5
    assert sorted(train.input_ids[:, 0].tolist() + holdout.input_ids[:, 0].tolist()) == list(range(0, 40, 2))
    assert torch.equal(train.input_ids, again.input_ids) and not torch.equal(train.input_ids, other.input_ids)
    with pytest.raises(RecoverLoraError, match="holdout fraction"):
        train_holdout_split(samples, 1.0)


def test_duplicate_rate_counts_rows_sharing_their_first_window():
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 7, 8], [1, 2, 3, 4]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    assert duplicate_rate(ids, mask, window=3) == 0.75
    assert duplicate_rate(ids, mask, window=4) == 0.5
    mask[3, 0] = False  # row 3's window starts at its first trained position: [2, 3, 4] is unique
    assert duplicate_rate(ids, mask, window=4) == 0.5


def test_tokenizer_info_from_hf_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(FIXTURES / "stories260K"))
    info = TokenizerInfo.from_hf(tokenizer, name="stories260K")
    assert info.vocab_size == 512 and info.eos_ids == (tokenizer.eos_token_id,)
    assert {tokenizer.bos_token_id, tokenizer.eos_token_id} <= set(info.excluded_ids)
    assert info.bos_id == tokenizer.bos_token_id  # this SentencePiece tokenizer adds BOS
    assert info.chat_prompts == ()
    tokenizer.chat_template = (
        "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}<s>{% endif %}"
    )
    info = TokenizerInfo.from_hf(tokenizer, name="stories260K")
    assert len(info.chat_prompts) == len(CHAT_PROMPTS)
    assert info.chat_prompts[0][0] == tokenizer.bos_token_id and info.chat_prompts[0][-1] == tokenizer.bos_token_id
    assert info.decode(list(info.chat_prompts[0])).startswith("<s>")


def synth_cli(*args: str):
    import typer
    from typer.testing import CliRunner

    from recover_lora.recovery.synth_cli import register

    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command is called by name as under recover-lora
    register(app)
    return CliRunner().invoke(app, ["synth", *map(str, args)])


def test_cli_on_a_tiny_real_model(tmp_path):
    model = FIXTURES / "stories260K"
    args = (model, "--out", tmp_path / "s", "--n-samples", 6, "--seq-len", 12, "--batch-size", 4)
    args += ("--device", "cpu", "--threads", 1)
    result = synth_cli(*args)
    assert result.exit_code == 0, result.output
    assert "wrote 6 x 12 tokens" in result.output
    samples = load_samples(tmp_path / "s")
    assert samples.input_ids.shape == (6, 12) and (samples.input_ids[:, 0] == 1).all()  # its tokenizer adds BOS
    assert samples.manifest["teacher"]["name"] == "stories260K" and len(samples.manifest["teacher"]["sha256"]) == 64
    preview = json.loads((tmp_path / "s" / "preview.jsonl").read_text().splitlines()[0])
    assert preview["text"].startswith("<s>")
    again = synth_cli(*args)
    assert isinstance(again.exception, RecoverLoraError) and "--force" in str(again.exception)
    both = synth_cli(*args, "--resume", "--force")
    assert isinstance(both.exception, RecoverLoraError) and "contradict" in str(both.exception)
    chat = synth_cli(*args, "--force", "--mode", "chat")
    assert isinstance(chat.exception, RecoverLoraError) and "chat template" in str(chat.exception)


def test_top_p_keeps_exactly_the_nucleus_with_and_without_the_full_sort():
    from recover_lora.recovery.synth import TOP_P_CANDIDATES, _sample_top_p

    vocab = 3 * TOP_P_CANDIDATES
    # Nearly flat, no ties: the nucleus of 0.95 is ~2900 tokens, wider than the candidates (full sort).
    flat = torch.linspace(0.0, 0.1, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(1))]
    peaked = torch.full((vocab,), -20.0)
    peaked[[7, 700, 2900]] = torch.tensor([5.0, 4.0, 3.0])  # nucleus: these three
    generator = torch.Generator().manual_seed(0)
    batch = torch.stack([flat, peaked] * 32)  # rows of both kinds in one batch
    drawn = torch.stack([_sample_top_p(batch, 1.0, 0.95, generator) for _ in range(50)], dim=1)
    for row, logits in enumerate((flat, peaked)):
        probs = torch.softmax(logits, -1)
        sorted_probs, order = probs.sort(descending=True)
        nucleus = set(order[(sorted_probs.cumsum(-1) - sorted_probs) <= 0.95].tolist())
        seen = set(drawn[row::2].flatten().tolist())
        assert seen <= nucleus
        assert len(seen) > (TOP_P_CANDIDATES if logits is flat else 2)
