"""The `gptpipe` command line: run the pipeline, sample from a checkpoint, inspect a config."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import textwrap
from pathlib import Path

from model.exit import skip_last_collections
from storage.errors import GptpipeError

EXAMPLES = {
    "run": """\
examples:
  gptpipe run --input ../shared/data/tinyshakespeare.txt
  gptpipe run --preset seed --set max_iters=500 --nproc 2
  gptpipe run --train-engine ray --ray-address head:6379 --nproc 8 --store s3://bucket/gptpipe
  gptpipe run --config my.yaml --set tokenizer=bpe --set vocab_size=1024 --store /data/gptpipe
  gptpipe run --notify https://hooks.example.com/T0K3N --timeout 21600 --train-timeout 18000
""",
    "sample": """\
examples:
  gptpipe sample --checkpoint gptpipe-store/models/train-KEY/ckpt.pt --prompt "ROMEO:"
  gptpipe sample --model models:/gptpipe-tinyshakespeare-char@champion
  gptpipe sample --checkpoint CKPT --temperature 0.8 --top-k 40 --max-new-tokens 1000 --seed 7
""",
    "tokenize": """\
examples:
  gptpipe tokenize --input 'corpus/*.txt' --store s3://bucket/gptpipe
  gptpipe tokenize --input s3://bucket/texts/ --task-runner dask --workers 8 --shard-size 64M
  gptpipe tokenize --input big.txt --set tokenizer=bpe --set vocab_size=4096 \\
      --dask-address HOST:8786
""",
    "sweep": """\
examples:
  gptpipe sweep --input ../shared/data/tinyshakespeare.txt --space sweep.yaml
  gptpipe sweep --input corpus.txt --space sweep.yaml --trials 20 --parallel 2 --task-runner dask
  gptpipe sweep --input s3://bucket/corpus.txt --store s3://bucket/gptpipe --space sweep.yaml \\
      --study-storage postgresql://user:password@db/optuna
""",
    "inspect": """\
examples:
  gptpipe inspect --preset lecture
  gptpipe inspect --preset seed --set n_layer=2
