"""Multi-node training through torchrun's rendezvous: 2 "nodes" x 1 rank on this machine.

Each node is a real `python -m torch.distributed.run --nnodes 2 ... -m model.train` started by
model.launch.launch_training, the two running at once and meeting at one rendezvous endpoint on
loopback. Like tests/test_ddp.py, the 2-rank run must end exactly where 1 rank of twice the
batch ends.
"""

from __future__ import annotations

import sys
import threading
import uuid
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint
from model.launch import ONE_NODE, Listeners, Rendezvous, train_command
from storage.errors import GptpipeError
from tests.conftest import free_port, launch_on
from tests.test_ddp import BASE  # the same tiny config

# one thread per rank: two "nodes" share this machine's cores
ENV = {"OMP_NUM_THREADS": "1"}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def launch(
    data: dict[str, str],
    out: Path,
    batch_size: int,
    lines: list[str],
    rendezvous: Rendezvous = ONE_NODE,
):
    config = {**BASE, "batch_size": batch_size}
    return launch_on(
        data,
        out,
        config,
        listeners=Listeners(on_line=lines.append),
        extra_env=ENV,
        rendezvous=rendezvous,
    )


def run_two_nodes(data: dict[str, str], outs: tuple[Path, Path], backend: str) -> list[dict]:
    """Both nodes at once, as two hosts would start them; returns each node's result."""
    endpoint, job = f"127.0.0.1:{free_port()}", f"test-{uuid.uuid4().hex[:8]}"
    results: list[dict] = [{}, {}]

    def node(rank: int) -> None:
        lines: list[str] = []
        try:
            rendezvous = Rendezvous(
                nnodes=2, node_rank=rank, endpoint=endpoint, id=job, backend=backend
            )
            summary = launch(data, outs[rank], 4, lines, rendezvous)
            results[rank] = {"summary": summary, "lines": lines}
        except BaseException as exc:  # reported by the main thread
            results[rank] = {"error": exc, "lines": lines}

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    for rank, result in enumerate(results):
        assert "error" not in result, f"node {rank}: {result.get('error')}\n" + "\n".join(
            result.get("lines", [])[-40:]
        )
    return results


@pytest.fixture(scope="module")
def one_rank_double_batch(char_dataset, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("one-rank")
    summary = launch(char_dataset, out, 8, [])
    assert summary["world_size"] == 1
    return load_checkpoint(str(out / "ckpt.pt"))["model"]


# ----------------------------------------------------------------------------- the command


def test_single_node_commands_are_unchanged():
    assert train_command(1) == [sys.executable, "-m", "model.train"]
    assert train_command(2) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "model.train",
    ]


def test_multinode_command_uses_the_rendezvous():
    c10d = train_command(4, Rendezvous(nnodes=2, node_rank=1, endpoint="node0:29400", id="job7"))
    assert c10d == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29400",
        "--rdzv_id=job7",
        "--nproc_per_node=4",
        "-m",
        "model.train",
    ]
    assert "--standalone" not in c10d and not any(a.startswith("--node_rank") for a in c10d)
    # one rank per node is still torchrun: the nodes have to meet
    static = train_command(
        1, Rendezvous(nnodes=3, node_rank=2, endpoint="10.0.0.8:6000", backend="static")
    )
    assert static[3:] == [
        "--nnodes=3",
        "--rdzv_backend=static",
        "--rdzv_endpoint=10.0.0.8:6000",
        "--node_rank=2",
        "--nproc_per_node=1",
        "-m",
        "model.train",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"endpoint": None}, "needs rdzv_endpoint HOST:PORT"),
        ({"endpoint": "node0"}, "needs rdzv_endpoint HOST:PORT"),
        ({"endpoint": "node0:x"}, "needs rdzv_endpoint HOST:PORT"),
        ({"endpoint": "node0:1", "node_rank": 2}, "node_rank must be in 0..1"),
        ({"endpoint": "node0:1", "backend": "etcd"}, "rdzv_backend must be one of"),
    ],
)
def test_multinode_arguments_are_checked(kwargs, message):
    with pytest.raises(GptpipeError, match=message):
        train_command(1, Rendezvous(nnodes=2, **kwargs))


# ----------------------------------------------------------------------------- real runs


@pytest.mark.slow
def test_two_nodes_c10d_equal_one_rank_with_double_batch(
    char_dataset, tmp_path, one_rank_double_batch
):
    """c10d: global ranks are assigned at the rendezvous; both nodes write to one shared store."""
    shared = tmp_path / "shared-store"
    results = run_two_nodes(char_dataset, (shared, shared), "c10d")
    for result in results:
        assert result["summary"]["world_size"] == 2
    assert any("training on 2 rank(s)" in line for r in results for line in r["lines"])
    weights = load_checkpoint(str(shared / "ckpt.pt"))["model"]
    assert max_abs_diff(weights, one_rank_double_batch) < 1e-5


@pytest.mark.slow
def test_two_nodes_static_node_zero_holds_rank_zero(char_dataset, tmp_path, one_rank_double_batch):
    """static: node_rank 0 is global rank 0, so its own --out gets the checkpoint and summary."""
    outs = (tmp_path / "node0", tmp_path / "node1")
    first, second = run_two_nodes(char_dataset, outs, "static")
    assert first["summary"]["world_size"] == 2
    assert any("training on 2 rank(s)" in line for line in first["lines"])
    assert second["summary"] == {"node_rank": 1} and not (outs[1] / "ckpt.pt").exists()
    weights = load_checkpoint(str(outs[0] / "ckpt.pt"))["model"]
    assert max_abs_diff(weights, one_rank_double_batch) < 1e-5
