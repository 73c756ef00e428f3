"""Credentials out of URIs: a source URL may carry user:password@, runs and messages must not."""

from __future__ import annotations

import re

_SCHEME = r"([A-Za-z][A-Za-z0-9+.-]*://)"
# scheme:// then the authority's userinfo, up to its last "@" (the authority ends at / ? #)
_USERINFO = re.compile("^" + _SCHEME + r"[^/?#]*@")
# the same anywhere in free text, where a URL also ends at whitespace and "@" ends its userinfo
_USERINFO_IN_TEXT = re.compile(_SCHEME + r"[^/\s?#@]*@")


def redact(uri: str) -> str:
    """A URI without user:password@ (a source URL may carry credentials; runs must not).

    Plain text work, not urlsplit: it never raises (a malformed port or IPv6 host still has its
    credentials removed) and leaves the rest of the URI as it was.
    """
    return _USERINFO.sub(r"\1", uri, count=1)


def redact_text(text: str) -> str:
    """Free text (an error, a message) with user:password@ taken out of every URL in it."""
    return _USERINFO_IN_TEXT.sub(r"\1", text)
