"""A Hugging Face tokenizer folder becomes a `TokenizerSpec`: the `tokenizer.ggml.*` fields llama.cpp reads.

Tokenizer kinds, tried in order (first match wins; `TOKENIZER_KINDS`):
- byte-level BPE `tokenizer.json` (GPT-2, SmolLM/SmolLM2, Llama-3.x, Qwen2/Qwen3, Mistral tekken) -> "gpt2"
  vocab with merges and the pre-tokenizer name llama.cpp expects (`PRE_TOKENIZERS`);
- SentencePiece `tokenizer.model` (Llama-2, TinyLlama, Mistral-7B, stories260K) -> "llama" vocab with scores and
  token types from the model proto.
Special token ids, add_bos/add_eos and the chat template come from the usual side files for both kinds
(tokenizer_config.json, special_tokens_map.json, config.json, generation_config.json, chat_template.jinja).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gguf

from recover_lora.errors import RecoverLoraError
from recover_lora.export.tokenizer import TokenizerSpec

# Pre-tokenizer regexes exactly as the models' tokenizer.json files store them (JSON-decoded). llama.cpp
# re-implements each one under the name in PRE_TOKENIZERS (src/llama-vocab.cpp, llm_tokenizer_bpe).
CONTRACTIONS_ANY_CASE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
LLAMA3_REGEX = CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = CONTRACTIONS_ANY_CASE + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
TEKKEN_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GPT-4o's o200k split (Phi-4-mini's tokenizer.json), as quoted in llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT4O.
GPT4O_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|"
    r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ByteLevel with use_regex=True splits with GPT-2's own regex first; use_regex=False only maps bytes to characters.
BYTE_LEVEL_GPT2_SPLIT = ("ByteLevel", "use_regex", "no_prefix_space")
BYTE_LEVEL_BYTES_ONLY = ("ByteLevel", "no_regex", "no_prefix_space")


def _split(regex: str) -> tuple:
    return ("Split", regex, "Isolated", "not_inverted")


@dataclass(frozen=True)
class PreTokenizerRule:
    """One llama.cpp pre-tokenizer: its `tokenizer.ggml.pre` name and the tokenizer.json pre_tokenizer it stands for."""

    name: str
    components: tuple[tuple, ...]  # the pre_tokenizer flattened by `pre_tokenizer_components`
    used_by: str


PRE_TOKENIZERS: tuple[PreTokenizerRule, ...] = (
    PreTokenizerRule("gpt-2", (BYTE_LEVEL_GPT2_SPLIT,), "GPT-2"),
    # llama.cpp "smollm" = one digit per pre-token, then GPT-2's regex; it also keeps spaces on decode
    # (clean_spaces off), as SmolLM2's tokenizer_config does.
    PreTokenizerRule("smollm", (("Digits", "individual"), BYTE_LEVEL_GPT2_SPLIT), "SmolLM, SmolLM2"),
    PreTokenizerRule("llama-bpe", (_split(LLAMA3_REGEX), BYTE_LEVEL_BYTES_ONLY), "Llama-3.x"),
    PreTokenizerRule("qwen2", (_split(QWEN2_REGEX), BYTE_LEVEL_BYTES_ONLY), "Qwen2, Qwen2.5, Qwen3"),
    PreTokenizerRule("tekken", (_split(TEKKEN_REGEX), BYTE_LEVEL_BYTES_ONLY), "Mistral Nemo (tekken)"),
    PreTokenizerRule("gpt-4o", (_split(GPT4O_REGEX), BYTE_LEVEL_BYTES_ONLY), "Phi-4-mini (GPT-4o o200k)"),
)

# Normalizers accepted although llama.cpp does not run them: NFC (Qwen2/Qwen3) changes only text that is not
# already NFC (e.g. decomposed accents), so only such input can tokenize differently from Hugging Face.
HARMLESS_NORMALIZERS = (None, "NFC")


def pre_tokenizer_components(pre_tokenizer: dict | None) -> tuple[tuple, ...]:
    """Flatten a tokenizer.json `pre_tokenizer` into comparable tuples (the settings that change the split)."""
    if pre_tokenizer is None:
        return ()
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return tuple(c for sub in pre_tokenizer.get("pretokenizers", []) for c in pre_tokenizer_components(sub))
    if kind == "ByteLevel":
        return ((
            "ByteLevel",
            "use_regex" if pre_tokenizer.get("use_regex", True) else "no_regex",
            "prefix_space" if pre_tokenizer.get("add_prefix_space", False) else "no_prefix_space",
        ),)
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String"))
        inverted = "inverted" if pre_tokenizer.get("invert", False) else "not_inverted"
        return (("Split", regex, pre_tokenizer.get("behavior"), inverted),)
    if kind == "Digits":
        return (("Digits", "individual" if pre_tokenizer.get("individual_digits", False) else "grouped"),)
    return ((str(kind), json.dumps(pre_tokenizer, sort_keys=True)),)


def detect_pre_tokenizer(pre_tokenizer: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json `pre_tokenizer` (first rule that matches wins).

    Example: detect_pre_tokenizer({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) -> "gpt-2"
    """
    components = pre_tokenizer_components(pre_tokenizer)
    for rule in PRE_TOKENIZERS:
        if components == rule.components:
            return rule.name
    summary = " + ".join(c[0] if c[0] != "Split" else f"Split({c[1]!r})" for c in components) or "none"
    supported = "; ".join(f"{r.name} ({r.used_by})" for r in PRE_TOKENIZERS)
    raise RecoverLoraError(f"unsupported BPE pre-tokenizer {summary}; supported: {supported}")


