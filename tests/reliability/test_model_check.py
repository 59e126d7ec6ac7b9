"""`index add` checks the model by its fingerprints, not by the path it was given (issue 18.10).

The index was built with the model at an absolute path; `index add --model <the same directory, relative>` used
to be refused because the path strings differed. A real mismatch is refused with one line naming the field that
differs and what to pass, never a raw dict.
"""

from __future__ import annotations

import os
import shutil

from click.testing import CliRunner

import factories
from forvalue.client.cli import main
from forvalue.indexer.data import write_jsonl
from forvalue.indexer.store import IndexRoot

from serving import corpus


def _add(root, data, model) -> object:
    return CliRunner().invoke(main, ["index", "add", "--index", str(root), "--data", str(data), "--model", model,
                                     "--no-progress"])


def test_same_model_by_another_path_is_accepted(tmp_path, served_index, served_model_dir, monkeypatch):
    root = tmp_path / "index"
    shutil.copytree(served_index[0], root)
    before = IndexRoot(root).current()
    assert IndexRoot(root).load(verify=False).manifest["model"]["name"] == served_model_dir  # absolute
    new = tmp_path / "new.jsonl"
    write_jsonl(new, corpus(3, seed=5, prefix="n"))
    monkeypatch.chdir(os.path.dirname(served_model_dir))
    r = _add(root, new, os.path.basename(served_model_dir))
    assert r.exit_code == 0, r.output
    assert IndexRoot(root).current() != before
    assert IndexRoot(root).load(verify=False).manifest["n_samples"] == 39


def test_another_model_is_refused_naming_the_field(tmp_path, served_index, served_model_dir):
    root = tmp_path / "index"
    shutil.copytree(served_index[0], root)
    before = IndexRoot(root).current()
    other = tmp_path / "other-model"
    factories.make_model(seed=99).save_pretrained(other)
    factories.make_tokenizer().save_pretrained(other)
    new = tmp_path / "new.jsonl"
    write_jsonl(new, corpus(3, seed=5, prefix="n"))
    r = _add(root, new, str(other))
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("forvalue: error:")]
    assert len(errors) == 1, r.output
    message = errors[0]
    assert "model.fingerprint" in message and f"--model {served_model_dir}" in message, message
    assert "{" not in message and "'name'" not in message, message  # no raw dict
    assert IndexRoot(root).current() == before
