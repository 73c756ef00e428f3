"""A tiny storage interface over `str` URIs: a local folder or an S3-compatible bucket.

URIs stay strings on purpose (a `Path` would collapse the `//` of `s3://`). Every write is
all-or-nothing: a reader never sees a half-written object under its final name, and a write that
fails (a full disk included) is a one-line GptpipeError that leaves the old object as it was.

Objects: put_bytes, put_file, create_new (only if absent), delete, get_bytes, get_file,
exists, list_uris, sha256, size. storage.lease builds leases on create_new. Files for
Parquet and checkpoints: open_read (random access) and ``with open_write(uri) as f``; and
arrow_filesystem for pyarrow.dataset. preflight(uri) checks a store is usable before a run.
S3 settings (endpoint, credentials, region) come from the standard AWS_* places: see storage.s3.
"""

from storage.uri import (
    arrow_filesystem,
    content_id,
    create_new,
    delete,
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
    "content_id",
    "create_new",
    "delete",
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
