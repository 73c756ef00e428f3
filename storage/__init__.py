"""A tiny storage interface over `str` URIs: a local folder or an S3-compatible bucket.

URIs stay strings on purpose (a `Path` would collapse the `//` of `s3://`). Every write is
all-or-nothing: a reader never sees a half-written object under its final name.
"""

from storage.uri import (
    arrow_filesystem,
    exists,
    get_bytes,
    get_file,
    join,
    list_uris,
    local_path,
    open_read,
    open_write,
    preflight,
    put_bytes,
    put_file,
    sha256,
    size,
)

__all__ = [
    "arrow_filesystem",
    "exists",
    "get_bytes",
    "get_file",
    "join",
    "list_uris",
    "local_path",
    "open_read",
    "open_write",
    "preflight",
    "put_bytes",
    "put_file",
    "sha256",
    "size",
]
