"""Tokenizers as llama.cpp stores them: the `tokenizer.ggml.*` fields of a GGUF.

`TokenizerSpec` is read from a GGUF (`from_gguf`) or built from a Hugging Face folder
(`from_hf_folder`: BPE tokenizer.json -> "gpt2" vocab with merges and a pre-tokenizer name;
SentencePiece tokenizer.model -> "llama" vocab with scores and token types), and written
into a GGUF with `write_to`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf

from recover_lora.errors import RecoverLoraError

# GGUF key suffixes of special token ids: tokenizer.ggml.<name>_token_id
SPECIAL_TOKEN_KEYS = {
    "bos": gguf.Keys.Tokenizer.BOS_ID,
    "eos": gguf.Keys.Tokenizer.EOS_ID,
    "unk": gguf.Keys.Tokenizer.UNK_ID,
    "pad": gguf.Keys.Tokenizer.PAD_ID,
    "sep": gguf.Keys.Tokenizer.SEP_ID,
    "eot": gguf.Keys.Tokenizer.EOT_ID,
}


@dataclass
class TokenizerSpec:
    """The vocabulary fields llama.cpp reads (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    pre: str | None = None  # pre-tokenizer name, "gpt2" vocabs only (e.g. "smollm", "qwen2", "llama-bpe")
    scores: list[float] | None = None
    merges: list[str] | None = None  # "a b" strings, BPE only
    special_ids: dict[str, int] = field(default_factory=dict)  # keys from SPECIAL_TOKEN_KEYS
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.model not in ("gpt2", "llama"):
            raise RecoverLoraError(f"tokenizer model {self.model!r} is not supported; supported: gpt2 (BPE), llama (SentencePiece)")
        if len(self.token_types) != len(self.tokens):
            raise RecoverLoraError(f"tokenizer has {len(self.tokens)} tokens but {len(self.token_types)} token types")
        if self.scores is not None and len(self.scores) != len(self.tokens):
            raise RecoverLoraError(f"tokenizer has {len(self.tokens)} tokens but {len(self.scores)} scores")
        unknown = set(self.special_ids) - set(SPECIAL_TOKEN_KEYS)
        if unknown:
            raise RecoverLoraError(f"unknown special token kinds {sorted(unknown)}; known: {sorted(SPECIAL_TOKEN_KEYS)}")

    def write_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            writer.add_uint32(SPECIAL_TOKEN_KEYS[kind], token_id)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> "TokenizerSpec":
        def value(key: str):
            f = reader.get_field(key)
            return None if f is None else f.contents()

        model = value(gguf.Keys.Tokenizer.MODEL)
        if model is None:
            raise RecoverLoraError("the GGUF has no tokenizer (tokenizer.ggml.model); it cannot be exported")
        special_ids = {}
        for kind, key in SPECIAL_TOKEN_KEYS.items():
            token_id = value(key)
            if token_id is not None:
                special_ids[kind] = int(token_id)
        return cls(
            model=model,
            tokens=list(value(gguf.Keys.Tokenizer.LIST)),
            token_types=[int(t) for t in value(gguf.Keys.Tokenizer.TOKEN_TYPE)],
            pre=value(gguf.Keys.Tokenizer.PRE),
            scores=value(gguf.Keys.Tokenizer.SCORES),
            merges=value(gguf.Keys.Tokenizer.MERGES),
            special_ids=special_ids,
            add_bos=value(gguf.Keys.Tokenizer.ADD_BOS),
            add_eos=value(gguf.Keys.Tokenizer.ADD_EOS),
            add_space_prefix=value(gguf.Keys.Tokenizer.ADD_PREFIX),
            chat_template=value(gguf.Keys.Tokenizer.CHAT_TEMPLATE),
        )

    @classmethod
    def from_hf_folder(cls, folder, vocab_size: int | None = None) -> "TokenizerSpec":
        """See `recover_lora.export.hf_tokenizer.tokenizer_from_hf_folder` (vocab_size None = config.json's)."""
        from recover_lora.export.hf_tokenizer import tokenizer_from_hf_folder

        return tokenizer_from_hf_folder(folder, vocab_size)
