"""The simulated SGLang worker's pure logic: request parsing, deterministic generation, replies.

Nothing here does I/O or reads clocks; `router.sim.app` drives it. Shapes follow SGLang v0.5.12's
native `/generate` (see shared/sglang_api.md §1-3): the meta_info key order, finish_reason variants,
`[logprob, id, text|null]` triples and base64 int32 `routed_experts`.

A completion is a deterministic function of (worker seed, sampling_seed, prompt ids, sample index):
a planned number of "pieces" (words, CJK words, emoji, punctuation, newlines, numbers) is drawn,
joined into text and tokenized. With probability `noncanonical_rate` a piece is cut in two and the
halves are tokenized separately, so the ids are a valid but non-canonical tokenization of the text:
re-encoding the decoded text gives different ids, like a real model sometimes does. A ChatML
prompt awaiting an assistant turn gets a chat-model reply instead (`router.sim.chat`, switch
`chat_replies`): optional reasoning, content and tool calls built from the same pieces, then EOS.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from router.sim.chat import ChatPlan, chat_mode, prompt_tools
from router.tokenizer import Tokenizer
from router.wire.sim import Faults, SimOptions  # noqa: F401  (re-exported)

SGLANG_VERSION = "0.5.12"
DEFAULT_MAX_NEW_TOKENS = 128
PREFIX_BLOCK_TOKENS = 16


class RequestError(Exception):
    """A /generate request SGLang rejects; `status` and `body()` give its HTTP reply."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message}}  # http_server.py::_create_error_response


class ValidationError(RequestError):
    """FastAPI's RequestValidationError (malformed JSON / wrong types): 400, OpenAI-style body."""

    def body(self) -> dict[str, Any]:
        return {"object": "error", "message": self.message, "type": "Bad Request", "param": None, "code": 400}


class InternalError(RequestError):
    """An exception SGLang's handler does not catch (e.g. TypeError): 500 plain text."""

    status = 500


class AbortedRequest(RequestError):
    """A scheduler-side 400 abort (e.g. logprob_start_len past the prompt)."""


# --- requests -------------------------------------------------------------------------------

# Every keyword SamplingParams.__init__ takes in v0.5.12; anything else is a TypeError there.
SAMPLING_PARAM_KEYS = frozenset(
    {
        "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
        "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
        "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
        "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed",
    }
)  # fmt: skip


class SamplingParams(msgspec.Struct, kw_only=True):
    max_new_tokens: int | None = DEFAULT_MAX_NEW_TOKENS
    stop: list[str] = []
    stop_token_ids: frozenset[int] = frozenset()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None


def parse_sampling_params(raw: Any) -> SamplingParams:
    if raw is None:
        return SamplingParams()
    if not isinstance(raw, dict):
        raise ValidationError("sampling_params: Input should be a valid dictionary")
    unknown = sorted(set(raw) - SAMPLING_PARAM_KEYS)
    if unknown:
        raise InternalError(f"SamplingParams.__init__() got an unexpected keyword argument '{unknown[0]}'")
    fields: dict[str, Any] = {}
    for key in SamplingParams.__struct_fields__:
        if key in raw and raw[key] is not None:
            fields[key] = raw[key]
    if "max_new_tokens" in raw:
        fields["max_new_tokens"] = raw["max_new_tokens"]
    stop = fields.get("stop")
    if isinstance(stop, str):
        fields["stop"] = [stop]
    try:
        params = msgspec.convert(fields, SamplingParams, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"sampling_params: {exc}") from None
    _verify(params, raw)
    return params


def _verify(p: SamplingParams, raw: dict[str, Any]) -> None:
    """The checks of sampling_params.py::SamplingParams.verify (ValueError -> 400)."""
    if p.temperature < 0.0:
        raise RequestError(f"temperature must be non-negative, got {p.temperature}.")
    if not 0.0 < p.top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], got {p.top_p}.")
    if not 0.0 <= p.min_p <= 1.0:
        raise RequestError(f"min_p must be in [0, 1], got {p.min_p}.")
    if p.top_k < 1 and p.top_k != -1:
        raise RequestError(f"top_k must be -1 (disable), or at least 1, got {p.top_k}.")
    if not -2.0 <= p.frequency_penalty <= 2.0:
        raise RequestError(f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}.")
    if not -2.0 <= p.presence_penalty <= 2.0:
        raise RequestError(f"presence_penalty must be in [-2, 2], got {p.presence_penalty}.")
    if not 0.0 < p.repetition_penalty <= 2.0:
        raise RequestError(f"repetition_penalty must be in (0, 2], got {p.repetition_penalty}.")
    if p.max_new_tokens is not None and p.max_new_tokens < 0:
        raise RequestError(f"max_new_tokens must be at least 0, got {p.max_new_tokens}.")
    if p.min_new_tokens < 0:
        raise RequestError(f"min_new_tokens must be in [0, max_new_tokens], got {p.min_new_tokens}.")
    if p.max_new_tokens is not None and p.min_new_tokens > p.max_new_tokens:
        raise RequestError(
            f"min_new_tokens must be in [0, max_new_tokens({p.max_new_tokens})], got {p.min_new_tokens}."
        )
    if sum(raw.get(k) is not None for k in ("regex", "json_schema", "ebnf")) > 1:
        raise RequestError("Only one of regex, json_schema, or ebnf can be set.")
    if p.n < 1:
        raise RequestError(f"n must be at least 1, got {p.n}.")


