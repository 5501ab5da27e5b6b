"""Wire formats: msgspec Structs for every body the router reads or writes.

Client-facing decode errors are worded in router/wire/errors.py (`decode_error_text` is the one place)."""

from router.wire.errors import (  # noqa: F401  (re-exported)
    DECODE_ERRORS,
    decode_error_text,
    validation_error_text,
    validation_problem,
)
