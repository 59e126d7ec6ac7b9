"""The `forvalue` command line: a thin click group over the library.

Heavy imports (torch, transformers) happen inside the commands so `forvalue --help` is instant. Every
forvalue error (bad data, bad model path, bad option) becomes one line on stderr and exit code 2; a server that
cannot be reached, exit code 3 (EXIT_UNREACHABLE).

Conventions every command follows: the index directory is `--index/-i DIR` (FORVALUE_INDEX), the model
`--model` (FORVALUE_MODEL), the server `--server HOST:PORT` (FORVALUE_SERVER); `-v` works before or after the
command; `--help` ends with examples; progress goes to stderr, only on a terminal and never with --json.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time

import click

from forvalue.client import render
from forvalue.indexer.config import (
    DTYPE_CHOICES, FIRST_STAGE_KINDS, METHODS, NORMALIZE, RERANK_STORES, TOKEN_SCOPES, BuildConfig, FirstStageConfig,
    ScoreConfig, SketchConfig, SyncConfig,
)
from forvalue.indexer.results import DEFAULT_EXACT_BUDGET, DEFAULT_K, DEFAULT_RERANK, DEFAULT_SCORE_BATCH, SCORE_MODES
from forvalue.server.config import ServerConfig

EXIT_USAGE = 2
DEFAULT_WAIT = 10.0  # --wait: seconds a --server command waits for a server that is still starting
EXIT_UNREACHABLE = 3  # the server did not answer (nothing listens, or still loading when --wait ran out)
INDEX_ENV, MODEL_ENV, SERVER_ENV = "FORVALUE_INDEX", "FORVALUE_MODEL", "FORVALUE_SERVER"
# what `pip install 'forvalue[engine]'` brings (pyproject.toml): a command that runs a model needs them
ENGINE_MODULES = frozenset({"torch", "transformers", "gguf", "accelerate", "tqdm", "faiss", "grpc_reflection",
                            "prometheus_client"})


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    click.echo(f"forvalue: error: {message}", err=True)
    sys.exit(code)


def _exit_code(exc: Exception) -> int:
    client = sys.modules.get("forvalue.client.client")  # imported only by the --server commands (grpc)
    return EXIT_UNREACHABLE if client is not None and isinstance(exc, client.ServerUnreachableError) else EXIT_USAGE


def handle_errors(fn):
    """Maps forvalue's own errors (and unreadable files) to a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from forvalue.indexer.errors import ForValueError

        try:
            return fn(*args, **kwargs)
        except ForValueError as exc:
            _fail(str(exc), _exit_code(exc))
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in ENGINE_MODULES:
                _fail(f"this needs the model side of forvalue ({exc.name} is not installed): pip install "
                      "'forvalue[engine,cpu]' (or [engine,gpu]); a client-only install can ask a server (--server)")
            raise
        except OSError as exc:
            _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))

    return wrapper


def field_options(fn):
    """--prompt-field ... --image-field: the column names of the input rows, one option per `FieldMap` field
    (its help string); the command gets them as one `fields` argument (a FieldMap). Also --format, --template
    and --turns (how rows become tokens, formats.py), which `_data_options` reads back: an index remembers all
    of them, so later commands on it leave them out."""
    import dataclasses

    from forvalue.indexer.data import FieldMap
    from forvalue.indexer.formats import FORMAT_CHOICES, TURN_SCOPES

    names = [f.name for f in dataclasses.fields(FieldMap)]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        click.get_current_context().meta[_SCHEMA_KEY] = {n: kwargs.pop(n) for n in ("format", "template", "turns")}
        columns = {n: kwargs.pop(f"{n}_field") for n in names}
        for n, column in columns.items():  # checked here to name the flags (FieldMap's own errors name itself)
            if not column.strip():
                _fail(f"--{n}-field must name a column, got {column!r}")
        for column in sorted(set(columns.values())):
            flags = [f"--{n}-field" for n, c in columns.items() if c == column]
            if len(flags) > 1:
                _fail(f"{' and '.join(flags)} name the same column {column!r}; give each its own")
        kwargs["fields"] = FieldMap(**columns)
        return fn(*args, **kwargs)

    for f in reversed(dataclasses.fields(FieldMap)):
        wrapper = click.option(f"--{f.name}-field", f"{f.name}_field", default=f.default, show_default=True,
                               help=f.metadata["help"])(wrapper)
    wrapper = click.option("--turns", type=click.Choice(TURN_SCOPES), default=None,
                           help="Conversations: score every assistant turn (all) or the last one [default: all; an "
                                "index keeps its own].")(wrapper)
    wrapper = click.option("--template", default=None, metavar="plain|chat|FORMAT",
                           help="How prompt + response rows become tokens: plain (prompt, response, EOS), chat (the "
                                "model's chat template, as a user and an assistant turn), or a format string of the "
                                "prompt such as '### Question:\\n{prompt}\\n### Answer:\\n' [default: plain; an "
                                "index keeps its own]. Conversations always use the chat template.")(wrapper)
    wrapper = click.option("--format", "format", type=click.Choice(FORMAT_CHOICES), default=None,
                           help="Fine-tuning format of the rows: messages, prompt-completion, instruction (Alpaca) "
                                "or prompt-response [default: auto, detected from the first row; an index keeps "
                                "its own].")(wrapper)
    return wrapper


_SCHEMA_KEY = "forvalue.schema"


def _data_options(fields, kept=None, queries: bool = False):
    """(fields, formats.Schema) to read a file with: what an index remembers (`kept`, its manifest's "data"),
    checked against the options given, or the options alone (data.remembered)."""
    from forvalue.indexer.data import remembered
    from forvalue.indexer.errors import ConfigError

    ctx = click.get_current_context(silent=True)
    given = ctx.meta.get(_SCHEMA_KEY, {}) if ctx is not None else {}
    try:
        return remembered(kept, fields, given, queries=queries)
    except ConfigError:
        raise
    except ValueError as exc:  # an invalid --template
        raise ConfigError(f"--template: {exc}") from exc


def _kept_schema(source) -> dict | None:
    """The "data" an index (or a server's index) keeps in its manifest; None for indexes built before it did."""
    return source.info()["manifest"].get("data")


_PROGRESS_KEY = "forvalue.progress"


def progress_option(fn):
    """--no-progress (the command does not take it): `_progress()` then says whether to draw bars and spinners:
    only on a terminal (stderr), and never with --no-progress or --json."""

    @functools.wraps(fn)
    def wrapper(*args, no_progress, **kwargs):
        from forvalue.client.progress import stderr_is_tty

        wanted = not no_progress and not kwargs.get("as_json", False) and stderr_is_tty()
        click.get_current_context().meta[_PROGRESS_KEY] = wanted
        return fn(*args, **kwargs)

    return click.option("--no-progress", is_flag=True,
                        help="No progress bars or spinners on stderr (they are drawn only on a terminal, and never "
                             "with --json).")(wrapper)


def _progress() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx.meta.get(_PROGRESS_KEY, False)) if ctx is not None else False


def _spinner(message: str):
    from forvalue.client.progress import spinner

    return spinner(message, _progress())


_DTYPE_KEY = "forvalue.dtype"


def dtype_option(fn):
    """--dtype: the precision of the forward pass. The command does not take it: `_load_model` reads it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        click.get_current_context().meta[_DTYPE_KEY] = kwargs.pop("dtype")
        return fn(*args, **kwargs)

    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=ServerConfig.dtype, show_default=True,
                        help="Precision of the forward pass: auto = bfloat16 on a GPU (float16 where it has no "
                             "bfloat16), float32 on a CPU. Scores are computed in float32 either way.")(wrapper)


def _dtype() -> str:
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(_DTYPE_KEY, "auto") if ctx is not None else "auto"


def _load_model(model_path, device):
    """The model for a command, on `device` in the command's --dtype."""
    from transformers.utils import logging as hf_logging

    from forvalue.indexer.model import load_model

    hf_logging.disable_progress_bar()  # its per-load "Loading weights" bar: forvalue draws its own, on a terminal
    with _spinner(f"loading the model ({model_path or 'SmolLM2-135M-Instruct'}) on {device}"):
        return load_model(model_path, device=device, dtype=_dtype())


class BatchTokens(click.ParamType):
    """--batch-tokens: a positive integer, or "auto" (sized to the device, `forward.auto_batch_tokens`)."""

    name = "N|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value == "auto":
            return value
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            self.fail(f"{value!r} is neither a positive integer nor 'auto'", param, ctx)
        return n


def model_options(fn):
    opts = [
        click.option("--device", default="cpu", show_default=True, help="torch device for the forward pass."),
        click.option("--batch-tokens", type=BatchTokens(), default="auto", show_default=True,
                     help="Padded tokens per forward batch; auto: 4096 on a CPU, sized to the free memory on a GPU."),
        click.option("--max-length", type=click.IntRange(2), default=BuildConfig.max_length, show_default=True,
                     help="Longest token sequence; longer samples lose prompt tokens from the left."),
        click.option("--tokens", type=click.Choice(TOKEN_SCOPES), default=BuildConfig.tokens, show_default=True,
                     help="Scored positions: the response (+EOS), or every position of prompt + response."),
        model_option("Local Hugging Face model directory or .gguf file [default: SmolLM2-135M-Instruct]; "
                     "random:ARCH (e.g. random:qwen2.5-0.5b) times a randomly initialised real architecture."),
    ]
    for opt in opts:
        fn = opt(fn)
    return dtype_option(fn)


