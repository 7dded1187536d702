"""The one rule for secrets: which keys hold one, and how a value or a text is shown without it.

`password` and `dsn` are secret keys: a plan, a results file, a log line or an error message
never shows their values. A `dsn` is shown with its passwords masked (its host and database
help a reader); a password is shown as `***`. Anywhere else, a URI's user-info password
(`postgresql://user:pw@host`) and a `password=...` pair are masked too.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

MASK = "***"
SECRET_KEYS = frozenset({"password", "dsn"})
# Very short values would blank out ordinary words; the patterns below still catch them.
MIN_SECRET_LENGTH = 4

_PASSWORD_PAIR = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URI_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.IGNORECASE)


def is_secret_key(key: str | int) -> bool:
    """Return whether the (dotted) key names a secret: its last part is `password` or `dsn`."""
    last = str(key).rsplit(".", 1)[-1].strip().lower()
    return last in SECRET_KEYS or last.endswith("password")


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Return `text` with the given secret values, `password=...` pairs and URI passwords masked."""
    text = str(text)
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len)[::-1]:
        text = text.replace(secret, MASK)
    text = _PASSWORD_PAIR.sub(rf"\1{MASK}", text)
    return _URI_USERINFO.sub(rf"\1{MASK}@", text)


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Return `text` on one line with secrets masked (given values, `password=`, URI user-info)."""
    return mask_text(" ".join(str(text).split()), secrets)


def mask_value(key: str | int, value: Any) -> Any:
    """Return `value` as it may be shown under `key`: secrets masked, mappings walked."""
    if value is None:
        return None
    if is_secret_key(key):
        if str(key).rsplit(".", 1)[-1].lower() == "dsn":
            return mask_text(str(value))
        return MASK
    return mask_secrets(value)


def mask_secrets(value: Any) -> Any:
    """Return a copy of `value` (mappings, lists, text) with every secret masked."""
    if isinstance(value, dict):
        return {key: mask_value(key, item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets(item) for item in value]
    if isinstance(value, str):
        return mask_text(value)
    return value


def mask_override(item: str) -> str:
    """Return a `key.path=value` override as it may be shown: a secret key's value masked."""
    key, sep, value = item.partition("=")
    if sep and is_secret_key(key):
        return f"{key}={MASK}"
    return mask_text(item)


def safe_cause(exc: BaseException) -> BaseException | None:
    """Return `exc` to chain a user error to, or None when its text may quote a secret's value.

    `--debug` prints the chain; pydantic's and OmegaConf's texts quote the input they reject.
    """
    key = getattr(exc, "full_key", None)
    if key is not None and is_secret_key(str(key)):
        return None
    errors = getattr(exc, "errors", None)
    if callable(errors):
        for error in errors():
            if any(is_secret_key(part) for part in error.get("loc", ()) if isinstance(part, str)):
                return None
            if mask_secrets(error.get("input")) != error.get("input"):
                return None
    return exc


class SecretFilter(logging.Filter):
    """A logging filter that masks `password=...` pairs and URI passwords in every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_text(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True
