"""Fragments to token ids: the ids decode back to exactly the streamed text, for byte-level BPE
(the embedded SmolLM2) and for a Llama-2-style SentencePiece tokenizer (TinyLlama, Phi-3)."""

from __future__ import annotations

import random

import pytest
from exo_rkllm.fake_server import answer_pieces, fake_answer
from exo_rkllm.fragments import FragmentEncoder
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, trainers

from exo_core import Tokenizer, load_tokenizer
from exo_core.models.tokenizer import ChatTemplate
from exo_core.testing import model_card

TEXT = (
    "Hello world! Bonjour le monde, café naïve — 日本語のテキスト, Ελληνικά, emoji 🚀🎉👩‍💻. "
    "Numbers 12345 and  double  spaces,\nnew lines\n\nand tabs\tend."
)


def llama2_style_tokenizer() -> Tokenizer:
    """Llama 2's tokenizer.json pipeline (▁ word marker, byte fallback, leading space stripped)."""
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *bytes_], show_progress=False
    )
    hf.train_from_iterator([TEXT.replace("日本語", "")] * 20, trainer)
    return Tokenizer(hf, chat_template=ChatTemplate("{{ messages }}"), eos_token_ids=[2], source="test")


def embedded() -> Tokenizer:
    return load_tokenizer(model_card("smollm2-135m"))


def streamed_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """What the origin shows the client: exo's own stream decoder, token by token."""
    decoder = tokenizer.stream_decoder()
    return "".join(decoder.push(i) for i in ids) + decoder.flush()


def random_fragments(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=len(text) // 3))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("make", [embedded, llama2_style_tokenizer], ids=["byte-level-bpe", "sentencepiece"])
def test_fragments_encoded_in_full_decode_to_exactly_the_text(make):
    tokenizer = make()
    rng = random.Random(7)
    answer = fake_answer([{"role": "user", "content": "x"}])
    for fragments in [
        answer_pieces(answer),
        answer_pieces(TEXT),
        *(random_fragments(TEXT, rng) for _ in range(5)),
    ]:
        encoder = FragmentEncoder(tokenizer)
        ids = [i for fragment in fragments for i in encoder.encode(fragment)]
        expected = "".join(fragments)
        assert tokenizer.decode(ids) == expected
        assert streamed_text(tokenizer, ids) == expected


def test_every_id_of_a_fragment_is_kept():
    tokenizer = embedded()
    encoder = FragmentEncoder(tokenizer)
    fragment = " several tokens in one fragment"
    ids = encoder.encode(fragment)
    assert ids == tokenizer.encode(fragment) and len(ids) > 3


@pytest.mark.parametrize("make", [embedded, llama2_style_tokenizer], ids=["byte-level-bpe", "sentencepiece"])
def test_a_replay_continues_the_ids_already_streamed(make):
    tokenizer = make()
    pieces = answer_pieces(TEXT)
    first = FragmentEncoder(tokenizer)
    before = [i for p in pieces[:7] for i in first.encode(p)]
    rest_text = "".join(pieces[7:])
    # The replay's first fragment may start mid-word: it continues the earlier ids.
    again = FragmentEncoder(tokenizer, context=before)
    after = again.encode(rest_text[:3]) + again.encode(rest_text[3:])
    assert streamed_text(tokenizer, before + after) == TEXT
