"""The core tokenizer reproduces llama.cpp's tokenization and chat prompts for the embedded model."""

import pytest

from exo_core.models.builtin import BUILTIN_CARDS
from exo_core.models.checkpoint.gguf import GGUFFormatError, read_gguf_metadata
from exo_core.models.files import embedded_gguf_path
from exo_core.models.tokenizer import TokenizerError, from_gguf_file, load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return from_gguf_file(embedded_gguf_path())


def test_tokenize_matches_llama_cpp(tok, reference):
    for case in reference["tokenize"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]


def test_chat_prompts_match_llama_cpp(tok, reference):
    for case in reference["greedy"]:
        assert tok.render_chat(case["messages"]) == case["prompt"]
        assert tok.encode_chat(case["messages"]) == case["prompt_ids"]


def test_decode_round_trip(tok, reference):
    for case in reference["greedy"]:
        assert tok.decode(case["completion_ids"]) == case["completion_text"]


def test_stream_decoder_never_splits_a_character(tok):
    text = "naïve café – “quotes” 東京 🚀 and more 🚀🚀"
    ids = tok.encode(text)
    decoder = tok.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_eos_and_card_loading(tok):
    card = next(c for c in BUILTIN_CARDS if c.id == "smollm2-135m")
    assert load_tokenizer(card).encode("Hello world") == tok.encode("Hello world")
    assert tok.eos_token_ids == {2}


def test_metadata_reader(tmp_path):
    meta = read_gguf_metadata(embedded_gguf_path())
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 30
    assert len(meta["tokenizer.ggml.tokens"]) == 49152
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 40)
    with pytest.raises(GGUFFormatError, match="magic"):
        read_gguf_metadata(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(embedded_gguf_path().read_bytes()[:5000])
    with pytest.raises(TokenizerError, match=r"cut\.gguf"):
        from_gguf_file(cut)
