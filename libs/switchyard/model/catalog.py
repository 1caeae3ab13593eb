"""Models known from a models folder: manifest, tokenizer, chat template (loaded lazily,
once). The router tokenizes and renders chat with these; nothing here touches ONNX."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .config import MANIFEST_FILE, ModelManifest

CHAT_ROLES = ("system", "user", "assistant")
# A model name is a folder name of the models folder: no separators, no "..", no control
# characters or surrogates (names come from clients).
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass
class ModelEntry:
    manifest: ModelManifest
    tokenizer: Tokenizer
    template: jinja2.Template | None

    @property
    def name(self) -> str:
        return self.manifest.name

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        if self.template is None:
            raise ValueError(f"model {self.name} has no chat template; send a text prompt")
        return self.template.render(messages=[{"role": r, "content": c} for r, c in messages],
                                    add_generation_prompt=True, bos_token="", eos_token="")

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


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

    Decodes a short window of ids around the new ones and holds text back while it ends in a
    replacement character (bytes of a character split across tokens)."""

    def __init__(self, entry: ModelEntry) -> None:
        self._entry = entry
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, new_ids: Sequence[int]) -> str:
        self.ids.extend(new_ids)
        before = self._entry.decode(self.ids[self._prefix:self._read])
        after = self._entry.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is held at the end (invalid trailing bytes come out as U+FFFD)."""
        before = self._entry.decode(self.ids[self._prefix:self._read])
        after = self._entry.decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]
