"""The decode loop: rows in the slots of a preallocated KV cache, one token per row per step.

A batch has a fixed number of slots. Rows join by a prefill of their own (left-padded prompts,
written into free slots) and leave as soon as they finish; a free slot is refilled from the
caller's queue (`refill`) before the next step, so the slots stay full while work waits. The
active rows always fill slots [0, n): a row that leaves without a successor has the highest
row moved into its slot, so a step's cost follows the rows that are still decoding.

A decode step reads back one tensor, the new tokens; EOS, stop strings and lengths are checked
on the host from it, and nothing else in a step waits for the device. Rows joining or leaving
cost a few host-device transfers more (their prefill's first tokens, the new layout).

Rows that ask for logprobs get the model's own log-probabilities: a log_softmax of the raw
logits, before penalties, temperature and filters, for those rows alone. A step keeps them on
the device (one small tensor for the rows that ask, which each row points into), and a row's
values are read back when it leaves, with those of the rows leaving beside it: a step whose
rows do not ask does no more work, and no step waits for them.

Rows with a `response_format` follow a JSON Schema: each has a grammar matcher of its own
(`worker.engine.grammar`), made when it joins; a row whose schema does not compile fails
alone. Before sampling (the prefill's too), their rows of the logits get -inf on every token
the matcher does not allow next, EOS included until the JSON is complete; the mask is built
on the host from the matchers and copied over, and the logprobs stay those of the raw logits.
Each matcher then follows its row's token from the step's read-back; a row whose matcher has
stopped is done ("stop"), one that reaches max_tokens first ends "length". A step of rows
without one does no mask work at all.

A row whose params ask for n > 1 samples is prefilled once: its slot is then copied into n-1
more (`SlotCache.copy`), and each copy draws its own first token from the same prefill logits
with a seed of its own (`jobs.sampling.sample_seed`; sample 0 keeps the row's seed, so it is
the row with n=1). The samples then decode as rows of their own, each with its own grammar
matcher, and end apart; the caller gets one result per key once the last one has ended (its
`samples`). Such a row joins only when n slots are free.
"""

import math
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from jobs.sampling import SamplingParams, sample_seed
from jobs.tokenizer import MistralTokenizer, TokenLogprob
from worker.engine.batching import plan_groups
from worker.engine.grammar import (
    ERROR_CODE,
    GrammarError,
    Grammars,
    Matcher,
    grammars_for,
    mask_logits,
)
from worker.engine.kv_cache import SlotCache, attention_mask, decode_inputs, prefill_inputs
from worker.engine.loader import LoadedModel
from worker.engine.lora_batched import BASE, forward_indexed, row_indices
from worker.engine.sampler import SamplingTensors, sample

Decode = Callable[[Sequence[int]], str]
CANCELLED = "cancelled"
FAILED = "error"
# A prefill group is split where left padding would pass this multiple of its real tokens.
PREFILL_MAX_PADDING = 0.5
# The profiler's name for a decode step.
STEP_LABEL = "mbatch::decode_step"
# A cache's slots are a multiple of this many columns long.
CACHE_COLUMNS = 64
# Each model's cache, kept for its next batch (a worker runs one batch at a time).
_CACHES: "weakref.WeakKeyDictionary[torch.nn.Module, SlotCache]" = weakref.WeakKeyDictionary()
# Token ids travel beside log-probabilities in float32 tensors: exact below 2**24.
_EXACT_FLOAT_IDS = 2**24
# What JSON shows for a log-probability of -inf (which it cannot carry), as OpenAI and vLLM.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # without the EOS token, if the row ended with one
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length", CANCELLED or FAILED
    compute_seconds: float  # this row's share of the batch's time, by tokens
    # Tokens generated, EOS included, as OpenAI and vLLM count them (and bill them).
    completion_tokens: int
    error: str | None = None  # why a FAILED row could not run; its batch mates ran on
    # One entry per token of `token_ids`, for a row that asked for logprobs; None otherwise.
    logprobs: list[TokenLogprob] | None = None
    # Every sample of a row that asked for n > 1 (sample 0 first, whose fields are the
    # Generation's own, unless a sample was cancelled or failed); None for one sample.
    samples: "list[Generation] | None" = None


@dataclass(frozen=True)
class NewRow:
    """A row to decode; `key` is the caller's, handed back with its result."""

    key: Hashable
    prompt: Sequence[int]
    params: SamplingParams
    adapter: str | None = None
    # Its tokens are reported after every step (`OnTokens`), for its text to be streamed.
    stream: bool = False


# Called with the number of free slots; returns at most that many rows to start.
Refill = Callable[[int], Sequence[NewRow]]
OnFinish = Callable[[Hashable, Generation], None]
# The keys of rows whose results are no longer wanted: they leave at the next step.
Dropped = Callable[[], Collection[Hashable]]
# Told of each decode step: the rows it decoded and its seconds (for metrics and benchmarks).
OnStep = Callable[[int, float], None]
# Told after each step (and each prefill) of the streaming rows still decoding: each one's key
# and its tokens so far. Called after the rows that ended were reported, even with no rows.
OnTokens = Callable[[list[tuple[Hashable, Sequence[int]]]], None]


