"""Secrets out of everything patchdb stores, logs or prints: one rule, used by every stage.

A secret is known by its name (an API key, a credential token such as `hf_token`, a password)
or by where it sits in a text (the password of `scheme://user:password@host`, a bearer token, a
secret query parameter). Counts that merely mention tokens, like `max_new_tokens`, are kept.
"""

import re
from collections.abc import Mapping
from typing import Any

# Name parts (split at anything not a letter or digit) that mark a secret. "tokens" (a count)
# is not among them; "token" (a credential) is.
SECRET_PARTS = frozenset({
    "key", "apikey", "token", "secret", "password", "passwd", "pwd", "credential",
    "credentials", "auth", "bearer", "cookie",
})
HIDDEN = "***"
# the password runs to the last "@" before the path, query or fragment, as URL parsers read it
# (an unescaped "@" in a password is taken as part of it)
_URL_PASSWORD = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#\s:@]*):[^/?#\s]*@")
_BEARER = re.compile(r"(\bBearer\s+)[^\s\"',}]+", re.IGNORECASE)
_QUERY = re.compile(r"([?&])([^=&#\s]+)=([^&#\s\"']*)")


def is_secret_name(name: str) -> bool:
    """Whether an option or variable of this name holds a secret (api_key, hf_token, ...)."""
    return any(part in SECRET_PARTS for part in re.split(r"[^a-z0-9]+", name.lower()))


def redact_text(text: str) -> str:
    """Hide URL passwords, bearer tokens and secret query parameters inside free text."""
    text = _URL_PASSWORD.sub(rf"\1:{HIDDEN}@", text)
    text = _BEARER.sub(rf"\g<1>{HIDDEN}", text)
    return _QUERY.sub(
        lambda m: f"{m[1]}{m[2]}={HIDDEN}" if is_secret_name(m[2]) else m[0], text
    )


def redact_arguments(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments fit to record: secret-named entries dropped, secrets inside values hidden."""
    return {k: _redact_value(v) for k, v in arguments.items() if not is_secret_name(k)}


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return redact_arguments(value)
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


def scrub(text: str, *secrets: str) -> str:
    """redact_text, and also remove each known secret value (and any long part of it), e.g. an
    API key that a server echoed back in its error body."""
    text = redact_text(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
            if len(secret) > 12:
                for part in (secret[:12], secret[-8:]):
                    text = text.replace(part, "[redacted]")
    return text
