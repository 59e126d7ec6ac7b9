"""The fine-tuning formats forvalue reads as they are, and how each becomes a sample to score.

Torch-free: the reader (data.py) and the command line use it without loading a model.

Formats, detected from a row's columns (the first row decides for the whole file; see `detect`):

- "messages": conversational, as TRL and the Hugging Face hub hold it: `messages` = a list of
  `{"role", "content"}` (system / user / assistant / tool, any number of turns). ShareGPT's `conversations` =
  a list of `{"from", "value"}` (human / gpt / system) is read as the same format.
- "prompt-completion": `prompt` + `completion`, each a string or a list of messages. Two strings are a flat
  sample; with a list on either side the sample is the conversation prompt + completion, of which only the
  completion's assistant turns are scored.
- "instruction" (Alpaca): `instruction` + optional `input` + `output`. The prompt is the instruction,
  followed by a blank line and the input when the input is not empty; the response is the output.
- "prompt-response": `prompt` + `response` (forvalue's own; `--prompt-field`/`--response-field` rename them),
  and DataInf rows (`prompt` + `text`).

How a sample becomes tokens (`Schema.template` for the flat formats, `Schema.turns` for conversations):

- A conversation is rendered by the model's chat template (`tokenizer.apply_chat_template`) and tokenised
  as supervised fine-tuning tokenises it (the whole rendered text, no extra special tokens). The scored
  positions are those predicting the tokens of the assistant turns: every assistant turn (turns "all") or
  the last one (turns "last"), each from the end of its generation prompt through its end-of-turn token
  (whitespace the template writes after that token is not scored). See chat.py.
- A model without a chat template gets the plain join of chat.py: the BOS token, then per turn
  "role: content" and a blank line, with the EOS token closing every assistant turn.
- A flat sample (prompt, response), template "plain" (the default): the prompt tokenised with the
  tokenizer's special tokens (e.g. BOS), then the response tokenised alone, then EOS; the response and
  EOS are scored (with `--tokens all`: every position). Template "chat": the prompt becomes a user turn and
  the response an assistant turn of a conversation (above). Any other template is a format string whose
  `{prompt}` and `{column}` fields (the row's columns) give the prompt text, e.g.
  "### Instruction:\\n{prompt}\\n\\n### Response:\\n"; the response is joined as with "plain".
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

FORMATS = ("messages", "prompt-completion", "instruction", "prompt-response")
FORMAT_CHOICES = ("auto",) + FORMATS
TURN_SCOPES = ("all", "last")
TEMPLATE_NAMES = ("plain", "chat")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function": "tool"}

# the columns each format reads (besides the bookkeeping ones: id, label, split, clean, image)
FORMAT_COLUMNS = {
    "messages": ("messages", "conversations"),
    "prompt-completion": ("prompt", "completion"),
    "instruction": ("instruction", "input", "output"),
    "prompt-response": ("prompt", "response"),
}


@dataclass(frozen=True)
class Chat:
    """A conversation to score: its turns as (role, content), and the indices of the assistant turns scored."""

    messages: tuple[tuple[str, str], ...]
    scored: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"messages": [{"role": r, "content": c} for r, c in self.messages], "scored": list(self.scored)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Chat:
        return cls(tuple((m["role"], m["content"]) for m in obj["messages"]), tuple(int(i) for i in obj["scored"]))

    def check(self) -> None:
        """Raises ValueError unless every scored index names an assistant turn with text."""
        if not self.scored:
            raise ValueError("the conversation has no assistant turn to score")
        for i in self.scored:
            if not 0 <= i < len(self.messages) or self.messages[i][0] != "assistant":
                raise ValueError(f"scored turn {i} is not an assistant turn of the conversation")
            if not self.messages[i][1].strip():
                raise ValueError(f"assistant turn {i} is empty")

    def display(self) -> tuple[str, str]:
        """(prompt, response) for people and text baselines: the user and assistant turns before the last scored
        one (system turns left out; "role: content" lines when there are several) and that turn's content."""
        last = self.scored[-1]
        before = [(r, c) for r, c in self.messages[:last] if r != "system"]
        prompt = before[0][1] if len(before) == 1 else "\n".join(f"{r}: {c}" for r, c in before)
        return prompt, self.messages[last][1]


