"""What generation needs to know about the teacher's tokenizer, and the chat prompts for chat mode.

`TokenizerInfo` is plain data (ids, a decoder callable), so the sampler never depends on which
tokenizer library the caller used: the CLI builds it from a transformers tokenizer, either an HF
folder's or a GGUF's (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``); tests build it by hand.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from recover_lora.errors import RecoverLoraError

# Generic requests spanning the things instruct models are asked for (explanation, how-to, code,
# math, writing, advice, summaries), so chat-mode samples cover the assistant's usual registers.
CHAT_PROMPTS: tuple[str, ...] = (
    "Explain how a rainbow forms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are some good habits for staying focused while studying?",
    "Summarize the causes of the French Revolution.",
    "How do I make a simple tomato pasta sauce?",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is the difference between weather and climate?",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "Explain what a neural network is to a high school student.",
    "Write a haiku about autumn leaves.",
    "How does compound interest work? Give an example.",
    "What should I pack for a weekend hiking trip?",
    "Describe the water cycle step by step.",
    "Write a polite email asking a colleague to review a document.",
    "What are the main differences between cats and dogs as pets?",
    "Solve this: a train travels 180 km in 2 hours. What is its average speed?",
    "Explain the rules of chess briefly.",
    "Tell me an interesting fact about the ocean.",
    "How can I improve my sleep?",
    "Write a limerick about a forgetful robot.",
    "What is photosynthesis and why is it important?",
    "Give me a recipe for pancakes.",
    "Explain the difference between a list and a tuple in Python.",
    "What were the main achievements of the Roman Empire?",
    "How do vaccines help the immune system?",
    "Write a short poem about the city at night.",
    "What are some tips for a successful job interview?",
    "Explain how a bill becomes a law in a democracy.",
    "Describe your ideal vacation.",
    "What is the Pythagorean theorem? Show an example.",
    "How do I start learning to play the guitar?",
    "Write a dialogue between a teacher and a curious student about stars.",
    "Why is the sky blue?",
    "List five healthy snacks and say why each is good for you.",
    "Explain recursion with a simple example.",
    "What causes earthquakes?",
    "Write a product description for a reusable water bottle.",
    "How can a small town reduce its waste?",
    "What is the difference between a virus and a bacterium?",
    "Plan a one-day itinerary for visiting a museum city.",
    "Explain what inflation is and how it affects people.",
    "Write the opening paragraph of a mystery novel.",
    "How does a refrigerator keep food cold?",
    "Give advice to someone moving to a new country.",
    "Translate the idea of 'teamwork' into a short motivational speech.",
    "What are prime numbers? List the first ten.",
    "Describe how to change a flat bicycle tire.",
    "Compare renewable and non-renewable energy sources.",
)

# End-of-turn tokens of common chat formats: generation stops on them as on the tokenizer's EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>", "</s>")


@dataclass
class TokenizerInfo:
    """What generation needs from the teacher's tokenizer; built from any tokenizer by the caller.

    Example:
        info = TokenizerInfo.from_hf(AutoTokenizer.from_pretrained(folder), name="SmolLM2-135M-Instruct")
    """

    name: str
    vocab_size: int  # real tokens; the teacher never emits ids at or above this
    eos_ids: tuple[int, ...]  # a sample ends at the first of these
    excluded_ids: tuple[int, ...] = ()  # never drawn as the random first token (special/control tokens)
    bos_id: int | None = None  # prepended to every sample when the tokenizer adds one
    chat_prompts: tuple[tuple[int, ...], ...] = ()  # CHAT_PROMPTS rendered with the chat template
    vocab_sha256: str = ""
    decode: Callable[[list[int]], str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.eos_ids = tuple(sorted({int(i) for i in self.eos_ids}))
        self.excluded_ids = tuple(sorted({int(i) for i in self.excluded_ids}))
        self.chat_prompts = tuple(tuple(int(i) for i in p) for p in self.chat_prompts)
        if self.vocab_size <= 0:
            raise RecoverLoraError(f"tokenizer {self.name!r} vocab_size={self.vocab_size} must be positive")
        ids = [*self.eos_ids, *self.excluded_ids, *(i for p in self.chat_prompts for i in p)]
        if self.bos_id is not None:
            ids.append(self.bos_id)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise RecoverLoraError(f"tokenizer {self.name!r} has ids {bad[:5]} outside its vocabulary [0, {self.vocab_size})")
        if len(set(self.excluded_ids)) >= self.vocab_size:
            raise RecoverLoraError(f"tokenizer {self.name!r} excludes every token; nothing is left to start samples with")

    def identity(self) -> dict:
        """The JSON-able part, for the manifest and the resume check."""
        prompts = hashlib.sha256(json.dumps(self.chat_prompts).encode()).hexdigest()
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "vocab_sha256": self.vocab_sha256,
            "bos_id": self.bos_id,
            "eos_ids": list(self.eos_ids),
            "excluded_ids": list(self.excluded_ids),
            "n_chat_prompts": len(self.chat_prompts),
            "chat_prompts_sha256": prompts,
        }

    @classmethod
    def from_hf(cls, tokenizer, name: str, extra_eos_ids: Sequence[int] = ()) -> "TokenizerInfo":
        """From a transformers tokenizer (an HF folder's, or a GGUF's via `gguf_file=`).

        Special tokens (and every added token marked special) are excluded from the random first
        token; the EOS token, ``extra_eos_ids`` (e.g. the model's generation_config EOS list) and
        any known end-of-turn token present in the vocabulary end a sample.
        """
        vocab = tokenizer.get_vocab()
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        excluded = set(tokenizer.all_special_ids) | {i for i, tok in added.items() if getattr(tok, "special", False)}
        eos = {int(i) for i in extra_eos_ids}
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        eos |= {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and vocab[t] in excluded}
        if not eos:
            raise RecoverLoraError(f"tokenizer {name!r} has no EOS token; cannot tell where a sample ends")
        bos = tokenizer.bos_token_id
        adds_bos = bos is not None and tokenizer("hello").input_ids[:1] == [bos]
        prompts: tuple[tuple[int, ...], ...] = ()
        if getattr(tokenizer, "chat_template", None):
            prompts = tuple(_render_chat_prompt(tokenizer, p) for p in CHAT_PROMPTS)
        return cls(
            name=name,
            vocab_size=len(tokenizer),
            eos_ids=tuple(eos),
            excluded_ids=tuple(excluded),
            bos_id=bos if adds_bos else None,
            chat_prompts=prompts,
            vocab_sha256=hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
        )


def _render_chat_prompt(tokenizer, prompt: str) -> tuple[int, ...]:
    # Render to text, then tokenize without adding specials: the template already holds them, and
    # apply_chat_template(tokenize=True) changed its return type between transformers 4 and 5.
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)
