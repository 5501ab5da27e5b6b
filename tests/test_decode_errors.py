"""The router's words for bad JSON (router/wire/errors.py): the same on every msgspec release.

Pure properties here; tests/test_fuzz.py checks the same over sockets on every endpoint that decodes."""

from __future__ import annotations

import json
import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.config import ConfigError, load_config
from router.wire import DECODE_ERRORS, decode_error_text
from router.wire.api import retrieve_request_decoder, worker_url_decoder
from router.wire.sglang import generate_request_decoder

_PATH = r"(?: at \$[^ ]*)?"
_TYPES = r"(?:an object|an array|a string|an integer|a number|a boolean|null|a base64 string|[A-Za-z0-9_]+)"
_TYPE_LIST = rf"{_TYPES}(?:, {_TYPES})*(?: or {_TYPES})?"
OURS = [re.compile(p) for p in (
    r"invalid UTF-8 in a JSON string at byte \d+", r"invalid UTF-8 at byte \d+",
    r"JSON is truncated at byte \d+", r"malformed JSON at byte \d+", r"malformed JSON",
    r"the body is empty \(expected JSON\)", r"JSON nests too deeply",
    r"lone UTF-16 surrogate escape \\u[0-9a-f]{4} at byte \d+", r"NaN and Infinity are not JSON numbers",
    rf"expected {_TYPE_LIST}, got {_TYPES}{_PATH}", rf"expected {_TYPES} (?:of length )?[<>]=? -?[0-9.e+]+{_PATH}",
    rf'unknown field "(?:[^"\\]|\\.)*"{_PATH}', rf'missing required field "(?:[^"\\]|\\.)*"{_PATH}', rf"invalid value(?: .+)?{_PATH}",
)]


def is_ours(text: str) -> bool:
    return any(p.fullmatch(text) for p in OURS)


DECODERS = [generate_request_decoder, retrieve_request_decoder, worker_url_decoder, msgspec.json.Decoder()]

# (body, the router's message) -- whichever way msgspec words it
KNOWN = [
    (b'{"text": "a\xffb"}', "invalid UTF-8 in a JSON string at byte 11"),
    (b'{"text": "a\xff', "invalid UTF-8 in a JSON string at byte 11"),
    (b'\xff\xfe{}', "invalid UTF-8 at byte 0"),
    (b'{"text": "\\ud800"}', "lone UTF-16 surrogate escape \\ud800 at byte 10"),
    (b'{"text": "\\uDC00"}', "lone UTF-16 surrogate escape \\udc00 at byte 10"),
    (b'{"text": "\\ud83d\\ude00", "b": "\\ud83d"}', "lone UTF-16 surrogate escape \\ud83d at byte 31"),
    (b"{", "JSON is truncated at byte 1"),
    (b'{"text": "ab', "JSON is truncated at byte 12"),
    (b'{"text": "ab\\', "JSON is truncated at byte 13"),
    (b'{"a": 1', "JSON is truncated at byte 7"),
    (b'{"a" 1}', "malformed JSON at byte 5"),
    (b'{"text": "a"} x', "malformed JSON at byte 14"),
    (b'{"text": "a\x01"}', "malformed JSON at byte 11"),
    (b'{"a": NaN}', "NaN and Infinity are not JSON numbers"),
    (b"", "the body is empty (expected JSON)"),
    (b"  \n", "the body is empty (expected JSON)"),
    (b'{"a":' * 5000, "JSON nests too deeply"),
]


@pytest.mark.parametrize("body, message", KNOWN)
def test_known_bad_bodies_get_the_routers_words(body, message):
    failed = 0
    for decoder in DECODERS:  # typed decoders skip unknown fields unchecked; the untyped one fails
        try:
            decoder.decode(body)
        except msgspec.ValidationError:
            pass  # a schema complaint about some other field
        except DECODE_ERRORS as e:
            assert decode_error_text(e, body) == message, decoder
            failed += 1
    assert failed, f"{body!r} decoded"


