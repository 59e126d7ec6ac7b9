"""The `forvalue` command line: a thin click group over the library.

Heavy imports (torch, transformers) happen inside the commands so `forvalue --help` is instant. Every
forvalue error (bad data, bad model path, bad option) becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time

import click

EXIT_USAGE = 2


def _fail(message: str) -> None:
    click.echo(f"forvalue: error: {message}", err=True)
    sys.exit(EXIT_USAGE)


def handle_errors(fn):
    """Maps forvalue's own errors (and unreadable files) to a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from forvalue.indexer.errors import ForValueError

        try:
            return fn(*args, **kwargs)
        except ForValueError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))

    return wrapper


def _fields(prompt: str, response: str, label: str, split: str, clean: str, id_: str):
    from forvalue.indexer.data import FieldMap

    return FieldMap(prompt=prompt, response=response, label=label, split=split, clean=clean, id=id_)


def field_options(fn):
    """--prompt-field ... --id-field: the column names of the input rows."""
    opts = [
        click.option("--id-field", "id_field", default="id", show_default=True, help="Column with the sample id."),
        click.option("--clean-field", default="clean", show_default=True, help="Column with the clean flag."),
        click.option("--split-field", default="split", show_default=True, help="Column with train|test."),
        click.option("--label-field", default="label", show_default=True, help="Column with the class label."),
        click.option("--response-field", default="response", show_default=True, help="Column with the response."),
        click.option("--prompt-field", default="prompt", show_default=True, help="Column with the prompt."),
    ]
    for opt in opts:
        fn = opt(fn)
    return fn


def model_options(fn):
    opts = [
        click.option("--device", default="cpu", show_default=True, help="torch device for the forward pass."),
        click.option("--batch-tokens", type=click.IntRange(1), default=4096, show_default=True,
                     help="Padded tokens per forward batch."),
        click.option("--max-length", type=click.IntRange(2), default=2048, show_default=True,
                     help="Longest token sequence; longer samples lose prompt tokens from the left."),
        click.option("--tokens", type=click.Choice(["response", "all"]), default="response", show_default=True,
                     help="Scored positions: the response (+EOS), or every position of prompt + response."),
        click.option("--model", "model_path", default=None,
                     help="Local Hugging Face model directory or .gguf file [default: SmolLM2-135M-Instruct]."),
    ]
    for opt in opts:
        fn = opt(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="forvalue")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def main(verbose: bool) -> None:
    """forvalue: which training samples drove this output? (For-Value, forward-only data valuation)"""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # transformers' per-load "Loading weights" bars are noise here; forvalue shows its own progress
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@main.command("eval")
@click.argument("data")
@click.option("--train", "train_path", default=None, help="Training file, when DATA holds the valuation rows only.")
@model_options
@click.option("--method", type=click.Choice(["exact", "inbatch", "shared", "emb"]), default="exact", show_default=True,
              help="exact: full vocabulary; inbatch: the paper's in-batch vocabulary; shared: one fixed vocabulary "
                   "(training targets); emb: the Emb baseline (alpha = 1).")
@click.option("--memory-mb", type=click.IntRange(16), default=1024, show_default=True,
              help="Working-memory budget of the scoring step.")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr.")
@field_options
@handle_errors
def eval_cmd(data, train_path, model_path, tokens, max_length, batch_tokens, device, method, memory_mb, as_json,
             no_progress, prompt_field, response_field, label_field, split_field, clean_field, id_field):
    """Evaluate For-Value on labelled data: AUC and Recall of same-label training rows.

    DATA is a JSONL/Parquet file with prompt, response, label and split (train|test) per row; or a
    valuation file with --train TRAIN; or a DataInf prefix such as ../shared/eval/datainf/grammars
    (reads grammars_train.hf and grammars_test.hf).
    """
    from forvalue.indexer.data import load_eval_sets
    from forvalue.indexer.evaluate import run_eval
    from forvalue.indexer.forward import ForwardConfig
    from forvalue.indexer.model import load_model
    from forvalue.indexer.score import ScoreConfig

    fields = _fields(prompt_field, response_field, label_field, split_field, clean_field, id_field)
    fwd = ForwardConfig(tokens=tokens, max_length=max_length, batch_tokens=batch_tokens)
    score = ScoreConfig(method=method, memory_mb=memory_mb)
    valuation, train = load_eval_sets(data, train_path, fields)
    t0 = time.perf_counter()
    lm = load_model(model_path, device=device)
    load_seconds = time.perf_counter() - t0
    result = run_eval(lm, valuation, train, fwd, score, progress=not no_progress)
    report = {"data": str(data), **result.report, "load_seconds": load_seconds}
    if as_json:
        click.echo(json.dumps(_jsonable(report), sort_keys=True))
        return
    click.echo(_format_report(report))


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def _format_report(r: dict) -> str:
    def f(x):
        return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.3f}"

    lines = [
        f"data        {r['data']}",
        f"model       {r['model']}   tokens={r['tokens']}   method={r['method']}",
        f"samples     {r['n_valuation']} valuation x {r['n_train']} training",
        f"AUC         {f(r['auc_mean'])} ± {f(r['auc_std'])}   (over {r['n_rows_scored']} valuation rows)",
        f"Recall      {f(r['recall_mean'])} ± {f(r['recall_std'])}",
    ]
    if "clean_auc" in r:
        lines.append(f"clean AUC   {f(r['clean_auc'])}   clean share in top 10%: {f(r['clean_share_top10'])}")
    lines.append(
        f"time        {r['seconds']:.1f} s (load {r['load_seconds']:.1f} s, forward {r['forward_seconds']:.1f} s, "
        f"scores {r['score_seconds']:.1f} s)   peak memory {r['peak_memory_mb']:.0f} MiB"
    )
    return "\n".join(lines)


@main.command("example")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL file to write.")
@click.option("--classes", type=click.IntRange(2), default=6, show_default=True)
@click.option("--train-per-class", type=click.IntRange(1), default=15, show_default=True)
@click.option("--test-per-class", type=click.IntRange(1), default=3, show_default=True)
@click.option("--noise", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Share of training rows given another transformation's response (clean=false).")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def example_cmd(out, classes, train_per_class, test_per_class, noise, seed):
    """Write forvalue's own small labelled example dataset (sentence transformations) as JSONL."""
    from forvalue.indexer.examples import write_example

    n = write_example(out, n_classes=classes, n_train_per_class=train_per_class, n_test_per_class=test_per_class,
                      noise=noise, seed=seed)
    click.echo(f"wrote {n} rows to {out}", err=True)


if __name__ == "__main__":
    main()
