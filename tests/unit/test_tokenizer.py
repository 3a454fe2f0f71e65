"""Chat formatting and token ids against mistral-common itself, the reference."""

import random

import pytest
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer as ReferenceTokenizer

from jobs.errors import InvalidParameter
from jobs.tokenizer import ChatMessage, v1_tokenizer

REFERENCE = ReferenceTokenizer.v1()
MESSAGE_CLASS = {"user": UserMessage, "system": SystemMessage, "assistant": AssistantMessage}
# Pieces that trip naive formatting: whitespace runs, indentation, newlines, markers that
# look like special tokens, non-Latin text and emoji.
PIECES = [
    *"abcxyz .,!?\t",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "é",
    "日本語",
    "🙂",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "    def f(x):\n        return x",
    "Hello",
    " world",
]


def reference_ids(messages: list[ChatMessage]) -> list[int] | None:
    request = ChatCompletionRequest(
        messages=[MESSAGE_CLASS[m.role](content=m.content) for m in messages]
    )
    try:
        return list(REFERENCE.encode_chat_completion(request).tokens)
    except (MistralCommonException, AssertionError, ValueError):
        return None


def random_conversation(rng: random.Random) -> list[ChatMessage]:
    return [
        ChatMessage(
            rng.choice(["user", "user", "assistant", "system"]),
            "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 10))),
        )
        for _ in range(rng.randint(1, 7))
    ]


def test_two_thousand_random_conversations_match_mistral_common() -> None:
    rng = random.Random(20261120)
    ours = v1_tokenizer()
    encoded = refused = 0
    for _ in range(2000):
        messages = random_conversation(rng)
        expected = reference_ids(messages)
        if expected is None:
            with pytest.raises(InvalidParameter):
                ours.encode_chat(messages)
            refused += 1
        else:
            assert ours.encode_chat(messages) == expected, messages
            encoded += 1
    # Both kinds of outcome are exercised, so neither branch passes vacuously.
    assert encoded > 1000 and refused > 200


@pytest.mark.parametrize(
    "messages",
    [
        [ChatMessage("user", "Hello")],
        [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")],
        [ChatMessage("user", "a"), ChatMessage("user", "b")],
        [ChatMessage("system", "s1"), ChatMessage("user", "u"), ChatMessage("system", "s2")],
        [ChatMessage("user", "q"), ChatMessage("assistant", "a"), ChatMessage("user", "q2")],
        [ChatMessage("system", "only a system prompt")],
        [ChatMessage("assistant", "hi"), ChatMessage("user", "hello")],
    ],
)
def test_known_shapes_match_mistral_common(messages: list[ChatMessage]) -> None:
    assert v1_tokenizer().encode_chat(messages) == reference_ids(messages)


def test_the_format_is_the_v1_instruct_format() -> None:
    tokenizer = v1_tokenizer()
    ids = tokenizer.encode_chat(
        [ChatMessage("user", "Hi"), ChatMessage("assistant", "Yo"), ChatMessage("user", "Bye")]
    )
    assert ids[:4] == [1, 733, 16289, 28793]  # <s> [INST]
    assert tokenizer.decode(ids) == "[INST] Hi [/INST] Yo [INST] Bye [/INST]"
    assert ids.count(tokenizer.eos_id) == 1  # after the assistant's answer


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([ChatMessage("user", "q"), ChatMessage("assistant", "a")], "messages[1].role"),
        ([ChatMessage("assistant", "")], "messages[0].content"),
        ([ChatMessage("tool", "x")], "messages[0].role"),
        (
            [ChatMessage("user", "q"), ChatMessage("assistant", "a"), ChatMessage("system", "s")],
            "messages[2].role",
        ),
    ],
)
def test_refused_conversations_name_the_message(messages: list[ChatMessage], param: str) -> None:
    with pytest.raises(InvalidParameter) as err:
        v1_tokenizer().encode_chat(messages)
    assert err.value.param == param


def test_plain_prompt_is_one_user_turn() -> None:
    tokenizer = v1_tokenizer()
    assert tokenizer.encode_prompt("Tell me a joke", raw=False) == reference_ids(
        [ChatMessage("user", "Tell me a joke")]
    )


def test_raw_prompt_is_untouched_and_gets_bos_once() -> None:
    tokenizer = v1_tokenizer()
    text = "[INST] Tell me a joke [/INST]"
    assert tokenizer.encode_prompt(text, raw=True) == [1, *tokenizer.encode(text)]
    assert tokenizer.encode_prompt("<s>" + text, raw=True) == [1, *tokenizer.encode(text)]
    # A hand-written chat in raw form gives the ids of the same chat formatted for us.
    assert tokenizer.encode_prompt("<s>[INST] Tell me a joke [/INST]", raw=True) == (
        tokenizer.encode_chat([ChatMessage("user", "Tell me a joke")])
    )
    two_turns = tokenizer.encode_prompt("<s>[INST] a [/INST] b</s>[INST] c [/INST]", raw=True)
    assert two_turns == tokenizer.encode_chat(
        [ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c")]
    )