class GenerateItem(msgspec.Struct, kw_only=True):
    """One sequence to generate (a batch entry, or one of the `n` samples)."""

    index: int
    rid: str
    prompt: list[int] | str  # text is tokenized by the app (it may go off-thread)
    params: SamplingParams
    sample_index: int = 0
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: list[int] | None = None
    return_text_in_logprobs: bool = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0


class GenerateRequest(msgspec.Struct, kw_only=True):
    items: list[GenerateItem]
    is_single: bool  # False: the non-stream reply is a JSON array
    stream: bool


def peek_stream_flag(body: Any) -> bool:
    return isinstance(body, dict) and body.get("stream") is True


def parse_generate(body: Any, *, return_routed_experts_enabled: bool) -> GenerateRequest:
    """GenerateReqInput normalisation (`normalize_batch_and_arguments`) for a decoded JSON body."""
    if not isinstance(body, dict):
        raise ValidationError("Input should be a valid dictionary or object to extract fields from")
    text, input_ids = body.get("text"), body.get("input_ids")
    if text is None and input_ids is None and body.get("input_embeds") is None:
        raise RequestError("Either text, input_ids or input_embeds should be provided.")
    if input_ids is None and body.get("input_embeds") is not None:
        raise RequestError("input_embeds is not supported by the simulated worker.")

    prompts: list[list[int] | str]
    if text is not None:
        if isinstance(text, str):
            is_single, batch = True, 1
        elif isinstance(text, list) and all(isinstance(t, str) for t in text):
            is_single, batch = False, len(text)
        else:
            raise ValidationError("text: Input should be a valid string or list of strings")
    if input_ids is not None:
        if not isinstance(input_ids, list):
            raise ValidationError("input_ids: Input should be a valid list")
        if len(input_ids) == 0:
            raise RequestError("input_ids cannot be empty.")
        nested = isinstance(input_ids[0], list)
        rows = input_ids if nested else [input_ids]
        for row in rows:
            if not isinstance(row, list) or not set(map(type, row)) <= {int}:
                raise ValidationError("input_ids: Input should be a list of integers or a list of lists of integers")
            if not row:
                raise RequestError("input_ids cannot be empty.")
            if min(row) < 0 or max(row) >= 1 << 31:
                raise RequestError("input_ids contains a token id out of range.")
        if text is None:
            is_single, batch = not nested, len(rows)
        elif len(rows) != batch:
            raise RequestError("The number of input_ids does not match the batch size of text.")
        prompts = list(rows)
    else:
        prompts = [text] if is_single else list(text)
    if batch == 0:
        raise RequestError("Either text, input_ids or input_embeds should be provided.")

    def per_item(key: str, default: Any, kind: type) -> list[Any]:
        """A field that is a scalar for everyone or (batch mode) a list with one value per item."""
        value = body.get(key)
        if value is None:
            return [default] * batch
        if isinstance(value, list) and not is_single:
            if len(value) != batch:
                raise RequestError(f"The length of {key} does not match the batch size.")
            values = value
        else:
            values = [value] * batch
        for v in values:
            if v is not None and (type(v) is not kind):
                raise ValidationError(f"{key}: Input should be a valid {kind.__name__}")
        return [default if v is None else v for v in values]

    def token_id_lists(key: str) -> list[list[int] | None]:
        value = body.get(key)
        if value is None:
            return [None] * batch
        nested = not is_single and isinstance(value, list) and bool(value) and isinstance(value[0], list)
        rows = value if nested else [value] * batch
        if len(rows) != batch:
            raise RequestError(f"The length of {key} does not match the batch size.")
        for row in rows:
            if not isinstance(row, list) or not set(map(type, row)) <= {int} or min(row, default=0) < 0:
                raise ValidationError(f"{key}: Input should be a list of non-negative integers")
        return rows

    sampling = body.get("sampling_params")
    if isinstance(sampling, list):
        if is_single or len(sampling) != batch:
            raise RequestError("The length of sampling_params does not match the batch size.")
        params_list = [parse_sampling_params(s) for s in sampling]
    else:
        params_list = [parse_sampling_params(sampling)] * batch
    n = params_list[0].n
    if any(p.n != n for p in params_list):
        raise RequestError("The parallel_sample_num should be the same for all samples in sample params.")

    return_logprob = per_item("return_logprob", False, bool)
    logprob_start_len = per_item("logprob_start_len", -1, int)
    top_logprobs_num = per_item("top_logprobs_num", 0, int)
    token_ids_logprob = token_id_lists("token_ids_logprob")
    flags = {k: body.get(k) for k in ("return_text_in_logprobs", "return_routed_experts", "stream")}
    for key, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise ValidationError(f"{key}: Input should be a valid boolean")
    start_len = body.get("routed_experts_start_len") or 0
    if type(start_len) is not int:
        raise ValidationError("routed_experts_start_len: Input should be a valid integer")

    rid = body.get("rid")
    if n > 1 or rid is None:
        rids = [uuid.uuid4().hex for _ in range(batch * n)]  # regenerate_rid
    elif isinstance(rid, str):
        rids = [rid] if is_single else [f"{rid}_{i}" for i in range(batch)]
    elif isinstance(rid, list) and all(isinstance(r, str) for r in rid):
        if len(rid) != batch:
            raise RequestError("The specified rids length mismatch with the batch_size for batch processing.")
        rids = list(rid)
    else:
        raise ValidationError("rid: Input should be a valid string or list of strings")
    if len(set(rids)) != len(rids):
        raise RequestError(f"Duplicate request ID detected: {rids}")

    items = []
    for i in range(batch):
        for j in range(n):
            k = i * n + j
            items.append(
                GenerateItem(
                    index=k,
                    rid=rids[k],
                    prompt=prompts[i],
                    params=params_list[i],
                    sample_index=j,
                    return_logprob=return_logprob[i],
                    logprob_start_len=logprob_start_len[i],
                    top_logprobs_num=top_logprobs_num[i],
                    token_ids_logprob=token_ids_logprob[i],
                    return_text_in_logprobs=bool(flags["return_text_in_logprobs"]),
                    return_routed_experts=bool(flags["return_routed_experts"]) and return_routed_experts_enabled,
                    routed_experts_start_len=start_len,
                )
            )
    return GenerateRequest(items=items, is_single=is_single and n == 1, stream=bool(flags["stream"]))


