"""Tokenizers and chat templates from a model's own files, shared by every engine."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import jinja2.meta
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

if TYPE_CHECKING:
    from exo_core.models.cards import ModelCard

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3


class TokenizerError(RuntimeError):
    """The model's tokenizer could not be built; the message says from what and why."""


@dataclass
class ChatTemplate:
    """A model's jinja chat template, rendered as Hugging Face does."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    @functools.cached_property
    def _template(self) -> jinja2.Template:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = _raise_template_error
        return env.from_string(self.source)

    @functools.cached_property
    def supports_tools(self) -> bool:
        """Whether the template reads a `tools` variable (renders tool definitions)."""
        env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
        try:
            return "tools" in jinja2.meta.find_undeclared_variables(env.parse(self.source))
        except jinja2.TemplateSyntaxError:
            return False

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        extra = {"tools": list(tools)} if tools else {}
        return self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )


def _raise_template_error(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


# ChatML, for models whose files carry no template.
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Tokenizer:
    """Encode, decode, and render chat prompts for one model."""

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        chat_template: ChatTemplate,
        eos_token_ids: Iterable[int],
        bos_token_id: int | None = None,
        add_bos: bool = False,
        source: str = "",
    ) -> None:
        self.hf = hf
        self.chat_template = chat_template
        self.eos_token_ids = frozenset(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.source = source

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids for text; special tokens written in the text are recognised."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        bos = self.add_bos if add_bos is None else add_bos
        if bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        """The prompt text for a conversation (and the tools it may call), from the model's own template."""
        return self.chat_template.render(messages, add_generation_prompt, tools)

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        prompt = self.render_chat(messages, tools=tools)
        # The template writes any BOS itself; do not add a second one.
        return self.encode(prompt, add_bos=False if self._template_writes_bos(prompt) else None)

    def _template_writes_bos(self, prompt: str) -> bool:
        bos = self.chat_template.bos_token
        return bool(bos) and prompt.startswith(bos)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text one token at a time, never splitting a multi-byte character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0  # characters of decode(self._ids) already returned

    def push(self, token: int) -> str:
        """The new complete text after this token ('' while a character is incomplete)."""
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""  # an unfinished UTF-8 sequence: wait for the next token
        new = text[self._emitted :]
        self._emitted = len(text)
        # Keep the window short: once text is out, earlier ids never change it.
        if len(self._ids) > 8:
            # Never start the window inside a character: byte-fallback tokens (<0xNN>) are
            # decoded as one run, so a run missing its lead byte would spoil the next character.
            keep = 4
            while keep < len(self._ids) and self._tokenizer.decode(self._ids[-keep:]).startswith("\ufffd"):
                keep += 1
            self._ids = self._ids[-keep:]
            self._emitted = len(self._tokenizer.decode(self._ids))
        return new

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids)
        new = text[self._emitted :]
        self._emitted = len(text)
        return new