def color_option(fn):
    """--color/--no-color: colours and a compact table on a terminal (auto-detected when neither is given)."""
    return click.option("--color/--no-color", "color", default=None,
                        help="Colours and a compact table, or plain text [default: colours when the output is a "
                             "terminal and NO_COLOR is unset].")(fn)


def model_option(help_text: str = "The model the index was built with (Hugging Face directory or .gguf) "
                                  "[default: SmolLM2-135M-Instruct]."):
    """--model PATH, defaulting to the FORVALUE_MODEL environment variable."""
    return click.option("--model", "model_path", default=None, envvar=MODEL_ENV, show_envvar=True, metavar="PATH",
                        help=help_text)


def server_option(help_text: str):
    """--server HOST:PORT, defaulting to the FORVALUE_SERVER environment variable."""
    return click.option("--server", "server", default=None, envvar=SERVER_ENV, show_envvar=True, metavar="HOST:PORT",
                        help=help_text)


class _HiddenArgument(click.Argument):
    """A positional argument kept for old command lines (deprecated): shown in no usage line or help."""

    def get_usage_pieces(self, ctx):
        return []


def _from_env(name: str) -> bool:
    from click.core import ParameterSource

    return click.get_current_context().get_parameter_source(name) == ParameterSource.ENVIRONMENT


def index_option(help_text: str, required: bool = True, env: bool = True, aliases: tuple[str, ...] = (),
                 positional: bool = False):
    """-i/--index DIR, the one spelling of the index directory in every command (FORVALUE_INDEX with `env`).

    Old spellings keep working, hidden and with a deprecation warning: `aliases` (e.g. --out of `index build`)
    and, with `positional`, a bare INDEX_DIR argument (`index info|gc`). The command gets `index_dir`; with
    `required` a missing one is one line, exit 2.
    """

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            given = kwargs["index_dir"]
            explicit = given is not None and not _from_env("index_dir")
            olds = [(a, kwargs.pop(f"index_alias_{a.strip('-')}")) for a in aliases]
            if positional:
                olds.append(("INDEX_DIR (positional)", kwargs.pop("index_positional")))
            for spelling, value in olds:
                if value is None:
                    continue
                click.echo(f"forvalue: warning: {spelling} is deprecated; write --index {value}", err=True)
                if explicit and value != given:
                    _fail(f"--index {given} and {spelling} {value} name different directories; give --index only")
                given, explicit = value, True
            if required and given is None:
                _fail(f"give the index directory: --index DIR (or set {INDEX_ENV})")
            kwargs["index_dir"] = given
            return fn(*args, **kwargs)

        for alias in aliases:
            wrapper = click.option(alias, f"index_alias_{alias.strip('-')}", default=None, hidden=True)(wrapper)
        wrapper = click.option("-i", "--index", "index_dir", default=None, metavar="DIR", help=help_text,
                               envvar=INDEX_ENV if env else None, show_envvar=env)(wrapper)
        if positional:
            wrapper = click.argument("index_positional", required=False, cls=_HiddenArgument)(wrapper)
        return wrapper

    return decorate


def _one_source(server: str | None, index_dir: str | None) -> tuple[str | None, str | None]:
    """(server, index_dir) with exactly one set: an option given on the command line wins over the other's
    environment variable (FORVALUE_SERVER, FORVALUE_INDEX)."""
    if server is not None and index_dir is not None:
        server_env, index_env = _from_env("server"), _from_env("index_dir")
        if index_env and not server_env:
            index_dir = None
        elif server_env and not index_env:
            server = None
    if (server is None) == (index_dir is None):
        _fail(f"give exactly one of --server ADDR or --index DIR (or one of {SERVER_ENV}, {INDEX_ENV})")
    return server, index_dir


TOKEN_ENV = "FORVALUE_TOKEN"


def read_token(token_file: str | None) -> str | None:
    """The bearer token: from `token_file`, else from the FORVALUE_TOKEN environment variable, else None.

    Raises:
        ConfigError: the file is unreadable or empty, or FORVALUE_TOKEN is set but empty.
    """
    from forvalue.indexer.errors import ConfigError
    from forvalue.server.security import read_token_file

    if token_file is not None:
        return read_token_file(token_file)
    token = os.environ.get(TOKEN_ENV)
    if token is None:
        return None
    if not token.strip():
        raise ConfigError(f"{TOKEN_ENV} is set but empty; put the token in it, or unset it for no token")
    return token.strip()


_WAIT_KEY = "forvalue.wait"


def client_options(fn):
    """--token-file, --tls, --tls-ca: how to reach a server; hand them to `connect`. --wait: how long `connect`
    waits for a server that is still starting (the command does not take it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        click.get_current_context().meta[_WAIT_KEY] = kwargs.pop("wait")
        return fn(*args, **kwargs)

    opts = [
        click.option("--wait", type=click.FloatRange(0), default=DEFAULT_WAIT, show_default=True, metavar="SECONDS",
                     help="With --server: wait this long for a server that is still starting (not listening yet, "
                          f"or loading its model) before giving up with exit code {EXIT_UNREACHABLE}; 0 = no wait."),
        click.option("--tls-ca", "tls_ca", default=None, metavar="PATH",
                     help="PEM file of the root certificates that sign the server's certificate (turns TLS on)."),
        click.option("--tls", "tls", is_flag=True,
                     help="Connect with TLS, checking the server against the system's root certificates."),
        click.option("--token-file", "token_file", default=None, metavar="PATH",
                     help=f"File holding the server's bearer token [default: the {TOKEN_ENV} environment variable, "
                          "if set]."),
    ]
    for opt in opts:
        wrapper = opt(wrapper)
    return wrapper


def where_options(fn):
    return click.option(
        "--where", "where_items", multiple=True, metavar="FIELD=VALUE",
        help="Only training samples whose metadata field has this value (e.g. source=gsm8k). Repeat a field for "
             "any of several values, different fields must all match.")(fn)


def split_option(fn):
    return click.option(
        "--split", "split", default=None, metavar="VALUE",
        help="Use only the --valuation rows whose split column has this value (e.g. test), so a labelled file "
             "serves as it is [default: the rows of split test if the file has a split column, else all].")(fn)


def _where(items):
    from forvalue.indexer.filters import Where

    return Where.parse(list(items)) if items else None


def connect(server: str, token_file: str | None, tls: bool, tls_ca: str | None):
    """An `InfluenceClient` for `server` with the options of `client_options` (the caller closes it).

    Args:
        server: host:port.
        token_file: file with the bearer token; None = FORVALUE_TOKEN if set, else no token.
        tls: TLS with the system's root certificates.
        tls_ca: PEM root certificates; implies TLS (and wins over `tls`).

    Raises:
        ConfigError: the token file, FORVALUE_TOKEN or the root certificates file is unusable.
        ServerUnreachableError: with --wait, no server answered SERVING in time.
    """
    from forvalue.client.client import InfluenceClient

    client = InfluenceClient(server, token=read_token(token_file), tls=tls_ca if tls_ca is not None else tls)
    ctx = click.get_current_context(silent=True)
    wait = ctx.meta.get(_WAIT_KEY, 0.0) if ctx is not None else 0.0
    if wait > 0:
        try:
            with _spinner(f"waiting for the server at {server}"):
                client.wait_until_ready(wait)
        except BaseException:
            client.close()
            raise
    return client


@contextlib.contextmanager
def open_source(server, index_dir, model_path, device, token_file, tls, tls_ca):
    """(what answers, its name for the output): an `InfluenceClient` of `server` or the in-process `Index` of
    `index_dir` (one of them: the other None). Both have the same calls (search, top_k, group_by, scores, info),
    so a command runs one code path for either."""
    server, index_dir = _one_source(server, index_dir)
    if server is not None:
        with connect(server, token_file, tls, tls_ca) as client:
            yield client, f"server {server}"
        return
    from forvalue.indexer.index import Index

    lm = _load_model(model_path, device)
    with _spinner(f"opening the index {index_dir}"):
        index = Index.open(index_dir, lm)
    with index:
        yield index, f"index {index_dir}"


def _set_verbose(ctx, param, value) -> None:
    if value:
        logging.getLogger().setLevel(logging.INFO)


VERBOSE_HELP = "Log progress details to stderr (before or after the command name)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=f"""\b
Examples:
  forvalue example --out example.jsonl --noise 0.1
  forvalue index build --data example.jsonl --split train --index idx
  forvalue query --index idx --prompt "Reverse: red cat sun ->" --response " sun cat red"