""",
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    from model.config import available_presets

    parser.add_argument(
        "--preset",
        help=f"named config ({', '.join(available_presets())}); "
        "default: lecture on a GPU, cpu otherwise",
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of hyperparameters")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one hyperparameter (repeatable), e.g. --set max_iters=500",
    )


def _byte_size(text: str) -> int:
    """--shard-size: '65536', '64K', '32M' or '1G' as a number of bytes."""
    from model.corpus import parse_byte_size

    try:
        return parse_byte_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    """Where the corpus comes from, where outputs go, and where the mapped tasks run."""
    from flows.defaults import DEFAULT_STORE, TINY_SHAKESPEARE_URL
    from flows.engines import TASK_RUNNERS

    parser.add_argument(
        "--input",
        default=TINY_SHAKESPEARE_URL,
        metavar="SRC",
        help="corpus: a file, a directory, a glob, an http(s) URL, an s3:// object or an "
        "s3://bucket/prefix/ of many files (taken in sorted order; default: Tiny Shakespeare's "
        "URL)",
    )
    parser.add_argument(
        "--shard-size",
        type=_byte_size,
        default=None,
        metavar="BYTES",
        help="target size of the corpus shards tokenized in parallel, e.g. 64M (default 32M)",
    )
    parser.add_argument(
        "--task-runner",
        default="default",
        choices=TASK_RUNNERS,
        help="where mapped tasks run: Prefect's thread pool (default), a Dask cluster "
        "(prefect-dask) or a Ray cluster (prefect-ray)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="worker processes of the local Dask or Ray cluster (default: one per core)",
    )
    parser.add_argument(
        "--dask-address",
        metavar="ADDR",
        help="a running Dask scheduler (implies --task-runner dask)",
    )
    parser.add_argument(
        "--ray-address", metavar="ADDR", help="a running Ray cluster (implies --task-runner ray)"
    )
    parser.add_argument(
        "--store", default=DEFAULT_STORE, help=f"where outputs go (default {DEFAULT_STORE})"
    )


def _add_tracking_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite)"
    )
    parser.add_argument(
        "--experiment", default="gptpipe", help="MLflow experiment (default gptpipe)"
    )
    parser.add_argument(
        "--model-name",
        help="registered model name (default gptpipe-<corpus file name>-<tokenizer>)",
    )


def _run_options(run: argparse.ArgumentParser) -> None:
    """`gptpipe run`'s options."""
    _add_data_args(run)
    run.add_argument(
        "--val-shards",
        type=int,
        default=0,
        metavar="N",
        help="validate on the last N whole shards instead of the last val_fraction of tokens",
    )
    _add_config_args(run)
    nproc_help = "training ranks, or auto: one per visible GPU, else 1 (default 1)"
    run.add_argument("--nproc", default="1", help=nproc_help)
    run.add_argument(
        "--train-engine",
        default="torchrun",
        choices=("torchrun", "ray"),
        help="torchrun: ranks on this machine (default); ray: Ray Train workers, one GPU (else "
        "one CPU) each, on the cluster at --ray-address or a local one (docs/scaling.md)",
    )
    _add_tracking_args(run)
    run.add_argument("--run-id", help="name of the run folder (default: time + random)")
    run.add_argument(
        "--refresh",
        action="append",
        default=[],
        metavar="STAGE",
        help="run a cached stage again: tokenize, split, train or all (repeatable)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted training (same data and config) from its last checkpoint",
    )
    _nightly_options(run)
    run.add_argument("--prompt", default="", help="prompt for the sample at the end")
    run.add_argument("--sample-tokens", type=int, default=500, help="tokens to sample (500)")
    run.add_argument(
        "--notify",
        metavar="TARGET",
        help="where to send one message when the run fails, crashes or times out, or moves the "
        "champion: an http(s) webhook URL (JSON POST), an Apprise URL or block:NAME of a Prefect "
        "notification block (default: $GPTPIPE_NOTIFY_URL)",
    )
    run.add_argument(
        "--timeout", metavar="SECONDS", help="stop the whole run after this long (default: none)"
    )
    run.add_argument(
        "--train-timeout",
        metavar="SECONDS",
        help="stop the training after this long, without retrying it (default: none)",
    )


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text}")
    return value


def _nightly_options(run: argparse.ArgumentParser) -> None:
    """What a run does on a corpus that changed: warm starts, data checks, the champion's gate
    (docs/deploy.md, "When the corpus changes"). Unset, a setting keeps the request's default."""
    from flows.request import DataSettings

    limits = DataSettings.model_fields
    run.add_argument(
        "--init-from",
        metavar="FROM",
        help="start training from these weights: champion, models:/NAME/VERSION or a ckpt.pt "
        "(default: a fresh model)",
    )
    run.add_argument(
        "--vocab",
        default=argparse.SUPPRESS,  # unset: the request's default (flows.request)
        choices=("keep", "fresh"),
        help="with --init-from: keep its character ids and append new ones (keep, default), or "
        "build a fresh vocabulary",
    )
    run.add_argument(
        "--accept-data-change",
        action="store_true",
        help="train on a corpus that changed beyond the limits below since the champion's",
    )
    run.add_argument(
        "--max-corpus-shrink",
        type=_fraction,
        default=argparse.SUPPRESS,
        metavar="FRACTION",
        help="stop before tokenizing if the corpus shrank by more than this "
        f"(default {limits['max_corpus_shrink'].default})",
    )
    run.add_argument(
        "--max-new-char-share",
        type=_fraction,
        default=argparse.SUPPRESS,
        metavar="FRACTION",
        help="stop before tokenizing if more of the corpus is characters the champion's lacked "
        f"(default {limits['max_new_char_share'].default})",
    )
    run.add_argument(
        "--min-improvement",
        type=float,
        metavar="BPB",
        help="bits per byte a new model must win by to become champion (default: from the "
        "evaluation's noise)",
    )