def from_gguf_metadata(meta: dict[str, Any], source: str = "") -> Tokenizer:
    """A byte-level BPE tokenizer from GGUF tokenizer.ggml.* metadata (llama.cpp's 'gpt2' model)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(
            f"{source}: tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    hf.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    hf.decoder = decoders.ByteLevel()
    special = [tok for tok, t in zip(tokens, types, strict=False) if t == _TOKEN_TYPE_CONTROL]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = {int(eos)} if eos is not None else set()
    eot = meta.get("tokenizer.ggml.eot_token_id")
    if eot is not None:
        eos_ids.add(int(eot))
    template = meta.get("tokenizer.chat_template") or _CHATML
    return Tokenizer(
        hf,
        chat_template=ChatTemplate(
            template,
            bos_token=tokens[bos] if bos is not None else "",
            eos_token=tokens[eos] if eos is not None else "",
        ),
        eos_token_ids=eos_ids,
        bos_token_id=int(bos) if bos is not None else None,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        source=source,
    )


# llama.cpp's pre-tokenizer regexes, by tokenizer.ggml.pre.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        split = pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if pre == "qwen2":
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    # smollm / starcoder / gpt2 style: digits split one by one, then GPT-2's byte-level regex.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])


def from_hf_directory(path: Path) -> Tokenizer:
    """From tokenizer.json + tokenizer_config.json in a local directory."""
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json")
    hf = HFTokenizer.from_file(str(tok_file))
    config: dict[str, Any] = {}
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja_file = path / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")

    def token_text(value: Any) -> str:
        return value.get("content", "") if isinstance(value, dict) else (value or "")

    bos_text, eos_text = token_text(config.get("bos_token")), token_text(config.get("eos_token"))
    eos_ids = {i for i in (hf.token_to_id(eos_text),) if i is not None}
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id")
        eos_ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    bos_id = hf.token_to_id(bos_text) if bos_text else None
    return Tokenizer(
        hf,
        chat_template=ChatTemplate(template or _CHATML, bos_token=bos_text, eos_token=eos_text),
        eos_token_ids=eos_ids,
        bos_token_id=bos_id,
        add_bos=bool(config.get("add_bos_token", False)),
        source=str(path),
    )


def _read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file, vocabulary included (tensor data is not read)."""
    from exo_core.models.checkpoint import CheckpointError, read_gguf

    try:
        return read_gguf(path).metadata
    except CheckpointError as exc:
        raise TokenizerError(f"no tokenizer: {exc}") from exc
    except OSError as exc:
        raise TokenizerError(f"{path}: not a readable GGUF file ({exc})") from exc


@functools.lru_cache(maxsize=8)
def from_gguf_file(path: Path) -> Tokenizer:
    return from_gguf_metadata(_read_gguf_metadata(path), source=str(path))


def load_tokenizer(card: ModelCard) -> Tokenizer:
    """The tokenizer for a model card, from the files on this node; when none are here, the
    model's metadata alone (a GGUF's header, a repo's tokenizer files) is fetched first, from a
    peer or the hub (`files.fetch_metadata`), never its weights.

    Order: the card's `tokenizer` (a local directory or a Hugging Face repo in the cache),
    then its GGUF file's metadata, then its safetensors snapshot. (A plugin may name a
    tokenizer repo on a shared card; when that repo is absent the card's own files still serve.)
    """
    try:
        return _load_local(card)
    except TokenizerError:
        from exo_core.models import files

        try:
            fetched = files.fetch_metadata(card)
        except files.ModelFilesError as exc:
            raise TokenizerError(f"model {card.id!r}: no tokenizer on this node, and {exc}") from exc
        if fetched is None:
            raise
        return _load_local(card)


def _load_local(card: ModelCard) -> Tokenizer:
    """The tokenizer from local files only."""
    from exo_core.models import files

    if card.tokenizer:
        path = (
            Path(card.tokenizer)
            if Path(card.tokenizer).is_absolute()
            else files.local_snapshot_any(card.tokenizer)
        )
        if path is not None:
            return _from_directory_cached(path)
    gguf_file = files.local_gguf_header(card)
    if gguf_file is not None:
        return from_gguf_file(gguf_file)
    for kind in ("safetensors", "mlx"):
        if kind in card.sources:
            snap = files.local_snapshot(card.sources[kind])
            if snap is not None and (snap / "tokenizer.json").is_file():
                return _from_directory_cached(snap)
    if card.tokenizer:
        raise TokenizerError(
            f"model {card.id!r}: tokenizer {card.tokenizer!r} is not on this node; download it "
            f"with `huggingface-cli download {card.tokenizer} tokenizer.json tokenizer_config.json`"
        )
    raise TokenizerError(
        f"model {card.id!r}: no tokenizer on this node (its files are not downloaded: "
        f"sources {dict(card.sources)})"
    )


@functools.lru_cache(maxsize=8)
def _from_directory_cached(path: Path) -> Tokenizer:
    return from_hf_directory(path)
