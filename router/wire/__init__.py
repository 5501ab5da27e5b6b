"""Wire formats: msgspec Structs for every body the router reads or writes."""

import msgspec

# Everything msgspec's JSON decoders raise on bad input: besides DecodeError (and its subclass
# ValidationError) it raises UnicodeDecodeError for invalid UTF-8 inside a string and RecursionError
# for deeply nested values. Each of the latter once escaped as a 500 (tests/test_bad_input.py).
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def decode_error_text(e: Exception) -> str:
    """A client-facing reason for one of DECODE_ERRORS."""
    return str(e) if isinstance(e, msgspec.DecodeError) else f"{type(e).__name__}: {e}"
