"""The Mistral v1 tokenizer and the v1 instruct chat format, without torch.

Chat formatting follows `mistral-common` (the reference) exactly: each turn is encoded on its
own by SentencePiece, as mistral-common's `InstructTokenizerV1` does, so token ids match it
where a single `encode` of the joined text would not (whitespace runs, literal `</s>` in text).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TypedDict

import sentencepiece

from jobs.errors import InvalidParameter

ROLES = ("system", "user", "assistant")
# Which role may follow which, as mistral-common's request validator allows them.
_ALLOWED_NEXT = {
    "system": {"system", "user", "assistant"},
    "user": {"system", "user", "assistant"},
    "assistant": {"user", "assistant"},
}
BOS_TEXT, EOS_TEXT = "<s>", "</s>"
# SentencePiece's word-boundary mark, a space in the text.
WORD_MARK = "\u2581"


class TopLogprob(TypedDict):
    """A token and its log-probability, as OpenAI's chat `logprobs` show one."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    """A generated token, with its best alternatives (best first): one entry of OpenAI's
    `choices[0].logprobs.content`, and how a job's logprobs are stored."""

    top_logprobs: list[TopLogprob]


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class MistralTokenizer:
    """SentencePiece over a Mistral `tokenizer.model`; BOS is 1 and EOS is 2 in every v1 model."""

    def __init__(self, model_file: Path | str) -> None:
        self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        self.vocab_size: int = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text: no BOS or EOS, and `<s>` in the text is just text."""
        return list(self._sp.encode(text))

    def model_proto(self) -> bytes:
        """The SentencePiece model itself, for libraries that build their own view of the
        vocabulary from it (the grammar matcher's tokenizer)."""
        return bytes(self._sp.serialized_model_proto())

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._sp.decode(list(ids)))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to the text, as OpenAI reports them: a byte-fallback token
        (`<0xE2>`) is its one byte, a piece is its text with the word mark as a space, and
        a control token (`</s>`) is its own name."""
        if self._sp.is_byte(token_id):
            return bytes([int(self._sp.id_to_piece(token_id)[3:-1], 16)])
        return str(self._sp.id_to_piece(token_id)).replace(WORD_MARK, " ").encode()

    def token_logprob(self, token_id: int, logprob: float) -> TopLogprob:
        """One token's entry; its text is its bytes decoded alone, so a byte of a character
        cut across tokens reads as U+FFFD, as OpenAI's do."""
        data = self.token_bytes(token_id)
        return {"token": data.decode(errors="replace"), "logprob": logprob, "bytes": list(data)}

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """`<s>[INST] user [/INST] answer</s>[INST] ...`, as mistral-common's v1 format."""
        system_prompt, turns = normalize_messages(messages)
        ids = [self.bos_id]
        for index, (role, content) in enumerate(turns):
            if role == "user":
                if index == 0 and system_prompt:
                    content = f"{system_prompt}\n\n{content}"
                ids += self.encode(f"[INST] {content} [/INST]")
            else:
                ids += self.encode(content)
                ids.append(self.eos_id)
        return ids

    def encode_prompt(self, prompt: str, raw: bool) -> list[int]:
        """A plain prompt is one user turn; a raw prompt is tokenized as written.

        In raw text `<s>` and `</s>` stand for BOS and EOS, as the model's own tokenizer reads
        them; BOS is added unless the text already starts with `<s>`.
        """
        if not raw:
            return self.encode_chat([ChatMessage("user", prompt)])
        ids: list[int] = [] if prompt.startswith(BOS_TEXT) else [self.bos_id]
        for chunk in _split_special(prompt):
            if chunk == BOS_TEXT:
                ids.append(self.bos_id)
            elif chunk == EOS_TEXT:
                ids.append(self.eos_id)
            else:
                ids += self.encode(chunk)
        return ids


def _split_special(text: str) -> list[str]:
    chunks: list[str] = []
    rest = text
    while rest:
        positions = [(rest.find(marker), marker) for marker in (BOS_TEXT, EOS_TEXT)]
        found = [(pos, marker) for pos, marker in positions if pos >= 0]
        if not found:
            chunks.append(rest)
            break
        pos, marker = min(found)
        if pos:
            chunks.append(rest[:pos])
        chunks.append(marker)
        rest = rest[pos + len(marker) :]
    return chunks


def normalize_messages(messages: Sequence[ChatMessage]) -> tuple[str | None, list[tuple[str, str]]]:
    """System prompt and user/assistant turns, as mistral-common's normalizer makes them.

    System messages are collected from anywhere and joined with a blank line; consecutive
    messages of one role are merged with a blank line; a conversation that does not open
    with a user turn gets an empty one first. Structures mistral-common refuses are refused
    here with `InvalidParameter` naming the message.
    """
    if not messages:
        raise InvalidParameter("messages", [], "at least one message is required")
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidParameter(
                f"messages[{index}].role", message.role, f"must be one of {', '.join(ROLES)}"
            )
        if message.role == "assistant" and not message.content:
            raise InvalidParameter(
                f"messages[{index}].content", "", "an assistant message must have content"
            )
        if index and message.role not in _ALLOWED_NEXT[messages[index - 1].role]:
            raise InvalidParameter(
                f"messages[{index}].role",
                message.role,
                f"cannot follow a message with role {messages[index - 1].role}",
            )
    if messages[-1].role == "assistant":
        raise InvalidParameter(
            f"messages[{len(messages) - 1}].role",
            "assistant",
            "the conversation must end with a user or system message",
        )

    system_parts = [m.content for m in messages if m.role == "system" and m.content]
    system_prompt = "\n\n".join(system_parts) if system_parts else None

    turns: list[tuple[str, str]] = []
    group_role: str | None = None
    group: list[str] = []
    for message in [*messages, ChatMessage("end", "")]:
        if message.role != group_role:
            if group_role in ("user", "assistant"):
                turns.append((group_role, "\n\n".join(part for part in group if part)))
            group_role, group = message.role, []
        group.append(message.content)
    if not turns or turns[0][0] != "user":
        turns.insert(0, ("user", ""))
    return system_prompt, turns


@lru_cache
def v1_tokenizer() -> MistralTokenizer:
    """The tokenizer of every served model: the `tokenizer.model.v1` that mistral-common ships."""
    data = resources.files("mistral_common") / "data" / "tokenizer.model.v1"
    with resources.as_file(data) as path:
        return MistralTokenizer(path)


def encode_job_input(tokenizer: MistralTokenizer, job_input: dict) -> list[int]:  # type: ignore[type-arg]
    """The prompt ids of a stored job input (`messages`, or `prompt` with `raw`)."""
    if "messages" in job_input:
        messages = [ChatMessage(m["role"], m["content"]) for m in job_input["messages"]]
        return tokenizer.encode_chat(messages)
    return tokenizer.encode_prompt(job_input["prompt"], bool(job_input.get("raw")))
