"""The router's own words for bad JSON: what a client (or a config file's author) is told.

msgspec's messages change between releases (0.23 reports invalid UTF-8 as a DecodeError without a
position, older releases raise UnicodeDecodeError; a lone UTF-16 surrogate escape is reported as
"truncated"), so no msgspec text reaches a client. A syntax-level failure is diagnosed again here
with the standard library: the first invalid UTF-8 byte, the first JSON syntax error and lone
surrogate escapes, each with its byte offset. A schema failure (msgspec.ValidationError) is reduced
to its structure (expected/got types, unknown or missing field, JSON path) and said in our words.

Every message is one of these shapes (N a byte offset, PATH like `$.a[0].b`):
  invalid UTF-8 in a JSON string at byte N        invalid UTF-8 at byte N
  JSON is truncated at byte N                      malformed JSON at byte N
  the body is empty (expected JSON)                JSON nests too deeply
  lone UTF-16 surrogate escape \\uXXXX at byte N   NaN and Infinity are not JSON numbers
  malformed JSON
  expected <types>, got <type>[ at PATH]           expected <type> <op> <number>[ at PATH]
  unknown field "F"[ at PATH]                      missing required field "F"[ at PATH]
  invalid value[ 'V'][ at PATH]
"""

from __future__ import annotations

import json
import re

import msgspec

# Everything msgspec's JSON decoders raise on bad input: besides DecodeError (and its subclass
# ValidationError) older releases raise UnicodeDecodeError for invalid UTF-8 inside a string, and
# all raise RecursionError for deeply nested values. Each of the latter once escaped as a 500.
DECODE_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

# ---- schema errors -----------------------------------------------------------------------------

_TYPE_WORDS = {
    "object": "an object", "array": "an array", "str": "a string", "int": "an integer",
    "float": "a number", "bool": "a boolean", "null": "null", "bytes": "a base64 string",
}
_PATH = re.compile(r" - at `(?P<path>\$[^`]*)`$")  # (a path with a backtick in a key is dropped)
_SCHEMA_FORMS = (
    (re.compile(r"Expected `(?P<exp>[^`]+)`, got `(?P<got>[^`]+)`"), "expected {exp}, got {got}"),
    (re.compile(r"Expected `(?P<exp>[^`]+)` (?:of length )?(?P<op>[<>]=?) (?P<n>-?[0-9.e+]+)"),
     "expected {exp} {lengthof}{op} {n}"),
    (re.compile(r"Object contains unknown field `(?P<field>.*)`(?= - at `\$|$)", re.S), "unknown field {field}"),
    (re.compile(r"Object missing required field `(?P<field>.*)`(?= - at `\$|$)", re.S), "missing required field {field}"),
    (re.compile(r"Invalid enum value (?P<value>'[^']{0,200}'|-?[0-9]{1,30})(?: - at |$)"), "invalid value {value}"),
)


def _type_words(spelling: str) -> str:
    """`str | array | null` -> `a string, an array or null` (unknown names kept, sanitized)."""
    words = [_TYPE_WORDS.get(t.strip(), re.sub(r"[^A-Za-z0-9_]", "", t) or "another type")
             for t in spelling.split("|")]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def validation_problem(err: Exception) -> tuple[str, str]:
    """(JSON path such as `$.a.b` or "", reason in the router's words) for a msgspec.ValidationError."""
    text = str(err)
    m = _PATH.search(text)
    path = m.group("path") if m else ""
    if m is not None:
        text = text[: m.start()]
    for pattern, template in _SCHEMA_FORMS:
        f = pattern.match(text)
        if f is not None:
            g = f.groupdict()
            exp = g.get("exp")
            return path, template.format(
                exp=_type_words(exp) if exp else "", got=_type_words(g.get("got") or ""),
                op=g.get("op"), n=g.get("n"), field=json.dumps(g.get("field")), value=g.get("value"),
                lengthof="of length " if " of length " in f.group(0) else "")
    return path, "invalid value"


def validation_error_text(err: Exception) -> str:
    path, reason = validation_problem(err)
    return f"{reason} at {path}" if path and path != "$" else reason


# ---- syntax errors -----------------------------------------------------------------------------

# A \u escape (a backslash preceded by an even run of backslashes starts an escape).
_U_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u([0-9a-fA-F]{4})")


