"""Conversations → token ids and scored positions, as supervised fine-tuning tokenises them.

The whole conversation is rendered with the tokenizer's chat template (`apply_chat_template(..., tokenize=
False)`) and tokenised without extra special tokens, which is what `apply_chat_template(tokenize=True)` and
TRL's SFT do. The tokens of an assistant turn i are found by rendering prefixes: the conversation up to turn i
with the generation prompt, and up to turn i included; both must tokenise to prefixes of the whole (a
template that rewrites earlier turns when later ones follow is refused, naming the turn). The scored tokens
of a turn run from the end of its generation prompt through its end-of-turn token: tokens after the last
non-whitespace token of the turn (the newline chatml writes after `<|im_end|>`) are not scored.

A tokenizer without a chat template gets the plain join (`plain_join`): the BOS token, then every turn as
"role: content" followed by a blank line, with the EOS token right after every assistant turn's content;
the generation prompt is "assistant: ".

Torch-free; forward.py turns the result into its `Encoded`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .formats import Chat


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_join(tokenizer, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    """The documented rendering of a conversation for a tokenizer without a chat template."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    parts = [bos]
    for role, content in messages:
        parts.append(f"{role}: {content}{eos if role == 'assistant' else ''}\n\n")
    if add_generation_prompt:
        parts.append("assistant: ")
    return "".join(parts)


def render(tokenizer, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as text: the chat template when the tokenizer has one, else `plain_join`."""
    if not has_template(tokenizer):
        return plain_join(tokenizer, messages, add_generation_prompt)
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_tokens(tokenizer, chat: Chat) -> tuple[list[int], list[int]]:
    """(token ids of the whole conversation, the token indices that are scored: each assistant turn of
    `chat.scored`, through its end-of-turn token).

    Raises:
        ValueError: the template does not render a conversation's beginning as a prefix of the whole.
    """
    chat.check()
    ids = _ids(tokenizer, render(tokenizer, chat.messages))
    scored: list[int] = []
    for i in chat.scored:
        start = _prefix_len(tokenizer, ids, chat.messages[:i], True, i)
        end = _prefix_len(tokenizer, ids, chat.messages[: i + 1], False, i)
        while end > start and not tokenizer.decode(ids[end - 1 : end]).strip():
            end -= 1  # whitespace after the end-of-turn token
        scored.extend(range(start, end))
    return ids, scored


def _prefix_len(tokenizer, ids: list[int], messages, generation: bool, turn: int) -> int:
    prefix = _ids(tokenizer, render(tokenizer, messages, generation)) if messages or generation else []
    if ids[: len(prefix)] != prefix:
        raise ValueError(f"the model's chat template does not render the conversation up to turn {turn} as the "
                         "beginning of the whole conversation, so its assistant tokens cannot be told apart; "
                         "use --turns last or a template without that behaviour")
    return len(prefix)
