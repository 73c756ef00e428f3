"""The tokenize stage alone, as a flow: `gptpipe tokenize`, and the bench of 1 vs 2 Dask workers.

A corpus too big for one machine is tokenized once on a cluster (``--task-runner dask``); the
pipeline's runs then find the dataset in the store under the same content key and re-use it.

(Not named flows/tokenize.py: Prefect puts a deployment entrypoint's folder on sys.path, where a
tokenize.py would shadow the standard library's module of that name.)
"""

from __future__ import annotations

from prefect import flow

import storage
from flows.defaults import DEFAULT_STORE
from model.corpus import DEFAULT_SHARD_BYTES
from tasks.results import TokenizeResult, Workspace
from tasks.tokenize import BPE_SAMPLE_BYTES, SourceURL, tokenize


@flow(name="gptpipe-tokenize")
def tokenize_corpus(
    source: str | SourceURL,
    *,
    store: str = DEFAULT_STORE,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    refresh: bool = False,
    bpe_sample_bytes: int = BPE_SAMPLE_BYTES,
) -> TokenizeResult:
    """Tokenize ``source`` into a sharded dataset in ``store``: the dataset and its tokenizer.

    A ``source`` URL with credentials comes as a SourceURL, which Prefect stores without them.
    """
    storage.preflight(store)
    workspace = Workspace(store=store, refresh=frozenset({"tokenize"} if refresh else ()))
    return tokenize(
        source,
        workspace,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        shard_bytes=shard_bytes,
        bpe_sample_bytes=bpe_sample_bytes,
    )