def check_prompt(item: GenerateItem, prompt_ids: list[int], context_length: int) -> None:
    """Checks SGLang makes once the prompt is tokenized (ValueError / 400-type scheduler abort)."""
    if not prompt_ids:
        raise RequestError("input_ids cannot be empty.")
    if len(prompt_ids) >= context_length:
        raise RequestError(
            f"The input ({len(prompt_ids)} tokens) is longer than the model's context length ({context_length} tokens)."
        )
    if item.return_logprob and item.logprob_start_len > len(prompt_ids):
        raise AbortedRequest(
            f"logprob_start_len ({item.logprob_start_len}) is superior to the number of input tokens "
            f"({len(prompt_ids)})."
        )
    if item.return_routed_experts and not 0 <= item.routed_experts_start_len <= len(prompt_ids):
        raise AbortedRequest(
            f"routed_experts_start_len ({item.routed_experts_start_len}) must be in [0, {len(prompt_ids)}]."
        )


# --- generation -----------------------------------------------------------------------------

_WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello", "world", "def", "return",
    "model", "data", "value", "token", "router", "request", "answer", "question", "because", "therefore",
    "however", "simple", "result", "number", "between", "function", "system", "example", "first", "second",
    "third", "let", "us", "compute", "sum", "of", "and", "is", "a", "an", "in", "on", "for", "with", "this",
    "that", "we", "it", "can", "will", "be", "not", "all", "each", "step", "then", "so", "if", "when",
    "reward", "policy", "rollout", "sample", "batch", "cache", "prefix", "worker", "train",
)  # fmt: skip
_ACCENTED = ("café", "naïve", "résumé", "über", "jalapeño", "Ångström", "façade", "señor")
_CJK = ("你好", "世界", "模型", "数据", "训练", "我们", "学习", "问题", "答案", "因为", "所以", "日本語", "한국어")
_EMOJI = ("🙂", "🚀", "🎉", "👍", "🔥", "✨", "🤖", "📈", "👍🏽")
_PUNCT = (",", ".", "!", "?", ":", ";", " (", ")", " -", "'s")
_NEWLINES = ("\n", "\n\n", ".\n")
_NUMBERS = (" 0", " 1", " 2", " 3", " 7", " 42", " 100", " 2024", " 3.14", " 1,000")