@dataclass(frozen=True)
class Schema:
    """How the rows of a corpus become samples; an index keeps it in its manifest ("data") for every later
    command (index add, query, rank, eval --index).

    Attributes:
        format: one of FORMATS, or "auto" (detected from the first row, then remembered as detected).
        template: how flat samples become tokens: "plain", "chat", or a format string (module docstring).
        turns: conversations: score "all" assistant turns or the "last" one.
        fields: column names other than the defaults (FieldMap field → column), as given at build time.
    """

    format: str = "auto"
    template: str = "plain"
    turns: str = "all"
    fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in FORMAT_CHOICES:
            raise ValueError(f"format must be one of {', '.join(FORMAT_CHOICES)}, got {self.format!r}")
        if self.turns not in TURN_SCOPES:
            raise ValueError(f"turns must be one of {', '.join(TURN_SCOPES)}, got {self.turns!r}")
        check_template(self.template)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fields"] = dict(sorted(self.fields.items()))
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | None) -> Schema:
        """The schema an index keeps (an index built before schemas were kept: the defaults)."""
        if not obj:
            return cls(format="prompt-response")
        return cls(format=obj.get("format", "auto"), template=obj.get("template", "plain"),
                   turns=obj.get("turns", "all"), fields=dict(obj.get("fields") or {}))


def check_template(template: str) -> None:
    """Raises ValueError unless `template` is "plain", "chat" or a format string with a `{name}` field."""
    if template in TEMPLATE_NAMES:
        return
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"template {template!r} is not a valid format string ({exc}); write fields as {{prompt}} "
                         "and literal braces as {{{{ }}}}") from exc
    if not names:
        raise ValueError(f"template {template!r} is neither plain, chat nor a format string with a {{prompt}} or "
                         "{column} field")
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise ValueError(f"template field {{{bad[0]}}} is not a column name; use {{prompt}} or {{column}}")


def matches(obj: Mapping[str, Any], prompt_col: str = "prompt", response_col: str = "response") -> list[str]:
    """The formats whose columns the row has (non-null), in FORMATS order."""
    def has(c: str) -> bool:
        return obj.get(c) is not None

    found = []
    if has("messages") or has("conversations"):
        found.append("messages")
    if has("prompt") and has("completion"):
        found.append("prompt-completion")
    if has("instruction") and has("output"):
        found.append("instruction")
    if has(prompt_col) and (has(response_col) or has("text")):
        found.append("prompt-response")
    return found


def text_columns_unused(obj: Mapping[str, Any], fmt: str, used: set[str]) -> list[str]:
    """Columns of the row that hold text (a string of several words) which the format does not read."""
    mine = set(FORMAT_COLUMNS.get(fmt, ())) | used
    return sorted(k for k, v in obj.items() if k not in mine and isinstance(v, str) and len(v.split()) > 2)


def messages_of(value: Any, column: str) -> tuple[tuple[str, str], ...]:
    """The turns of a `messages` (role/content) or ShareGPT `conversations` (from/value) list.

    Raises:
        ValueError: not a list of such objects, an unknown role, or content that is not text.
    """
    if not isinstance(value, list) or not value:
        raise ValueError(f"field {column!r} must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise ValueError(f"field {column!r}[{j}] must be an object with role and content, got "
                             f"{type(m).__name__}")
        if "role" in m:
            role, content = m.get("role"), m.get("content")
        elif "from" in m:
            role, content = SHAREGPT_ROLES.get(str(m.get("from")).lower(), m.get("from")), m.get("value")
        else:
            raise ValueError(f"field {column!r}[{j}] has no role; write {{\"role\": ..., \"content\": ...}}")
        if role not in ROLES:
            raise ValueError(f"field {column!r}[{j}] has role {role!r}; use one of {', '.join(ROLES)}")
        out.append((role, _content_text(content, f"{column}[{j}].content")))
    return tuple(out)


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content parts: text only
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"field {where} holds a {kind!r} part; only text parts are read in conversations")
        return "".join(parts)
    if content is None:
        return ""
    raise ValueError(f"field {where} must be a string, got {type(content).__name__}")


def scored_turns(messages: Sequence[tuple[str, str]], first: int, turns: str) -> tuple[int, ...]:
    """Indices of the assistant turns from `first` on: all of them, or the last only."""
    idx = tuple(i for i in range(first, len(messages)) if messages[i][0] == "assistant")
    return idx[-1:] if turns == "last" else idx


def flat_prompt(template: str, prompt: str, obj: Mapping[str, Any]) -> str:
    """The prompt text of a flat sample under a format-string template (unchanged for "plain"/"chat").

    Raises:
        ValueError: the template names a column the row does not have.
    """
    if template in TEMPLATE_NAMES:
        return prompt
    values = {k: "" if v is None else str(v) for k, v in obj.items()}
    values["prompt"] = prompt
    try:
        return template.format_map(values)
    except KeyError as exc:
        raise ValueError(f"template field {{{exc.args[0]}}} names no column of the row; use {{prompt}} or one of "
                         f"the row's columns ({', '.join(sorted(obj))})") from exc
