"""Streaming text generation and chat on a loaded llama.cpp model.

Chat uses the model's own chat template (the GGUF's `tokenizer.chat_template`, which
llama-cpp-python applies in `create_chat_completion`), so an instruct model sees the prompt
format it was trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from recover_lora.errors import RecoverLoraError


def stream_completion(
    llm,
    prompt: str,
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int | None = None,
) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece (temperature 0 = greedy).

    Example:
        for piece in stream_completion(loaded.llm, "Once upon a time", max_tokens=16):
            print(piece, end="")
    """
    _check_sampling(max_tokens, temperature)
    n_prompt = len(llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True))
    if n_prompt + 1 > llm.n_ctx():
        raise RecoverLoraError(f"the prompt is {n_prompt} tokens but the context holds {llm.n_ctx()}; raise --ctx or shorten the prompt")
    max_tokens = min(max_tokens, llm.n_ctx() - n_prompt)
    for chunk in llm.create_completion(
        prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stream=True
    ):
        yield chunk["choices"][0]["text"]


def chat(
    llm,
    user_lines: Iterable[str],
    write: Callable[[str], None],
    max_tokens: int = 256,
    temperature: float = 0.7,
    system: str | None = None,
    prompt: Callable[[], None] | None = None,
) -> list[dict]:
    """A multi-turn chat: each line of `user_lines` is a user message; replies stream to `write`.

    When the conversation outgrows the context, the oldest turns are dropped (the system
    message stays). Returns the message history.

    Example:
        chat(loaded.llm, ["Hi!", "Name a colour."], write=lambda s: print(s, end=""))
    """
    _check_sampling(max_tokens, temperature)
    messages: list[dict] = [{"role": "system", "content": system}] if system else []
    n_fixed = len(messages)
    if prompt:
        prompt()
    for line in user_lines:
        text = line.rstrip("\n")
        if not text.strip():
            if prompt:
                prompt()
            continue
        messages.append({"role": "user", "content": text})
        reply = _reply_within_context(llm, messages, n_fixed, write, max_tokens, temperature)
        messages.append({"role": "assistant", "content": reply})
        write("\n")
        if prompt:
            prompt()
    return messages


def _reply_within_context(llm, messages, n_fixed, write, max_tokens, temperature) -> str:
    while True:
        try:
            stream = llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=temperature, stream=True)
            pieces = []
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content") or ""
                if piece:
                    pieces.append(piece)
                    write(piece)
            return "".join(pieces)
        except ValueError as e:  # llama-cpp-python: "Requested tokens (N) exceed context window of M"
            if "exceed context window" not in str(e):
                raise
            if len(messages) - n_fixed <= 1:
                raise RecoverLoraError(f"the message does not fit the context ({e}); raise --ctx or write less") from None
            del messages[n_fixed : n_fixed + 2]  # drop the oldest user/assistant turn


def _check_sampling(max_tokens: int, temperature: float) -> None:
    if max_tokens < 1:
        raise RecoverLoraError(f"-n {max_tokens}: the number of tokens to generate must be >= 1")
    if temperature < 0:
        raise RecoverLoraError(f"--temp {temperature} must be >= 0 (0 = greedy)")
