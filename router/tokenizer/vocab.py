"""A Hugging Face tokenizer's vocabulary as bytes: reads the exact bytes every id stands for out of its
Rust core (byte-level BPE, SentencePiece with byte fallback, or decode as a last resort) into the one
`VocabBytes` table (router/core/vocab.py) the tokenizer and the trajectory cache share."""

from __future__ import annotations

from typing import Any

from router.core.vocab import VocabBytes


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


def token_vocabulary(raw: Any, added: dict[int, Any]) -> VocabBytes:
    """The bytes of every id of `raw` (a `tokenizers.Tokenizer`); `added`: its added tokens by id."""
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
    return VocabBytes(pieces)