@dataclass
class HfTokenizerFiles:
    """The tokenizer-related files of a Hugging Face model folder, read once (missing JSON files read as {})."""

    folder: Path
    tokenizer_json: dict | None
    tokenizer_config: dict
    special_tokens_map: dict
    config: dict
    generation_config: dict
    sentencepiece_model: Path | None

    @classmethod
    def read(cls, folder: str | Path) -> "HfTokenizerFiles":
        folder = Path(folder)
        if not folder.is_dir():
            raise RecoverLoraError(f"tokenizer folder {folder} does not exist; give a Hugging Face model folder")
        spm = folder / "tokenizer.model"
        return cls(
            folder=folder,
            tokenizer_json=_read_json(folder / "tokenizer.json", None),
            tokenizer_config=_read_json(folder / "tokenizer_config.json", {}),
            special_tokens_map=_read_json(folder / "special_tokens_map.json", {}),
            config=_read_json(folder / "config.json", {}),
            generation_config=_read_json(folder / "generation_config.json", {}),
            sentencepiece_model=spm if spm.is_file() else None,
        )


def _read_json(path: Path, missing: Any) -> Any:
    if not path.is_file():
        return missing
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecoverLoraError(f"{path} is not valid JSON ({e}); restore the file from the model's source") from e


def _is_byte_level_bpe(files: HfTokenizerFiles) -> bool:
    tj = files.tokenizer_json
    if tj is None or tj.get("model", {}).get("type") != "BPE" or tj["model"].get("byte_fallback", False):
        return False
    uses_byte_level = any(c[0] == "ByteLevel" for c in pre_tokenizer_components(tj.get("pre_tokenizer")))
    return uses_byte_level or (tj.get("decoder") or {}).get("type") == "ByteLevel"


@dataclass(frozen=True)
class TokenizerKind:
    name: str
    applies: Callable[[HfTokenizerFiles], bool]
    build: Callable[[HfTokenizerFiles, int | None], TokenizerSpec]


def tokenizer_from_hf_folder(folder: str | Path, vocab_size: int | None = None) -> TokenizerSpec:
    """Read a Hugging Face folder's tokenizer as llama.cpp's GGUF tokenizer fields.

    Args:
        folder: model folder with tokenizer.json and/or tokenizer.model plus the usual side files.
        vocab_size: the model's embedding rows; ids the tokenizer does not use up to it become "[PAD{i}]"
            tokens. None = config.json's vocab_size when present, else the tokenizer's own size.

    Example: tokenizer_from_hf_folder("tests/fixtures/stories260K").model -> "llama"
    """
    files = HfTokenizerFiles.read(folder)
    if vocab_size is None and isinstance(files.config.get("vocab_size"), int):
        vocab_size = files.config["vocab_size"]
    for kind in TOKENIZER_KINDS:
        if kind.applies(files):
            return kind.build(files, vocab_size)
    found = []
    if files.tokenizer_json is not None:
        model = files.tokenizer_json.get("model", {})
        fallback = " with byte_fallback" if model.get("byte_fallback") else ""
        found.append(f"tokenizer.json with a {model.get('type')} model{fallback}")
    supported = "; ".join(kind.name for kind in TOKENIZER_KINDS)
    raise RecoverLoraError(
        f"no supported tokenizer in {files.folder} (found: {', '.join(found) or 'nothing'}); supported: {supported}"
    )


# ---- byte-level BPE -> "gpt2" -------------------------------------------------------------------------------