def _sample_options(smp: argparse.ArgumentParser) -> None:
    """`gptpipe sample`'s options."""
    which = smp.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", metavar="URI", help="a ckpt.pt in a store")
    which.add_argument(
        "--model", metavar="MODEL_URI", help="an MLflow model, e.g. models:/NAME@champion"
    )
    smp.add_argument("--tracking-uri", help="MLflow tracking URI for --model")
    smp.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    smp.add_argument("--max-new-tokens", type=int, default=500)
    smp.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    smp.add_argument("--top-k", type=int, default=None)
    smp.add_argument("--seed", type=int, default=1337, help="same seed, same text")
    smp.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def _tokenize_options(tok: argparse.ArgumentParser) -> None:
    """`gptpipe tokenize`'s options."""
    _add_data_args(tok)
    _add_config_args(tok)
    tok.add_argument("--refresh", action="store_true", help="tokenize again even if cached")


def _sweep_options(swp: argparse.ArgumentParser) -> None:
    """`gptpipe sweep`'s options."""
    _add_data_args(swp)
    _add_config_args(swp)
    swp.add_argument(
        "--space", required=True, metavar="FILE.yaml", help="the search space (docs/sweeps.md)"
    )
    swp.add_argument("--trials", type=int, help="how many trials (default: the space file's)")
    swp.add_argument(
        "--parallel", type=int, default=1, metavar="K", help="trials run at a time (default 1)"
    )
    swp.add_argument(
        "--name", help="the sweep's name; the same name resumes it (default: from its inputs)"
    )
    swp.add_argument(
        "--study-storage",
        metavar="URL",
        help="a database URL for the Optuna study (default: a journal file in the store)",
    )
    swp.add_argument("--nproc", default="1", help="training ranks of each trial (default 1)")
    _add_tracking_args(swp)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptpipe",
        description="Train, track and ship small GPT language models as a Prefect pipeline.",
        epilog="examples:\n  gptpipe run --input corpus.txt\n  gptpipe sample --checkpoint CKPT\n"
        "  gptpipe inspect --preset lecture",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    _run_options(command("run", "run the pipeline: tokenize, split, train, evaluate, sample"))
    _sample_options(command("sample", "generate text from a checkpoint"))
    _tokenize_options(
        command("tokenize", "tokenize a corpus into a sharded dataset (the first stage alone)")
    )
    _sweep_options(
        command("sweep", "search hyperparameters: trials of train + evaluate, the best registered")
    )
    insp = command("inspect", "print the parameter table of a config")
    _add_config_args(insp)
    return parser


def _quiet_user_errors() -> None:
    """Prefect logs a failed task's traceback; for bad input the one-line message is enough."""

    class DropTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            # bad input, and interrupts (Ctrl-C, SIGTERM: BaseExceptions, not Exceptions)
            if record.exc_info and (
                isinstance(record.exc_info[1], GptpipeError)
                or not isinstance(record.exc_info[1], Exception)
            ):
                record.exc_info, record.exc_text = None, None
            return True

    for name in (
        "prefect.task_runs",
        "prefect.flow_runs",
        "prefect.task_engine",
        "prefect.flow_engine",
        "prefect",
    ):
        logging.getLogger(name).addFilter(DropTraceback())


def run_request(args: argparse.Namespace, request_type=None, **given):
    """The command line as a run request (flows.request): argv -> request -> check -> flow.

    Every setting whose flag (`flows.request.FLAGS`) this command has is taken from it, by the
    flag's name; ``given`` holds sections (or values) the command sets itself. A setting the
    command has no flag for keeps the request's default."""
    from flows.request import FLAGS, RunRequest

    values: dict = {}
    for path, flag in FLAGS.items():
        dest = flag.removeprefix("--").replace("-", "_")
        if path == "search.space" or not hasattr(args, dest):
            continue  # the space is a file: the sweep command reads it
        section, _, name = path.rpartition(".")
        (values.setdefault(section, {}) if section else values)[name] = getattr(args, dest)
    refresh = values.get("data", {}).get("refresh")
    if isinstance(refresh, bool):  # `gptpipe tokenize --refresh`: its one stage
        values["data"]["refresh"] = ["tokenize"] if refresh else []
    for key, value in given.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return (request_type or RunRequest).of(**values)