@pytest.mark.parametrize("decoder, body, message", [
    (generate_request_decoder, b"[1, 2]", "expected an object, got an array"),
    (generate_request_decoder, b'{"text": 5}', "expected a string, an array or null, got an integer at $.text"),
    (generate_request_decoder, b'{"stream": "yes"}', "expected a boolean, got a string at $.stream"),
    (worker_url_decoder, b'{"url": ["x"]}', "expected a string or null, got an array at $.url"),
    (retrieve_request_decoder, b'{"texts": [1]}', "expected a string, got an integer at $.texts[0]"),
])
def test_schema_errors_get_the_routers_words(decoder, body, message):
    with pytest.raises(msgspec.ValidationError) as ei:
        decoder.decode(body)
    assert decode_error_text(ei.value, body) == message


def test_config_errors_get_the_routers_words(tmp_path):
    p = tmp_path / "r.toml"
    for text, message in [
        ('[server]\nport = "x"', "server.port: expected an integer, got a string"),
        ("[workers]\nurls = [1]", "workers.urls[0]: expected a string, got an integer"),
        ("[server]\nbogus = 1", "server.bogus: unknown key"),
        ('[[routes]]\npath = "/g"\npolicy = "fastest"',
         "routes[0].policy: invalid value 'fastest': must be one of least_inflight, prefix_affinity, sticky"),
        ('[[routes]]\nmethod = "GET"', "routes[0]: missing required field \"path\""),
    ]:
        p.write_text(text)
        with pytest.raises(ConfigError) as ei:
            load_config(p)
        assert str(ei.value) == f"{p}: {message}"


# ---- properties over random bad bodies -----------------------------------------------------------

leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                 st.text(max_size=12))
values = st.recursive(leaf, lambda ch: st.lists(ch, max_size=3) | st.dictionaries(st.text(max_size=6), ch, max_size=3),
                      max_leaves=10)
objects = st.one_of(values, st.fixed_dictionaries({}, optional={
    "text": values, "texts": values, "url": values, "input_ids": values, "stream": values}))


@st.composite
def bad_bodies(draw):
    raw = msgspec.json.encode(draw(objects))
    how = draw(st.sampled_from(["keep", "cut", "junk", "flip", "utf8", "surrogate", "random"]))
    if how == "cut":
        raw = raw[: draw(st.integers(0, max(0, len(raw) - 1)))]
    elif how == "junk":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=6)) + raw[at:]
    elif how == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    elif how == "utf8":
        raw = raw.replace(b'"', b'"' + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82"])), 1)
    elif how == "surrogate":
        raw = raw.replace(b'"', b'"' + draw(st.sampled_from([b"\\ud800", b"\\udfff", b"\\ud800\\u0041"])), 1)
    elif how == "random":
        raw = draw(st.binary(max_size=40))
    return raw


@settings(max_examples=1500, deadline=None, database=None)
@given(body=bad_bodies())
def test_every_decode_error_is_said_in_the_routers_words(body):
    for decoder in DECODERS:
        try:
            decoder.decode(body)
        except DECODE_ERRORS as e:
            text = decode_error_text(e, body)
            assert is_ours(text), (body, text)
            m = re.fullmatch(r"invalid UTF-8(?: in a JSON string)? at byte (\d+)", text)
            if m:  # the offset is the first byte that is not UTF-8
                with pytest.raises(UnicodeDecodeError) as ue:
                    body.decode("utf-8")
                assert ue.value.start == int(m.group(1))
            m = re.fullmatch(r"JSON is truncated at byte (\d+)", text)
            if m:  # only a body that ends too early is called truncated
                assert int(m.group(1)) == len(body), (body, text)
            if not isinstance(e, msgspec.ValidationError):
                # a syntax problem is never blamed on a body the standard library accepts as strict JSON
                try:
                    json.loads(body.decode("utf-8"), parse_constant=lambda c: 1 / 0)
                    strict_ok = re.search(rb"\\u[dD][89a-fA-F]", body) is not None
                except (ValueError, ZeroDivisionError, RecursionError):
                    strict_ok = True
                assert strict_ok, (body, text)