def _bpe_spec(files: HfTokenizerFiles, vocab_size: int | None) -> TokenizerSpec:
    tj = files.tokenizer_json
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in HARMLESS_NORMALIZERS:
        raise RecoverLoraError(
            f"tokenizer.json normalizer {normalizer!r} is not supported by llama.cpp's BPE tokenizer; supported: none, NFC"
        )
    pre = detect_pre_tokenizer(tj.get("pre_tokenizer"))
    by_id: dict[int, tuple[str, int]] = {i: (text, gguf.TokenType.NORMAL) for text, i in tj["model"]["vocab"].items()}
    # Added tokens keep their raw text (llama.cpp matches CONTROL / USER_DEFINED tokens literally in the input).
    for added in tj.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    tokens, types = _fill_ids(by_id, vocab_size)
    spec = TokenizerSpec(model="gpt2", tokens=tokens, token_types=types, pre=pre, merges=_merges(tj["model"].get("merges", [])))
    _add_special_fields(spec, files)
    return spec


def _merges(merges: list) -> list[str]:
    if all(isinstance(m, str) for m in merges):
        return list(merges)
    out = []
    for m in merges:
        # Newer tokenizer.json files store pairs; llama.cpp splits "a b" at the first space after position 0.
        if not (isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) and " " not in p for p in m)):
            raise RecoverLoraError(f"tokenizer.json merge {m!r} is not a pair of space-free strings; a GGUF merge cannot hold it")
        out.append(f"{m[0]} {m[1]}")
    return out


def _fill_ids(by_id: dict[int, tuple[str, int]], vocab_size: int | None) -> tuple[list[str], list[int]]:
    """Tokens in id order; ids without a token (gaps, or rows beyond the tokenizer) become "[PAD{i}]".

    Same as llama.cpp's converter: UNUSED type, so the placeholder text is never matched in user input.
    """
    n_used = max(by_id) + 1 if by_id else 0
    if vocab_size is not None and vocab_size < n_used:
        raise RecoverLoraError(
            f"the tokenizer uses ids up to {n_used - 1} but the model's vocab_size is {vocab_size}; "
            "use the tokenizer that belongs to this model"
        )
    n = max(n_used, vocab_size or 0)
    tokens, types = [], []
    for i in range(n):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    duplicates = sorted(t for t, count in Counter(tokens).items() if count > 1)
    if duplicates:
        raise RecoverLoraError(f"tokenizer has duplicate tokens {duplicates[:5]}; llama.cpp refuses duplicate vocabulary entries")
    return tokens, types


# ---- SentencePiece -> "llama" -------------------------------------------------------------------------------


def _sentencepiece_spec(files: HfTokenizerFiles, vocab_size: int | None) -> TokenizerSpec:
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(files.sentencepiece_model.read_bytes())
    except Exception as e:  # protobuf raises DecodeError and friends
        raise RecoverLoraError(
            f"{files.sentencepiece_model} is not a SentencePiece model ({e}); restore it from the model's source"
        ) from e
    model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    if model_type != "BPE":
        # llama.cpp's "llama" tokenizer merges by score like SentencePiece BPE; unigram models need Viterbi ("t5").
        raise RecoverLoraError(
            f"SentencePiece model type {model_type} in {files.sentencepiece_model} is not supported; supported: BPE"
        )
    piece_type = sentencepiece_model_pb2.ModelProto.SentencePiece.Type.Name
    by_id = {i: (p.piece, gguf.TokenType[piece_type(p.type)]) for i, p in enumerate(proto.pieces)}
    scores = {i: p.score for i, p in enumerate(proto.pieces)}
    for token_id, (text, special) in _added_tokens(files).items():
        if token_id >= len(proto.pieces):  # tokens the HF side added after the SentencePiece vocab
            by_id[token_id] = (text, gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            scores[token_id] = -1000.0
        elif special and by_id[token_id][1] in (gguf.TokenType.NORMAL, gguf.TokenType.USER_DEFINED):
            # Pieces the HF side marks special (Gemma's <start_of_turn>/<end_of_turn> are user-defined
            # pieces): CONTROL, as llama.cpp's converter makes them, so they parse and print as specials.
            by_id[token_id] = (by_id[token_id][0], gguf.TokenType.CONTROL)
    tokens, types = _fill_ids(by_id, vocab_size)
    spec = TokenizerSpec(
        model="llama",
        tokens=tokens,
        token_types=types,
        scores=[float(scores.get(i, -1000.0)) for i in range(len(tokens))],
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
    )
    _add_special_fields(spec, files)
    return spec


def _added_tokens(files: HfTokenizerFiles) -> dict[int, tuple[str, bool]]:
    """id -> (text, special) from tokenizer.json, tokenizer_config.json and added_tokens.json."""
    added: dict[int, tuple[str, bool]] = {}
    for text, token_id in _read_json(files.folder / "added_tokens.json", {}).items():
        added[int(token_id)] = (text, False)
    for token_id, entry in (files.tokenizer_config.get("added_tokens_decoder") or {}).items():
        added[int(token_id)] = (entry["content"], bool(entry.get("special")))
    for entry in (files.tokenizer_json or {}).get("added_tokens", []):
        added[int(entry["id"])] = (entry["content"], bool(entry.get("special")))
    return added


# ---- special tokens, add_bos/add_eos, chat template ---------------------------------------------------------


def _token_text(entry: Any) -> str | None:
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) else None