def _settle_and_boot(request):
    """Prefect's temporary server launched first (when no Prefect API is set), so that it boots
    while the request's own checks (which import torch) and the checks of what the settings point
    at run; (settled settings, server). A request its own checks refuse stops it again."""
    from flows.prefect_env import start_temporary_server

    prefect_server = start_temporary_server()
    try:
        settled = request.check_settings()
        target = settled.notify
        if target is not None and target.kind == "block" and prefect_server is not None:
            raise GptpipeError(
                f"--notify {target.spec}: Prefect blocks are kept by a Prefect server; set "
                "PREFECT_API_URL to yours (this run would use a temporary server, without blocks)"
            )
    except BaseException:
        if prefect_server is not None:
            prefect_server.stop()
        raise
    return settled, prefect_server


def cmd_run(args: argparse.Namespace) -> int:
    request = run_request(args)
    settled, prefect_server = _settle_and_boot(request)
    checked = request.check(settled=settled)
    from flows.pipeline import pipeline

    run_id = checked.plan.run_id  # chosen by the check: an interrupted run's last line names it
    if prefect_server:
        prefect_server.use()
    from flows.alerts import Alerter

    _quiet_user_errors()
    # the hooks are given here, not as a parameter: Prefect stores parameters, and a webhook
    # URL may hold a token
    hooks = Alerter(checked.notify).hooks() if checked.notify is not None else {}
    flow = pipeline.with_options(timeout_seconds=checked.timeout_seconds, **hooks)
    checkpoints = CheckpointWatch()
    try:
        summary = _on_task_runner(flow, checked)(source=checked.source, plan=checked.plan)
    except TimeoutError as exc:  # the hooks have sent the alert; the user gets one line
        raise GptpipeError(_timed_out(exc, args)) from None
    except BaseException as exc:
        code = interrupt_status(exc)
        if code is None:
            raise
        # the flow has recorded the crash, the MLflow runs are KILLED, the training stopped
        print(_interrupted(code, args, run_id, checkpoints.step), file=sys.stderr, flush=True)
        return code
    finally:
        checkpoints.close()
    print_summary(summary)
    return 0


