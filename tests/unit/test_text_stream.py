"""What a streaming row shows while it decodes, on the real Mistral v1 tokenizer: never a
broken character, never any part of a stop string, and pieces that join into the answer."""

import pytest

from jobs.streams import END, TEXT, StreamedText, StreamEvent
from jobs.tokenizer import v1_tokenizer
from worker.engine.text_stream import TextStream, held_back, showable

REPLACEMENT = "\ufffd"


def tokens_of(text: str) -> list[int]:
    return v1_tokenizer().encode_prompt(text, raw=True)[1:]  # without BOS


def shown_after_each_token(text: str, stops: list[str]) -> list[str]:
    tokenizer = v1_tokenizer()
    ids = tokens_of(text)
    stream = TextStream(tokenizer.decode, stops)
    return [stream.update(ids[:count]) for count in range(1, len(ids) + 1)]


def test_the_sample_texts_do_use_byte_fallback_tokens() -> None:
    """The flamingo and the math letters are several tokens per character: what the tests
    below guard against happens with them."""
    tokenizer = v1_tokenizer()
    for text in ("🦩", "𝔘𝔫", "쨘"):
        ids = tokens_of(text)
        partial = [tokenizer.decode(ids[:count]) for count in range(1, len(ids))]
        assert any(REPLACEMENT in piece for piece in partial), (text, partial)


@pytest.mark.parametrize(
    "text",
    ["Hi 🦩 flamingo 𝔘𝔫 ok", "쨘 x 你好 y", "plain words, then 💯 and 🦩🦩"],
)
def test_no_broken_character_is_ever_shown(text: str) -> None:
    shown = shown_after_each_token(text, [])
    assert all(REPLACEMENT not in piece for piece in shown)
    assert shown[-1] == v1_tokenizer().decode(tokens_of(text))
    for earlier, later in zip(shown, shown[1:], strict=False):
        assert later.startswith(earlier)


def test_a_stop_string_split_across_tokens_is_never_shown_even_in_part() -> None:
    # " STOP" is several tokens; the text before it is shown once it cannot be the start of it.
    text = "The answer is 42 STOP and more"
    stops = [" STOP"]
    assert len(tokens_of(" STOP")) > 1
    shown = shown_after_each_token(text, stops)
    for piece in shown:
        assert "STOP" not in piece
        assert not piece.endswith(" ST") and not piece.endswith(" S")
    assert shown[-1] == "The answer is 42"


def test_a_stop_string_of_byte_fallback_characters_is_held_back() -> None:
    text = "before 🦩🦩 after"
    shown = shown_after_each_token(text, ["🦩🦩"])
    assert all("🦩" not in piece and REPLACEMENT not in piece for piece in shown)
    assert shown[-1] == "before "  # one flamingo alone could begin the stop string


def test_held_back_counts_the_longest_start_of_any_stop_string() -> None:
    assert held_back("hello wo", ["world", "xyz"]) == 2
    assert held_back("hello w", ["wo", "hello w!"]) == 7
    assert held_back("hello", ["world"]) == 0
    assert showable("abc STO", [" STOP"]) == "abc"
    assert showable("abc STOP tail", [" STOP"]) == "abc"
    assert showable("abc \ufffd", []) == "abc "


def test_text_shown_never_shrinks() -> None:
    decoded = iter(["Hello wor", "Hello", "Hello world"])
    stream = TextStream(lambda _ids: next(decoded), [])
    assert stream.update([1]) == "Hello wor"
    assert stream.update([1, 2]) == "Hello wor"  # a decoder that rewrote its text: kept
    assert stream.update([1, 2, 3]) == "Hello world"


def test_a_reader_joins_text_by_offset_and_never_across_a_gap() -> None:
    text = StreamedText()
    assert text.add(StreamEvent(TEXT, 1, "Hello", 0)) == "Hello"
    assert text.add(StreamEvent(TEXT, 1, " there", 10)) == ""  # " wor..." was lost
    assert text.add(StreamEvent(TEXT, 1, " world", 5)) == " world"  # resent from its offset
    assert text.add(StreamEvent(TEXT, 1, " world", 5)) == ""  # a repeat shows nothing
    assert text.shown == "Hello world"


def test_a_second_attempt_shows_only_what_goes_beyond_the_first() -> None:
    text = StreamedText()
    text.add(StreamEvent(TEXT, 1, "Once upon", 0))
    assert text.add(StreamEvent(TEXT, 2, "Once", 0)) == ""
    assert text.add(StreamEvent(TEXT, 2, " upon a time", 4)) == " a time"
    assert text.offer("Once upon a time.") == "."
    assert text.offer("Something else") == ""  # never contradicts what was shown
    assert StreamEvent.parse(StreamEvent(END, 3).fields()) == StreamEvent(END, 3)