\b
Environment: {INDEX_ENV} (--index), {MODEL_ENV} (--model), {SERVER_ENV} (--server), FORVALUE_TOKEN.
Exit codes: 0 done; 2 bad input, bad option or a refused call (one line on stderr); {EXIT_UNREACHABLE} no server
answered at --server (within --wait).""")
@click.version_option(package_name="forvalue")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
def main(verbose: bool) -> None:
    """forvalue: which training samples drove this output? (For-Value, forward-only data valuation)"""
    handler = logging.StreamHandler()
    handler.setFormatter(_CliFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    # transformers' per-load "Loading weights" bars are noise here; forvalue shows its own progress
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


class _CliFormatter(logging.Formatter):
    """forvalue's own warnings and errors as the CLI's other lines ("forvalue: warning: ..."); -v details and
    other libraries' messages keep their level and logger name."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING and record.name.startswith("forvalue"):
            return f"forvalue: {record.levelname.lower()}: {record.getMessage()}"
        return super().format(record)


def _add_verbose_everywhere(group: click.Group) -> None:
    """-v/--verbose on every command too, so `forvalue query -v ...` works as `forvalue -v query ...`."""
    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            _add_verbose_everywhere(cmd)
        if not any("--verbose" in p.opts for p in cmd.params):
            cmd.params.append(click.Option(["-v", "--verbose"], is_flag=True, expose_value=False,
                                           callback=_set_verbose, help=VERBOSE_HELP))


@main.command("eval", epilog="""\b
Examples:
  forvalue eval example.jsonl --tokens all
  forvalue eval valuation.jsonl --train train.jsonl --method inbatch --json
  forvalue eval example.jsonl --index idx --rerank 50""")
@click.argument("data")
@click.option("--train", "train_path", default=None, help="Training file, when DATA holds the valuation rows only.")
@model_options
@click.option("--method", type=click.Choice(METHODS), default=ScoreConfig.method, show_default=True,
              help="exact: full vocabulary; inbatch: the paper's in-batch vocabulary; shared: one fixed vocabulary "
                   "(training targets); emb: the Emb baseline (alpha = 1).")
@click.option("--memory-mb", type=click.IntRange(16), default=ScoreConfig.memory_mb, show_default=True,
              help="Working-memory budget of the scoring step.")
@click.option("--normalize", type=click.Choice(NORMALIZE), default=ScoreConfig.normalize, show_default=True,
              help="unit: each training row's value divided by its norm, as an index built with --normalize unit "
                   "ranks (--method exact).")
@index_option("Evaluate through this index (its rows are the training set): adds fidelity_top10 and "
              "candidate_recall of the first stage.", required=False, env=False)