# (pieces, probability of drawing one of them)
_PIECE_GROUPS = (
    ([" " + w for w in _WORDS], 0.60),
    (list(_PUNCT), 0.12),
    (list(_CJK), 0.08),
    ([" " + e for e in _EMOJI], 0.04),
    (list(_NEWLINES), 0.06),
    (list(_NUMBERS), 0.06),
    ([" " + w for w in _ACCENTED], 0.04),
)
PIECES: tuple[str, ...] = tuple(p for group, _ in _PIECE_GROUPS for p in group)
_PIECE_CDF = np.cumsum(np.concatenate([np.full(len(g), w / len(g)) for g, w in _PIECE_GROUPS]))
_PIECE_CDF /= _PIECE_CDF[-1]
_PIECE_BLOCK = 64
MIN_PIECES, MAX_PIECES = 4, 120

_U64 = np.uint64
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed uint64 hash of each element (vectorised; uint64 arithmetic wraps)."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _hash_ints(*parts: int) -> int:
    """A stable (cross-process) 64-bit hash of some integers."""
    data = b"".join((p & _MASK64).to_bytes(8, "little") for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def visible_bytes(tok: Tokenizer, ids: Sequence[int], skip_special_tokens: bool) -> tuple[bytes, np.ndarray]:
    """Bytes of `ids` as decode() shows them, and each token's share (0 for skipped specials)."""
    blob, lengths = tok.token_bytes(ids)
    if skip_special_tokens and tok.special_ids and not tok.special_ids.isdisjoint(ids):
        hidden = np.fromiter((i in tok.special_ids for i in ids), bool, len(ids))
        lengths = lengths.copy()
        lengths[hidden] = 0
        blob = tok.text_bytes([i for i in ids if i not in tok.special_ids])
    return blob, lengths


def _unit(h: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from hashes."""
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _logprobs_from_hash(h: np.ndarray) -> np.ndarray:
    """Negative float32 logprobs in (-6, -0.001], mostly close to 0."""
    u = (h >> _U64(40)).astype(np.float64) / float(1 << 24)
    return (-(0.001 + 6.0 * u**3)).astype(np.float32)


class Completion:
    """The full planned output of one item; prefixes of it are what streams and aborts show."""

    def __init__(
        self,
        model: SimModel,
        key: int,
        output_ids: list[int],
        logprobs: np.ndarray,
        finish_reason: dict[str, Any],
        params: SamplingParams,
    ) -> None:
        self.model = model
        self.key = key  # generation_key(): seeds this completion's pieces and logprobs
        self.output_ids = output_ids
        self.logprobs = logprobs
        self.finish_reason = finish_reason
        self.params = params
        self._final_text: str | None = None
        self._cum_bytes: np.ndarray | None = None
        self._blob = b""

    def __len__(self) -> int:
        return len(self.output_ids)

    def final_text(self) -> str:
        """detokenizer_manager's text: stop token / stop string trimmed unless no_stop_trim."""
        if self._final_text is None:
            ids, matched = self.output_ids, self.finish_reason.get("matched")
            trim = not self.params.no_stop_trim
            if trim and isinstance(matched, int) and not isinstance(matched, bool) and ids:
                ids = ids[:-1]
            text = self.model.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)
            if trim and isinstance(matched, str):
                pos = text.find(matched)
                if pos != -1:
                    text = text[:pos]
            self._final_text = text
        return self._final_text

    def aborted_text(self, produced: int) -> str:
        return self.model.tokenizer.decode(
            self.output_ids[:produced], skip_special_tokens=self.params.skip_special_tokens
        )

    def partial_text(self, produced: int) -> str | None:
        """Text of an intermediate stream chunk; None while the tail may still become a stop string."""
        if self._cum_bytes is None:
            self._blob, lengths = visible_bytes(self.model.tokenizer, self.output_ids, self.params.skip_special_tokens)
            self._cum_bytes = np.zeros(len(lengths) + 1, np.int64)
            np.cumsum(lengths, out=self._cum_bytes[1:])
        text = self._blob[: int(self._cum_bytes[produced])].decode("utf-8", errors="replace").rstrip("\ufffd")
        for stop in self.params.stop:
            if stop and any(text.endswith(stop[:k]) for k in range(1, len(stop))):
                return None
        return text


class SimModel:
    """Deterministic fake LLM: completions, logprobs and MoE routing for one worker seed."""

    def __init__(self, tokenizer: Tokenizer, options: SimOptions) -> None:
        if not 1 <= options.top_k <= options.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts], got {options.top_k}/{options.num_experts}")
        if not 0.0 <= options.noncanonical_rate <= 1.0:
            raise ValueError(f"noncanonical_rate must be in [0, 1], got {options.noncanonical_rate}")
        self.tokenizer = tokenizer
        self.options = options
        self.seed = options.seed & _MASK64
        self._token_text: dict[int, str] = {}
        self._piece_cache: dict[tuple[int, int], list[int]] = {}

    # ---- completions

    def generation_key(self, prompt_ids: Sequence[int], params: SamplingParams, sample_index: int) -> int:
        prompt_digest = hashlib.blake2b(np.asarray(prompt_ids, np.int64).tobytes(), digest_size=8).digest()
        greedy = params.temperature == 0.0  # greedy decoding ignores sampling seeds and sample index
        sampling_seed = 0 if greedy or params.sampling_seed is None else params.sampling_seed + 1
        return _hash_ints(
            self.seed, int.from_bytes(prompt_digest, "little"), sampling_seed, 0 if greedy else sample_index
        )

    def _piece_stream(self, key: int, start: int, count: int) -> list[tuple[int, int]]:
        """Pieces `start..start+count` of this key's stream as (piece index, cut or 0 = not split).

        Each position is hashed on its own, so a longer completion extends a shorter one.
        """
        i = np.arange(start, start + count, dtype=np.uint64)
        base = _splitmix64(i * _U64(0x9E3779B97F4A7C15) ^ _U64(key))
        choice = np.searchsorted(_PIECE_CDF, _unit(base), side="right").tolist()
        split = (_unit(_splitmix64(base ^ _U64(0x632BE59BD9B4E019))) < self.options.noncanonical_rate).tolist()
        where = _unit(_splitmix64(base ^ _U64(0x8CB92BA72F3D8DD7))).tolist()
        out = []
        for piece, s, w in zip(choice, split, where):
            n = len(PIECES[piece])
            out.append((piece, 1 + int(w * (n - 1)) if s and n >= 2 else 0))
        return out

    def _piece_ids(self, piece: int, cut: int) -> list[int]:
        """Token ids of a piece, or of its two halves tokenized separately (cached)."""
        ids = self._piece_cache.get((piece, cut))
        if ids is None:
            raw, text = self.tokenizer.raw, PIECES[piece]
            halves = [text[:cut], text[cut:]] if cut else [text]
            ids = [t for half in halves for t in raw.encode(half, add_special_tokens=False).ids]
            self._piece_cache[(piece, cut)] = ids
        return ids

    def complete(self, prompt_ids: Sequence[int], params: SamplingParams, sample_index: int = 0) -> Completion:
        key = self.generation_key(prompt_ids, params, sample_index)
        max_new = params.max_new_tokens
        if max_new is None:
            max_new = max(0, self.options.context_length - len(prompt_ids))
        planned_pieces = MIN_PIECES + _hash_ints(key, 1) % (MAX_PIECES - MIN_PIECES + 1)
        # ignore_eos runs to max_new_tokens; min_new_tokens holds EOS back until then
        target = max_new if params.ignore_eos else min(params.min_new_tokens, max_new)
        content: list[int] = []
        mode = chat_mode(self.tokenizer, prompt_ids) if self.options.chat_replies and max_new > 0 else None
        if mode is not None:
            content = self._chat_reply(prompt_ids, mode, key, target)
        drawn = 0
        while mode is None and max_new > 0 and (drawn < planned_pieces or len(content) < target):
            count = planned_pieces if drawn == 0 else _PIECE_BLOCK
            for piece, cut in self._piece_stream(key, drawn, count):
                content.extend(self._piece_ids(piece, cut))
            drawn += count
        seq = content if params.ignore_eos else content + [self.tokenizer.eos_token_id]

        end, finish = self._finish(seq, params, max_new)
        output_ids = seq[:end]
        positions = np.arange(len(prompt_ids), len(prompt_ids) + len(output_ids), dtype=np.uint64)
        logprobs = self.logprobs(key, positions, output_ids)
        return Completion(self, key, output_ids, logprobs, finish, params)

    def _chat_reply(self, prompt_ids: Sequence[int], mode: str, key: int, target: int) -> list[int]:
        """A chat model's reply (router/sim/chat.py), without the eos: at least `target` tokens."""
        plan = ChatPlan(mode, prompt_tools(self.tokenizer, prompt_ids), key)
        raw = self.tokenizer.raw
        head: list[int] = []
        if plan.think:
            head += raw.encode(plan.think_prefix(), add_special_tokens=False).ids
            head += self._pieces(_hash_ints(key, 21), 0, 4 + _hash_ints(key, 22) % 37)
            head += raw.encode(plan.think_suffix(), add_special_tokens=False).ids
        content_key, drawn = _hash_ints(key, 23), 0
        content: list[int] = []
        if plan.has_content:
            drawn = 4 + _hash_ints(key, 24) % 57
            content = self._pieces(content_key, 0, drawn)
        calls = raw.encode(plan.calls_text(True), add_special_tokens=False).ids if plan.calls else []
        while len(head) + len(content) + len(calls) < target:  # ignore_eos / min_new_tokens: keep talking
            content += self._pieces(content_key, drawn, _PIECE_BLOCK)
            drawn += _PIECE_BLOCK
        if plan.calls and not content:
            calls = raw.encode(plan.calls_text(False), add_special_tokens=False).ids
        return head + content + calls

    def _pieces(self, key: int, start: int, count: int) -> list[int]:
        """Ids of pieces `start..start+count` of `key`'s stream; a text's first piece loses its
        leading space (a reply or a thought doesn't start with one)."""
        ids: list[int] = []
        for i, (piece, cut) in enumerate(self._piece_stream(key, start, count)):
            if start + i == 0 and PIECES[piece].startswith(" "):
                ids += self.tokenizer.raw.encode(PIECES[piece].lstrip(" "), add_special_tokens=False).ids
            else:
                ids += self._piece_ids(piece, cut)
        return ids

    def _finish(self, seq: list[int], params: SamplingParams, max_new: int) -> tuple[int, dict[str, Any]]:
        """(number of output tokens, finish_reason), checked in Req.check_finished's order."""
        if max_new == 0:
            return 0, {"type": "length", "length": 0}
        best = (max_new, 0, {"type": "length", "length": max_new})  # (tokens, priority, reason)
        if not params.ignore_eos:
            stop_ids = params.stop_token_ids | {self.tokenizer.eos_token_id}
            for i, token in enumerate(seq[: best[0]]):
                if token in stop_ids and i >= params.min_new_tokens:
                    best = min(best, (i + 1, 1, {"type": "stop", "matched": token}), key=lambda b: b[:2])
                    break
        stops = [s for s in params.stop if s]
        if stops:
            blob, lengths = visible_bytes(self.tokenizer, seq[: best[0]], params.skip_special_tokens)
            cum_end = np.cumsum(lengths)
            for stop in stops:
                pos = blob.find(stop.encode())
                if pos != -1:
                    tokens = int(np.searchsorted(cum_end, pos + len(stop.encode()))) + 1
                    best = min(best, (tokens, 2, {"type": "stop", "matched": stop}), key=lambda b: b[:2])
        return best[0], best[2]

    # ---- logprobs

    def logprobs(self, key: int, positions: np.ndarray, ids: Sequence[int]) -> np.ndarray:
        if len(ids) == 0:
            return np.zeros(0, np.float32)
        h = _splitmix64(positions * _U64(0xD6E8FEB86659FD93) ^ np.asarray(ids, np.uint64) ^ _U64(key))
        return _logprobs_from_hash(h)

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.raw.decode([token_id], skip_special_tokens=False)
            if len(self._token_text) < 1 << 20:
                self._token_text[token_id] = text
        return text

    def _triples(self, lps: Sequence[float | None], ids: Sequence[int], with_text: bool) -> list[list[Any]]:
        if with_text:
            return [[lp, t, self.token_text(t)] for lp, t in zip(lps, ids)]
        return [[lp, t, None] for lp, t in zip(lps, ids)]

    def _top_logprobs(
        self, key: int, positions: np.ndarray, ids: Sequence[int], lps: np.ndarray, k: int, with_text: bool
    ) -> list[list[list[Any]]]:
        """k [logprob, id, text] alternatives per position, best first; the chosen token comes first."""
        out = []
        vocab = max(self.tokenizer.vocab_size, 1)
        for pos, token, lp in zip(positions.tolist(), ids, lps.tolist()):
            alt_h = _splitmix64(np.arange(1, k, dtype=np.uint64) + _U64((pos * 0x9E3779B1 + key) & _MASK64))
            alt_lps = (np.float32(lp) - np.float32(1.0) + _logprobs_from_hash(alt_h)).tolist()
            alt_ids = (alt_h % _U64(vocab)).astype(np.int64).tolist()
            ranked = [(lp, token)] + sorted(zip(alt_lps, alt_ids), reverse=True)
            out.append(self._triples([r[0] for r in ranked], [r[1] for r in ranked], with_text))
        return out

    # ---- routed experts

    def routed_experts(self, seq_ids: Sequence[int], start_len: int = 0) -> np.ndarray:
        """int32 [len(seq)-1-start_len, num_layers, top_k]: distinct experts per (position, token, layer)."""
        opts = self.options
        rows = max(0, len(seq_ids) - 1 - start_len)
        layers, k, experts = opts.num_layers, opts.top_k, opts.num_experts
        if rows == 0:
            return np.zeros((0, layers, k), np.int32)
        pos = np.arange(start_len, start_len + rows, dtype=np.uint64)
        tok = np.asarray(seq_ids[start_len : start_len + rows], dtype=np.uint64)
        row_h = _splitmix64(pos * _U64(0xA24BAED4963EE407) ^ tok * _U64(0x9FB21C651E98DF25) ^ _U64(self.seed))
        layer_h = _splitmix64(np.arange(layers, dtype=np.uint64) * _U64(0xC2B2AE3D27D4EB4F) + _U64(1))
        h = _splitmix64(row_h[:, None] ^ layer_h[None, :])  # [rows, layers]
        out = np.empty((rows, layers, k), np.int32)
        out[:, :, 0] = h % _U64(experts)
        if k > 1:
            # k-1 increments in [1, gap] (16 hash bits each) sum to <= experts-1: the k experts are distinct
            gap = max(1, (experts - 1) // (k - 1))
            words = []
            for j in range(math.ceil((k - 1) / 4)):
                hj = _splitmix64(h ^ _U64(0xE7037ED1A0B428DB * (j + 1) & _MASK64))
                words.append(hj.view(np.uint16).reshape(rows, layers, 4))
            inc = np.concatenate(words, axis=2)[:, :, : k - 1] % np.uint16(gap) + np.uint16(1)
            np.cumsum(inc, axis=2, dtype=np.int32, out=out[:, :, 1:])
            out[:, :, 1:] += out[:, :, :1]
            out[:, :, 1:] %= experts
        return out

    def routed_experts_bytes(self, seq_ids: Sequence[int], start_len: int = 0) -> bytes:
        """Little-endian int32 bytes of `routed_experts` (the wire form before base64)."""
        return self.routed_experts(seq_ids, start_len).astype("<i4", copy=False).tobytes()

    # ---- replies

    def output(
        self,
        item: GenerateItem,
        prompt_ids: Sequence[int],
        completion: Completion,
        produced: int,
        *,
        finish_reason: dict[str, Any] | None,
        text: str,
        weight_version: str,
        cached_tokens: int,
        num_retractions: int,
        e2e_latency: float | None,
        sent_ts: float | None,
        index: int | None = None,
    ) -> dict[str, Any]:
        """One /generate output object with meta_info in SGLang's key order (§2.2)."""
        output_ids = completion.output_ids[:produced]
        meta: dict[str, Any] = {
            "id": item.rid,
            "finish_reason": finish_reason,
            "prompt_tokens": len(prompt_ids),
            "weight_version": weight_version,
            "num_retractions": num_retractions,
        }
        if item.return_logprob:
            self._add_logprobs(meta, item, prompt_ids, completion, produced)
        meta["reasoning_tokens"] = 0
        meta["completion_tokens"] = produced
        meta["cached_tokens"] = cached_tokens
        meta["cached_tokens_details"] = {"device": cached_tokens, "host": 0} if cached_tokens else None
        if item.return_routed_experts and finish_reason is not None:
            # bytes: msgspec's JSON encoder writes them as standard padded base64 (fast for multi-MB arrays)
            meta["routed_experts"] = self.routed_experts_bytes(
                list(prompt_ids) + output_ids, item.routed_experts_start_len
            )
        meta["dp_rank"] = None
        if finish_reason is not None and e2e_latency is not None:
            meta["e2e_latency"] = e2e_latency
        if sent_ts is not None:
            meta["response_sent_to_client_ts"] = sent_ts
        out = {"text": text, "output_ids": output_ids, "meta_info": meta}
        if index is not None:
            out["index"] = index
        return out

    def _add_logprobs(
        self, meta: dict[str, Any], item: GenerateItem, prompt_ids: Sequence[int], completion: Completion, produced: int
    ) -> None:
        with_text = item.return_text_in_logprobs
        key = completion.key
        start = len(prompt_ids) if item.logprob_start_len < 0 else item.logprob_start_len
        in_ids = list(prompt_ids[start:])
        in_pos = np.arange(start, len(prompt_ids), dtype=np.uint64)
        in_lps: list[float | None] = self.logprobs(self.seed, in_pos, in_ids).tolist()
        if in_lps:
            in_lps[0] = None  # the first prompt position has no logprob
        out_ids = completion.output_ids[:produced]
        out_lps = completion.logprobs[:produced]
        meta["input_token_logprobs"] = self._triples(in_lps, in_ids, with_text)
        meta["output_token_logprobs"] = self._triples(out_lps.tolist(), out_ids, with_text)
        meta["output_token_logprobs_length"] = produced
        if item.top_logprobs_num > 0:
            k = item.top_logprobs_num
            in_top = self._top_logprobs(
                self.seed, in_pos, in_ids, self.logprobs(self.seed, in_pos, in_ids), k, with_text
            )
            if in_top:
                in_top[0] = None
            out_pos = np.arange(len(prompt_ids), len(prompt_ids) + produced, dtype=np.uint64)
            meta["input_top_logprobs"] = in_top
            meta["output_top_logprobs"] = self._top_logprobs(key, out_pos, out_ids, out_lps, k, with_text)
        if item.token_ids_logprob:
            wanted = item.token_ids_logprob
            meta["input_token_ids_logprobs"] = [
                None if i == 0 else self._ids_logprobs(self.seed, p, wanted, with_text)
                for i, p in enumerate(range(start, len(prompt_ids)))
            ]
            meta["output_token_ids_logprobs"] = [
                self._ids_logprobs(key, len(prompt_ids) + i, wanted, with_text) for i in range(produced)
            ]

    def _ids_logprobs(self, key: int, position: int, ids: list[int], with_text: bool) -> list[list[Any]]:
        lps = self.logprobs(key ^ 0x5BD1E995, np.full(len(ids), position, np.uint64), ids) - np.float32(1.0)
        return self._triples(lps.tolist(), ids, with_text)

    @staticmethod
    def waiting_abort_output(
        item: GenerateItem, *, weight_version: str, e2e_latency: float, sent_ts: float, index: int | None = None
    ) -> dict[str, Any]:
        """`_handle_abort_req`'s reply for a request aborted before it was scheduled (§2.6, §6.3b)."""
        meta: dict[str, Any] = {
            "id": item.rid,
            "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
            "weight_version": weight_version,
            "e2e_latency": e2e_latency,
        }
        if item.return_logprob:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = []
            meta["output_token_logprobs_length"] = 0
        meta["completion_tokens"] = 0
        meta["response_sent_to_client_ts"] = sent_ts
        out = {"text": "", "output_ids": [], "meta_info": meta}
        if index is not None:
            out["index"] = index
        return out


ABORTED = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}


