"""Checkpoints: round trip, corrupt files, and pickled objects that would run code on load."""

import pytest
import torch

import storage
from model import checkpoint
from model.checkpoint import FORMAT_VERSION, CheckpointWriter, load_checkpoint
from model.config import GPTConfig
from model.gpt import GPT
from storage.errors import GptpipeError, first_line


def payload() -> dict:
    torch.manual_seed(0)
    return {
        "model": {
            "w": torch.randn(4, 3),
            "b": torch.zeros(3, dtype=torch.bfloat16),
            "ids": torch.arange(5),
        },
        "config": {"block_size": 8, "learning_rate": 1e-3, "tokenizer": "char"},
        "step": 123,
        "losses": [2.5, 2.25],
        "tokenizer": '{"kind": "char"}',
    }


def save_checkpoint(uri: str, payload: dict) -> None:
    """Save as training does: rank 0's writer, waiting for the (local: no) upload."""
    writer = CheckpointWriter(uri)
    writer.save(payload)
    writer.finish()


@pytest.fixture
def saved(tmp_path) -> tuple[str, bytes]:
    uri = str(tmp_path / "run" / "ckpt.pt")
    save_checkpoint(uri, payload())
    return uri, storage.get_bytes(uri)


def load_error(uri: str) -> str:
    with pytest.raises(GptpipeError) as info:
        load_checkpoint(uri)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- round trip


def test_round_trip(saved):
    uri, _ = saved
    ckpt = load_checkpoint(uri)
    original = payload()
    assert ckpt["format_version"] == FORMAT_VERSION
    assert set(ckpt) == {"format_version", *original}
    for key, tensor in original["model"].items():
        assert ckpt["model"][key].dtype == tensor.dtype
        assert torch.equal(ckpt["model"][key], tensor)
    for key in ("config", "step", "losses", "tokenizer"):
        assert ckpt[key] == original[key]


def test_save_leaves_only_the_checkpoint(saved, tmp_path):
    uri, _ = saved
    assert storage.list_uris(str(tmp_path / "run")) == [uri]


def test_a_model_survives_the_round_trip(tmp_path):
    torch.manual_seed(1)
    config = GPTConfig(vocab_size=65, block_size=8, n_embd=32, n_head=4, n_layer=2, dropout=0.0)
    model = GPT(config).eval()
    uri = str(tmp_path / "ckpt.pt")
    save_checkpoint(uri, {"model": model.state_dict(), "config": {}, "model_config": {}})
    restored = GPT(config).eval()
    restored.load_state_dict(load_checkpoint(uri)["model"])
    idx = torch.randint(65, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], restored(idx)[0])


def test_a_folder_that_cannot_be_made_is_a_one_line_error():
    """/proc takes no new folders, not even from root: no OSError escapes, one line says why."""
    with pytest.raises(GptpipeError) as info:
        save_checkpoint("/proc/gptpipe-out/ckpt.pt", payload())
    assert str(info.value) == (
        "could not write the checkpoint /proc/gptpipe-out/ckpt.pt: No such file or directory "
        "(0.0 MB free on that disk)"
    )


# ----------------------------------------------------------------------------- format_version


@pytest.fixture
def newer(tmp_path, monkeypatch) -> str:
    """A real checkpoint, written by a gptpipe whose FORMAT_VERSION is one higher."""
    uri = str(tmp_path / "ckpt.pt")
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "FORMAT_VERSION", FORMAT_VERSION + 1)
        save_checkpoint(uri, payload())
    return uri


def test_a_checkpoint_of_a_newer_format_is_a_one_line_error(newer):
    assert load_error(newer) == (
        f"checkpoint {newer} has format_version {FORMAT_VERSION + 1}; this gptpipe reads up to "
        f"{FORMAT_VERSION}: upgrade gptpipe"
    )


def test_a_checkpoint_of_an_older_or_the_current_format_loads(saved, tmp_path):
    uri, _ = saved
    assert load_checkpoint(uri)["format_version"] == FORMAT_VERSION
    old = tmp_path / "old.pt"
    torch.save({"format_version": FORMAT_VERSION - 1, **payload()}, old)
    assert load_checkpoint(str(old))["step"] == 123


def test_the_cli_reports_a_newer_format_in_one_line(newer, capsys):
    from flows.cli import main

    assert main(["sample", "--checkpoint", newer, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: checkpoint {newer} has format_version {FORMAT_VERSION + 1}; this gptpipe reads "
        f"up to {FORMAT_VERSION}: upgrade gptpipe"
    ]


def test_first_line_of_an_error():
    assert first_line(RuntimeError("\n  first line  \nsecond")) == "first line"
    assert first_line(ValueError("x" * 500), limit=300) == "x" * 300
    # an empty message: the type's name (str(exc).splitlines()[0] raised IndexError here)
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(OSError("")) == "OSError"
    assert first_line(KeyError()) == "KeyError"


def test_missing_checkpoint_is_a_gptpipe_error(tmp_path):
    assert "not found" in load_error(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize(
    "content", [{"model": {}}, {"config": {}}, [1, 2, 3]], ids=["no-config", "no-model", "list"]
)
def test_a_torch_file_that_is_not_a_gptpipe_checkpoint(tmp_path, content):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    assert "is not a gptpipe checkpoint" in load_error(str(path))


# ----------------------------------------------------------------------------- corrupt files


@pytest.mark.parametrize("keep", ["half", "all-but-one", "30-bytes", "4-bytes", "empty"])
def test_a_truncated_checkpoint_is_corrupt_or_truncated(saved, tmp_path, keep):
    _, raw = saved
    length = {
        "half": len(raw) // 2,
        "all-but-one": len(raw) - 1,
        "30-bytes": 30,
        "4-bytes": 4,
        "empty": 0,
    }[keep]
    path = tmp_path / "truncated.pt"
    path.write_bytes(raw[:length])
    message = load_error(str(path))
    assert "corrupt or truncated" in message
    assert str(path) in message


@pytest.mark.parametrize("length", [1, 2], ids=["1-byte", "2-bytes"])
def test_a_checkpoint_truncated_to_a_byte_or_two(saved, tmp_path, length):
    _, raw = saved
    path = tmp_path / "truncated.pt"
    path.write_bytes(raw[:length])
    assert "corrupt or truncated" in load_error(str(path))


@pytest.mark.parametrize(
    "content",
    [b"hello world", b"# README\n\nnot a checkpoint\n", b'{"model": {}}'],
    ids=["hello", "markdown", "json"],
)
def test_a_file_that_is_not_a_checkpoint_is_reported_as_such(tmp_path, content):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    message = load_error(str(path))
    assert "not a readable checkpoint" in message
    assert "more than weights" not in message


# ----------------------------------------------------------------------------- code in pickles


class WritesAMarker:
    """Unpickling this calls exec(), which writes a marker file: arbitrary code on load."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.fixture
def malicious(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({**payload(), "extra": WritesAMarker(marker)}, path)
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(malicious):
    path, marker = malicious
    message = load_error(str(path))
    assert "refusing to load" in message and str(path) in message
    assert not marker.exists()
    # the control: the payload is live, a plain pickle load does run it
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_the_refusal_names_what_was_refused(malicious):
    path, _ = malicious
    message = load_error(str(path))
    assert "\x1b[" not in message
    assert "exec" in message