@click.option("--rerank", type=click.IntRange(1), default=DEFAULT_RERANK, show_default=True,
              help="With --index: first-stage candidates scored exactly.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@progress_option
@field_options
@handle_errors
def eval_cmd(data, train_path, model_path, tokens, max_length, batch_tokens, device, method, memory_mb, index_dir,
             rerank, as_json, fields, normalize=ScoreConfig.normalize):
    """Evaluate For-Value on labelled data: AUC and Recall of same-label training rows.

    DATA is a JSONL/Parquet file with prompt, response, label and split (train|test) per row; or a
    valuation file with --train TRAIN; or a DataInf prefix such as ../shared/eval/datainf/grammars
    (reads grammars_train.hf and grammars_test.hf).
    """
    from forvalue.indexer.data import load_eval_sets
    from forvalue.indexer.evaluate import run_eval
    from forvalue.indexer.features import ForwardConfig
    from forvalue.indexer.forward import batch_sizes
    if index_dir is not None:
        _eval_through_index(data, index_dir, model_path, device, rerank, as_json, fields)
        return
    score = ScoreConfig(method=method, memory_mb=memory_mb, normalize=normalize)
    fields, schema = _data_options(fields)
    valuation, train = load_eval_sets(data, train_path, fields, schema=schema)
    t0 = time.perf_counter()
    lm = _load_model(model_path, device)
    load_seconds = time.perf_counter() - t0
    batch_tokens, max_batch = batch_sizes(batch_tokens, lm.model, max_length)
    fwd = ForwardConfig(tokens=tokens, max_length=max_length, batch_tokens=batch_tokens, max_batch=max_batch)
    result = run_eval(lm, valuation, train, fwd, score, progress=_progress())
    report = {"data": str(data), **result.report, "load_seconds": load_seconds}
    click.echo(render.dumps(report) if as_json else render.eval_text(report))


def _eval_through_index(data, index_dir, model_path, device, rerank, as_json, fields):
    from forvalue.indexer.data import load_valuation_set
    from forvalue.indexer.evaluate import run_index_eval
    from forvalue.indexer.index import Index

    t0 = time.perf_counter()
    lm = _load_model(model_path, device)
    index = Index.open(index_dir, lm)
    load_seconds = time.perf_counter() - t0
    fields, schema = _data_options(fields, _kept_schema(index), queries=True)
    valuation = load_valuation_set(data, fields, require=("label",), schema=schema)
    report = {"data": str(data), "index": str(index_dir),
              **run_index_eval(index, valuation, rerank=rerank, progress=_progress()), "load_seconds": load_seconds}
    click.echo(render.dumps(report) if as_json else render.index_eval_text(report))


@main.group("index", epilog="""\b
Examples:
  forvalue index build --data train.jsonl --index idx
  forvalue index add --index idx --data more.jsonl
  forvalue index info --index idx""")
def index_group() -> None:
    """Build, extend and inspect influence indexes."""


def sketch_options(fn):
    opts = [
        click.option("--seed", type=int, default=SketchConfig.seed, show_default=True,
                     help="Seed of the vocabulary hashing."),
        click.option("--fit-samples", type=click.IntRange(1), default=SketchConfig.fit_samples, show_default=True,
                     help="Samples of the corpus used to fit the sketch maps."),
        click.option("--rerank-store", "--rerank-dtype", "rerank_dtype", type=click.Choice(RERANK_STORES),
                     default=BuildConfig.rerank_dtype, show_default=True,
                     help="Storage tier of the exact re-rank data: the hidden states in float32 or float16, or "
                          "none (recompute: a query runs its candidates' forward passes again from the stored "
                          "texts; exact, ~100x less disk, slower queries, no percentiles). --rerank-dtype is "
                          "its old name."),
        click.option("--rerank-top", type=click.IntRange(0), default=BuildConfig.rerank_top, show_default=True,
                     help="Largest next-token probabilities stored per training token, so queries score exactly "
                          "only the candidates that can be in the answer (0 = score every candidate)."),
        click.option("--shard-size", type=click.IntRange(1), default=BuildConfig.shard_size, show_default=True,
                     help="Samples per shard (the unit a killed build resumes from)."),
        click.option("--rank", type=click.IntRange(1), default=SketchConfig.rank, show_default=True,
                     help="Principal directions of the hidden states in the sketch."),
        click.option("--dim", type=click.IntRange(1), default=SketchConfig().dim, show_default=True,
                     help="First-stage sketch dimension (rank x vocabulary buckets); 4 bytes each."),
    ]
    for opt in opts:
        fn = opt(fn)
    return fn


def _build_config(tokens, max_length, batch_tokens, dim, rank, shard_size, rerank_dtype, fit_samples, seed,
                  rerank_top=BuildConfig.rerank_top):
    from forvalue.indexer.errors import ConfigError

    if dim % rank:
        raise ConfigError(f"--dim ({dim}) must be a multiple of --rank ({rank})")
    sketch = SketchConfig(rank=rank, buckets=dim // rank, seed=seed, fit_samples=fit_samples)
    return BuildConfig(tokens=tokens, sketch=sketch, shard_size=shard_size, rerank_dtype=rerank_dtype,
                       rerank_top=rerank_top,
                       max_length=max_length, batch_tokens=batch_tokens)


def _train_rows(data, fields, split, kept=None):
    """(the training rows of `data` (those of `split`), the schema they were read with (format found))."""
    from forvalue.indexer.data import read_corpus
    from forvalue.indexer.errors import DataError

    fields, schema = _data_options(fields, kept)
    samples, schema = read_corpus(data, fields, schema=schema)
    if split is not None:
        samples = [s for s in samples if s.split == split]
        if not samples:
            raise DataError(f"no rows with split {split!r}", path=str(data))
    return samples, schema


def first_stage_options(fn):
    """--index-kind ... --min-recall: the first stage; the command gets them as `first_stage` (FirstStageConfig).

    Put it below @handle_errors, so an invalid combination is one line and exit 2.
    """

    @functools.wraps(fn)
    def wrapper(*args, index_kind, approx_threshold, nlist, nprobe, pq_m, refine, min_recall, norm_buckets,
                **kwargs):
        kwargs["first_stage"] = FirstStageConfig(kind=index_kind, approx_threshold=approx_threshold, nlist=nlist,
                                                 nprobe=nprobe, pq_m=pq_m, refine=refine, min_recall=min_recall,
                                                 norm_buckets=norm_buckets)
        return fn(*args, **kwargs)

    opts = [
        click.option("--min-recall", type=click.FloatRange(0, 1), default=FirstStageConfig.min_recall,
                     show_default=True,
                     help="Approximate first stage: the recall@10 against flat search (most and least, measured at "
                          "build time on held-out training sketches) below which the build is refused."),
        click.option("--refine", type=click.IntRange(1), default=FirstStageConfig.refine, show_default=True,
                     help="Approximate first stage: candidates taken from the codes per wanted row, re-scored "
                          "exactly from the stored sketches."),
        click.option("--norm-buckets", type=click.IntRange(1), default=FirstStageConfig.norm_buckets,
                     show_default=True,
                     help="IVF kinds: each list split into this many norm ranges, so that least-influential "
                          "searches skip the short rows (1 = plain lists; least then scans about half of them)."),
        click.option("--pq-m", "pq_m", type=click.IntRange(1), default=FirstStageConfig.pq_m, show_default=True,
                     help="ivf-pq: bytes per row (must divide --dim)."),
        click.option("--nprobe", type=click.IntRange(0), default=FirstStageConfig.nprobe, show_default=True,
                     help="IVF lists searched per query; 0 = per direction, the smallest reaching --min-recall "
                          "(chosen at build time)."),
        click.option("--nlist", type=click.IntRange(0), default=FirstStageConfig.nlist, show_default=True,
                     help="IVF lists; 0 = about the square root of the corpus size."),
        click.option("--approx-threshold", type=click.IntRange(1), default=FirstStageConfig.approx_threshold,
                     show_default=True,
                     help="--index-kind auto: corpus size from which the first stage is approximate (ivf-sq8)."),
        click.option("--index-kind", type=click.Choice(FIRST_STAGE_KINDS), default=FirstStageConfig.kind,
                     show_default=True,
                     help="First stage: exact flat search, or an inverted file with 8-bit (sq8) or product-"
                          "quantised (pq) codes; auto = flat below --approx-threshold rows."),
    ]
    for opt in opts:
        wrapper = opt(wrapper)
    return wrapper


_JOB_KEY = "forvalue.job"  # what a job command leaves for --metrics-file: {"rows": {kind: n}, "sync": {...}}


def metrics_file_option(job: str):
    """--metrics-file PATH: after the command, write its metrics for a scheduler (indexer/jobmetrics.py): success,
    seconds, rows, failures, last success time. Put it right below the command decorator (above handle_errors, so
    that it sees a failure's exit code)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, metrics_file=None, **kwargs):
            if metrics_file is None:
                return fn(*args, **kwargs)
            ctx, t0, ok = click.get_current_context(), time.perf_counter(), False
            try:
                out = fn(*args, **kwargs)
                ok = True
                return out
            except SystemExit as exc:
                ok = exc.code in (0, None)
                raise
            finally:
                from forvalue.indexer.jobmetrics import write_job_metrics

                info = ctx.meta.get(_JOB_KEY, {}) if ok else {}
                index = kwargs.get("index_dir") or kwargs.get("index_alias_out") or ""
                try:
                    write_job_metrics(metrics_file, job, str(index), ok, time.perf_counter() - t0, info.get("rows"),
                                      info.get("sync"))
                except OSError as exc:
                    click.echo(f"forvalue: warning: cannot write --metrics-file {metrics_file}: "
                               f"{exc.strerror or exc}", err=True)

        return click.option("--metrics-file", "metrics_file", default=None, metavar="PATH",
                            help="Write the run's metrics (success, seconds, rows, failures, last success time) to "
                                 "this Prometheus text file (node-exporter textfile collector: name it *.prom), "
                                 "atomically.")(wrapper)

    return decorate


@index_group.command("build", epilog="""\b
Examples:
  forvalue index build --data train.jsonl --index idx
  forvalue index build --data example.jsonl --split train --index idx --tokens all
  forvalue index build --data big.parquet --index idx --device cuda --index-kind ivf-sq8 --json
  forvalue index build --data train.jsonl --index idx --model ./my-finetuned --normalize unit""")
@metrics_file_option("build")
@click.option("--data", required=True, help="Training corpus: JSONL, Parquet or one *.hf directory.")
@index_option("Index directory (created; new versions go beside old ones).", aliases=("--out",))
@click.option("--split", default=None, help="Index only the rows with this split value (e.g. train).")
@model_options
@sketch_options
@click.option("--json", "as_json", is_flag=True, help="Print the new version's summary as one JSON object.")
@progress_option
@field_options
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Encode the shards on a Ray cluster (Ray Data actors; pip install 'forvalue[ray]'): ADDRESS "
                   "of the cluster, none = the one this machine belongs to, 'local' = start one here. --index must "
                   "be on a file system every node sees.")
@click.option("--ray-workers", type=click.IntRange(1), default=None,
              help="With --ray: actors encoding shards [default: one per GPU with --ray-gpu, else one per CPU].")
@click.option("--ray-gpu", is_flag=True, help="With --ray: one GPU per actor, forward passes on cuda.")
@click.option("--normalize", type=click.Choice(NORMALIZE), default=BuildConfig.normalize, show_default=True,
              help="What the index ranks by: none = For-Value as defined; unit = each row's value divided by its "
                   "norm (the cosine order; recommended for a fine-tuned model, whose memorised rows have G near 0). "
                   "index add and sync keep it.")
@handle_errors
@first_stage_options
def index_build_cmd(data, index_dir, split, model_path, tokens, max_length, batch_tokens, device, dim, rank, shard_size,
                    rerank_top, rerank_dtype, fit_samples, seed, as_json, fields, first_stage, ray_address=None,
                    ray_workers=None, ray_gpu=False, normalize=BuildConfig.normalize):
    """Build a new index version over a training corpus and make it CURRENT (resumes a killed build).

    Prints a short summary (rows, version, seconds, first-stage recall); --json prints the JSON object."""
    import dataclasses

    from forvalue.indexer.build import build_index
    from forvalue.indexer.forward import batch_sizes
    from forvalue.indexer.store import IndexRoot
    config = _build_config(tokens, max_length, 4096 if batch_tokens == "auto" else batch_tokens, dim, rank, shard_size,
                           rerank_dtype, fit_samples, seed, rerank_top)
    samples, schema = _train_rows(data, fields, split)
    config = dataclasses.replace(config, first_stage=first_stage, schema=schema, normalize=normalize)
    lm = _load_model(model_path, device)
    batch_tokens, max_batch = batch_sizes(batch_tokens, lm.model, max_length)
    config = dataclasses.replace(config, batch_tokens=batch_tokens, max_batch=max_batch)
    if ray_address is not None:
        from forvalue.indexer.raybuild import RayOptions, build_index_ray

        options = RayOptions(address=ray_address, model_path=model_path, workers=ray_workers, use_gpu=ray_gpu)
        name = build_index_ray(index_dir, samples, lm, config, options, progress=_progress())
    else:
        name = build_index(index_dir, samples, lm, config, progress=_progress())
    _print_summary(IndexRoot(index_dir).load(name, verify=False).manifest, name, as_json, index_dir)


@index_group.command("add", epilog="""\b
Examples:
  forvalue index add --index idx --data more.jsonl
  forvalue index add --index idx --data example.jsonl --split test --json
  FORVALUE_INDEX=idx forvalue index add --data more.jsonl --device cuda""")
@metrics_file_option("add")
@index_option("Index directory to extend (its CURRENT version).")
@click.option("--data", required=True, help="New samples: JSONL, Parquet or one *.hf directory.")
@click.option("--split", default=None, help="Add only the rows with this split value.")
@model_option()
@click.option("--device", default="cpu", show_default=True, help="torch device for the forward pass.")
@click.option("--batch-tokens", type=BatchTokens(), default="auto", show_default=True,
              help="Padded tokens per forward batch; auto: 4096 on a CPU, sized to the free memory on a GPU.")
@click.option("--json", "as_json", is_flag=True, help="Print the new version's summary as one JSON object.")
@progress_option
@dtype_option
@field_options
@handle_errors
def index_add_cmd(index_dir, data, split, model_path, device, batch_tokens, as_json, fields):
    """Append samples as a new version, with the same vocabulary map and sketch parameters.

    Prints a short summary (rows, version, seconds); --json prints the JSON object."""
    import dataclasses

    from forvalue.indexer.build import build_index, kept_config
    from forvalue.indexer.forward import batch_sizes
    from forvalue.indexer.store import IndexRoot

    root = IndexRoot(index_dir)
    base = root.load()
    m = base.manifest
    samples, schema = _train_rows(data, fields, split, m.get("data"))
    config = dataclasses.replace(kept_config(m), schema=schema)
    lm = _load_model(model_path, device)
    batch_tokens, max_batch = batch_sizes(batch_tokens, lm.model, m["max_length"])
    config = dataclasses.replace(config, batch_tokens=batch_tokens, max_batch=max_batch)
    name = build_index(index_dir, samples, lm, config, progress=_progress(), base=base)
    if name == base.name:  # every row was in the index already: nothing published
        click.get_current_context().meta[_JOB_KEY] = {"rows": {"total": int(m["n_samples"]), "added": 0}}
        click.echo(render.dumps({"version": name, "n_samples": int(m["n_samples"]), "added": 0}) if as_json else
                   f"forvalue: {index_dir}: nothing to add; every row is in version {name} already (same id and "
                   "content)")
        return
    _print_summary(root.load(name, verify=False).manifest, name, as_json, index_dir)


@index_group.command("sync", epilog="""\b
Examples:
  forvalue index sync --index idx --data corpus.jsonl
  forvalue index sync --index idx --data corpus.jsonl --json --metrics-file /var/lib/node_exporter/forvalue.prom
  forvalue index sync --index idx --data corpus.jsonl --refit""")
@metrics_file_option("sync")
@index_option("Index directory whose CURRENT is brought to the corpus.")
@click.option("--data", required=True, help="The whole corpus as it is now: JSONL, Parquet or one *.hf directory.")
@click.option("--split", default=None, help="Index only the rows with this split value.")
@model_option()
@click.option("--device", default="cpu", show_default=True, help="torch device for the forward pass.")
@click.option("--batch-tokens", type=BatchTokens(), default="auto", show_default=True,
              help="Padded tokens per forward batch; auto: 4096 on a CPU, sized to the free memory on a GPU.")
@click.option("--min-recall", type=click.FloatRange(0, 1), default=SyncConfig.min_recall, show_default=True,
              help="Advise a refit when the sketch recall@10 measured on the new version is below this.")
@click.option("--max-changed", type=click.FloatRange(0, 1), default=SyncConfig.max_changed, show_default=True,
              help="Advise a refit when more than this share of the rows was encoded since the maps were fit.")
@click.option("--refit", is_flag=True, help="Rebuild in full with new sketch maps (a build of the corpus) instead.")
@click.option("--retries", type=click.IntRange(0), default=SyncConfig.retries, show_default=True,
              help="Times to start again from the new CURRENT when another update published first.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@progress_option
@dtype_option
@field_options
@handle_errors
def index_sync_cmd(index_dir, data, split, model_path, device, batch_tokens, min_recall, max_changed, refit, retries,
                   as_json, fields):
    """Bring an index to a corpus by content: reuse the rows whose scored content is unchanged, encode only new
    and changed rows, drop rows that left, publish one version (the same answers as a fresh build with the
    index's sketch maps). Says when a refit (--refit) is worth it. Exit 0: done or nothing to do; 2: bad input,
    or CURRENT kept moving."""
    from forvalue.indexer.store import IndexRoot
    from forvalue.indexer.sync import sync_index

    if not os.path.isdir(index_dir) or IndexRoot(index_dir).current() is None:
        _fail(f"{index_dir}: no published index here; build one first (forvalue index build)")
    config = SyncConfig(min_recall=min_recall, max_changed=max_changed, refit=refit, retries=retries)
    with IndexRoot(index_dir).load(verify=False) as v:  # the corpus is read as the index reads its rows
        kept = v.manifest.get("data")
    samples, _ = _train_rows(data, fields, split, kept)
    lm = _load_model(model_path, device)
    result = sync_index(index_dir, samples, lm, config, batch_tokens=batch_tokens, progress=_progress())
    report = {"index": str(index_dir), "data": str(data), **result.as_dict()}
    click.get_current_context().meta[_JOB_KEY] = {
        "rows": {k: report[k] for k in ("rows", "reused", "encoded", "dropped", "metadata_updated")}, "sync": report}
    click.echo(render.dumps(report) if as_json else render.sync_text(report))


@index_group.command("info", epilog="""\b
Examples:
  forvalue index info --index idx
  forvalue index info --index idx --version v000001 --files
  FORVALUE_INDEX=idx forvalue index info --no-verify""")
@index_option("Index directory to describe.", positional=True)
@click.option("--version", "version", default=None, help="A version name [default: CURRENT].")
@click.option("--files", is_flag=True, help="Also list every file with its sha256.")
@click.option("--no-verify", is_flag=True, help="Skip the checksum verification of every file.")
@handle_errors
def index_info_cmd(index_dir, version, files, no_verify):
    """Print the manifest of an index version (verified against its checksums) as JSON."""
    from forvalue.indexer.store import IndexRoot

    root = IndexRoot(index_dir)
    v = root.load(version, verify=not no_verify)
    m = dict(v.manifest)
    if not files:
        m.pop("files", None)
    from forvalue.indexer.build import storage_summary
    from forvalue.indexer.results import brief_index

    if "index" in m:
        m["index"] = brief_index(m["index"])

    m["storage"] = storage_summary(v.manifest)
    m["version"] = v.name
    m["current"] = root.current()
    m["versions"] = root.versions()
    click.echo(render.json.dumps(m, indent=2, sort_keys=True))


@index_group.command("delete", epilog="""\b
Examples:
  forvalue index delete --index idx --ids takedown.txt
  forvalue index delete --index idx --ids takedown.jsonl --missing ignore""")
@index_option("Index directory whose CURRENT version loses the samples.")
@click.option("--ids", "ids_path", required=True, metavar="FILE",
              help="Ids to take down: one per line (# comments allowed), or JSON lines with an \"id\".")
@click.option("--missing", type=click.Choice(["error", "ignore"]), default="error", show_default=True,
              help="Ids found in no row: refuse the whole call (error), or record them as taken down anyway (ignore).")
@handle_errors
def index_delete_cmd(index_dir, ids_path, missing):
    """Take samples down: publish a new version in which they are never returned (no rebuild, no model);
    a later rebuild or add leaves them out physically. Prints what it did as JSON. A running server moves
    to the new version by itself (hot swap)."""
    from forvalue.indexer.deletion import delete_samples, read_id_file

    if not os.path.isdir(index_dir):
        _fail(f"{index_dir}: no such index directory")
    result = delete_samples(index_dir, read_id_file(ids_path), missing=missing)
    click.echo(render.dumps({"version": result.version, "base": result.base, "published": result.published,
                             "deleted": result.deleted, "already_deleted": result.already, "unknown": result.unknown,
                             "hidden_rows": result.hidden_rows}))


@index_group.command("gc", epilog="""\b
Examples:
  forvalue index gc --index idx --keep 3
  forvalue index gc --index idx --keep 1""")
@index_option("Index directory whose old versions are deleted.", positional=True)
@click.option("--keep", type=int, required=True, help="How many of the newest versions to keep (>= 1).")
@handle_errors
def index_gc_cmd(index_dir, keep):
    """Delete old versions of an index, keeping the --keep newest and CURRENT; prints what it removed as JSON.

    A server still serving a deleted version goes on answering from it (its files stay open) until it
    moves to CURRENT. Unpublished builds under builds/ are left alone.
    """
    from forvalue.indexer.store import IndexRoot

    if keep < 1:
        _fail(f"--keep must be at least 1 (the newest version is always kept), got {keep}")
    if not os.path.isdir(index_dir):
        _fail(f"{index_dir}: no such index directory")
    root = IndexRoot(index_dir)
    if not (root.path / "versions").is_dir():
        _fail(f"{index_dir}: not an index directory (it has no versions/); nothing to remove")
    current = root.current()  # a CURRENT that cannot be read stops gc before anything is deleted
    removed = root.gc(keep)
    click.echo(render.dumps({"removed": removed, "kept": root.versions(), "current": current}))


def _print_summary(m: dict, name: str, as_json: bool, index_dir: str) -> None:
    from forvalue.indexer.build import storage_summary

    click.get_current_context().meta[_JOB_KEY] = {"rows": {"total": int(m["n_samples"])}}  # for --metrics-file
    summary = render.build_summary(m, name, storage_summary(m))
    click.echo(render.dumps(summary) if as_json else render.build_summary_text(summary, index_dir,
                                                                                m.get("base_version")))


def router_options(fn):
    """--shards ADDR1,ADDR2,...: run a router over shard servers instead of serving an index (server/router.py).

    Put it below @handle_errors. Without --shards the command runs as it is, with --index required.
    """

    @functools.wraps(fn)
    def wrapper(*args, shards, shard_timeout, shard_tls_ca, **kwargs):
        if shards is not None and kwargs.get("index_dir") is not None and _from_env("index_dir"):
            kwargs["index_dir"] = None  # --shards on the command line wins over FORVALUE_INDEX
        if shards is None:
            if kwargs.get("index_dir") is None:
                _fail("give --index DIR (serve an index) or --shards ADDR1,ADDR2,... (route over shard servers)")
            return fn(*args, **kwargs)
        if kwargs.get("index_dir") is not None:
            _fail("give either --index DIR or --shards ADDR1,ADDR2,..., not both: a router serves no index itself")
        from forvalue.server.router import RouterConfig, serve_router

        host = kwargs["host"]
        config = RouterConfig(shards=tuple(a.strip() for a in shards.split(",") if a.strip()),
                              shard_timeout=shard_timeout, token=read_token(kwargs["token_file"]),
                              tls_cert=kwargs["tls_cert"], tls_key=kwargs["tls_key"], shard_tls_ca=shard_tls_ca,
                              reflection=not kwargs["no_reflection"], grace_seconds=kwargs["grace"])
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literal
        serve_router(config, f"{host}:{kwargs['port']}",
                     announce=lambda message: click.echo(f"forvalue: {message}", err=True))

    opts = [
        click.option("--shard-tls-ca", "shard_tls_ca", default=None, metavar="PATH",
                     help="With --shards: PEM root certificates of the shards' TLS [default: plaintext to the "
                          "shards]."),
        click.option("--shard-timeout", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True,
                     help="With --shards: seconds a shard may take when the caller set no deadline."),
        click.option("--shards", default=None, metavar="ADDR1,ADDR2,...",
                     help="Route over these shard servers (each a `forvalue serve` of one part of the corpus): "
                          "answers merged exactly, a down shard is UNAVAILABLE unless the request allows partial "
                          "answers. Model and index options are then the shards' business."),
    ]
    for opt in opts:
        wrapper = opt(wrapper)
    return wrapper


def _is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP literal, IPv6 with or without brackets) only reaches this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@main.command("serve", epilog="""\b
Examples:
  forvalue serve --index idx --port 50051
  forvalue serve --index idx --device cuda --host 0.0.0.0 --token-file token --tls-cert c.pem --tls-key k.pem
  forvalue serve --shards 10.0.0.1:50051,10.0.0.2:50051 --port 50050""")
@index_option("Index directory; its CURRENT version is served (and a new CURRENT hot-swapped in).", required=False)
@model_option()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=50051, show_default=True,
              help="Port to listen on; 0 picks a free one (printed).")
@click.option("--device", default=ServerConfig.device, show_default=True, help="torch device for the forward pass.")
@click.option("--k-cap", type=click.IntRange(1), default=ServerConfig.k_cap, show_default=True,
              help="Largest k a request may ask for.")
@click.option("--max-sample-chars", type=click.IntRange(1), default=ServerConfig.max_sample_chars, show_default=True,
              help="Most characters in a valuation sample's prompt, and in its response (longer: INVALID_ARGUMENT).")
@click.option("--max-queue", type=click.IntRange(1), default=ServerConfig.max_queue, show_default=True,
              help="Requests waiting for or in the model beyond which new ones get RESOURCE_EXHAUSTED at once "
                   "(retryable; health checks still answer).")
@click.option("--grace", type=click.FloatRange(0), default=ServerConfig.grace_seconds, show_default=True,
              help="Seconds in-flight calls may take to finish after SIGTERM.")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 60_000), default=ServerConfig.batch_wait_ms,
              show_default=True,
              help="How long a TopK request may wait for others to share its forward pass (0: no wait).")
@click.option("--batch-tokens", type=click.IntRange(1), default=ServerConfig.batch_tokens, show_default=True,
              help="Estimated tokens (about 4 characters each) beyond which no more requests join a batch.")
@click.option("--max-batch-requests", type=click.IntRange(1), default=ServerConfig.max_batch_requests,
              show_default=True,
              help="Most TopK requests sharing one forward pass (1: no batching).")
@click.option("--watch-seconds", type=click.FloatRange(0), default=ServerConfig.watch_seconds, show_default=True,
              help="How often to check the index's CURRENT and serve a new version without a restart (0: never).")
@click.option("--no-reflection", is_flag=True, help="Do not serve gRPC server reflection.")
@click.option("--token-file", "token_file", default=None, metavar="PATH",
              help=f"File holding the bearer token every call but health checks must carry [default: the {TOKEN_ENV} "
                   "environment variable; neither: no authentication].")
@click.option("--tls-cert", "tls_cert", default=None, metavar="PATH",
              help="PEM certificate (chain) of the server; with --tls-key: TLS.")
@click.option("--tls-key", "tls_key", default=None, metavar="PATH",
              help="PEM private key (unencrypted) of --tls-cert.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics over HTTP (/metrics) on --metrics-host at this port; 0 picks a free "
                   "one (printed); with a token, scrapes must send it [default: no metrics endpoint].")
@click.option("--metrics-host", default=ServerConfig.metrics_host, show_default=True,
              help="Address the metrics endpoint listens on (0.0.0.0: every interface; use with --token-file).")
@click.option("--max-explain-pairs", type=click.IntRange(1), default=ServerConfig.max_explain_pairs, show_default=True,
              help="Most top token pairs per hit an explained TopK request may ask for (explain_pairs).")
@click.option("--enable-admin", is_flag=True,
              help="Also serve forvalue.v1.InfluenceAdmin (Delete: takedowns publish a new version without the "
                   "samples and serve it). Off by default; needs --token-file (or --insecure-admin on loopback).")
@click.option("--insecure-admin", is_flag=True,
              help="Allow --enable-admin without a token, only when --host is a loopback address (local tests).")
@dtype_option
@handle_errors
@router_options
def serve_cmd(index_dir, model_path, host, port, device, k_cap, max_sample_chars, max_queue, grace, batch_wait_ms,
              batch_tokens, max_batch_requests, watch_seconds, no_reflection, token_file, tls_cert, tls_key,
              metrics_port, metrics_host, max_explain_pairs, enable_admin, insecure_admin):
    """Serve an index over gRPC (forvalue.v1.Influence, grpc.health.v1, reflection) until SIGTERM.

    Prints to stderr what it serves once loaded (index, version, rows, model, address) and every index swap."""
    from forvalue.server.app import serve
    from forvalue.server.config import ServerConfig

    config = ServerConfig(index_dir=index_dir, model_path=model_path, device=device, dtype=_dtype(), k_cap=k_cap,
                          max_sample_chars=max_sample_chars, max_queue=max_queue, reflection=not no_reflection,
                          grace_seconds=grace, batch_wait_ms=batch_wait_ms, batch_tokens=batch_tokens,
                          max_batch_requests=max_batch_requests, watch_seconds=watch_seconds,
                          token=read_token(token_file), tls_cert=tls_cert, tls_key=tls_key, metrics_port=metrics_port,
                          metrics_host=metrics_host, admin=enable_admin, max_explain_pairs=max_explain_pairs,
                          default_explain_pairs=min(ServerConfig.default_explain_pairs, max_explain_pairs))
    if enable_admin and config.token is None and not (insecure_admin and _is_loopback(host)):
        _fail("--enable-admin needs --token-file (or FORVALUE_TOKEN): without a token anyone who reaches the port "
              "can take samples down" + ("; --insecure-admin is only allowed with a loopback --host"
                                         if insecure_admin else ""))
    if enable_admin and config.token is None:
        click.echo("forvalue: warning: --enable-admin without --token-file (--insecure-admin): anyone on this "
                   "machine can take samples down", err=True)
    if config.token is not None and config.tls_cert is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo("forvalue: warning: the bearer token crosses the network in plaintext; add --tls-cert and "
                   "--tls-key", err=True)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    serve(config, f"{host}:{port}", announce=lambda message: click.echo(f"forvalue: {message}", err=True))


@main.command("query", epilog="""\b
Examples:
  forvalue query --index idx --prompt "Reverse: red cat sun ->" --response " sun cat red"
  forvalue query --server 127.0.0.1:50051 --valuation example.jsonl --split test -k 5 --json
  forvalue query --index idx --response " sun cat red" --least --html report.html""")
@server_option("A forvalue server to ask.")
@index_option("Or: an index directory, queried in-process.", required=False)
@model_option("With --index: the model the index was built with [default: SmolLM2-135M-Instruct].")
@click.option("--device", default="cpu", show_default=True, help="With --index: torch device for the forward pass.")
@click.option("--prompt", default="", help="Prompt of the valuation sample (may be empty).")
@click.option("--response", default=None, help="The response whose training sources are asked for.")
@click.option("--valuation", "valuation_path", default=None,
              help="Or: a file of valuation samples (JSONL, Parquet, *.hf), queried as one group (mean).")
@split_option
# -k and --rerank are checked by the server (or Index.search), so a bad value is one line naming it, exit 2
@click.option("-k", "k", type=int, default=DEFAULT_K, show_default=True, help="Training samples to list (>= 1).")
@click.option("--least", is_flag=True, help="The least valuable instead of the most valuable.")
@click.option("--rerank", type=int, default=DEFAULT_RERANK, show_default=True,
              help="First-stage candidates re-ranked exactly (those that cannot be in the answer are ruled "
                   "out by certified bounds first); >= 0, raised to k.")
@click.option("--scores", "scores", type=click.Choice(SCORE_MODES), default="exact", show_default=True,
              help="exact: every hit's exact score (costs about one more forward pass); certified: certified "
                   "intervals lo..hi from the index's stored top probabilities, the ranks the intervals prove "
                   "marked = (no percentiles or cosines).")
@click.option("--exact-budget", type=click.IntRange(0), default=DEFAULT_EXACT_BUDGET, show_default=True,
              help="With --scores certified: candidates at most scored exactly where intervals overlap at the k "
                   "boundary.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--explain", is_flag=True,
              help="Under each hit, the (query token, training token) pairs that contribute most to its score.")
@click.option("--explain-pairs", type=click.IntRange(1), default=5, show_default=True,
              help="With --explain or --html: top token pairs per hit (a server caps it).")
@click.option("--html", "html_path", default=None, metavar="PATH",
              help="Also write a self-contained HTML report: the query, its most and least valuable training "
                   "samples, and the tokens of both texts coloured by their contribution.")
@where_options
@click.option("--group-by", "group_by", default=None, metavar="FIELD",
              help="Which sources drove it: total and mean value per value of this metadata field (e.g. source), "
                   "with the top -k samples of each. Scores every training sample in scope exactly: narrow "
                   "large indexes with --where.")
@color_option
@client_options
@field_options
@dtype_option
@progress_option
@handle_errors
def query_cmd(server, index_dir, model_path, device, prompt, response, valuation_path, split, k, least, rerank,
              scores, exact_budget, as_json, explain, explain_pairs, html_path, where_items, group_by, color,
              token_file, tls, tls_ca, fields):
    """Which training samples drove this response? The top k by exact For-Value, from a server or an index.

    Each hit also carries calibrated scores: pct, the share of the index's other training samples with a lower
    value to this query (exact; an interval lo–hi% on indexes above 2,048 rows), and cos, the score normalised
    by both gradients' norms (-1..1)."""
    server, index_dir = _one_source(server, index_dir)
    if (response is None) == (valuation_path is None):
        _fail("give exactly one of --response TEXT (with --prompt) or --valuation FILE")
    if response is not None and not response.strip():
        _fail("--response must not be empty or whitespace only")
    if split is not None and valuation_path is None:
        _fail("--split selects rows of --valuation FILE; give --valuation too")
    if html_path is not None and valuation_path is not None and os.path.abspath(html_path) == os.path.abspath(
            valuation_path):
        _fail(f"--html {html_path!r} is an input of this command; write to another file")
    if group_by is not None and (explain or html_path is not None):
        _fail("--group-by cannot be combined with --explain or --html; use --where FIELD=VALUE to look into one group")
    if scores != "exact" and (group_by is not None or html_path is not None):
        _fail("--scores certified cannot be combined with --group-by or --html (they show exact scores)")
    direction = "least" if least else "most"
    where = _where(where_items)
    pairs = explain_pairs if explain or html_path is not None else 0
    with open_source(server, index_dir, model_path, device, token_file, tls, tls_ca) as (source, name):
        samples = [s.as_input() for s in _valuation(_kept_schema(source), valuation_path, prompt, response, fields,
                                                    split=split)]
        if group_by is not None:
            grouped = source.group_by(samples, group_by, k=k, direction=direction, where=where)
        elif html_path is not None:  # the report shows both ends: one call (one forward pass) answers both
            results = {r.direction: r for _, r in source.top_k(samples, k, "both", rerank, explain=pairs, where=where)}
        else:
            results = {direction: source.search(samples, k=k, direction=direction, rerank=rerank, explain=pairs,
                                                where=where, scores=scores, exact_budget=exact_budget)}
    answered = grouped if group_by is not None else results[direction]
    if answered.cut_samples:
        click.echo(render.cut_warning(answered.cut_samples), err=True)
    if group_by is not None:
        click.echo(render.dumps(render.groups_json(grouped, name, len(samples))) if as_json
                   else render.groups_text(grouped, name))
        return
    result = results[direction]
    if html_path is not None:
        from forvalue.client.report import query_report, write_html

        texts = [s[:2] for s in samples]  # the report shows the texts (a VLM sample's image stays out)
        write_html(html_path, query_report(texts, [results["most"], results["least"]], name))
        click.echo(f"forvalue: wrote the report to {html_path}", err=True)
    if as_json:
        click.echo(render.dumps(render.hits_json(result, name, len(samples), explain)))
    elif render.use_color(color):
        click.echo(render.color_hits(result, name, len(samples), explain), color=True)
    else:
        click.echo(render.hits_text(result, name, len(samples), explain))


@main.command("rank", epilog="""\b
Examples:
  forvalue rank --index idx --valuation val.jsonl --out scores.jsonl --select 10% --selected-out best.jsonl
  forvalue rank --index idx --valuation example.jsonl --split test --out scores.parquet --lowest --select 20
  forvalue rank --server 127.0.0.1:50051 --valuation val.jsonl --out scores.jsonl --json""")
@server_option("A forvalue server whose index is ranked.")
@index_option("Or: an index directory, scored in-process.", required=False)
@model_option("With --index: the model the index was built with [default: SmolLM2-135M-Instruct].")
@click.option("--device", default="cpu", show_default=True, help="With --index: torch device for the forward pass.")
@click.option("--batch", type=click.IntRange(1), default=DEFAULT_SCORE_BATCH, show_default=True,
              help="Valuation samples per forward pass (--index) or per request (--server).")
@click.option("--valuation", "valuation_path", required=True,
              help="Valuation samples (JSONL, Parquet, *.hf); a training row's value is its mean score over them.")
@split_option
@click.option("--out", "out_path", required=True,
              help="Every training row's id, row, score, rank, percentile and selected flag, rank order: "
                   ".jsonl or .parquet.")
@click.option("--select", "select_spec", default=None,
              help="Select the best rows: a percentage of the rows (5%) or a count (500).")
@click.option("--per-label", is_flag=True,
              help="Value each training row against the valuation rows of its own label only, minus the mean of "
                   "that over the rows of its label: with --lowest, the rows least like their own class "
                   "(mislabelled-row detection). Needs a label on both sides (--data with --server).")
@click.option("--lowest", is_flag=True,
              help="Rank (and select) the lowest-valued rows first: noisy or mislabeled data detection.")
@click.option("--selected-out", "selected_out", default=None,
              help="With --select: write the selected training rows, rank order, as .jsonl in the training-data "
                   "format (what `forvalue index build --data` reads).")
@click.option("--data", "data_path", default=None,
              help="With --server: the training corpus the server's index was built from (rows matched by id), "
                   "for --selected-out and the texts of the rows the summary lists.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON summary object on stdout.")
@click.option("--html", "html_path", default=None, metavar="PATH",
              help="Also write a self-contained HTML report: a histogram of the values with the --select cut-off.")
@where_options
@color_option
@client_options
@field_options
@dtype_option
@progress_option
@handle_errors
def rank_cmd(server, index_dir, model_path, device, batch, valuation_path, split, out_path, select_spec, per_label,
             lowest, selected_out, data_path, as_json, html_path, where_items, color, token_file, tls, tls_ca, fields):
    """Value every training row for a valuation set; select the best rows (data selection) or, with --lowest,
    the worst (noisy data)."""
    from forvalue.indexer.selection import parse_select, scores_format

    server, index_dir = _one_source(server, index_dir)
    scores_format(out_path)
    if selected_out is not None:
        if select_spec is None:
            _fail("--selected-out needs --select (which rows to write), e.g. --select 5%")
        if os.path.splitext(selected_out)[1].lower() != ".jsonl":
            _fail(f"--selected-out {selected_out!r}: the selected rows are written as JSONL; name a .jsonl file")
        if os.path.abspath(selected_out) == os.path.abspath(out_path):
            _fail("--selected-out and --out name the same file; give each its own")
        if server is not None and data_path is None:
            _fail("--selected-out with --server needs --data TRAIN: the corpus the server's index was built from")
    if data_path is not None and server is None:
        _fail("--data is only read with --server (with --index the rows come from the index)")
    if per_label and server is not None and data_path is None:
        _fail("--per-label with --server needs --data TRAIN: the training rows' labels come from the corpus")
    inputs = {os.path.abspath(p) for p in (valuation_path, data_path) if p is not None}
    for option, path in (("--out", out_path), ("--selected-out", selected_out), ("--html", html_path)):
        if path is not None and os.path.abspath(path) in inputs:
            _fail(f"{option} {path!r} is an input of this command; write to another file")
    if html_path is not None and os.path.abspath(html_path) in {os.path.abspath(p) for p in (out_path, selected_out)
                                                                if p is not None}:
        _fail(f"--html {html_path!r} names an output of this command already; give the report its own file")
    if select_spec is not None:
        parse_select(select_spec, sys.maxsize)  # a malformed spec fails now; a count above n once n is known

    from forvalue.indexer.data import read_samples, sample_of_row

    with open_source(server, index_dir, model_path, device, token_file, tls, tls_ca) as (source, name):
        kept = _kept_schema(source)  # read once: from a server it is a call
        valuation = _valuation(kept, valuation_path, None, None, fields, require=("label",) if per_label else (),
                               split=split)
        samples = [s.as_input() for s in valuation]
        if data_path is not None:
            corpus_fields, schema = _data_options(fields, kept)
            corpus = {s.id: s for s in read_samples(data_path, corpus_fields, schema=schema)}
        else:
            corpus = None
        with _spinner(f"valuing every training row of the {name}"):
            if per_label:
                scores = _per_label_scores(source, valuation, corpus, _where(where_items), batch)
            else:
                scores = source.scores(samples, where=_where(where_items), batch=batch)
        ids = scores.ids
        chosen, order, ranks, percentiles = _rank_and_select(ids, scores.values, select_spec, lowest)
        shown = _shown_rows(source, scores, order, ranks, percentiles, corpus)
        if selected_out is None:
            subset = None
        elif corpus is not None:  # a server's rows: from the corpus it was built from
            subset = _corpus_rows(corpus, [ids[i] for i in chosen], data_path)
        else:  # the index's own stored rows
            subset = [sample_of_row(row) for row in source.version.rows([scores.rows[i] for i in chosen])]
    if scores.cut_samples:
        click.echo(render.cut_warning(scores.cut_samples), err=True)
    summary = _write_ranking(out_path, selected_out, ids, scores.values, chosen, order, ranks, percentiles, subset)
    summary = {"source": name, "version": scores.version, "n_valuation": len(samples), "n_scored": len(ids),
               "direction": "lowest" if lowest else "highest", **summary,
               "top": [shown[int(i)] for i in order[: render.RANK_TOP]]}
    if html_path is not None:
        from forvalue.client.report import rank_report, write_html

        write_html(html_path, rank_report(ids, scores.values, order, ranks, chosen, summary, details=shown))
        summary["html"] = str(html_path)
    if as_json:
        click.echo(render.dumps(summary))
        return
    text = render.rank_summary_text(summary)
    if render.use_color(color, err=True):
        click.echo(render.color_rank_summary(text), err=True, color=True)
    else:
        click.echo(text, err=True)


def _per_label_scores(source, valuation, corpus, where, batch):
    """`Scores` whose values are, per training row, its mean value to the valuation rows (Samples, labelled) of its
    own label minus the mean of that over the training rows of its label (rank --per-label;
    tools/noise_by_label.py measures it).

    Raises:
        DataError: a training label has no valuation row.
    """
    import dataclasses

    import numpy as np

    from forvalue.indexer.errors import DataError
    from forvalue.indexer.selection import centre_by_label

    groups: dict[str, list] = {}
    for s in valuation:
        groups.setdefault(s.label, []).append(s.as_input())
    by_label = {label: source.scores(group, where=where, batch=batch) for label, group in groups.items()}
    first = next(iter(by_label.values()))
    if corpus is not None:
        labels = [corpus[i].label if i in corpus else None for i in first.ids]
    else:
        labels = [row.get("label") for row in source.version.rows(first.rows)]
    missing = next((j for j, x in enumerate(labels) if x not in by_label), None)
    if missing is not None:
        raise DataError(f"training row {first.ids[missing]!r} has label {labels[missing]!r} but no valuation row "
                        "does; give every training label valuation rows, or leave --per-label out",
                        path=valuation[0].source or None)
    own = np.array([by_label[x].values[j] for j, x in enumerate(labels)])
    return dataclasses.replace(first, values=centre_by_label(own, labels), cosines=None)


def _valuation(kept, valuation_path, prompt, response, fields, require=(), split=None) -> list:
    """The valuation Samples of --valuation FILE [--split VALUE] (or --prompt/--response), read as the index reads
    its rows (`kept`, `_kept_schema`): its field names, template and turn scope."""
    from forvalue.indexer.data import flat_sample, load_valuation_set

    fields, schema = _data_options(fields, kept, queries=True)
    if valuation_path is None:
        return [flat_sample(prompt, response, schema)]
    return load_valuation_set(valuation_path, fields, require=require, schema=schema, split=split)


def _rank_and_select(ids, scores, select_spec, lowest):
    """(selected rows, best first; order; ranks; percentiles): see forvalue.indexer.selection."""
    from forvalue.indexer.selection import parse_select, rank_scores

    order, ranks, percentiles = rank_scores(ids, scores, lowest=lowest)
    k = parse_select(select_spec, len(ids)) if select_spec is not None else 0
    return order[:k], order, ranks, percentiles


def _shown_rows(source, scores, order, ranks, percentiles, corpus, show: int = 10) -> dict:
    """The rows `rank` reports (its first and last `show`, by position in scores.ids) as render.ranked_rows,
    with their text from the index's stored rows, or from the --data corpus (a server), else none."""
    which = sorted({int(i) for i in [*order[:show], *order[-show:]]})
    version = getattr(source, "version", None)  # an in-process Index; a client has none
    if corpus is not None:
        found = [corpus.get(scores.ids[i]) for i in which]
        md = [None if s is None else {"prompt": getattr(s, "prompt", ""), "response": getattr(s, "response", "")}
              for s in found]
    elif version is not None:
        md = version.rows([scores.rows[i] for i in which])
    else:
        md = [None] * len(which)
    texts = {i: render.snippet(m) for i, m in zip(which, md) if m is not None}
    rows = render.ranked_rows(scores.ids, scores.rows, scores.values, ranks, percentiles, scores.cosines, texts, which)
    return dict(zip(which, rows))


def _corpus_rows(corpus: dict, chosen_ids: list[str], data_path: str) -> list:
    """The --data rows of the chosen ids, in that order."""
    from forvalue.indexer.errors import DataError

    for i in chosen_ids:
        if i not in corpus:
            raise DataError(f"the server's training row {i!r} (selected) has no row with that id here; pass the "
                            "corpus the server's index was built from", path=str(data_path))
    return [corpus[i] for i in chosen_ids]


def _write_ranking(out_path, selected_out, ids, scores, chosen, order, ranks, percentiles, subset) -> dict:
    """Write --out (every row, rank order) and --selected-out; the summary's part about the selection."""
    import numpy as np

    from forvalue.indexer.data import write_jsonl
    from forvalue.indexer.selection import write_scores

    selected = np.zeros(len(ids), dtype=bool)
    selected[chosen] = True
    if subset is not None:  # first: a failure here leaves an existing --out as it was
        write_jsonl(selected_out, [s.original() for s in subset])  # the rows as read, for fine-tuning
    write_scores(out_path, [ids[i] for i in order], order, scores[order], ranks[order], percentiles[order],
                 selected[order])
    return {"n_selected": int(chosen.size), "cutoff_score": float(scores[chosen[-1]]) if chosen.size else None,
            "out": str(out_path), "selected_out": None if selected_out is None else str(selected_out)}


@main.command("example", epilog="""\b
Examples:
  forvalue example --out example.jsonl --noise 0.1
  forvalue example --out shapes.jsonl --vlm --classes 4
  forvalue example --out facts.jsonl --facts --people 50""")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--classes", type=click.IntRange(2), default=6, show_default=True,
              help="Classes (sentence transformations; with --vlm caption styles).")
@click.option("--train-per-class", type=click.IntRange(1), default=15, show_default=True,
              help="Training rows (split train) per class.")
@click.option("--test-per-class", type=click.IntRange(1), default=3, show_default=True,
              help="Valuation rows (split test) per class.")
@click.option("--noise", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of training rows given another transformation's response (clean=false).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated rows.")
@click.option("--vlm", is_flag=True,
              help="The image-to-text set instead: coloured shapes captioned in --classes styles (at most 6); "
                   "PNGs go to OUT's folder, in <stem>_images/. --noise then captions the wrong shape and colour.")
@click.option("--image-size", type=click.IntRange(16, 1024), default=64, show_default=True,
              help="With --vlm: side of the square images in pixels.")
@click.option("--facts", is_flag=True,
              help="The fact-tracing set instead (indexer/facts.py): statements of fictional people's facts, "
                   "distractors (negatives) and one question per fact (split test).")
@click.option("--people", type=click.IntRange(1), default=30, show_default=True,
              help="With --facts: fictional people.")
@click.option("--fields", type=click.IntRange(1), default=4, show_default=True,
              help="With --facts: facts per person (birthplace, employer, ...).")
@click.option("--templates", type=click.IntRange(1), default=4, show_default=True,
              help="With --facts: paraphrased statements per fact.")
@click.option("--distractors", type=click.IntRange(0), default=1, show_default=True,
              help="With --facts: distractor rows per fact (the same person and value in an unrelated relation; "
                   "negatives).")
@handle_errors
def example_cmd(out, classes, train_per_class, test_per_class, noise, seed, vlm, image_size, facts, people, fields,
                templates, distractors):
    """Write forvalue's own small labelled example dataset (sentence transformations; with --vlm coloured
    shapes with captions; with --facts fact tracing) as JSONL."""
    if facts:
        from forvalue.indexer.facts import write_facts_example

        try:
            n = write_facts_example(out, n_people=people, n_fields=fields, n_templates=templates,
                                    n_distractors=distractors, seed=seed)
        except ValueError as exc:  # the library's parameter names → the flags
            message = str(exc)
            for param, flag in (("n_people", "--people"), ("n_fields", "--fields"), ("n_templates", "--templates"),
                                ("n_distractors", "--distractors")):
                message = message.replace(param, flag)
            _fail(f"--facts: {message}")
        click.echo(f"wrote {n} rows to {out}", err=True)
        return
    if vlm:
        from forvalue.indexer.shapes import STYLES, write_shapes_example

        if classes > len(STYLES):
            _fail(f"--classes: the --vlm set has {len(STYLES)} caption styles, got {classes}")
        n = write_shapes_example(out, n_classes=classes, n_train_per_class=train_per_class,
                                 n_test_per_class=test_per_class, noise=noise, seed=seed, image_size=image_size)
        click.echo(f"wrote {n} rows to {out} (images in {os.path.splitext(out)[0]}_images/)", err=True)
        return
    from forvalue.indexer.examples import write_example

    n = write_example(out, n_classes=classes, n_train_per_class=train_per_class, n_test_per_class=test_per_class,
                      noise=noise, seed=seed)
    click.echo(f"wrote {n} rows to {out}", err=True)


_add_verbose_everywhere(main)

if __name__ == "__main__":
    main()
