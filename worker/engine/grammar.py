"""JSON answers enforced while decoding, with llguidance: which tokens each constrained row may
take next.

A row whose `SamplingParams.response_format` holds a JSON Schema gets a matcher of its own
(`Grammars.matcher`), a copy of a template compiled once per distinct schema text and kept in
a bounded LRU; the matcher follows the row's tokens (`consume_token`) and says which tokens
may come next (`mask_logits`). EOS is allowed only where the JSON is complete; once the
matcher has stopped, the row is done. Whitespace between tokens of the JSON is not allowed at
all (compact separators), so a random model cannot spend its tokens on blank runs. The
matchers work on the host; the mask goes to the device in one copy that waits for nothing.
"""

import json
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.torch
import torch
from transformers import AutoTokenizer

from jobs.tokenizer import MistralTokenizer
from worker.engine.tiny import TOKENIZER_CONFIG

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of the stubs alone

# A row whose schema fails to compile fails with an error that starts so; the runtime records
# it under this code.
ERROR_CODE = "invalid_response_format"
# Compiled templates kept per tokenizer: one per distinct schema text, least recently used
# dropped first. A compile takes about a millisecond, so this only saves repeated work.
CACHE_SIZE = 256
# Set over any `x-guidance` options a schema carries: compact separators and no whitespace
# outside strings (llguidance's default allows any run of it).
_OPTIONS: "JsonCompileOptions" = {
    "whitespace_flexible": False,
    "item_separator": ",",
    "key_separator": ":",
}


class GrammarError(ValueError):
    """A schema that llguidance cannot compile."""


Matcher = llguidance.LLMatcher


def _hf_tokenizer(tokenizer: MistralTokenizer) -> object:
    """The same SentencePiece model as a Hugging Face fast tokenizer, which llguidance reads:
    from the model file itself, so that it holds for the built-in tokenizer and for a model
    folder's own alike (their ids match SentencePiece's exactly, as `save_tokenizer` relies
    on too)."""
    proto = tokenizer.model_proto()
    with tempfile.TemporaryDirectory() as staging:
        (Path(staging) / "tokenizer.model").write_bytes(proto)
        (Path(staging) / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
        return AutoTokenizer.from_pretrained(staging)


class Grammars:
    """The matchers of one tokenizer and vocabulary: its llguidance tokenizer (built once, in
    about a second) and a cache of compiled templates."""

    def __init__(self, tokenizer: MistralTokenizer, vocab: int) -> None:
        hf = _hf_tokenizer(tokenizer)
        self.tokenizer = llguidance.hf.from_tokenizer(
            hf,  # type: ignore[arg-type]
            n_vocab=vocab,
            eos_token=tokenizer.eos_id,
        )
        self.vocab = vocab
        self._templates: OrderedDict[str, Matcher] = OrderedDict()
        self._lock = threading.Lock()  # a worker's batches may share it across threads

    def matcher(self, schema: str) -> Matcher:
        """A fresh matcher for one row; raises GrammarError if the schema does not compile."""
        with self._lock:
            template = self._templates.get(schema)
            if template is None:
                template = self._compile(schema)
                self._templates[schema] = template
                if len(self._templates) > CACHE_SIZE:
                    self._templates.popitem(last=False)
            else:
                self._templates.move_to_end(schema)
            return template.deep_copy()

    def _compile(self, schema: str) -> Matcher:
        try:
            grammar = Matcher.grammar_from_json_schema(schema, overrides=_OPTIONS)
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        template = Matcher(self.tokenizer, grammar, log_level=0)
        if template.is_error():
            raise GrammarError(template.get_error())
        return template


@lru_cache(maxsize=4)
def grammars_for(tokenizer: MistralTokenizer, vocab: int) -> Grammars:
    """One `Grammars` per tokenizer and vocabulary, for the life of the process."""
    return Grammars(tokenizer, vocab)


@lru_cache(maxsize=1)
def _executor() -> llguidance.LLExecutor:
    # Masks of many rows are filled in parallel, on llguidance's own threads, without the GIL.
    return llguidance.LLExecutor()


def mask_logits(logits: torch.Tensor, matchers: Sequence[Matcher | None]) -> torch.Tensor:
    """`logits` with -inf on every token a row's matcher does not allow next (row i of the
    logits is matchers[i]; None: free). A new tensor: the raw logits stay as they were, for
    the logprobs. The rows' bitmasks are filled on the host and copied over without a wait."""
    rows, vocab = logits.shape
    bitmask = torch.full(llguidance.torch.get_bitmask_shape(rows, vocab), -1, dtype=torch.int32)
    constrained = [(matcher, row) for row, matcher in enumerate(matchers) if matcher is not None]
    llguidance.torch.fill_next_token_bitmask_par(_executor(), constrained, bitmask)
    words = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    # Token 32 * w + b is allowed where bit b of word w is set.
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    return logits.masked_fill(~allowed, float("-inf"))
