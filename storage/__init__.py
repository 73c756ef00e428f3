"""A tiny storage interface over `str` URIs: a local folder now, S3-compatible buckets next.

URIs stay strings on purpose (a `Path` would collapse the `//` of `s3://`). Every write is
all-or-nothing: a reader never sees a half-written object under its final name.
"""

from storage.uri import (
    exists,
    get_bytes,
    get_file,
    join,
    list_uris,
    local_path,
    put_bytes,
    put_file,
    sha256,
    size,
)

__all__ = [
    "exists",
    "get_bytes",
    "get_file",
    "join",
    "list_uris",
    "local_path",
    "put_bytes",
    "put_file",
    "sha256",
    "size",
]
