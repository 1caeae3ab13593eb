"""API keys → tenants, from a TOML file, re-read when it changes (revoking a key takes effect
within a second). Keys are stored and compared only as SHA-256 digests, so the file holds no
secret and a key never reaches a log.

    [tenants.acme]
    key_sha256 = ["<hex digest>", ...]   # `switchyard tenants add acme` prints a new key
    requests_per_minute = 600
    tokens_per_minute = 200000           # prompt + max_tokens reserved, settled to actual use
    weight = 1.0                         # share of a contended model's admission capacity
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "sy-"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tenant:
    name: str
    requests_per_minute: float
    tokens_per_minute: float
    weight: float = 1.0  # its share of a contended model's capacity, relative to the others in flight


ANONYMOUS = Tenant("anonymous", float("inf"), float("inf"))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


class TenantDirectory:
    """Resolves API keys to tenants. With no file, authentication is off (every caller is
    the anonymous tenant, unlimited) — for tests and single-user set-ups only."""

    def __init__(self, tenants: dict[str, Tenant], digests: dict[str, str], required: bool,
                 path: Path | None = None, reload_every_s: float = 1.0) -> None:
        self.tenants = tenants
        self._digests = digests  # digest → tenant name
        self.required = required
        # Hot reload: the file is re-read when it changes (checked at most every reload_every_s),
        # so adding a key or revoking one takes effect within a second, without a restart.
        self.path = path
        self.reload_every_s = reload_every_s
        self._checked_at = time.monotonic()
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if self.path is None or now - self._checked_at < self.reload_every_s:
            return
        self._checked_at = now
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            fresh = TenantDirectory.load(self.path)
        except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
            log.warning("tenants file %s changed but cannot be read (%s); keeping the previous tenants",
                        self.path, exc)
            self._stamp = stamp
            return
        self.tenants, self._digests, self._stamp = fresh.tenants, fresh._digests, stamp
        log.info("tenants reloaded from %s: %d tenants, %d keys", self.path, len(self.tenants), len(self._digests))

    @classmethod
    def disabled(cls) -> "TenantDirectory":
        return cls({}, {}, required=False)

    @classmethod
    def load(cls, path: Path) -> "TenantDirectory":
        data = tomllib.loads(Path(path).read_text())
        tenants: dict[str, Tenant] = {}
        digests: dict[str, str] = {}
        for name, entry in data.get("tenants", {}).items():
            weight = float(entry.get("weight", 1.0))
            if not 0 < weight < float("inf"):
                raise ValueError(f"tenant {name}: weight must be a positive number")
            tenants[name] = Tenant(name, float(entry.get("requests_per_minute", 600)),
                                   float(entry.get("tokens_per_minute", 1_000_000)), weight)
            keys = entry.get("key_sha256", [])
            for digest in [keys] if isinstance(keys, str) else keys:
                if len(digest) != 64:
                    raise ValueError(f"tenant {name}: key_sha256 entries must be 64 hex digits")
                digests[digest.lower()] = name
        return cls(tenants, digests, required=True, path=Path(path))

    def find(self, name: str) -> Tenant | None:
        """The tenant called `name` (another router's usage report names tenants), if known here."""
        return self.tenants.get(name)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant owning `key`; None when the key is missing or unknown."""
        if not self.required:
            return ANONYMOUS
        self._reload_if_changed()
        if not key:
            return None
        digest = hash_key(key)
        for known, name in self._digests.items():
            if hmac.compare_digest(known, digest):
                return self.tenants[name]
        return None


def write_tenant(path: Path, name: str, key: str, requests_per_minute: int = 600,
                 tokens_per_minute: int = 200_000, weight: float = 1.0) -> None:
    """Append a tenant with one key (stored hashed) to a tenants file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(f'\n[tenants.{name}]\nkey_sha256 = ["{hash_key(key)}"]\n'
                f"requests_per_minute = {requests_per_minute}\ntokens_per_minute = {tokens_per_minute}\n"
                f"weight = {weight}\n")
