"""tools/train_tiny_vlm.py: the tiny VLM's loss and greedy decoding against simple references, its training
lowers the loss, and the tool prints its report (toy sizes: seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import train_tiny_vlm as tool  # noqa: E402

TOY = tool.Settings(hidden=32, layers=1, heads=2, vision_dim=32, vision_depth=1, train_rows=48, heldout_rows=6,
                    steps=30, batch=8, warmup=2, lr=1e-2)
TOY_ARGS = ["--hidden", "32", "--layers", "1", "--heads", "2", "--vision-dim", "32", "--vision-depth", "1",
            "--train-rows", "24", "--heldout-rows", "6", "--steps", "4", "--batch", "4", "--warmup", "1",
            "--eval-train-per-class", "2", "--eval-test-per-class", "1", "--log-every", "0"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small run fastest on one thread (and the tool's main sets one): restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    model, proc = tool.build_model(TOY)
    rows = tool.shapes_rows(12, 1000, 64)
    return model, proc, rows, tool.encode_rows(proc, rows)


def test_tokenizer_keeps_shape_and_colour_as_tokens_and_round_trips():
    tok = tool.make_tokenizer()
    text = " The picture shows a purple triangle on a plain background."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert " purple" in tok.convert_ids_to_tokens(ids) and " triangle" in tok.convert_ids_to_tokens(ids)
    assert tok.decode(tok("zebra?", add_special_tokens=False)["input_ids"]) == "zebra?"  # unseen text still reads


def test_batch_loss_equals_per_sample_reference(toy):
    model, proc, _, enc = toy
    batch = enc[:5]  # different styles: different lengths, so padding is exercised
    assert len({len(e.ids) for e in batch}) > 1
    with torch.no_grad():
        got = tool.batch_loss(model, proc, batch)
        total = n = 0
        for e in batch:
            logits = model(**tool.model_inputs(model, proc, [e.ids], [e.pixels])).logits[0]
            for p in e.positions:
                total += -torch.log_softmax(logits[p].float(), -1)[e.ids[p + 1]]
                n += 1
    torch.testing.assert_close(got, total / n, rtol=1e-5, atol=1e-5)


def test_batched_greedy_decoding_equals_one_by_one():
    model, proc = tool.build_model(TOY)
    torch.manual_seed(1)
    for p in model.parameters():  # large random weights: captions that differ from row to row and stop early
        p.data.normal_(0, 0.5)
    enc = tool.encode_rows(proc, tool.shapes_rows(12, 1000, 64))
    together = tool.greedy_captions(model, proc, enc, max_new=6, batch=5)
    alone = [tool.greedy_captions(model, proc, [e], max_new=6)[0] for e in enc]
    assert together == alone
    assert len(set(alone)) > 3


def test_caption_scores_by_hand():
    rows = [{"label": "short", "response": " a red circle", "shape": "circle", "color": "red"},
            {"label": "tags", "response": " #blue #cross", "shape": "cross", "color": "blue"},
            {"label": "short", "response": " a green square", "shape": "square", "color": "green"}]
    r = tool.caption_scores(rows, [" a red circle", " #red #cross", " a green"])
    assert (r["caption_accuracy"], r["shape_accuracy"], r["colour_accuracy"]) == (1 / 3, 2 / 3, 1 / 3)


def test_training_lowers_the_loss(toy):
    model, proc, _, enc = toy
    before = [p.detach().clone() for p in model.parameters()]
    losses = tool.train(model, proc, enc * 4, TOY)
    assert len(losses) == TOY.steps
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert not model.training
    for b, p in zip(before, model.parameters()):  # the fixture's model is trained in place: restore it
        p.data.copy_(b)


def test_token_kinds():
    kinds = [tool.token_kind(t, False) for t in (" circle", "#red", "cross", " The", '"', " colour")]
    assert kinds == ["shape", "colour", "shape", "format", "format", "format"]
    assert tool.token_kind("<|im_end|>", True) == "eos"


def test_settings_are_checked():
    with pytest.raises(ValueError, match="steps"):
        tool.Settings(steps=0)
    with pytest.raises(ValueError, match="heads"):
        tool.Settings(hidden=30, heads=4)


def test_tool_prints_its_report_and_reuses_the_trained_model(tmp_path, capsys):
    report = tool.main(TOY_ARGS + ["--out", str(tmp_path)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(json.dumps(report))
    for key in ("caption_accuracy", "shape_accuracy", "colour_accuracy", "clean_auc", "auc", "recall", "noisy_auc",
                "noisy_recall", "train_seconds", "untrained_clean_auc", "gnorm_clean_auc", "cosine_clean_auc",
                "loss_first", "loss_last", "parameters", "value_shape_clean", "value_shape_flipped"):
        assert key in report, key
    assert 0 <= report["caption_accuracy"] <= 1 and 0 <= report["clean_auc"] <= 1
    assert report["n_train"] == 12 and report["n_valuation"] == 6 and report["n_heldout"] == 6
    model_dir = Path(report["model_dir"])
    assert (model_dir / "config.json").exists() and (model_dir / "preprocessor_config.json").exists()
    again = tool.main(TOY_ARGS + ["--out", str(tmp_path)])  # cached by the settings' hash: not trained again
    assert again["train_seconds"] == report["train_seconds"] and again["clean_auc"] == report["clean_auc"]
