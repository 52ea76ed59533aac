"""Constrained decoding: a grammar (llguidance) decides which tokens the last stage may sample.

A request's constraint is an llguidance grammar (from a JSON schema, JSON mode, or a tool-call
format) that travels with the request's first step to the last stage. There a `Constraint`
holds an `LLMatcher` over the model's tokenizer: before each sample it gives the mask of
tokens that keep the output inside the grammar (end-of-turn only once the grammar is
complete), and after it consumes the sampled token. The grammar never loosens: a model that
"wants" to write prose inside a JSON answer only gets the tokens the schema allows.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import llguidance

    from exo_core.models.cards import ModelCard
    from exo_core.models.tokenizer import Tokenizer

# JSON written the way people write it ("a, b" and "k: v"), without free whitespace: small
# models given free whitespace can pad an answer with newlines until max_tokens.
_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}


class ConstraintError(ValueError):
    """A grammar or schema that cannot constrain decoding; the message says why."""


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text valid against `schema` (None: any JSON object)."""
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema if schema is not None else _ANY_JSON_OBJECT, overrides=_JSON_OPTIONS
        )
    except ValueError as exc:
        raise ConstraintError(f"the JSON schema is not usable: {exc}") from exc


def lark_grammar(lark: str) -> str:
    """A grammar in llguidance's Lark dialect (it can embed JSON schemas with %json {...})."""
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(lark)


def json_lark(schema: dict[str, Any] | None) -> str:
    """A `%json` rule body for a Lark grammar (with the same JSON style as json_schema_grammar)."""
    body = dict(schema) if schema is not None else dict(_ANY_JSON_OBJECT)
    body.setdefault("x-guidance", _JSON_OPTIONS)
    return "%json " + json.dumps(body, ensure_ascii=False)


_ll_tokenizers: weakref.WeakKeyDictionary[Tokenizer, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_ll_lock = threading.Lock()


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of a model's tokenizer (built once per tokenizer: it takes ~0.5 s)."""
    import llguidance

    with _ll_lock:
        found = _ll_tokenizers.get(tokenizer)
        if found is None:
            found = llguidance.LLTokenizer(
                tokenizer.hf.to_str(),
                n_vocab=tokenizer.vocab_size,
                eos_token=sorted(tokenizer.eos_token_ids) or None,
            )
            _ll_tokenizers[tokenizer] = found
        return found


def check_grammar(grammar: str, tokenizer: Tokenizer) -> None:
    """Raise ConstraintError when the grammar cannot be used with this tokenizer."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer(tokenizer))
    if is_error:
        raise ConstraintError(messages[0] if messages else "the grammar is not valid")


class Constraint:
    """One request's grammar state on the last stage: the mask before a sample, the token after."""

    def __init__(self, grammar: str, tokenizer: Tokenizer, consumed: Sequence[int] = ()) -> None:
        import llguidance

        ll = ll_tokenizer(tokenizer)
        self.matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
        self.vocab_size = ll.vocab_size
        self._words = (self.vocab_size + 31) // 32
        self._bitmask = np.zeros(self._words, dtype=np.int32)
        self._check()
        for token in consumed:  # a replay: the tokens an earlier attempt already produced
            self.consume(token)

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(self.matcher.get_error())

    def allowed(self) -> np.ndarray:
        """Bool [vocab]: the tokens that keep the output inside the grammar."""
        self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        self._check()
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].view(bool)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self._check()
            raise ConstraintError(f"token {token} does not fit the grammar")


_tokenizers: dict[str, Tokenizer] = {}


def tokenizer_for(card: ModelCard) -> Tokenizer:
    """The model's tokenizer on a stage, looked up once per model."""
    from exo_core.models.tokenizer import load_tokenizer

    found = _tokenizers.get(card.id)
    if found is None:
        found = _tokenizers[card.id] = load_tokenizer(card)
    return found
