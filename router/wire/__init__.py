"""Wire formats: msgspec Structs for every body the router reads or writes."""

import re

import msgspec

# Everything msgspec's JSON decoders raise on bad input: besides DecodeError (and its subclass
# ValidationError) it raises UnicodeDecodeError for invalid UTF-8 inside a string and RecursionError
# for deeply nested values. Each of the latter once escaped as a 500 (tests/test_bad_input.py).
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


# A \uD800-\uDBFF escape followed by something other than a \u escape (a backslash preceded by an
# even run of backslashes starts an escape). At the very end of the body it may really be truncated.
_LONE_HIGH_SURROGATE = re.compile(rb'(?<!\\)(?:\\\\)*\\u[dD][89abAB][0-9a-fA-F]{2}(?=[^\\]|\\[^u])')


def decode_error_text(e: Exception, body: bytes | None = None) -> str:
    """A client-facing reason for one of DECODE_ERRORS raised while decoding `body`."""
    if not isinstance(e, msgspec.DecodeError):
        return f"{type(e).__name__}: {e}"
    text = str(e)
    # msgspec reports a lone high surrogate escape as "Input data was truncated", which sends the
    # client looking for a cut-off body; name the real problem when the body shows it.
    if text == "Input data was truncated" and body is not None:
        m = _LONE_HIGH_SURROGATE.search(body)
        if m is not None:
            text = (f"JSON is malformed: lone utf-16 high surrogate escape "
                    f"{m.group()[-6:].decode()} (byte {m.end() - 6})")
    return text