class _Samples:
    """The results of one key's samples, gathered until the last of them ends."""

    def __init__(self, n: int) -> None:
        self.results: list[Generation | None] = [None] * n

    def add(self, index: int, generation: Generation) -> Generation | None:
        """Note a sample's result; the key's whole result once every sample has one."""
        self.results[index] = generation
        done = [result for result in self.results if result is not None]
        if len(done) < len(self.results):
            return None
        # A sample cancelled or failed ends its key so: the caller sees that sample's ending
        # (a cancelled key's earlier samples were not wanted either).
        ended = [result for result in done if result.finish_reason in (CANCELLED, FAILED)]
        return replace(ended[0] if ended else done[0], samples=done)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str | None:
    positions = [text.find(stop) for stop in stops]
    found = [pos for pos in positions if pos >= 0]
    return text[: min(found)] if found else None


class _Row:
    """The state of one row while it decodes."""

    def __init__(self, new: NewRow, budget: int) -> None:
        self.key = new.key
        self.prompt = list(new.prompt)
        self.params = new.params
        self.adapter = new.adapter or BASE
        self.stream = new.stream
        self.budget = budget
        self.tokens: list[int] = []
        self.ended_by_eos = False
        self.finish: str | None = "length" if budget == 0 else None
        self.cut_text: str | None = None
        self.error: str | None = None
        self.seconds = 0.0
        # Where each token's log-probabilities are, for a row that asks for them: a step's
        # record on the device (see `_logprob_record`) and this row's line in it.
        self.logprob_steps: list[tuple[torch.Tensor, int]] = []
        # What its tokens may be, for a row with a response_format; None: free text.
        self.grammar: Matcher | None = None
        # The longest stop string in UTF-8 bytes: every token adds at least one byte to the
        # text, so a stop string that ends in the newest token lies within that many tokens.
        self.stop_bytes = max((len(stop.encode()) for stop in self.params.stop), default=0)
        # Which sample of its key this row is, and where the key's samples gather (None for
        # a row of one sample).
        self.sample = 0
        self.samples: _Samples | None = None

    def sample_row(self, index: int) -> "_Row":
        """Sample `index` of this freshly prefilled row: the same prompt and settings, its own
        seed (a random one where the row has none), and a copy of its fresh grammar matcher."""
        seed = self.params.seed
        params = replace(self.params, seed=None if seed is None else sample_seed(seed, index))
        row = _Row(NewRow(self.key, self.prompt, params, self.adapter, self.stream), self.budget)
        row.sample, row.samples = index, self.samples
        if self.grammar is not None:
            row.grammar = self.grammar.deep_copy()
        return row

    def accept(self, token: int, eos_id: int, decode: Decode) -> None:
        if token == eos_id:
            self.finish, self.ended_by_eos = "stop", True
            return
        self.tokens.append(token)
        if self.grammar is not None and self._grammar_ends(token):
            return
        if self.params.stop and self._stop_in_tail(decode):
            cut = _cut_at_stop(decode(self.tokens), self.params.stop)
            if cut is not None:
                self.cut_text, self.finish = cut, "stop"
                return
        if len(self.tokens) >= self.budget:
            self.finish = "length"

    def _grammar_ends(self, token: int) -> bool:
        """The matcher follows the token; whether that ends the row: the JSON is complete and
        nothing but EOS may follow ("stop"), or, which the mask rules out, it was refused."""
        assert self.grammar is not None
        if not self.grammar.consume_token(token):
            self.fail(f"the grammar refused token {token}: {self.grammar.get_error()}")
            return True
        if self.grammar.is_stopped():
            self.finish = "stop"
            return True
        return False

    def _stop_in_tail(self, decode: Decode) -> bool:
        """Whether a stop string lies in the newest tokens. Counted in bytes, not characters:
        byte-fallback tokens (emoji, CJK, math letters) are a byte each, several per character.
        A few more tokens keep the stop string clear of the window's first piece, which may be
        the end of a character cut in two, or lose its leading space in decoding."""
        tail = decode(self.tokens[-(self.stop_bytes + 4) :])
        return any(stop in tail for stop in self.params.stop)

    def fail(self, error: str) -> None:
        self.finish, self.error = FAILED, error

    def result(self, decode: Decode, logprobs: list[TokenLogprob] | None = None) -> Generation:
        text = self.cut_text if self.cut_text is not None else decode(self.tokens)
        return Generation(
            token_ids=self.tokens,
            text=text if self.finish != FAILED else "",
            finish_reason=self.finish or "length",
            compute_seconds=self.seconds,
            completion_tokens=len(self.tokens) + self.ended_by_eos,
            error=self.error,
            logprobs=logprobs,
        )

    @property
    def reports_logprobs(self) -> bool:
        """Whether its logprobs are read back: it asked, and its result is wanted."""
        return self.params.logprobs and self.finish not in (CANCELLED, FAILED)

    def logprob_slices(self) -> list[torch.Tensor]:
        """This row's values on the device, a [1 + 2 * top_logprobs] view per kept token (an
        EOS that ended the row is not one of its tokens)."""
        width = 1 + 2 * self.params.top_logprobs
        steps = self.logprob_steps[: len(self.tokens)]
        return [record[line, :width] for record, line in steps]