class Terminated(BaseException):
    """SIGTERM (a scheduler's, `timeout`'s), raised in the main thread as Ctrl-C raises
    KeyboardInterrupt, so that a run ends the same way: the flow and its MLflow runs record
    the stop, the command exits 143. During a flow Prefect's own handler raises its
    TerminationSignal instead, then signals again once the flow has ended: this is raised then."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM raises `Terminated` in the block (the main thread only); as before after it, so
    that a SIGTERM during the exit handlers ends the process quietly."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals are the main thread's
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_status(exc: BaseException) -> int | None:
    """The exit status of a command stopped by ``exc``: 130 for Ctrl-C (SIGINT), 143 for
    SIGTERM (128 + the signal, as a shell reports it); None for anything else."""
    if isinstance(exc, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(exc, Terminated):
        return 128 + signal.SIGTERM
    from prefect.exceptions import TerminationSignal

    if isinstance(exc, TerminationSignal):
        return 128 + exc.signal
    return None


class CheckpointWatch(logging.Filter):
    """The step of the last checkpoint the training reported (its lines are the train task's
    log), for the line of an interrupted run; attached to Prefect's task-run logger until
    `close`."""

    def __init__(self) -> None:
        from model.launch import parse_checkpoint_line

        super().__init__()
        self.step: int | None = None
        self._parse = parse_checkpoint_line
        self._logger = logging.getLogger("prefect.task_runs")
        self._logger.addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            step = self._parse(record.msg)
            if step is not None:
                self.step = step
        return True

    def close(self) -> None:
        self._logger.removeFilter(self)


def _interrupted(code: int, args: argparse.Namespace, run_id: str, step: int | None) -> str:
    """One line: the run stopped, what is kept, how to continue it."""
    how = "interrupted" if code == 128 + signal.SIGINT else "terminated"
    kept = f"; its training checkpoint (step {step}) is kept" if step is not None else ""
    missing = ([] if args.run_id else ["--run-id", run_id]) + ([] if args.resume else ["--resume"])
    again = f"the same command plus {' '.join(missing)}" if missing else "the same command"
    return f"{how}: run {run_id} stopped{kept}: continue it with {again}"


def _timed_out(exc: TimeoutError, args: argparse.Namespace) -> str:
    """A run stopped at --timeout or --train-timeout, as the one-line error it is."""
    from prefect.flow_engine import FlowRunTimeoutError
    from prefect.task_engine import TaskRunTimeoutError

    if isinstance(exc, TaskRunTimeoutError):
        return f"the training ran longer than --train-timeout {args.train_timeout} s: stopped"
    if isinstance(exc, FlowRunTimeoutError):
        return f"the run ran longer than --timeout {args.timeout} s: stopped"
    return f"the run timed out: {exc}"


def cmd_tokenize(args: argparse.Namespace) -> int:
    request = run_request(args, alerts={"notify": ""})  # tokenizing alone sends no alerts
    settled, prefect_server = _settle_and_boot(request)
    request.check_data(settled=settled)
    from flows.tokenize_corpus import tokenize_corpus
    from tasks.tokenize import source_parameter

    if prefect_server:
        prefect_server.use()
    _quiet_user_errors()
    from flows.engines import with_task_runner

    on_runner = with_task_runner(tokenize_corpus, *settled.task_runner, request.compute.workers)
    result = on_runner(
        source=source_parameter(settled.source),  # stored by Prefect without user:password@
        store=settled.store,
        tokenizer=settled.config.tokenizer,
        vocab_size=settled.config.vocab_size,
        shard_bytes=settled.shard_bytes,
        refresh=bool(settled.refresh),
    )
    meta = result.metadata
    print(
        f"\n{meta['n_tokens']:,} {meta['tokenizer']} tokens (vocab {meta['vocab_size']}) in "
        f"{meta['n_shards']} shard(s){' (cached)' if result.cached else ''}\n"
        f"  dataset    {result.tokens.uri}\n  tokenizer  {result.tokenizer.uri}",
        flush=True,
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from flows.request import SweepRequest
    from model.config import read_yaml_mapping

    request = run_request(
        args,
        SweepRequest,
        search={"space": read_yaml_mapping(Path(args.space), "--space"), "space_file": args.space},
    )
    settled, prefect_server = _settle_and_boot(request)
    checked = request.check(settled=settled)
    from flows.sweep import sweep

    if prefect_server:
        prefect_server.use()
    _quiet_user_errors()
    summary = _on_task_runner(sweep, checked)(
        source=checked.source, plan=checked.plan, search=request.search
    )
    print_sweep_summary(summary)
    return 0


def print_sweep_summary(summary: dict) -> None:
    names = list(summary["space"]["params"])
    lines = ["", f"sweep {summary['sweep']}: {len(summary['trials'])} trial(s)"]
    for trial in summary["trials"]:
        loss = f"{trial['val_loss']:.4f}" if trial["val_loss"] is not None else "-"
        values = ", ".join(f"{n}={trial['params'].get(n)}" for n in names)
        note = f"  ({trial['error']})" if trial["error"] else ""
        if trial["stopped_at"] is not None:
            note = f"  (at step {trial['stopped_at']})"
        lines.append(
            f"  trial {trial['number']:>3}  {trial['state']:<8}  val {loss}  {values}{note}"
        )
    best, model = summary["best"], summary["model"]
    lines += [
        f"  best: trial {best['number']}, val loss {best['val_loss']:.4f}",
        f"  model: {model['name']} version {model['version']} ({model['reason']})",
        f"  summary: {summary['summary_uri']}",
    ]
    if summary["mlflow"]["run_url"]:
        lines.append(f"  MLflow: {summary['mlflow']['run_url']}")
    print("\n".join(lines), flush=True)


def _on_task_runner(flow, checked):
    """``flow`` on the checked run's task runner."""
    from flows.engines import with_task_runner

    return with_task_runner(flow, *checked.task_runner, checked.workers)


