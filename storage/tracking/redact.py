"""Credentials out of URIs: a source URL may carry user:password@, runs and messages must not."""

from __future__ import annotations

import re

# scheme:// then the authority's userinfo, up to its last "@" (the authority ends at / ? #)
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


def redact(uri: str) -> str:
    """A URI without user:password@ (a source URL may carry credentials; runs must not).

    Plain text work, not urlsplit: it never raises (a malformed port or IPv6 host still has its
    credentials removed) and leaves the rest of the URI as it was.
    """
    return _USERINFO.sub(r"\1", uri, count=1)