def _asking(rows: Sequence[_Row]) -> tuple[int, ...]:
    """Which of these rows ask for logprobs."""
    return tuple(index for index, row in enumerate(rows) if row.params.logprobs)


def _grammars(rows: Sequence[_Row]) -> list[Matcher | None] | None:
    """The rows' matchers, row by row; None where no row has one (nothing to mask)."""
    matchers = [row.grammar for row in rows]
    return matchers if any(matcher is not None for matcher in matchers) else None


def _logprob_record(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> torch.Tensor:
    """[rows, 1 + 2 * top] float32: the log-probability of each row's token, then its `top`
    best tokens as (log-probability, id) pairs, best first. From the raw logits, as vLLM
    reports them by default: what the model says, not what the sampler drew from."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1))
    if not top:
        return chosen
    best = logprobs.topk(top, dim=-1)  # sorted, best first
    pairs = torch.stack([best.values, best.indices.to(torch.float32)], dim=2).flatten(1)
    return torch.cat([chosen, pairs], dim=1)


def _capture_logprobs(
    rows: Sequence[_Row],
    asking: tuple[int, ...],
    index: torch.Tensor | None,
    logits: torch.Tensor,
    tokens: torch.Tensor,
) -> None:
    """Keep the step's values of the rows that ask (`asking`, on the device as `index`; None
    where every row asks), on the device, each row pointing at its line."""
    if index is not None:
        logits, tokens = logits[index], tokens[index]
    record = _logprob_record(logits, tokens, max(rows[i].params.top_logprobs for i in asking))
    for line, row_index in enumerate(asking):
        rows[row_index].logprob_steps.append((record, line))


def _read_logprobs(
    rows: Sequence[_Row], tokenizer: MistralTokenizer
) -> list[list[TokenLogprob] | None]:
    """The logprobs of rows that are leaving, read back together: one transfer, made only
    when one of them reports logprobs."""
    slices = [row.logprob_slices() if row.reports_logprobs else [] for row in rows]
    flat = [piece for pieces in slices for piece in pieces]
    values: list[float] = torch.cat(flat).tolist() if flat else []
    results: list[list[TokenLogprob] | None] = []
    start = 0
    for row, pieces in zip(rows, slices, strict=True):
        if not row.reports_logprobs:
            results.append(None)
            continue
        size = sum(len(piece) for piece in pieces)
        results.append(_entries(tokenizer, row, values[start : start + size]))
        start += size
    return results


def _shown(logprob: float) -> float:
    """A value JSON (and Postgres) can hold: -inf, and NaN from a broken model, as the floor."""
    return logprob if math.isfinite(logprob) and logprob > MIN_LOGPROB else MIN_LOGPROB


def _entries(tokenizer: MistralTokenizer, row: _Row, values: list[float]) -> list[TokenLogprob]:
    """A row's flat values (per token: its log-probability, then (log-probability, id) pairs)
    as OpenAI's `logprobs.content` entries."""
    width = 1 + 2 * row.params.top_logprobs
    entries = []
    for index, token in enumerate(row.tokens[: len(values) // width]):
        step = values[index * width : (index + 1) * width]
        chosen = tokenizer.token_logprob(token, _shown(step[0]))
        top = [
            tokenizer.token_logprob(int(step[pair + 1]), _shown(step[pair]))
            for pair in range(1, width, 2)
        ]
        entries.append(
            TokenLogprob(
                token=chosen["token"],
                logprob=chosen["logprob"],
                bytes=chosen["bytes"],
                top_logprobs=top,
            )
        )
    return entries


class _Sampling:
    """The sampler's per-row state, row i for slot i: its tensors, and the tokens each row has
    seen (prompt and output) and generated, for the penalties. Every call into the sampler is
    made here."""

    def __init__(self, tensors: SamplingTensors, seen: torch.Tensor, counts: torch.Tensor) -> None:
        self.tensors, self.seen, self.counts = tensors, seen, counts

    @classmethod
    def start(
        cls,
        rows: Sequence[_Row],
        vocab: int,
        device: torch.device,
        prompts: torch.Tensor,
        real: torch.Tensor,
    ) -> "_Sampling":
        """New rows, with `prompts` their padded ids and `real` where they are not padding."""
        tensors = SamplingTensors.from_params([row.params for row in rows], vocab, device)
        seen = torch.zeros((len(rows), vocab), device=device)
        seen = seen.scatter_add_(1, prompts, real.to(seen.dtype)) > 0
        counts = torch.zeros((len(rows), vocab), dtype=torch.int32, device=device)
        return cls(tensors, seen, counts)

    @staticmethod
    def check(params: SamplingParams, vocab: int, device: torch.device) -> None:
        """Raise what setting up this row's sampling alone raises."""
        SamplingTensors.from_params([params], vocab, device)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = sample(logits, self.seen, self.counts, self.tensors)
        # Kept up only while a row uses them: a row that joins later starts its own from its
        # prompt, and a row without penalties never reads them.
        flags = self.tensors.flags
        if flags.any_repetition_penalty or flags.any_additive_penalty:
            rows = torch.arange(len(tokens), device=tokens.device)
            self.seen[rows, tokens] = True
            self.counts[rows, tokens] += 1
        return tokens

    def extend(self, other: "_Sampling") -> "_Sampling":
        return _Sampling(
            self.tensors.concat(other.tensors),
            torch.cat([self.seen, other.seen]),
            torch.cat([self.counts, other.counts]),
        )

    def select(self, rows: list[int], index: torch.Tensor) -> "_Sampling":
        """These rows, in this order (`index` is `rows` on the device)."""
        return _Sampling(self.tensors.select(rows), self.seen[index], self.counts[index])


@dataclass
class _Joining:
    """A prefilled group of new rows, with the slots they were written into."""

    rows: list[_Row]
    slots: list[int]
    first_columns: list[int]
    width: int
    sampling: _Sampling
    tokens: torch.Tensor  # each row's first token


class _Batch:
    """The rows in the slots, and what the device holds for them."""

    def __init__(
        self,
        loaded: LoadedModel,
        slots: int,
        on_finish: OnFinish,
        compiled: bool = False,
        on_step: OnStep | None = None,
    ) -> None:
        self.loaded = loaded
        self.slots = slots
        self.on_step = on_step
        # A compiled step always runs every slot over every column: one shape, one graph.
        self.step_forward = _compiled_step(loaded.device) if compiled else _model_step
        self.on_finish = on_finish
        self.device = loaded.device
        config = loaded.model.config
        self.vocab = config.vocab_size
        self.window: int | None = getattr(config, "sliding_window", None)
        self.attention = config._attn_implementation
        self.context = loaded.spec.context_length
        self.eos_id = loaded.tokenizer.eos_id
        self.tokenizer = loaded.tokenizer
        self.decode = loaded.tokenizer.decode
        self.cache: SlotCache | None = None
        # Slot i: its row, the first column of the row's own (after its left padding) and the
        # column its next token goes to; the same two columns on the device (for every slot,
        # 0 where none is in use); the row's input token for the next step; its sampling state.
        self.rows: list[_Row] = []
        self.first: list[int] = []
        self.next: list[int] = []
        self.first_t = torch.zeros(0, dtype=torch.long, device=self.device)
        self.next_t = torch.zeros(0, dtype=torch.long, device=self.device)
        self.next_ids = torch.zeros(0, dtype=torch.long, device=self.device)
        self.sampling: _Sampling | None = None
        # The slots whose rows ask for logprobs, and the same on the device (None where every
        # row asks): set with the layout, so that a step of rows that do not ask pays nothing.
        self.asking: tuple[int, ...] = ()
        self.asking_index: torch.Tensor | None = None
        # Each slot's grammar matcher, set with the layout; None where no row has one, so
        # that a step of free rows does no mask work.
        self.matchers: list[Matcher | None] | None = None
        self._grammars: Grammars | None = None  # made for the first row that needs one
        # Rows that finished before they had a slot (setup failed, or no room for a token).
        self.unseated: list[_Row] = []

    @property
    def free(self) -> int:
        return self.slots - len(self.rows)

    # Rows joining ------------------------------------------------------------------------

    def admit(self, new_rows: Sequence[NewRow]) -> None:
        """Prefill new rows into free slots; they take part in the next step. A row that
        cannot be set up fails alone, at once."""
        rows = [row for row in map(self._setup, new_rows) if row.finish is None]
        if not rows:
            return
        live = set(range(len(self.rows)))  # the loop retires finished rows before admitting
        final = len(live) + sum(row.params.n for row in rows)  # a slot per sample
        free = [slot for slot in range(final) if slot not in live]
        joining = []
        groups = plan_groups(rows, lambda row: len(row.prompt), PREFILL_MAX_PADDING, min_rows=1)
        # Each row needs its group's width (its prompt, left-padded) and its own budget.
        self._reserve(max(len(group[-1].prompt) + max(r.budget for r in group) for group in groups))
        for group in groups:
            targets, free = free[: len(group)], free[len(group) :]
            copies = sum(row.params.n - 1 for row in group)
            sample_slots, free = free[:copies], free[copies:]
            joining.append(self._prefill(group, targets, sample_slots))
        self._arrange(live, final, joining)

    def _setup(self, new: NewRow) -> _Row:
        """A row, checked alone: its ids, its sampling settings."""
        # A prompt that leaves less room than max_tokens is capped and reports "length".
        row = _Row(new, min(new.params.max_tokens, max(self.context - len(new.prompt), 0)))
        try:
            if not row.prompt:
                raise ValueError("the prompt has no tokens")
            if min(row.prompt) < 0 or max(row.prompt) >= self.vocab:
                raise ValueError(f"a prompt token is outside the vocabulary of {self.vocab}")
            _Sampling.check(row.params, self.vocab, self.device)
            if row.params.n > self.slots:
                raise ValueError(f"n={row.params.n} samples need as many slots, of {self.slots}")
            if row.params.logprobs and self.vocab > _EXACT_FLOAT_IDS:
                raise ValueError(f"logprobs need a vocabulary below {_EXACT_FLOAT_IDS} tokens")
            if row.params.logprobs and self.vocab > self.tokenizer.vocab_size:
                # A top token the tokenizer cannot name would fail every row leaving with it.
                raise ValueError("logprobs need a tokenizer that names every token of the model")
            if row.adapter != BASE:
                row_indices(self.loaded, [row.adapter])  # raises unless it is loaded
        except torch.OutOfMemoryError:
            raise  # not the row's fault: its batch cannot run now
        except Exception as exc:
            row.fail(f"the row could not be set up: {exc}")
        if row.finish is None and row.params.response_format is not None:
            try:
                row.grammar = self._grammar_set().matcher(row.params.response_format)
            except GrammarError as exc:
                row.fail(f"{ERROR_CODE}: the schema does not compile: {exc}")
            except Exception as exc:  # the grammar tokenizer itself: this row fails, not its batch
                row.fail(f"{ERROR_CODE}: no grammar could be made: {exc}")
        if row.finish is not None:
            self.unseated.append(row)  # reported alone: it makes no samples
        elif row.params.n > 1:
            row.samples = _Samples(row.params.n)
        return row

    def _grammar_set(self) -> Grammars:
        if self._grammars is None:
            self._grammars = grammars_for(self.tokenizer, self.vocab)
        return self._grammars

    def _prefill(self, group: list[_Row], slots: list[int], sample_slots: list[int]) -> _Joining:
        """Prefill `group` into `slots`; the further samples of its rows that ask for n > 1
        take `sample_slots`, copied from their rows' slots."""
        assert self.cache is not None
        started = time.perf_counter()
        width = max(len(row.prompt) for row in group)
        input_ids = torch.zeros((len(group), width), dtype=torch.long)
        real = torch.zeros((len(group), width), dtype=torch.bool)
        for index, row in enumerate(group):
            input_ids[index, width - len(row.prompt) :] = torch.tensor(row.prompt)
            real[index, width - len(row.prompt) :] = True
        input_ids, real = input_ids.to(self.device), real.to(self.device)
        lengths = [len(row.prompt) for row in group]
        allowed, positions = prefill_inputs(lengths, width, self.window, self.device)
        self.cache.plan_prefill(slots, width)
        names = [row.adapter for row in group]
        logits = _model_step(
            self.loaded,
            _adapter_index(self.loaded, names),
            input_ids,
            attention_mask(allowed, self.attention, self.loaded.dtype),
            positions,
            self.cache,
        )
        sampling = _Sampling.start(group, self.vocab, self.device, input_ids, real)
        matchers = _grammars(group)
        tokens = sampling.sample(mask_logits(logits, matchers) if matchers else logits)
        if asking := _asking(group):
            asking_index = self._rows_index(asking, len(group))
            _capture_logprobs(group, asking, asking_index, logits, tokens)
        joining = _Joining(group, slots, [width - n for n in lengths], width, sampling, tokens)
        if sample_slots:  # before the rows' matchers follow their first tokens
            joining = self._add_samples(joining, sample_slots, logits, input_ids, real)
        for row, token in zip(joining.rows, joining.tokens.tolist(), strict=True):
            row.accept(token, self.eos_id, self.decode)
        elapsed = time.perf_counter() - started
        for row in group:  # the prefill's time, shared by prompt tokens
            row.seconds += elapsed * len(row.prompt) / sum(lengths)
        return joining

    def _add_samples(
        self,
        joining: _Joining,
        slots: list[int],
        logits: torch.Tensor,
        input_ids: torch.Tensor,
        real: torch.Tensor,
    ) -> _Joining:
        """The prefilled rows with their further samples, one per slot of `slots`: each a copy
        of its row's slot, with a first token drawn from its row's prefill logits by its own
        seed (the sampler is vectorised: the logits are repeated, one line per sample)."""
        assert self.cache is not None
        lines = [line for line, row in enumerate(joining.rows) for _ in range(row.params.n - 1)]
        samples = [
            row.sample_row(index) for row in joining.rows for index in range(1, row.params.n)
        ]
        self.cache.copy([joining.slots[line] for line in lines], slots, joining.width)
        index = torch.tensor(lines, device=self.device)
        sampling = _Sampling.start(samples, self.vocab, self.device, input_ids[index], real[index])
        own = logits[index]
        matchers = _grammars(samples)
        tokens = sampling.sample(mask_logits(own, matchers) if matchers else own)
        if asking := _asking(samples):
            _capture_logprobs(samples, asking, self._rows_index(asking, len(samples)), own, tokens)
        return _Joining(
            joining.rows + samples,
            joining.slots + slots,
            joining.first_columns + [joining.first_columns[line] for line in lines],
            joining.width,
            joining.sampling.extend(sampling),
            torch.cat([joining.tokens, tokens]),
        )

    def _reserve(self, columns: int) -> None:
        """A cache whose slots hold `columns` columns: the model's cache from earlier batches
        where it has slots enough, else a new one; grown when a row needs more than any
        before it. Kept from batch to batch, so that its memory is allocated once, and a
        compiled step keeps its graph (the cache's tensors are its static inputs)."""
        columns = -(-columns // CACHE_COLUMNS) * CACHE_COLUMNS
        if self.cache is None:
            cache = _CACHES.get(self.loaded.model)
            if cache is None or cache.slots < self.slots or cache.dtype != self.loaded.dtype:
                config = self.loaded.model.config
                cache = SlotCache(config, self.slots, columns, self.loaded.dtype, self.device)
                _CACHES[self.loaded.model] = cache
            self.cache = cache
        if columns > self.cache.max_len:
            # A quarter more than asked, so that a run of longer rows grows it rarely.
            self.cache.grow(max(columns, self.cache.max_len * 5 // 4))

    def _arrange(self, live: set[int], final: int, joining: list[_Joining]) -> None:
        """Lay the batch out again: the live rows and the joining ones fill slots [0, final).
        Live rows above `final` move down into the slots left free; the joining rows were
        prefilled into theirs."""
        assert self.cache is not None
        taken = {slot for group in joining for slot in group.slots}
        holes = [slot for slot in range(final) if slot not in live and slot not in taken]
        movers = sorted(slot for slot in live if slot >= final)
        assert len(holes) == len(movers)
        if movers:
            columns = max(self.next[slot] for slot in movers)
            self.cache.move(movers, holes, columns)
        # Where each slot's state comes from: an old slot, or a joining row, numbered after
        # the old slots in the order the joining groups are concatenated below. Each source
        # is a row with its first and next columns.
        source = {slot: slot for slot in live if slot < final}
        source.update(zip(holes, movers, strict=True))
        states = {
            slot: (self.rows[slot], self.first[slot], self.next[slot]) for slot in source.values()
        }
        joined = len(self.rows)
        for group in joining:
            for row, slot, column in zip(group.rows, group.slots, group.first_columns, strict=True):
                source[slot], states[joined] = joined, (row, column, group.width)
                joined += 1
        order_list = [source[slot] for slot in range(final)]
        self.rows = [states[index][0] for index in order_list]
        self.first = [states[index][1] for index in order_list]
        self.next = [states[index][2] for index in order_list]
        order = torch.tensor(order_list, device=self.device)
        sampling = self.sampling
        next_ids = [self.next_ids]
        for group in joining:
            sampling = group.sampling if sampling is None else sampling.extend(group.sampling)
            next_ids.append(group.tokens)
        assert sampling is not None
        self.sampling = sampling.select(order_list, order) if final else None
        self.next_ids = torch.cat(next_ids)[order]
        idle = [0] * (self.cache.slots - final)
        self.first_t = torch.tensor(self.first + idle, device=self.device)
        self.next_t = torch.tensor(self.next + idle, device=self.device)
        self.asking = _asking(self.rows)
        self.asking_index = self._rows_index(self.asking, final) if self.asking else None
        self.matchers = _grammars(self.rows)

    def _rows_index(self, asking: tuple[int, ...], rows: int) -> torch.Tensor | None:
        """`asking` on the device, without waiting for it; None where it is every row."""
        if len(asking) == rows:
            return None
        return torch.tensor(asking).to(self.device, non_blocking=True)

    # Rows leaving ------------------------------------------------------------------------

    def retire(self) -> None:
        """Report the rows that have finished; their slots are free from now on."""
        done = [slot for slot, row in enumerate(self.rows) if row.finish is not None]
        leaving = self.unseated + [self.rows[slot] for slot in done]
        self.unseated = []
        for row, logprobs in zip(leaving, _read_logprobs(leaving, self.tokenizer), strict=True):
            self._report(row, row.result(self.decode, logprobs))
        if not done:
            return
        assert self.cache is not None
        for slot in done:
            self.cache.release(slot, self.next[slot])  # it wrote the columns before `next`
        live = {slot for slot, row in enumerate(self.rows) if row.finish is None}
        if live:
            self._arrange(live, len(live), [])
        else:
            self.rows, self.first, self.next, self.sampling = [], [], [], None
            self.next_ids = self.next_ids[:0]
            self.asking, self.asking_index = (), None
            self.matchers = None

    def _report(self, row: _Row, generation: Generation) -> None:
        """Hand a row's result to the caller; a sample's waits for its key's other samples."""
        if row.samples is not None:
            whole = row.samples.add(row.sample, generation)
            if whole is None:
                return
            generation = whole
        self.on_finish(row.key, generation)

    def streaming(self) -> list[tuple[Hashable, Sequence[int]]]:
        """The streaming rows still decoding, with their tokens so far."""
        return [(row.key, row.tokens) for row in self.rows if row.stream and row.finish is None]

    def settle(self, dropped: Dropped | None) -> None:
        """Stop the rows that `dropped` names (every sample of a key), then let every
        finished row go."""
        keys = dropped() if dropped is not None else ()
        for row in self.rows:
            if row.key in keys and row.finish is None:
                row.finish = CANCELLED
        self.retire()

    # A decode step -----------------------------------------------------------------------

    def step(self) -> None:
        """One token for every row in the slots."""
        assert self.cache is not None and self.sampling is not None
        with torch.profiler.record_function(STEP_LABEL):  # what bench/steps.py counts
            self._step()

    def _step(self) -> None:
        assert self.cache is not None and self.sampling is not None
        started = time.perf_counter()
        rows = len(self.rows)
        if self.step_forward is _model_step:
            width, kv_len, input_ids = rows, max(self.next) + 1, self.next_ids
        else:  # idle slots decode token 0 at their column 0, which a prefill overwrites
            width, kv_len = self.cache.slots, self.cache.max_len
            input_ids = torch.cat([self.next_ids, self.next_ids.new_zeros(width - rows)])
        first, next_column = self.first_t[:width], self.next_t[:width]
        self.cache.plan_decode(width, next_column, kv_len)
        allowed, positions = decode_inputs(first, next_column, kv_len, self.window)
        names = [row.adapter for row in self.rows] + [BASE] * (width - rows)
        adapters = _adapter_index(self.loaded, names)  # kept by lora_batched while unchanged
        logits = self.step_forward(
            self.loaded,
            adapters,
            input_ids.unsqueeze(1),
            attention_mask(allowed, self.attention, self.loaded.dtype),
            positions,
            self.cache,
        )
        own = logits[:rows]  # the rows' (a compiled step decodes idle slots too)
        tokens = self.sampling.sample(mask_logits(own, self.matchers) if self.matchers else own)
        if self.asking:
            _capture_logprobs(self.rows, self.asking, self.asking_index, own, tokens)
        self.next_ids = tokens
        self.next_t[:rows] += 1
        self.next = [column + 1 for column in self.next]
        token_list = tokens.tolist()  # the step's one read-back
        for row, token in zip(self.rows, token_list, strict=True):
            row.accept(token, self.eos_id, self.decode)
        elapsed = time.perf_counter() - started
        for row in self.rows:
            row.seconds += elapsed / rows
        if self.on_step is not None:
            self.on_step(rows, elapsed)


@torch.inference_mode()
def decode_rows(
    loaded: LoadedModel,
    rows: Sequence[NewRow],
    on_finish: OnFinish,
    *,
    slots: int | None = None,
    refill: Refill | None = None,
    dropped: Dropped | None = None,
    compile: bool = False,
    on_step: OnStep | None = None,
    on_tokens: OnTokens | None = None,
    prefill_tokens: int | None = None,
) -> None:
    """Decode rows, each with its own sampling parameters and LoRA adapter (None: the base
    model), `slots` at a time (all of them by default); `on_finish` gets each row's result as
    soon as it ends. The adapters must be loaded (`LoraCache.ensure`).

    A row whose params ask for n samples takes n slots (it waits until n are free; one that
    asks for more than the batch has fails alone) and is prefilled once; its one result, once
    every sample has ended, holds them in `samples`.

    Rows beyond the slots wait their turn; `refill` is asked for more whenever slots are free
    that the waiting rows do not take (always with every slot free before the batch ends), and
    what it gives joins ahead of rows still waiting. Rows that `dropped`
    names stop where they are, every sample of them, with the finish reason CANCELLED. With
    `compile`, the decode step runs under torch.compile (`MBATCH_COMPILE`); `on_step` is told
    of every step, and `on_tokens` of the tokens of the rows that stream after each.

    With `prefill_tokens`, rows join a running batch a prefill of about that many prompt
    tokens at a time (at least one row), with a decode step of the running rows between two:
    a wave of rows refilled together joins over a few steps rather than stall the batch for
    one long prefill (and with it a caller waiting for its first token)."""
    slots = slots if slots is not None else sum(row.params.n for row in rows)
    if slots < 1:
        if rows:
            raise ValueError("a batch with rows needs at least one slot")
        return
    batch = _Batch(loaded, slots, on_finish, compiled=compile, on_step=on_step)
    waiting = deque(rows)
    while True:
        spare = batch.free - sum(row.params.n for row in waiting)
        if refill is not None and spare > 0:
            # Rows claimed while others still wait to join (a wave joining a prefill budget
            # at a time) go ahead of them: the refill gives its most urgent rows first.
            joined = list(refill(spare))
            if waiting:
                waiting.extendleft(reversed(joined))
            else:
                waiting.extend(joined)  # any beyond the free slots wait their turn
        joining = _take(waiting, batch.free, batch.slots, prefill_tokens)
        if joining:
            batch.admit(joining)
            batch.settle(dropped)
            if on_tokens is not None:
                on_tokens(batch.streaming())
            if not (prefill_tokens is not None and waiting and batch.rows):
                continue  # rows may finish at their first token: room for more before a step
        if not batch.rows:
            return
        batch.step()
        batch.settle(dropped)
        if on_tokens is not None:
            on_tokens(batch.streaming())


def _take(
    waiting: deque[NewRow], free: int, slots: int, prefill_tokens: int | None = None
) -> list[NewRow]:
    """The waiting rows that join now, in order: as many as their samples find free slots
    (and, with `prefill_tokens`, until their prompts hold that many tokens). A row asking for
    more samples than the batch has slots takes one, to fail when it joins."""
    taken: list[NewRow] = []
    tokens = 0
    while waiting:
        need = waiting[0].params.n if waiting[0].params.n <= slots else 1
        if need > free or (prefill_tokens is not None and taken and tokens >= prefill_tokens):
            break
        tokens += len(waiting[0].prompt)
        taken.append(waiting.popleft())
        free -= need
    return taken


def generate(
    loaded: LoadedModel,
    prompts: Sequence[list[int]],
    params: Sequence[SamplingParams],
    adapters: Sequence[str | None] | None = None,
    dropped: Callable[[], Collection[int]] | None = None,
    compile: bool = False,
    on_step: OnStep | None = None,
    streams: Sequence[bool] | None = None,
    on_tokens: OnTokens | None = None,
) -> list[Generation]:
    """Decode every prompt with its own sampling parameters and adapter, in one batch; the
    results in the order of the prompts. Rows that `dropped` names (by index) stop where they
    are, with the finish reason CANCELLED. The rows that `streams` marks have their tokens
    reported to `on_tokens` after every step (keyed by index). `compile`, `on_step`: as
    `decode_rows`."""
    names = adapters if adapters is not None else [None] * len(prompts)
    streaming = streams if streams is not None else [False] * len(prompts)
    rows = [
        NewRow(index, prompt, p, adapter, stream)
        for index, (prompt, p, adapter, stream) in enumerate(
            zip(prompts, params, names, streaming, strict=True)
        )
    ]
    results: dict[Hashable, Generation] = {}
    decode_rows(
        loaded,
        rows,
        results.__setitem__,
        slots=sum(p.n for p in params),  # a slot per sample
        dropped=dropped,
        compile=compile,
        on_step=on_step,
        on_tokens=on_tokens,
    )
    return [results[index] for index in range(len(rows))]


def _adapter_index(loaded: LoadedModel, names: list[str]) -> torch.Tensor | None:
    """Each row's adapter, as the batched LoRA layers index them; None when every row is on
    the base model, whose forward then goes through no LoRA at all."""
    if all(name == BASE for name in names):
        return None
    return row_indices(loaded, names)


def _model_step(
    loaded: LoadedModel,
    adapters: torch.Tensor | None,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: SlotCache | None,
) -> torch.Tensor:
    """The next token's logits of every row, each with its adapter (by its index), writing
    keys and values where the cache's plan says."""
    output = forward_indexed(
        loaded,
        adapters,
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return output.logits[:, -1, :]  # type: ignore[no-any-return]


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled_step(device: torch.device) -> Callable[..., torch.Tensor]:
    """`_model_step` under torch.compile: CUDA graphs on a GPU (`reduce-overhead`), inductor's
    default elsewhere. Made once per process; dynamo compiles again only for a new shape."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _COMPILED:
        compiled = torch.compile(_model_step, mode=mode, dynamic=False)
        if device.type == "cuda":

            def step(*args: Any) -> torch.Tensor:
                # The logits live in the graph's own output buffer until the next replay:
                # each step samples from them before the next one starts.
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(*args)

            _COMPILED[mode] = step
        else:
            _COMPILED[mode] = compiled
    return _COMPILED[mode]
