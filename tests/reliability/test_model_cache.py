"""The converted-model cache is keyed by the whole GGUF file and every entry is checked against it (issue 18.3).

A GGUF with other weights in the middle (same size, same first and last MiB) used to get the cache entry of
the original and load its model, fingerprint included, so an index's model check passed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from forvalue.indexer import model as model_mod
from forvalue.indexer.errors import ModelError
from forvalue.indexer.model import gguf_cache_key, load_model

sys.path.insert(0, str(Path(__file__).parents[1] / "indexer"))
from test_model import write_tiny_gguf  # noqa: E402


def test_key_covers_every_byte(tmp_path):
    """Same size, same first and last MiB, one byte changed in the middle: another key."""
    data = bytearray(b"GGUF" + bytes(range(256)) * (5 * 4096))  # 5 MiB and a bit
    original, changed = tmp_path / "a.gguf", tmp_path / "b.gguf"
    original.write_bytes(bytes(data))
    data[len(data) // 2] ^= 0xFF
    changed.write_bytes(bytes(data))
    assert gguf_cache_key(changed) != gguf_cache_key(original)


def test_cache_entry_of_another_file_is_refused(tmp_path, monkeypatch):
    """An entry whose recorded source hash is not the file's is never loaded, and the error names it."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", seed=3)
    cache = tmp_path / "cache"
    first = load_model(path, cache_dir=cache)
    (entry,) = (cache / "models").iterdir()
    marker = entry / "forvalue_conversion.json"
    recorded = json.loads(marker.read_text())
    assert len(recorded["source_sha256"]) == 64
    recorded["source_sha256"] = "0" * 64
    marker.write_text(json.dumps(recorded))

    def refuse(gguf_path):
        raise AssertionError("the refused entry must not be replaced behind the caller's back")

    monkeypatch.setattr(model_mod, "_read_gguf", refuse)
    with pytest.raises(ModelError, match="another file") as info:
        load_model(path, cache_dir=cache)
    assert str(entry) in str(info.value) and "delete that directory" in str(info.value)
    assert first.fingerprint  # the first load (recorded hash right) worked