def _reject_constant(name: str):
    raise _NotJson(name)


class _NotJson(ValueError):
    pass


def _lone_surrogate(body: bytes) -> tuple[int, bytes] | None:
    """(byte offset, escape) of the first \\uD800-\\uDFFF escape that is not half of a pair."""
    pending_high: re.Match | None = None
    for m in _U_ESCAPE.finditer(body):
        code = int(m.group(1), 16)
        start = m.end() - 6
        if pending_high is not None:
            if 0xDC00 <= code <= 0xDFFF and start == pending_high.end():
                pending_high = None
                continue
            return pending_high.end() - 6, pending_high.group()[-6:]
        if 0xD800 <= code <= 0xDBFF:
            pending_high = m
        elif 0xDC00 <= code <= 0xDFFF:
            return start, m.group()[-6:]
    if pending_high is not None and pending_high.end() < len(body):  # (at the end: may be cut off)
        return pending_high.end() - 6, pending_high.group()[-6:]
    return None


_STRING = re.compile(r'"(?:[^"\\]|\\.)*(?P<close>")?', re.S)
# a string's valid content, and what may follow it at the very end of a truncated input
_GOOD_IN_STRING = re.compile(r'(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*')
_PARTIAL_ESCAPE = re.compile(r'(?:\\(?:u[0-9a-fA-F]{0,3})?)?')


def _open_string(doc: str, pos: int) -> int | None:
    """Where the string containing offset `pos` opens, if that string is never closed."""
    last = None
    for m in _STRING.finditer(doc):
        if m.start() > pos:
            break
        last = m
    if last is not None and last.group("close") is None:
        return last.start()
    return None


def syntax_error_text(body: bytes) -> str:
    """Why `body` is not a JSON document, with the byte offset of the first problem."""
    if not body.strip(b" \t\r\n"):  # JSON's whitespace (str.strip() takes more)
        return "the body is empty (expected JSON)"
    try:
        body.decode("utf-8")
        bad_utf8 = None
    except UnicodeDecodeError as e:
        bad_utf8 = e.start
    # surrogateescape maps each invalid byte to one character, so offsets convert back exactly;
    # the standard library's parser accepts those characters only inside strings.
    doc = body.decode("utf-8", "surrogateescape")
    syntax_at, truncated = None, False
    try:
        json.loads(doc, parse_constant=_reject_constant)
    except RecursionError:
        return "JSON nests too deeply"
    except _NotJson:
        if bad_utf8 is None:
            return "NaN and Infinity are not JSON numbers"
    except json.JSONDecodeError as e:
        pos = e.pos
        opened = _open_string(doc, pos)
        if opened is not None:
            # The error lies in a string that the input ends inside: truncated, unless the string
            # already holds something no continuation can fix.
            good = _GOOD_IN_STRING.match(doc, opened + 1).end()
            if _PARTIAL_ESCAPE.fullmatch(doc, good):
                pos, truncated = len(doc), True
            else:
                pos = good
        elif not doc[pos:].strip(" \t\r\n"):
            truncated = True
        syntax_at = len(doc[:pos].encode("utf-8", "surrogateescape"))
    if bad_utf8 is not None and (syntax_at is None or bad_utf8 < syntax_at):
        return f"invalid UTF-8 in a JSON string at byte {bad_utf8}"
    if bad_utf8 is not None and bad_utf8 == syntax_at:
        return f"invalid UTF-8 at byte {bad_utf8}"
    lone = _lone_surrogate(body)
    if lone is not None and (syntax_at is None or lone[0] < syntax_at):
        return f"lone UTF-16 surrogate escape {lone[1].decode().lower()} at byte {lone[0]}"
    if syntax_at is not None:
        if truncated:
            return f"JSON is truncated at byte {syntax_at}"
        return f"malformed JSON at byte {syntax_at}"
    return "malformed JSON"


def decode_error_text(e: Exception, body: bytes | None = None) -> str:
    """A client-facing reason, in the router's own words, for one of DECODE_ERRORS raised while
    decoding `body` (never msgspec's wording: it changes between releases)."""
    if isinstance(e, msgspec.ValidationError):
        return validation_error_text(e)
    if isinstance(e, RecursionError):
        return "JSON nests too deeply"
    if body is None:
        return "malformed JSON"
    return syntax_error_text(bytes(body))
