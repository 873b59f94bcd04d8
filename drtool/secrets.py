"""Keeping secrets out of logs, errors, manifests and --json.

Every string that may hold a DSN, URL or credential passes through `redact`
before it is shown or stored.
"""

from __future__ import annotations

import re

MASK = "****"

# scheme://user:password@host  ->  scheme://user:****@host
_URL_PASSWORD = re.compile(r"(?P<pre>[a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:)(?P<secret>[^@\s/]+)(?P<post>@)")
# key=value pairs of libpq DSNs and query strings: password=..., secret=...
_KV_SECRET = re.compile(
    r"(?P<pre>\b(?:password|passwd|pwd|secret|secret_access_key|aws_secret_access_key|sslpassword|"
    r"token|session_token|access_key|aws_access_key_id)\s*[=:]\s*)(?P<quote>['\"]?)(?P<secret>[^'\"\s&;,]+)",
    re.IGNORECASE,
)

_registered: set[str] = set()


def register(secret: str | None) -> None:
    """Remember a secret value so `redact` masks it wherever it appears."""
    if secret and len(secret) >= 4:
        _registered.add(secret)


def redact(text: str) -> str:
    """Mask passwords in URLs and key=value pairs, and every registered secret."""
    if not text:
        return text
    out = _URL_PASSWORD.sub(lambda m: m.group("pre") + MASK + m.group("post"), text)
    out = _KV_SECRET.sub(lambda m: m.group("pre") + m.group("quote") + MASK, out)
    for secret in _registered:
        out = out.replace(secret, MASK)
    return out