def bad_request_abort(message: str) -> dict[str, Any]:
    return {"type": "abort", "message": message, "status_code": 400, "err_type": "BadRequestError"}


# --- prefix cache ---------------------------------------------------------------------------


class PrefixCache:
    """Simulated radix cache: an LRU of chained hashes of 16-token blocks, `capacity_tokens` big.

    A block key stands for the whole prefix up to the block's end (`keys`), so a prompt's cached
    length is its run of leading keys present (`match_keys`)."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_blocks = max(0, capacity_tokens // PREFIX_BLOCK_TOKENS)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks) * PREFIX_BLOCK_TOKENS

    @staticmethod
    def keys(ids: Sequence[int], limit: int | None = None) -> list[int]:
        """The chained key of every whole block of `ids[:limit]`."""
        limit = len(ids) if limit is None else limit
        hashes, h = [], 0
        for start in range(0, limit - PREFIX_BLOCK_TOKENS + 1, PREFIX_BLOCK_TOKENS):
            h = hash((h, tuple(ids[start : start + PREFIX_BLOCK_TOKENS])))
            hashes.append(h)
        return hashes

    def match_keys(self, keys: Sequence[int]) -> int:
        """Cached tokens of the leading run of `keys` (refreshing them as recently used)."""
        matched = 0
        for h in keys:
            if h not in self._blocks:
                break
            self._blocks.move_to_end(h)
            matched += PREFIX_BLOCK_TOKENS
        return matched

    def match(self, ids: Sequence[int]) -> int:
        """Cached tokens for a prompt; at least its last token is always recomputed."""
        return self.match_keys(self.keys(ids, len(ids) - 1))

    def insert_keys(self, keys: Sequence[int]) -> None:
        if self.capacity_blocks == 0:
            return
        for h in keys:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)

    def insert(self, ids: Sequence[int]) -> None:
        self.insert_keys(self.keys(ids))

    def clear(self) -> None:
        self._blocks.clear()
