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


# Texts on either side of a candidate split token in `split_after_ids`' check: letters, spaces, newlines,
# punctuation, a multi-byte character, a word a pre-tokenizer keeps whole, the start of a special token.
_LEFTS = ("", "a", "Hello world", " ", "\n", "é", "x ", "1.5")
_RIGHTS = ("", "a", " a", "\n", "\n\n", "Hello", "é", "  x", "'s", "<", "|", "1")


def split_after_ids(raw: Any, added: dict[int, Any]) -> list[int]:
    """The added tokens after which `raw` splits any text: a text its encode spells with one of them ending at
    byte b encodes as encode(text[:b]) + encode(text[b:]), so a prompt's tokens up to such a token can be reused
    for any text that starts the same way, without tokenizing that part again.

    Hugging Face tokenizers find added tokens first (leftmost-longest) and tokenize the text between them piece by
    piece, so this holds for a token that takes no text from its right (no `rstrip`, not `single_word`, matched
    on the raw text: not `normalized`) and that no other added token contains (which could then match across the
    cut). A pre-tokenizer that treats the first piece of a text apart (SentencePiece's prefix space) breaks it:
    each candidate is also checked on sample texts, and kept only if every sample splits exactly."""
    contents = {i: tok.content for i, tok in added.items()}
    candidates = [(i, c) for i, c in contents.items()
                  if c and not (added[i].rstrip or added[i].single_word or added[i].normalized)
                  and raw.token_to_id(c) == i and not any(c in other for j, other in contents.items() if j != i)]
    texts = set(_RIGHTS)
    for _, c in candidates:  # each left + token + each right ("" among them), and the token as a right
        texts.update(x + c + y for x in _LEFTS for y in _RIGHTS + (c, c[:1]))
        texts.update((c, c[:1]))
    order = list(texts)
    enc = dict(zip(order, (e.ids for e in raw.encode_batch(order, add_special_tokens=False))))

    def splits(i: int, c: str) -> bool:
        for x in _LEFTS:
            left = enc[x + c]
            if not left or left[-1] != i or any(enc[x + c + y] != left + enc[y] for y in _RIGHTS + (c, c[:1])):
                return False
        return True

    return [i for i, c in candidates if splits(i, c)]