def print_summary(summary: dict) -> None:
    out = summary["outputs"]
    lines = [
        "",
        f"run {summary['run_id']}: {summary['n_params']:,} parameters trained on "
        f"{summary['world_size']} rank(s)",
        f"  final loss (eval mode): train {summary['train_loss']:.4f}, "
        f"val {summary['val_loss']:.4f}"
        + (f" ({summary['val_bpb']:.4f} bits per byte)" if summary.get("val_bpb") else ""),
        f"  run folder: {summary['run_uri']}",
    ]
    lines += [f"  {name:<10} {uri}" for name, uri in out.items()]
    mlflow_info, model = summary["mlflow"], summary["model"]
    lines.append(
        f"  mlflow     run {mlflow_info['run_id']} in experiment {mlflow_info['experiment']} "
        f"at {mlflow_info['tracking_uri']}"
    )
    if mlflow_info.get("run_url"):
        lines.append(f"  mlflow ui  {mlflow_info['run_url']}")
    champion = "now champion" if model["champion"] else "champion unchanged"
    lines.append(
        f"  model      {model['name']} version {model['version']} ({champion}: {model['reason']})"
    )
    reused = [stage for stage, cached in summary["cached"].items() if cached]
    if reused:
        lines.append(f"  re-used from cache (same content and settings): {', '.join(reused)}")
    lines.append("  sample:")
    excerpt = summary["sample"][:300]
    lines += ["    " + line for line in excerpt.splitlines()]
    print("\n".join(lines), flush=True)


def cmd_sample(args: argparse.Namespace) -> int:
    from model.sample import load_model, sample_text

    if args.model:
        from storage.tracking import Tracker
        from tasks.registry import FetchedCheckpoint

        with FetchedCheckpoint(Tracker(args.tracking_uri), args.model) as path:
            loaded = load_model(path, args.device)
    else:
        loaded = load_model(args.checkpoint, args.device)
    text, notes = sample_text(
        loaded,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(text)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch

    from model.config import build_config
    from model.gpt import GPT
    from model.params import parameter_table

    cfg = build_config(args.preset, args.config, args.set)
    vocab_size = cfg.vocab_size or 65  # the character vocabulary of Tiny Shakespeare
    with torch.device("meta"):  # shapes only: no memory, whatever the size
        model = GPT(cfg.model_config(vocab_size))
    print(
        f"vocab_size {vocab_size}, block_size {cfg.block_size}, n_embd {cfg.n_embd}, "
        f"n_head {cfg.n_head}, n_layer {cfg.n_layer}"
    )
    print(parameter_table(model).format())
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    skip_last_collections()
    args = build_parser().parse_args(argv)
    handler = {
        "run": cmd_run,
        "tokenize": cmd_tokenize,
        "sweep": cmd_sweep,
        "sample": cmd_sample,
        "inspect": cmd_inspect,
    }[args.command]
    try:
        with _sigterm_raises():
            return handler(args)
    except GptpipeError as exc:
        print(f"error: {textwrap.shorten(str(exc), 2000)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as exc:  # before any run started (a run says more)
        code = interrupt_status(exc)
        print("interrupted" if code == 128 + signal.SIGINT else "terminated", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
