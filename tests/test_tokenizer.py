"""Tests for router.tokenizer: builtin Qwen/tiny tokenizers, exact token bytes, async encode."""

from __future__ import annotations

import threading
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.tokenizer import QWEN_ADDED_TOKENS, Tokenizer, load_tokenizer, resolve_tokenizer_folder

MIXED_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.\n\n",
    "你好，世界。日本語のテキスト",
    "emoji 🙂🚀👍🏽 and flags 🇫🇷",
    "accents: café naïve Ångström e\u0301 (decomposed)",
    "tabs\tand\r\nwindows newlines\n   indented",
    "<|im_start|>user\nHi<|im_end|>\n<think>x</think>",
    "",
]


@pytest.fixture(scope="session")
def qwen() -> Tokenizer:
    return load_tokenizer("builtin:qwen")


@pytest.fixture(scope="session")
def tiny() -> Tokenizer:
    return load_tokenizer("builtin:tiny")


def test_qwen_known_ids(qwen: Tokenizer) -> None:
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.eos_token_id == 151645
    assert qwen.encode("<|endoftext|><|im_start|><|im_end|>") == [151643, 151644, 151645]
    assert qwen.hf.convert_tokens_to_ids(list(QWEN_ADDED_TOKENS)) == list(range(151643, 151669))
    assert qwen.encode("<think>x</think>") == [151667, 87, 151668]
    assert qwen.special_ids == {151643, 151644, 151645}
    assert qwen.added_ids == set(range(151643, 151669))


def test_qwen_chatml(qwen: Tokenizer) -> None:
    text = qwen.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert qwen.encode(text) == [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]
    system = qwen.encode(qwen.apply_chat_template([{"role": "system", "content": "S"}], add_generation_prompt=False))
    assert system[:2] == [151644, 8948]


def test_decode_skips_only_special_tokens(qwen: Tokenizer) -> None:
    ids = qwen.encode("<|im_start|>user\nHi<|im_end|><tool_call>")
    assert qwen.decode(ids) == "user\nHi<tool_call>"
    assert qwen.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|><tool_call>"
    assert qwen.decode(np.array(ids)) == "user\nHi<tool_call>"


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_qwen_token_bytes_round_trip(qwen: Tokenizer, text: str) -> None:
    ids = qwen.encode(text)
    data, lengths = qwen.token_bytes(ids)
    assert data == unicodedata.normalize("NFC", text).encode()
    assert lengths.dtype == np.uint32 and lengths.tolist() == [len(qwen.text_bytes([i])) for i in ids]
    assert int(lengths.sum()) == len(data)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_tiny_token_bytes_round_trip(text: str) -> None:
    tok = load_tokenizer("builtin:tiny")
    ids = tok.encode(text)
    assert tok.text_bytes(ids) == unicodedata.normalize("NFC", text).encode()


def test_tiny_layout(tiny: Tokenizer) -> None:
    assert tiny.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    assert tiny.eos_token_id == 2
    assert tiny.special_ids == {0, 1, 2}
    assert tiny.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_multibyte_char_split_across_tokens(tiny: Tokenizer) -> None:
    ids = tiny.encode("猫")  # not in the tiny corpus: one token per UTF-8 byte
    assert len(ids) == 3
    data, lengths = tiny.token_bytes(ids)
    assert data == "猫".encode() and lengths.tolist() == [1, 1, 1]
    assert b"".join(tiny.text_bytes([i]) for i in ids) == "猫".encode()
    assert tiny.decode(ids[:1]) == "\ufffd"  # a decoded str can't hold part of a char; bytes can


def test_token_bytes_edge_cases(qwen: Tokenizer) -> None:
    data, lengths = qwen.token_bytes([])
    assert data == b"" and lengths.shape == (0,)
    assert qwen.text_bytes(np.array([9707, 1879])) == b"Hello world"
    for bad in ([-1], [10**9]):
        with pytest.raises(ValueError):
            qwen.text_bytes(bad)
    assert len(qwen.vocab.blob) == int(qwen.vocab.offsets[-1])
    i = 9707
    assert qwen.vocab.blob[qwen.vocab.offsets[i] : qwen.vocab.offsets[i + 1]] == b"Hello"


async def test_encode_async_matches_encode(qwen: Tokenizer) -> None:
    long_text = " ".join(MIXED_TEXTS) * 200
    assert len(long_text) > 4096
    assert await qwen.encode_async(long_text) == qwen.encode(long_text)
    assert await qwen.encode_async("Hello world") == [9707, 1879]


def test_load_is_cached_per_spec() -> None:
    assert load_tokenizer("builtin:tiny") is load_tokenizer("builtin:tiny", None)


@pytest.mark.parametrize("spec", ["builtin:nope", "/definitely/not/a/tokenizer", ""])
def test_bad_spec_raises_value_error(spec: str) -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        load_tokenizer(spec)


def test_folder_without_tokenizer_raises_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path))


