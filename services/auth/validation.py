"""Input checks for what people type: usernames, emails, passwords, names.

Every check raises `InvalidParams` naming the field, never echoing a password.
Lengths are capped before anything else looks at a value, so a megabyte of
text costs one `len()`.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache
from pathlib import Path

from shared.errors import InvalidParams

__all__ = [
    "MIN_PASSWORD",
    "MAX_PASSWORD",
    "check_username",
    "check_email",
    "check_password",
    "check_name",
    "check_login_identifier",
    "common_passwords",
    "fold",
]

MIN_PASSWORD = 8
MAX_PASSWORD = 1024
MAX_EMAIL = 254
MAX_NAME = 100
# ASCII only: look-alike letters from other scripts would let "аdmin" pass for "admin".
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{2,31}")
# The shape, not RFC 5322: one @, no spaces, a dot in the domain. Unicode is allowed.
_EMAIL = re.compile(r"[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f.]+(?:\.[^@\s\x00-\x1f\x7f.]+)+")
_COMMON_FILE = Path(__file__).with_name("common_passwords.txt")


def fold(name: str) -> str:
    """The form in which two usernames or emails are the same account.

    NFKC (compatibility forms: the Kelvin sign U+212A is K, the ligature U+FB01
    is "fi", fullwidth letters are ASCII), then casefold, then NFKC again -- close
    to Unicode's NFKC_Casefold -- with invisible format characters (zero-width
    space and joiners, soft hyphen, variation selectors) dropped. Computed
    here, in Python, and stored: never left to PostgreSQL's `lower()`, whose
    answer depends on the database's locale (in "C" it leaves U+212A alone, in
    C.UTF-8 it turns U+0130 into "i" where Python keeps the dot above).
    Letters of other scripts that merely look alike (Cyrillic "а") stay distinct.
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())
    return "".join(c for c in text if not _invisible(c))


def _invisible(char: str) -> bool:
    if unicodedata.category(char) == "Cf":
        return True
    return "\ufe00" <= char <= "\ufe0f" or "\U000e0100" <= char <= "\U000e01ef"  # variation selectors


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The shipped list of the most common passwords, lowercased."""
    lines = _COMMON_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip().lower() for line in lines if line.strip() and not line.startswith("#"))


def check_username(username: str) -> str:
    """3-32 characters: ASCII letters, digits, `_`, `.`, `-`, starting with a letter or digit."""
    if len(username) > 64 or _USERNAME.fullmatch(username) is None:
        raise InvalidParams(
            "username must be 3-32 characters: letters, digits, '_', '.', '-', "
            "starting with a letter or digit", {"param": "username"},
        )
    return username


def check_email(email: str) -> str:
    """An address of the usual shape, at most 254 characters, stored as typed (trimmed)."""
    email = email.strip()
    if len(email) > MAX_EMAIL or _EMAIL.fullmatch(email) is None:
        raise InvalidParams("email is not a valid address", {"param": "email"})
    return email


def check_password(password: str, *, username: str = "", email: str = "") -> str:
    """8-1024 characters, not a common password, not the username or email."""
    if len(password) > MAX_PASSWORD * 4:  # before normalizing a huge string
        raise InvalidParams(f"password must be at most {MAX_PASSWORD} characters", {"param": "password"})
    normalized = unicodedata.normalize("NFC", password)
    if len(normalized) < MIN_PASSWORD:
        raise InvalidParams(f"password must be at least {MIN_PASSWORD} characters", {"param": "password"})
    if len(normalized) > MAX_PASSWORD:
        raise InvalidParams(f"password must be at most {MAX_PASSWORD} characters", {"param": "password"})
    lowered = normalized.lower()
    if lowered in common_passwords():
        raise InvalidParams("password is too common; choose another", {"param": "password"})
    if lowered in (username.lower(), email.lower(), email.lower().partition("@")[0]):
        raise InvalidParams("password must differ from the username and email", {"param": "password"})
    return password


def check_login_identifier(identifier: str) -> str:
    """A username or email to log in with: only its length is checked here."""
    identifier = identifier.strip()
    if not identifier or len(identifier) > MAX_EMAIL:
        raise InvalidParams("username_or_email must be 1-254 characters", {"param": "username_or_email"})
    return identifier


def check_name(name: str, param: str = "name") -> str:
    """A label (a key's name): 1-100 printable characters, trimmed."""
    name = name.strip()
    if not name or len(name) > MAX_NAME or any(unicodedata.category(c)[0] == "C" for c in name):
        raise InvalidParams(f"{param} must be 1-{MAX_NAME} printable characters", {"param": param})
    return name