def _add_special_fields(spec: TokenizerSpec, files: HfTokenizerFiles) -> None:
    ids_by_text = {text: i for i, text in enumerate(spec.tokens)}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = _special_id(kind, files, ids_by_text, len(spec.tokens))
        if token_id is not None:
            spec.special_ids[kind] = token_id
    spec.add_bos = _adds_special("bos", spec, files, ids_by_text)
    spec.add_eos = _adds_special("eos", spec, files, ids_by_text)
    spec.chat_template = _chat_template(files)


def _special_id(kind: str, files: HfTokenizerFiles, ids_by_text: dict[str, int], n_tokens: int) -> int | None:
    # Token text first (tokenizer_config.json, then special_tokens_map.json), then ids from the model configs.
    for source in (files.tokenizer_config, files.special_tokens_map):
        text = _token_text(source.get(f"{kind}_token"))
        if text is not None and text in ids_by_text:
            return ids_by_text[text]
    for source in (files.config, files.generation_config):
        token_id = source.get(f"{kind}_token_id")
        if isinstance(token_id, list) and token_id:  # e.g. Llama-3 generation_config: several eos ids
            token_id = token_id[0]
        if isinstance(token_id, int) and 0 <= token_id < n_tokens:
            return token_id
    return None


def _adds_special(kind: str, spec: TokenizerSpec, files: HfTokenizerFiles, ids_by_text: dict[str, int]) -> bool | None:
    """Whether encoding adds bos/eos: tokenizer_config.json's add_<kind>_token, else tokenizer.json's post-processor.

    None (llama.cpp's default for the vocab type) only when neither file says anything.
    """
    flag = files.tokenizer_config.get(f"add_{kind}_token")
    if isinstance(flag, bool):
        return flag
    if files.tokenizer_json is None:
        return None
    special_id = spec.special_ids.get(kind)
    first, last = _post_processor_ends(files.tokenizer_json.get("post_processor"), ids_by_text)
    edge = first if kind == "bos" else last
    return edge is not None and edge == special_id


def _post_processor_ends(post_processor: dict | None, ids_by_text: dict[str, int]) -> tuple[int | None, int | None]:
    """Ids of the special tokens a tokenizer.json post-processor puts before / after a single sequence."""
    if post_processor is None:
        return None, None
    kind = post_processor.get("type")
    if kind == "Sequence":
        ends = [_post_processor_ends(p, ids_by_text) for p in post_processor.get("processors", [])]
        return next((f for f, _ in ends if f is not None), None), next((l for _, l in ends if l is not None), None)
    if kind in ("RobertaProcessing", "BertProcessing"):
        return post_processor["cls"][1], post_processor["sep"][1]
    if kind != "TemplateProcessing":
        return None, None
    single = post_processor.get("single", [])
    specials = post_processor.get("special_tokens", {})

    def special_id(item: dict) -> int | None:
        if "SpecialToken" not in item:
            return None
        name = item["SpecialToken"]["id"]
        ids = specials.get(name, {}).get("ids") or [ids_by_text.get(name)]
        return ids[0]

    return (special_id(single[0]), special_id(single[-1])) if single else (None, None)


def _chat_template(files: HfTokenizerFiles) -> str | None:
    template = files.tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the GGUF field holds the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if isinstance(template, str):
        return template
    jinja = files.folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(files.folder / "chat_template.json", {}).get("chat_template")
    return template if isinstance(template, str) else None


TOKENIZER_KINDS: tuple[TokenizerKind, ...] = (
    TokenizerKind("byte-level BPE tokenizer.json (gpt2 vocab)", _is_byte_level_bpe, _bpe_spec),
    TokenizerKind(
        "SentencePiece BPE tokenizer.model (llama vocab)", lambda f: f.sentencepiece_model is not None, _sentencepiece_spec
    ),
)