def test_builtin_builds_into_cache_dir_concurrently(tmp_path: Path, tiny: Tokenizer) -> None:
    folders: list[Path] = []
    threads = [
        threading.Thread(target=lambda: folders.append(resolve_tokenizer_folder("builtin:tiny", tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert folders == [tmp_path / "tiny-v2"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-v2"]  # no leftover build dirs
    built = load_tokenizer("builtin:tiny", tmp_path)
    assert built.folder == tmp_path / "tiny-v2"
    assert built.encode("Hello world! 你好") == tiny.encode("Hello world! 你好")


def test_sentencepiece_style_folder(tmp_path: Path) -> None:
    """A Llama-style folder (Metaspace `▁`, `<0xNN>` byte fallback) gets exact token bytes too."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def sentencepiece_parts() -> tuple[object, object, object]:
        return (
            normalizers.NFC(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            decoders.Sequence(
                [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
            ),
        )

    # Train with the byte tokens in the vocab, then rebuild so that (as in Llama's tokenizer.json)
    # `<0xNN>` are ordinary vocab entries and only <unk>/<s>/</s> are added tokens.
    trained = RawTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trained.normalizer, trained.pre_tokenizer, trained.decoder = sentencepiece_parts()
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials + [f"<0x{b:02X}>" for b in range(256)], show_progress=False
    )
    trained.train_from_iterator(["The quick brown fox jumps over the lazy dog.", "Hello world!"] * 20, trainer)
    vocab_file, merges_file = trained.model.save(str(tmp_path))
    raw = RawTokenizer(models.BPE.from_file(vocab_file, merges_file, byte_fallback=True, unk_token="<unk>"))
    raw.normalizer, raw.pre_tokenizer, raw.decoder = sentencepiece_parts()
    raw.add_special_tokens(specials)
    folder = tmp_path / "llama_like"
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", bos_token="<s>", unk_token="<unk>").save_pretrained(
        str(folder)
    )
    assert set(raw.get_added_tokens_decoder()) == {0, 1, 2}
    tok = load_tokenizer(str(folder))
    ids = tok.encode("Hello 猫 world")
    assert "<0xE7>" in tok.hf.convert_ids_to_tokens(ids)
    assert tok.text_bytes(ids) == " Hello 猫 world".encode()  # Metaspace prepends the word-start marker
    assert tok.text_bytes(tok.encode("猫")) == " 猫".encode()
    assert tok.eos_token_id == tok.hf.convert_tokens_to_ids("</s>")


# ---- split tokens: where the trajectory cache may cut a text prompt inside another prompt (router/core/radix) ----
_PIECES = st.one_of(
    st.sampled_from(["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<think>", "</think>",
                     "<|endoftext|>", "<|im_", "|>", "<tool", "think>", "\n", "\n\n", " ", "  ", "user", "assistant"]),
    st.text(alphabet=st.sampled_from("ab xyz.,'!?\n\t0123456789éü你好🙂<>|/_"), max_size=12),
)


def _split_points(tok: Tokenizer, text: str) -> list[int]:
    """Byte offsets right after each split token in the tokenizer's own encoding of `text`."""
    ids = tok.encode(text)
    ends = np.cumsum(tok.vocab.lengths[np.asarray(ids, np.int64)]) if ids else []
    return [int(e) for i, e in zip(ids, ends) if tok.vocab.split_after is not None and tok.vocab.split_after[i]]


def test_the_builtin_tokenizers_split_after_their_chat_tokens(qwen: Tokenizer, tiny: Tokenizer) -> None:
    for tok in (qwen, tiny):
        table = tok.vocab.split_after
        assert table is not None
        for name in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
            assert table[tok.raw.token_to_id(name)], (tok.name, name)
        assert not table[tok.raw.token_to_id("Hello")]  # an ordinary token never
    assert all(qwen.vocab.split_after[qwen.raw.token_to_id(t)] for t in ("<tool_call>", "</think>"))


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=10).map("".join))
def test_a_text_cut_after_a_split_token_encodes_as_its_two_pieces(qwen: Tokenizer, text: str) -> None:
    """What the cache relies on: encode(text) == encode(text[:b]) + encode(text[b:]) at every split point b."""
    data = text.encode("utf-8", "surrogatepass")
    whole = qwen.encode(text)
    for b in _split_points(qwen, text):
        assert qwen.encode(data[:b].decode()) + qwen.encode(data[b:].decode()) == whole, b


def _word_level(pre_tokenizer, added):
    """A small offline tokenizer (tokenizers' WordLevel model) with the given pre-tokenizer and added tokens."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models

    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "▁a", "Hello", "▁Hello", "x", "▁x", "1", "▁1"])}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizer
    raw.add_special_tokens(added)
    return raw


def test_split_tokens_are_refused_where_a_cut_would_change_the_tokens() -> None:
    from tokenizers import AddedToken, pre_tokenizers

    from router.tokenizer.vocab import split_after_ids

    def ids(raw):
        return sorted(raw.get_added_tokens_decoder()[i].content for i in
                      split_after_ids(raw, raw.get_added_tokens_decoder()))

    plain = [AddedToken("<sep>", special=True, normalized=False)]
    assert ids(_word_level(pre_tokenizers.Whitespace(), plain)) == ["<sep>"]
    # SentencePiece's prefix space on the first piece only: the text after a cut would gain one
    assert ids(_word_level(pre_tokenizers.Metaspace(prepend_scheme="first"), plain)) == []
    # a token that takes the whitespace after it, or one another added token contains
    assert ids(_word_level(pre_tokenizers.Whitespace(),
                           [AddedToken("<sep>", special=True, rstrip=True, normalized=False)])) == []
    assert ids(_word_level(pre_tokenizers.Whitespace(),
                           [AddedToken("<s>", special=True, normalized=False),
                            AddedToken("<s><t>", special=True, normalized=False)])) == ["<s><t>"]
