"""Conversations and the flat formats become exactly the tokens fine-tuning saw, and the same features."""

from __future__ import annotations

import pytest
import torch

from factories import make_chat_tokenizer, make_tokenizer
from forvalue.indexer.chat import chat_tokens, plain_join
from forvalue.indexer.data import Sample, flat_sample
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.formats import Chat, Schema
from forvalue.indexer.forward import Encoded, encode_input, extract_features, forward_batch

CHAT = Chat((("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?"), ("assistant", "4")),
            (2, 4))


@pytest.fixture(scope="module")
def chat_tok():
    return make_chat_tokenizer()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def by_hand(tok, chat: Chat) -> tuple[list[int], list[int]]:
    """The template's tokens written out turn by turn, and the token indices of the scored assistant turns."""
    ids, scored = [], []
    for i, (role, content) in enumerate(chat.messages):
        ids += ids_of(tok, f"<s>{role}: ")
        turn = ids_of(tok, f"{content}</s>")
        if i in chat.scored:
            scored += range(len(ids), len(ids) + len(turn))
        ids += turn + ids_of(tok, " ")
    return ids, scored


def test_chat_tokens_are_the_template_s_and_score_the_assistant_turns(chat_tok):
    ids, scored = chat_tokens(chat_tok, CHAT)
    assert ids == chat_tok.apply_chat_template([{"role": r, "content": c} for r, c in CHAT.messages], tokenize=True,
                                               return_dict=False)
    assert (ids, scored) == by_hand(chat_tok, CHAT)
    assert chat_tok.decode([ids[t] for t in scored]) == "Hello!</s>4</s>"
    last = Chat(CHAT.messages, CHAT.scored[-1:])
    assert chat_tok.decode([ids[t] for t in chat_tokens(chat_tok, last)[1]]) == "4</s>"


def test_chat_features_equal_the_same_tokens_given_by_hand(model64, chat_tok):
    config = ForwardConfig(dtype=torch.float64)
    head = Head.from_model(model64, torch.float64)
    via_chat = forward_batch(model64, head, [encode_input(chat_tok, ("p", "r", CHAT), config)], config)
    ids, scored = by_hand(chat_tok, CHAT)
    hand = Encoded(ids, scored[0] - 1, positions=tuple(t - 1 for t in scored))
    want = forward_batch(model64, head, [hand], config)
    assert want.h.shape[0] == len(scored) == 9
    torch.testing.assert_close(via_chat.h, want.h, rtol=0, atol=0)
    assert torch.equal(via_chat.y, want.y) and torch.allclose(via_chat.lse, want.lse)
    # and not the same as scoring the last turn only
    only_last = encode_input(chat_tok, ("p", "r", Chat(CHAT.messages, (4,))), config)
    assert len(only_last.positions) == 2


def test_tokens_all_scores_every_position_and_max_length_cuts_from_the_right(chat_tok):
    ids, _ = chat_tokens(chat_tok, CHAT)
    e = encode_input(chat_tok, ("p", "r", CHAT), ForwardConfig(tokens="all"))
    assert e.positions == tuple(range(len(ids) - 1))
    n = len(by_hand(chat_tok, Chat(CHAT.messages[:3], (2,)))[0])  # up to the end of the first answer
    cut = encode_input(chat_tok, ("p", "r", CHAT), ForwardConfig(max_length=n))
    assert cut.truncated and len(cut.ids) == n and len(cut.positions) == len("Hello!") + 1
    with pytest.raises(ValueError, match="max_length"):
        encode_input(chat_tok, ("p", "r", CHAT), ForwardConfig(max_length=5))


def test_plain_join_without_a_chat_template():
    tokenizer = make_tokenizer("\n")
    text = plain_join(tokenizer, CHAT.messages)
    assert text.startswith("<s>system: Be brief.\n\nuser: Hi\n\nassistant: Hello!</s>\n\n")
    ids, scored = chat_tokens(tokenizer, CHAT)
    assert tokenizer.decode([ids[t] for t in scored]) == "Hello!</s>4</s>"


def test_template_that_rewrites_earlier_turns_is_refused(chat_tok):
    tok = make_chat_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="chat template"):
        chat_tokens(tok, CHAT)


@pytest.mark.parametrize("row", [
    {"prompt": "Name a color:", "completion": " red"},
    {"instruction": "Name a color", "input": "warm", "output": " red"},
    {"instruction": "Name a color", "input": "", "output": " red"},
])
def test_flat_formats_equal_their_tokens_by_hand(tmp_path, model64, tokenizer, row):
    import json

    from forvalue.indexer.data import read_samples

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (s,) = read_samples(path)
    assert s.chat is None
    config = ForwardConfig(dtype=torch.float64)
    head = Head.from_model(model64, torch.float64)
    prompt = row.get("prompt") or (row["instruction"] + ("\n\n" + row["input"] if row["input"] else ""))
    response = row.get("completion") or row["output"]
    p_ids = tokenizer(prompt)["input_ids"]  # with the tokenizer's BOS
    r_ids = ids_of(tokenizer, response) + [tokenizer.eos_token_id]
    hand = Encoded(p_ids + r_ids, len(p_ids) - 1)
    want = forward_batch(model64, head, [hand], config)
    got = extract_features(model64, tokenizer, [s.as_input()], config, head)
    assert want.h.shape[0] == len(r_ids)
    torch.testing.assert_close(got.h, want.h, rtol=0, atol=0)
    assert torch.equal(got.y, want.y)


def test_template_chat_and_format_string_for_flat_rows(chat_tok):
    s = flat_sample("Hi", "Hello!", Schema(template="chat"))
    assert s.chat == Chat((("user", "Hi"), ("assistant", "Hello!")), (1,))
    ids, scored = chat_tokens(chat_tok, s.chat)
    assert chat_tok.decode([ids[t] for t in scored]) == "Hello!</s>"
    s = flat_sample("Hi", "Hello!", Schema(template="Q: {prompt}\nA:"))
    assert (s.prompt, s.response, s.chat) == ("Q: Hi\nA:", "Hello!", None)
    assert isinstance(s, Sample)
