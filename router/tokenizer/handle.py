"""The tokenizer handle: encode/decode, the exact bytes of every token (`vocab`), and the chat template
(`apply_chat_template`, `render_appended`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio

from router.core.vocab import VocabBytes
from router.tokenizer.qwen3 import render_qwen3
from router.tokenizer.vocab import split_after_ids, token_vocabulary
from router.wire.qwen3 import QWEN3_CHAT_TEMPLATE

# Texts shorter than this are encoded on the trio thread: a thread hop costs more than the encode.
ASYNC_ENCODE_MIN_CHARS = 4096
# From this many ids on, `token_bytes` gathers with numpy instead of joining.
_GATHER_MIN_TOKENS = 64


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
        # The exact bytes of every id, one table (the trajectory cache derives its text from it too).
        self.vocab: VocabBytes = token_vocabulary(self.raw, added)
        # where the trajectory cache may cut a text prompt inside another prompt's tokens (router/core/radix)
        self.vocab.set_split_after(split_after_ids(self.raw, added))
        self._renders_role: dict[str, bool] = {}

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token_id})"

    def __len__(self) -> int:
        return self.vocab.size

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
            if int(arr.min()) < 0 or int(arr.max()) >= self.vocab.size:
                raise ValueError(f"token id out of range for {self.name!r} (size {self.vocab.size})")
            return self.vocab(arr, gather_from=0)
        return self.text_bytes(arr.tolist()), self.vocab.lengths[arr]

    def text_bytes(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """The exact bytes `ids` stand for; NFC(s).encode() for ids = encode(s) (byte-level BPE)."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if not ids:
            return b""
        pieces = self.vocab.pieces
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
        if self.fast_qwen3_template:  # the template reads no kwarg but enable_thinking and clear_thinking
            text = render_qwen3(messages, add_generation_prompt, tools, chat_template_kwargs.get("enable_thinking"),
                                chat_template_kwargs.get("clear_thinking"))
            if text is not None:
                return text
        return self.hf.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **chat_template_kwargs,
        )

    @property
    def template_name(self) -> str:
        return "the builtin Qwen3 chat template" if self.fast_qwen3_template else f"the chat template of {self.name}"

    def renders_role(self, role: str) -> bool:
        """Whether the chat template writes a message of this role into the prompt (probed once per role:
        alone and after a user turn). A template that renders nothing for it, or raises, does not."""
        known = self._renders_role.get(role)
        if known is None:
            sentinel = "\u2063probe\u2063"
            known = False
            for messages in ([{"role": role, "content": sentinel}],
                             [{"role": "user", "content": "u"}, {"role": role, "content": sentinel}]):
                try:
                    known = known or sentinel in self.apply_chat_template(messages, False)
                except Exception:  # jinja raises anything: a template's own raise_exception included
                    pass
            self._renders_role[role] = known
        return known

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

