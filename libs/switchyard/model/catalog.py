"""Models known from a models folder: manifest, tokenizer, chat template (loaded lazily,
once). The router tokenizes and renders chat with these; nothing here touches ONNX."""

from __future__ import annotations

import codecs
import functools
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, decoders

from .config import MANIFEST_FILE, ModelManifest

log = logging.getLogger(__name__)
CHAT_ROLES = ("system", "user", "assistant")
# A model name is a folder name of the models folder: no separators, no "..", no control
# characters or surrogates (names come from clients).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class ModelEntry:
    manifest: ModelManifest
    tokenizer: Tokenizer
    template: jinja2.Template | None
    _literal: Tokenizer | None = field(default=None, repr=False)
    _specials: dict[str, int] | None = field(default=None, repr=False)
    _max_token_bytes: int | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    def encode(self, text: str) -> list[int]:
        """Trusted text (a rendered template): control tokens in it are control tokens.
        Never for what a client sent; that is encode_text or encode_chat."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def _literal_tokenizer(self) -> tuple[Tokenizer, dict[str, int]]:
        if self._literal is None or self._specials is None:
            literal = Tokenizer.from_str(self.tokenizer.to_str())
            literal.encode_special_tokens = True  # special tokens' text is split like any text
            self._specials = {t.content: i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
            self._literal = literal
        return self._literal, self._specials

    @property
    def max_token_bytes(self) -> int:
        """Characters in the vocabulary's longest token (byte-level BPE: one per byte). A text of
        N characters has at least N bytes, so it makes at least N / max_token_bytes tokens: a text
        longer than context × this cannot fit, and is refused without tokenizing it."""
        if self._max_token_bytes is None:
            self._max_token_bytes = max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        return self._max_token_bytes

    def encode_text(self, text: str) -> list[int]:
        """A client's text: "<|im_start|>" in it is plain text (several tokens), never the
        control token, so a user cannot forge turns or end-of-text (as chat servers do)."""
        return self._literal_tokenizer()[0].encode(text, add_special_tokens=False).ids

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """The chat template's prompt, where only the template adds control tokens: it is
        rendered with a marker per content, split at the template's own special tokens (where
        the tokenizer splits them anyway), and each piece between them is encoded with the
        contents put back and special tokens as plain text. For contents without special-token
        text this is exactly encode(render_chat(messages))."""
        literal, specials = self._literal_tokenizer()
        markers = [f"\ue000{i}\ue001" for i in range(len(messages))]
        rendered = self.render_chat([(role, markers[i]) for i, (role, _) in enumerate(messages)])
        contents = {m: c for m, (_, c) in zip(markers, messages)}
        marker_re = re.compile("|".join(re.escape(m) for m in markers)) if markers else None
        names = sorted(specials, key=len, reverse=True)
        pieces = re.split("(" + "|".join(re.escape(n) for n in names) + ")", rendered) if names else [rendered]
        ids: list[int] = []
        for piece in pieces:
            if piece in specials:
                ids.append(specials[piece])
            elif piece:
                text = marker_re.sub(lambda m: contents[m.group()], piece) if marker_re else piece
                ids += literal.encode(text, add_special_tokens=False).ids
        return ids

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        if self.template is None:
            raise ValueError(f"model {self.name} has no chat template; send a text prompt")
        return self.template.render(messages=[{"role": r, "content": c} for r, c in messages],
                                    add_generation_prompt=True, bos_token="", eos_token="")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @functools.cached_property
    def token_bytes(self) -> list[bytes] | None:
        """Each token id's bytes as `decode` joins them (special tokens: none), when the
        tokenizer's decoder is plain byte-level BPE — there decoding is concatenation, so a
        stream is detokenized by table lookups instead of two `decode` calls per token. None for
        any other decoder (SentencePiece-style ones strip or add spaces by position)."""
        try:  # built once, whatever happens: a table that cannot be built means decode()
            return _byte_level_table(self.tokenizer)
        except Exception:
            log.exception("model %s: no byte-level token table; streams decode through the tokenizer", self.name)
            return None


def _bytes_of_unicode() -> dict[str, int]:
    """The byte-level BPE alphabet: each byte's printable stand-in character (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _byte_level_table(tokenizer: Tokenizer) -> list[bytes] | None:
    if type(tokenizer.decoder) is not decoders.ByteLevel:  # a Sequence or anything else: decode() decides
        return None
    to_byte = _bytes_of_unicode()
    to_latin1 = str.maketrans({c: chr(b) for c, b in to_byte.items()})
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values(), default=-1) + 1)  # ids may have gaps: an unused id decodes to nothing
    for piece, i in vocab.items():
        # As the ByteLevel decoder does: a token all of whose characters are in the alphabet is
        # those bytes; any other (an added token's literal text) is its own UTF-8, whole.
        table[i] = piece.translate(to_latin1).encode("latin-1") if all(c in to_byte for c in piece) else piece.encode()
    for i, added in tokenizer.get_added_tokens_decoder().items():
        if added.special:
            table[i] = b""
    return table


class ModelCatalog:
    """Model folders under `models_dir`, by name."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = Path(models_dir)
        self._entries: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        self._env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def names(self) -> list[str]:
        if not self.models_dir.exists():
            return []
        return sorted(p.parent.name for p in self.models_dir.glob(f"*/{MANIFEST_FILE}"))

    def get(self, name: str) -> ModelEntry | None:
        if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
            return None
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None:
                return entry
            folder = self.models_dir / name
            if not (folder / MANIFEST_FILE).exists():
                return None
            manifest = ModelManifest.load(folder)
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            template = self._env.from_string(manifest.chat_template) if manifest.chat_template else None
            entry = self._entries[name] = ModelEntry(manifest, tokenizer, template)
            return entry


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are always valid UTF-8.

    Byte-level BPE: the tokens' bytes go through an incremental UTF-8 decoder, which holds a
    character's bytes until the token that completes it arrives. Other tokenizers: decodes a
    short window of ids around the new ones and holds text back while it ends in a replacement
    character (bytes of a character split across tokens)."""

    def __init__(self, entry: ModelEntry) -> None:
        self._entry = entry
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._table = entry.token_bytes  # None: the window path
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        table = self._table
        if table is not None:
            try:
                data = b"".join([table[i] for i in new_ids])
            except IndexError:  # an id beyond the vocabulary decodes to nothing, as in decode()
                data = b"".join([table[i] if 0 <= i < len(table) else b"" for i in new_ids])
            return self._utf8.decode(data)
        before = self._entry.decode(self.ids[self._prefix:self._read])
        after = self._entry.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held at the end (invalid trailing bytes come out as U+FFFD)."""
        if self._table is not None:
            return self._utf8.decode(b"", final=True)
        before = self._entry.decode(self.ids[self._prefix:self._read])
        after = self._entry.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]
