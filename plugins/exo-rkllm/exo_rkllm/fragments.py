"""Streamed text fragments to token ids that decode back to exactly the server's text.

Each fragment is encoded in full, and every id goes to the node. For byte-level BPE
tokenizers (Qwen, Llama 3, SmolLM2, DeepSeek-R1-Distill) encoding a fragment on its own is
always exact. SentencePiece-style tokenizers (TinyLlama, Phi-3) add a "▁" word marker at the
start of every encoded text, which would put a space at each fragment boundary; for those the
encoder checks each fragment's ids against the text in context and, when they differ, encodes
the fragment behind a throw-away prefix and keeps only the fragment's own ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from exo_core.models.tokenizer import Tokenizer

log = structlog.get_logger("exo.rkllm")

_CONTEXT = 4  # ids of earlier text the check decodes with (what a stream decoder keeps)
_PREFIXES = ("\n", "a", " ")


class FragmentEncoder:
    """Encodes one answer's fragments in order; `ids` decode to the concatenated fragments."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self._context: list[int] = []  # the last ids streamed (a replay continues earlier ones)
        self._remember(list(context))

    def encode(self, fragment: str) -> list[int]:
        """The ids for the next fragment."""
        if not fragment:
            return []
        ids = self.tokenizer.encode(fragment, add_bos=False)
        if not self._exact(ids, fragment):
            ids = self._in_context(fragment, ids)
        self._remember(ids)
        return ids

    def _remember(self, ids: list[int]) -> None:
        """Keep the last few ids, never starting inside a character (a run of byte tokens
        missing its lead byte would decode as replacement characters)."""
        recent = (self._context + ids)[-4 * _CONTEXT :]
        keep = min(_CONTEXT, len(recent))
        while keep < len(recent) and self.tokenizer.decode(recent[-keep:]).startswith("\ufffd"):
            keep += 1
        self._context = recent[-keep:]

    def _decoded_after_context(self, ids: list[int]) -> str:
        before = self.tokenizer.decode(self._context)
        return self.tokenizer.decode(self._context + ids)[len(before) :]

    def _exact(self, ids: list[int], fragment: str) -> bool:
        return self._decoded_after_context(ids) == fragment

    def _in_context(self, fragment: str, first_try: list[int]) -> list[int]:
        """Ids for a fragment whose plain encoding does not continue the text exactly."""
        candidates = [first_try[1:]] if len(first_try) > 1 else []  # a leading "▁" of its own
        for prefix in _PREFIXES:
            full = self.tokenizer.encode(prefix + fragment, add_bos=False)
            for cut in range(1, min(len(full), 4)):
                candidates.append(full[cut:])
        for ids in candidates:
            if ids and self._exact(ids, fragment):
                return ids
        byte_ids = self._byte_fallback(fragment)
        if byte_ids is not None and self._exact(byte_ids, fragment):
            return byte_ids
        log.warning("fragment does not re-encode exactly", fragment=fragment)
        return first_try

    def _byte_fallback(self, fragment: str) -> list[int] | None:
        """SentencePiece byte-fallback pieces (<0xNN>), when the vocabulary has them."""
        ids = [self.tokenizer.hf.token_to_id(f"<0x{b:02X}>") for b in fragment.encode("utf-8")]
        return None if any(i is None for i in ids) else [int(i) for i in ids if i is not None]
