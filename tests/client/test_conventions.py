"""The CLI's conventions (issue 16): one index option, examples and help everywhere, a human build summary,
progress only on a terminal, environment defaults, -v after the command, --split, --wait, errors for people."""

from __future__ import annotations

import io
import json
import logging
import shutil
import threading

import click
import pytest
from click.testing import CliRunner

from forvalue.client import progress
from forvalue.client.cli import EXIT_UNREACHABLE, main
from forvalue.indexer.data import write_jsonl

from serving import ServerThread, corpus, server_config

PROMPT, RESPONSE = "Reverse: red cat sun ->", " sun cat red"
INDEX_COMMANDS = ("index build", "index add", "index info", "index gc", "index delete", "query", "rank", "eval",
                  "serve")


def run(*args, env=None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def commands(group: click.Group = main, path: str = "forvalue"):
    """(full name, command) of the group and of every command under it."""
    yield path, group
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from commands(cmd, f"{path} {name}")
        else:
            yield f"{path} {name}", cmd


def test_every_command_has_examples_and_every_option_help():
    missing = []
    for name, cmd in commands():
        text = cmd.get_help(click.Context(cmd, info_name=name))
        if "Examples:" not in text or text.split("Examples:")[-1].count("forvalue ") < 2:
            missing.append(f"{name}: no Examples")
        missing += [f"{name} {'/'.join(p.opts)}: no help" for p in cmd.params
                    if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert not missing, missing


def test_one_spelling_of_the_index_everywhere():
    found = {name.removeprefix("forvalue "): cmd for name, cmd in commands()}
    for name in INDEX_COMMANDS:
        options = [p for p in found[name].params if isinstance(p, click.Option) and "--index" in p.opts]
        assert len(options) == 1 and "-i" in options[0].opts and options[0].name == "index_dir", name
        assert not [p for p in found[name].params if isinstance(p, click.Argument) and "index" in p.name
                    and p.required], name


def test_verbose_and_environment_are_shown_in_help():
    assert "FORVALUE_INDEX" in run("query", "--help").output
    assert "FORVALUE_MODEL" in run("rank", "--help").output and "FORVALUE_SERVER" in run("rank", "--help").output
    for name, cmd in commands():
        assert any("--verbose" in p.opts and "-v" in p.opts for p in cmd.params), name


@pytest.fixture(scope="module")
def index_copy(tmp_path_factory, served_index):
    root = tmp_path_factory.mktemp("conventions") / "idx"
    shutil.copytree(served_index[0], root)
    return str(root)


def test_old_spellings_still_work_with_a_warning(index_copy, served_model_dir, tmp_path):
    new = run("index", "info", "--index", index_copy)
    old = run("index", "info", index_copy)
    assert old.exit_code == 0 and json.loads(old.stdout) == json.loads(new.stdout)
    assert "deprecated" in old.stderr and "--index" in old.stderr
    r = run("index", "info", index_copy, "--index", str(tmp_path))
    assert r.exit_code == 2 and "different directories" in r.stderr
    r = run("index", "gc", str(tmp_path / "nothing"), "--keep", "1")
    assert r.exit_code == 2 and "no such index directory" in r.stderr  # the positional still reaches gc
    r = run("index", "info")
    assert r.exit_code == 2 and "--index DIR" in r.stderr and "FORVALUE_INDEX" in r.stderr
    data = tmp_path / "train.jsonl"
    write_jsonl(data, corpus(6, seed=3, prefix="b"))
    r = run("index", "build", "--data", str(data), "--out", str(tmp_path / "built"), "--model", served_model_dir,
            "--dim", "64", "--rank", "4", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_samples"] == 6 and "--out is deprecated" in r.stderr


def test_build_and_add_print_a_summary_or_json(served_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    write_jsonl(data, corpus(8, seed=4, prefix="s"))
    more = tmp_path / "more.jsonl"
    write_jsonl(more, corpus(3, seed=5, prefix="m"))
    idx = str(tmp_path / "idx")
    r = run("index", "build", "--data", str(data), "-i", idx, "--model", served_model_dir, "--dim", "64",
            "--rank", "4")
    assert r.exit_code == 0, r.output
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.stdout)
    lines = r.stdout.strip().splitlines()
    assert 2 <= len(lines) <= 4 and "version v000001" in lines[0] and "8 rows" in lines[0], r.stdout
    assert "built in" in lines[0] and "exact search" in r.stdout
    r = run("index", "add", "-i", idx, "--data", str(more), "--model", served_model_dir)
    assert r.exit_code == 0 and "version v000002" in r.stdout and "11 rows, from v000001" in r.stdout, r.output
    write_jsonl(more, corpus(2, seed=6, prefix="n"))
    r = run("index", "add", "-i", idx, "--data", str(more), "--model", served_model_dir, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["version"] == "v000003"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_spinner_draws_on_a_terminal_and_erases_itself():
    out = _Terminal()
    with progress.spinner("loading the model", True, stream=out, interval=0.01):
        threading.Event().wait(0.05)
    text = out.getvalue()
    assert "loading the model" in text and text.endswith("\r") and text.split("\r")[-2].strip() == ""
    quiet = _Terminal()
    with progress.spinner("loading the model", False, stream=quiet):
        pass
    assert quiet.getvalue() == ""


def test_progress_only_on_a_terminal_and_never_with_json(sources, monkeypatch):
    args = ["query", *sources["index"], "--prompt", PROMPT, "--response", RESPONSE, "-k", "2"]
    assert "loading the model" not in run(*args).stderr  # CliRunner's stderr is no terminal
    monkeypatch.setattr(progress, "stderr_is_tty", lambda: True)
    assert "loading the model" in run(*args).stderr
    for flag in ("--json", "--no-progress"):
        r = run(*args, flag)
        assert r.exit_code == 0 and "loading the model" not in r.stderr, flag


def test_environment_defaults_and_the_command_line_wins(sources, served_index, served_model_dir, local_index):
    want = [h.id for h in local_index.search([(PROMPT, RESPONSE)], k=3).hits]
    env = {"FORVALUE_INDEX": served_index[0], "FORVALUE_MODEL": served_model_dir}
    r = run("query", "--prompt", PROMPT, "--response", RESPONSE, "-k", "3", "--json", env=env)
    assert r.exit_code == 0, r.output
    assert [h["id"] for h in json.loads(r.stdout)["hits"]] == want
    # --server on the command line beats FORVALUE_INDEX, --index beats FORVALUE_SERVER
    for args, env in ((sources["server"], env),
                      (sources["index"], {"FORVALUE_SERVER": "127.0.0.1:1"})):
        r = run("query", *args, "--prompt", PROMPT, "--response", RESPONSE, "-k", "3", "--json", env=env)
        assert r.exit_code == 0 and [h["id"] for h in json.loads(r.stdout)["hits"]] == want, r.output
    r = run("query", "--response", RESPONSE, env={"FORVALUE_INDEX": "a", "FORVALUE_SERVER": "b:1"})
    assert r.exit_code == 2 and "exactly one of --server" in r.stderr


def test_verbose_after_the_command(index_copy):
    root = logging.getLogger()
    before = root.level
    try:
        root.setLevel(logging.WARNING)
        assert run("index", "info", "--index", index_copy).exit_code == 0
        assert root.level == logging.WARNING
        assert run("index", "info", "--index", index_copy, "-v").exit_code == 0
        assert root.level == logging.INFO
    finally:
        root.setLevel(before)


@pytest.fixture()
def labelled(tmp_path):
    """A labelled file: two rows of split test, one of split train (the one valuation sample of --split train)."""
    rows = [{"prompt": "Upper: cat ->", "response": " CAT", "split": "test"},
            {"prompt": PROMPT, "response": RESPONSE, "split": "train"},
            {"prompt": "Upper: sun ->", "response": " SUN", "split": "validation"}]
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("where", ["index", "server"])
def test_split_selects_the_valuation_rows(sources, local_index, labelled, where, tmp_path):
    r = run("query", *sources[where], "--valuation", labelled, "--split", "train", "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["n_queries"] == 1
    assert [h["id"] for h in out["hits"]] == [h.id for h in local_index.search([(PROMPT, RESPONSE)], k=3).hits]
    for split in (["--split", "test"], []):  # test (validation is its alias), also the default
        r = run("rank", *sources[where], "--valuation", labelled, *split, "--out", str(tmp_path / "s.jsonl"),
                "--json")
        assert r.exit_code == 0 and json.loads(r.stdout)["n_valuation"] == 2, r.output
    r = run("rank", *sources[where], "--valuation", labelled, "--split", "train", "--out", str(tmp_path / "s.jsonl"),
            "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["n_valuation"] == 1, r.output
    write_jsonl(tmp_path / "unsplit.jsonl", corpus(2, seed=8, prefix="t"))
    r = run("query", *sources[where], "--valuation", str(tmp_path / "unsplit.jsonl"), "--split", "test")
    assert r.exit_code == 2 and "no valuation rows (split test)" in r.stderr, r.output
    r = run("query", *sources[where], "--response", RESPONSE, "--split", "train")
    assert r.exit_code == 2 and "--split selects rows of --valuation" in r.stderr


@pytest.mark.parametrize("address,wait", [("127.0.0.1:1", "0"), ("127.0.0.1:1", "0.5"),
                                          ("nosuchhost.invalid:1", "0")])
def test_an_unreachable_server_is_one_human_line_exit_3(address, wait):
    r = CliRunner().invoke(main, ["query", "--server", address, "--response", RESPONSE, "--wait", wait])
    assert r.exit_code == EXIT_UNREACHABLE, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot reach forvalue server at {address}" in lines[0], r.stderr
    assert "forvalue serve" in lines[0] and "UNAVAILABLE" not in lines[0] and "grpc" not in lines[0].lower()
    assert ("after 0.5 s" in lines[0]) == (wait == "0.5")


def test_a_starting_server_is_waited_for(served_index, local_index):
    release = threading.Event()

    def slow_load():
        assert release.wait(60), "the test never released the load"
        return local_index

    srv = ServerThread(server_config(served_index, reflection=False), load=slow_load)
    try:
        args = ["query", "--server", srv.address, "--prompt", PROMPT, "--response", RESPONSE, "-k", "2", "--json"]
        r = CliRunner().invoke(main, [*args, "--wait", "0.5"])  # loading all along: gives up, says why
        assert r.exit_code == EXIT_UNREACHABLE and "still loading its model and index" in r.stderr, r.output
        threading.Timer(1.0, release.set).start()
        r = CliRunner().invoke(main, [*args, "--wait", "60"])
        assert r.exit_code == 0, r.output
        assert len(json.loads(r.stdout)["hits"]) == 2
    finally:
        release.set()
        srv.stop()


def test_a_missing_column_names_the_flag_not_the_class(served_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "p", "response": " r"}) + "\n")
    r = run("index", "build", "--data", str(data), "-i", str(tmp_path / "i"), "--model", served_model_dir)
    assert r.exit_code == 2, r.output
    assert "--prompt-field" in r.stderr and "FieldMap" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_a_model_mismatch_of_index_add_shows_no_raw_dict(index_copy, tmp_path):
    import factories

    other = tmp_path / "other-model"
    factories.make_model(seed=98).save_pretrained(other)
    factories.make_tokenizer().save_pretrained(other)
    data = tmp_path / "new.jsonl"
    write_jsonl(data, corpus(2, seed=6, prefix="x"))
    r = run("index", "add", "-i", index_copy, "--data", str(data), "--model", str(other))
    assert r.exit_code == 2, r.output
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "--model" in line, line
    assert "{" not in line and "}" not in line and "'name'" not in line, line


def test_warnings_are_the_cli_s_own_lines():
    import logging

    from forvalue.client.cli import _CliFormatter

    fmt = _CliFormatter("%(levelname)s %(name)s: %(message)s")

    def line(name, level):
        return fmt.format(logging.LogRecord(name, level, __file__, 1, "skipped %d row(s)", (3,), None))

    assert line("forvalue.indexer.data", logging.WARNING) == "forvalue: warning: skipped 3 row(s)"
    assert line("forvalue.indexer.build", logging.INFO) == "INFO forvalue.indexer.build: skipped 3 row(s)"
    assert line("transformers", logging.WARNING) == "WARNING transformers: skipped 3 row(s)"
