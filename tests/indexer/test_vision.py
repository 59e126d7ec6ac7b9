"""Vision-language models: tiny Qwen2-VL, Qwen2.5-VL and LLaVA built from configs, images made with PIL.

The features of image-conditioned samples equal the model's own logits at the scored positions, do not
depend on batching or padding, feed the exact engine (checked against the brute-force reference), and go
through an index; images are validated with errors that name the file and row.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from forvalue.indexer.config import ScoreConfig
from forvalue.indexer.data import Sample, read_samples
from forvalue.indexer.errors import DataError, ModelError
from forvalue.indexer.features import ForwardConfig, Head
from forvalue.indexer.forward import extract_features
from forvalue.indexer.images import ImageRef, decode_image
from forvalue.indexer.score import reference_scores, scores
from forvalue.indexer.vision import family_of

from vlm_factories import make_image, make_llava, make_qwen2_vl, save_vlm

FAMILIES = {
    "qwen2_vl": lambda: make_qwen2_vl(seed=0),
    "qwen2_5_vl": lambda: make_qwen2_vl(seed=0, v25=True),
    "llava": lambda: make_llava(seed=0),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm64(request):
    """(family name, float64 model, processor)."""
    model, proc = FAMILIES[request.param]()
    return request.param, model.double(), proc


def vlm_samples() -> list[tuple]:
    """Image samples of different sizes, a text-only one (a VLM takes those too), and repeated texts."""
    return [
        ("What is in the picture?", " a red circle", ImageRef(data=make_image(0, (40, 48)))),
        ("Describe it.", " two blue squares", ImageRef(data=make_image(1, (64, 30)))),
        ("Say hi", " hi there"),
        ("What is in the picture?", " a red circle", ImageRef(data=make_image(2, (33, 33), fmt="JPEG"))),
        ("Colour?", " green", ImageRef(data=make_image(3, (56, 56)))),
    ]


def _reference(model, proc, sample, tokens):
    """Single-sample pass with the real lm_head: (logits, targets) at the scored positions."""
    enc = proc.encode(sample[0], sample[1], sample[2] if len(sample) > 2 else None, ForwardConfig(tokens=tokens))
    inputs = {"input_ids": torch.tensor([enc.ids]), **enc.pixels}
    if "mm_token_type_ids" in inspect.signature(type(model).forward).parameters:  # transformers >= 5
        inputs["mm_token_type_ids"] = (inputs["input_ids"] == proc.image_token_id).long()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    pos = torch.tensor(enc.positions)
    return logits[pos], torch.tensor(enc.ids)[pos + 1]


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_features_match_model_logits(vlm64, tokens):
    _, model, proc = vlm64
    samples = vlm_samples()
    f = extract_features(model, proc, samples, ForwardConfig(tokens=tokens, dtype=torch.float64))
    head = Head.from_model(model, torch.float64)
    assert f.n == len(samples)
    for j, s in enumerate(samples):
        logits, y = _reference(model, proc, s, tokens)
        a, b = int(f.offsets[j]), int(f.offsets[j + 1])
        torch.testing.assert_close(head.logits(f.h[a:b]), logits, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(f.lse[a:b], torch.logsumexp(logits, -1), atol=1e-9, rtol=1e-9)
        assert torch.equal(f.y[a:b], y)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scored_positions_never_image_tokens(family):
    _, proc = FAMILIES[family]()
    prompt, response, image = vlm_samples()[0]
    resp = proc.encode(prompt, response, image, ForwardConfig(tokens="response"))
    full = proc.encode(prompt, response, image, ForwardConfig(tokens="all"))
    n_resp = len(proc.tokenizer(response, add_special_tokens=False)["input_ids"])
    assert len(resp.positions) == n_resp + 1 and resp.ids[-1] == proc.tokenizer.eos_token_id
    assert resp.positions == list(range(len(resp.ids) - n_resp - 2, len(resp.ids) - 1))
    n_image = sum(t == proc.image_token_id for t in full.ids)
    assert n_image == proc.n_image_tokens(full.pixels) > 0
    assert proc.image_token_id in proc.marker_ids
    for p in full.positions:
        assert full.ids[p] not in proc.marker_ids and full.ids[p + 1] not in proc.marker_ids
    n_text_pairs = sum(full.ids[p] not in proc.marker_ids and full.ids[p + 1] not in proc.marker_ids
                       for p in range(len(full.ids) - 1))
    assert len(full.positions) == n_text_pairs and set(resp.positions) <= set(full.positions)


def test_processor_equals_transformers_processors():
    """Our composition gives the input ids and pixels of transformers' own processor classes."""
    import transformers.processing_utils as pu
    from transformers import LlavaProcessor, Qwen2VLProcessor

    prompt, response, image = vlm_samples()[0]
    img = image.load()
    model, proc = make_llava()
    ref = LlavaProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer,
                         chat_template=proc.chat_template, patch_size=7, vision_feature_select_strategy="default",
                         num_additional_image_tokens=1)
    _check_same_inputs(proc, ref, prompt, image, img)

    model, proc = make_qwen2_vl()
    # Qwen2VLProcessor insists on a video processor, which needs torchvision: skip that one check only
    orig = pu.ProcessorMixin.check_argument_for_proper_class
    try:
        pu.ProcessorMixin.check_argument_for_proper_class = lambda self, n, a: None if a is None else orig(self, n, a)
        ref = Qwen2VLProcessor(image_processor=proc.image_processor, tokenizer=proc.tokenizer, video_processor=None,
                               chat_template=proc.chat_template)
    finally:
        pu.ProcessorMixin.check_argument_for_proper_class = orig
    _check_same_inputs(proc, ref, prompt, image, img)


def _check_same_inputs(proc, ref, prompt, image, img):
    text = proc.render(prompt, image=True)
    assert text == ref.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": prompt}]}],
                                           add_generation_prompt=True, tokenize=False)
    want = ref(text=[text], images=[img], return_tensors="pt")
    enc = proc.encode(prompt, "x", image, ForwardConfig(add_eos=False))
    assert enc.ids[:-1] == want["input_ids"][0].tolist()
    torch.testing.assert_close(enc.pixels["pixel_values"], want["pixel_values"])
    if "image_grid_thw" in want:
        assert torch.equal(enc.pixels["image_grid_thw"], want["image_grid_thw"])


@pytest.mark.parametrize("padding_side, batch_tokens", [("left", 60), ("right", 100000)])
def test_independent_of_batching_and_padding(vlm64, padding_side, batch_tokens):
    _, model, proc = vlm64
    samples = vlm_samples()
    ref = extract_features(model, proc, samples, ForwardConfig(dtype=torch.float64, batch_tokens=1))
    got = extract_features(model, proc, samples, ForwardConfig(dtype=torch.float64, batch_tokens=batch_tokens,
                                                                padding_side=padding_side))
    torch.testing.assert_close(got.h, ref.h, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(got.lse, ref.lse, atol=1e-10, rtol=1e-10)
    assert torch.equal(got.y, ref.y) and torch.equal(got.offsets, ref.offsets)


def test_the_image_changes_the_features(vlm64):
    _, model, proc = vlm64
    a = ("What is in the picture?", " a red circle", ImageRef(data=make_image(0)))
    b = ("What is in the picture?", " a red circle", ImageRef(data=make_image(5)))
    f = extract_features(model, proc, [a, b], ForwardConfig(dtype=torch.float64))
    assert torch.equal(f.y[: f.lengths[0]], f.y[f.lengths[0]:])
    assert (f.h[: f.lengths[0]] - f.h[f.lengths[0]:]).abs().max() > 1e-3


@pytest.mark.parametrize("tokens", ["response", "all"])
def test_exact_engine_equals_brute_force_reference(vlm64, tokens):
    _, model, proc = vlm64
    samples = vlm_samples()
    cfg = ForwardConfig(tokens=tokens, dtype=torch.float64)
    fv = extract_features(model, proc, samples[:2], cfg)
    ft = extract_features(model, proc, samples, cfg)
    head = Head.from_model(model, torch.float64)
    want = reference_scores(fv, ft, head)
    for strategy in ("pairs", "gram"):
        got = scores(fv, ft, head, ScoreConfig(method="exact", strategy=strategy, memory_mb=16))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-7)


def test_truncation_cuts_the_response_and_refuses_a_prompt_too_long():
    _, proc = make_qwen2_vl()
    prompt, response, image = vlm_samples()[0]
    full = proc.encode(prompt, response, image, ForwardConfig())
    cut = proc.encode(prompt, response, image, ForwardConfig(max_length=len(full.ids) - 3))
    assert cut.truncated and cut.ids == full.ids[:-3] and len(cut.positions) == len(full.positions) - 3
    with pytest.raises(DataError, match="too many for max_length"):
        proc.encode(prompt, response, image, ForwardConfig(max_length=10))


def test_placeholder_in_the_text_is_refused():
    _, proc = make_qwen2_vl()
    with pytest.raises(DataError, match="image placeholder"):
        proc.encode("look <|image_pad|> here", " x", None, ForwardConfig())
    with pytest.raises(DataError, match="image placeholder"):
        proc.encode("look", " <|vision_end|>", ImageRef(data=make_image(0)), ForwardConfig())


def test_text_only_model_refuses_image_samples(model32, tokenizer, tmp_path):
    (tmp_path / "a.png").write_bytes(make_image(0))
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "p", "response": " r"}) + "\n"
                                      + json.dumps({"prompt": "p", "response": " r", "image": "a.png"}) + "\n")
    samples = read_samples(tmp_path / "d.jsonl")
    with pytest.raises(ModelError, match=r"d\.jsonl, row 1 has an image but the model is text-only"):
        extract_features(model32, tokenizer, [s.as_input() for s in samples], ForwardConfig())


# --------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_load_model_from_directory(family, tmp_path):
    from forvalue.indexer.model import load_model

    model, proc = FAMILIES[family]()
    d = save_vlm(model, proc, tmp_path / "m")
    lm = load_model(d)
    assert lm.accepts_images and lm.processor.family is proc.family and lm.preprocessor is lm.processor
    assert type(lm.model) is type(model)
    samples = vlm_samples()
    want = extract_features(model, proc, samples, ForwardConfig())
    got = extract_features(lm.model, lm.preprocessor, samples, ForwardConfig())
    torch.testing.assert_close(got.h, want.h, atol=1e-6, rtol=1e-6)
    assert torch.equal(got.y, want.y)
    # another image size gives other inputs: the fingerprint says so
    proc.image_processor.size = dict(proc.image_processor.size) | {"shortest_edge": 28 * 28 * 4}
    other = save_vlm(model, proc, tmp_path / "m2")
    lm2 = load_model(other)
    assert lm2.fingerprint == lm.fingerprint and lm2.tokenizer_fingerprint != lm.tokenizer_fingerprint


def test_unsupported_vlm_type_is_a_clear_error(tmp_path):
    from forvalue.indexer.model import load_model

    with pytest.raises(ModelError, match="'paligemma' is not supported; supported types: qwen2_vl"):
        family_of({"model_type": "paligemma", "vision_config": {}})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics2", "vision_config": {}}))
    with pytest.raises(ModelError, match="not supported"):
        load_model(tmp_path)
    assert family_of({"model_type": "llama"}) is None


# --------------------------------------------------------------------------------------------- images


def _write_rows(folder, rows, name="d.jsonl"):
    p = folder / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_read_samples_resolves_image_paths(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(make_image(0))
    absolute = tmp_path / "b.jpg"
    absolute.write_bytes(make_image(1, fmt="JPEG"))
    p = _write_rows(tmp_path, [{"prompt": "p", "response": " r", "image": "img/a.png"},
                               {"prompt": "p", "response": " r", "image": str(absolute)},
                               {"prompt": "p", "response": " r", "image": {"path": "img/a.png", "bytes": None}},
                               {"prompt": "p", "response": " r"}])
    s = read_samples(p)
    assert s[0].image == str(tmp_path / "img" / "a.png") and s[1].image == str(absolute)
    assert s[2].image == s[0].image and s[3].image is None and "image" not in s[0].meta
    assert s[0].to_dict()["image"] == s[0].image and "image" not in s[3].to_dict()
    ref = s[0].as_input()[2]
    assert isinstance(ref, ImageRef) and (ref.source, ref.row) == (str(p), 0) and len(s[3].as_input()) == 2


def test_read_samples_parquet_with_images(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.png").write_bytes(make_image(0))
    pq.write_table(pa.table({"prompt": ["p", "q"], "response": [" r", " s"], "image": ["a.png", None]}),
                   tmp_path / "d.parquet")
    s = read_samples(tmp_path / "d.parquet")
    assert s[0].image == str(tmp_path / "a.png") and s[1].image is None


@pytest.mark.parametrize("value, match", [
    ("missing.png", r"row 1: field 'image' image file 'missing.png' not found"),
    ("https://example.com/a.png", "is a URL"),
    ("notes.txt", "not a recognised image"),
    ("sub", "is not a file"),
    (7, "must be a path to an image file"),
    ({"bytes": "AAAA", "path": None}, "holds embedded image bytes, which are not supported"),
])
def test_bad_image_references_name_the_row(tmp_path, value, match):
    (tmp_path / "ok.png").write_bytes(make_image(0))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    p = _write_rows(tmp_path, [{"prompt": "p", "response": " r", "image": "ok.png"},
                               {"prompt": "p", "response": " r", "image": value}])
    with pytest.raises(DataError, match=match) as info:
        read_samples(p)
    assert info.value.row == 1 and info.value.path == str(p)


def test_corrupt_pixels_are_reported_with_the_row_in_the_forward_pass(tmp_path):
    good = make_image(0, (64, 64))
    (tmp_path / "bad.png").write_bytes(good[:300])  # a valid header, truncated pixel data
    p = _write_rows(tmp_path, [{"prompt": "p", "response": " r", "image": "bad.png"}])
    s = read_samples(p)  # the header is fine: accepted at read time
    model, proc = make_qwen2_vl()
    with pytest.raises(DataError, match=r"d\.jsonl, row 0: image '.*bad\.png': cannot be decoded"):
        extract_features(model, proc, [x.as_input() for x in s], ForwardConfig())


# --------------------------------------------------------------------------------------------- index


@pytest.fixture(scope="module")
def vlm_corpus(tmp_path_factory):
    """(samples, their folder): 16 training samples with images (two without), written as PNG files."""
    d = tmp_path_factory.mktemp("vlm-corpus")
    rows = []
    for i in range(16):
        row = {"id": f"t{i}", "prompt": ["Describe it.", "What colour?"][i % 2],
               "response": [" a red circle", " blue", " a green square", " yellow star"][i % 4],
               "label": ["a", "b"][i % 2]}
        if i not in (3, 10):
            (d / f"{i}.png").write_bytes(make_image(i, (28 + i, 40)))
            row["image"] = f"{i}.png"
        rows.append(row)
    return read_samples(_write_rows(d, rows)), d


@pytest.fixture(scope="module")
def vlm_model_dir(tmp_path_factory):
    return save_vlm(*make_qwen2_vl(seed=1), tmp_path_factory.mktemp("tiny-vlm"))


@pytest.fixture(scope="module")
def vlm_index(tmp_path_factory, vlm_corpus, vlm_model_dir):
    from forvalue.indexer.build import build_index
    from forvalue.indexer.config import BuildConfig, SketchConfig
    from forvalue.indexer.index import Index
    from forvalue.indexer.model import load_model

    lm = load_model(vlm_model_dir)
    root = tmp_path_factory.mktemp("vlm-index")
    cfg = BuildConfig(sketch=SketchConfig(rank=2, buckets=16, fit_samples=8), shard_size=6)
    build_index(str(root), vlm_corpus[0], lm, cfg)
    return str(root), Index.open(str(root), lm)


def test_index_round_trip_with_images(vlm_index, vlm_corpus):
    from forvalue.indexer.images import file_sha256
    from forvalue.indexer.score import exact_scores

    root, index = vlm_index
    samples = vlm_corpus[0]
    assert index.accepts_images and index.manifest["model"]["vision"] == "qwen2_vl"
    rows = index.version.rows(range(index.n))
    assert rows[0]["image"] == samples[0].image and rows[0]["image_sha256"] == file_sha256(samples[0].image)
    assert "image" not in rows[3]
    query = [("Describe it.", " a red circle", ImageRef(data=make_image(99)))]
    res = index.search(query, k=5, rerank=16)
    lm = index.lm
    fq = extract_features(lm.model, lm.preprocessor, query, index.forward)
    ft = extract_features(lm.model, lm.preprocessor, [s.as_input() for s in samples], index.forward)
    exact = exact_scores(fq, ft, Head.from_model(lm.model)).mean(0)
    want = torch.argsort(exact, descending=True, stable=True)[:5]
    assert [h.id for h in res.hits] == [samples[i].id for i in want.tolist()]
    torch.testing.assert_close(torch.tensor([h.score for h in res.hits]), exact[want], rtol=1e-4, atol=1e-4)


def test_text_only_model_cannot_index_images(vlm_corpus, served_lm, tmp_path):
    from forvalue.indexer.build import build_index

    with pytest.raises(ModelError, match="row 0 has an image but the model .* is text-only"):
        build_index(str(tmp_path / "idx"), vlm_corpus[0], served_lm)


def test_changed_image_changes_the_build_key(vlm_corpus, tmp_path):
    import dataclasses

    from forvalue.indexer.build import corpus_fingerprint

    samples, d = vlm_corpus
    (tmp_path / "x.png").write_bytes(make_image(50))
    moved = [dataclasses.replace(samples[0], image=str(tmp_path / "x.png"))] + samples[1:]
    text_only = [Sample(id="a", prompt="p", response=" r")]
    assert corpus_fingerprint(moved) != corpus_fingerprint(samples)
    assert corpus_fingerprint(text_only) == corpus_fingerprint([dataclasses.replace(text_only[0])])


# --------------------------------------------------------------------------------------------- the service


@pytest.fixture(scope="module")
def vlm_server(vlm_index, vlm_model_dir):
    from forvalue.server.config import ServerConfig

    from serving import ServerThread

    srv = ServerThread(ServerConfig(index_dir=vlm_index[0], model_path=vlm_model_dir, k_cap=20))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_grpc_round_trip_with_images(vlm_server, vlm_index, vlm_corpus, tmp_path):
    from forvalue.client.client import InfluenceClient

    _, index = vlm_index
    path = tmp_path / "q.png"
    path.write_bytes(make_image(99))
    queries = [("Describe it.", " a red circle", ImageRef(data=make_image(99))),
               ("What colour?", " blue", str(path)),  # a path: the client sends the file's bytes
               ("What colour?", " blue")]
    with InfluenceClient(vlm_server.address, timeout=60) as c:
        for q in queries:
            remote = c.search([q], k=4, rerank=16)
            local = index.search([q], k=4, rerank=16)
            assert [h.id for h in remote.hits] == [h.id for h in local.hits]
            torch.testing.assert_close(torch.tensor([h.score for h in remote.hits]),
                                       torch.tensor([h.score for h in local.hits]), rtol=1e-5, atol=1e-5)
        assert remote.hits[0].metadata.get("image") == local.hits[0].metadata.get("image")
        # a path and the bytes of the same image give the same answer
        by_bytes = c.search([("What colour?", " blue", ImageRef(data=make_image(99)))], k=4, rerank=16)
        assert [(h.id, h.score) for h in by_bytes.hits] == [(h.id, h.score) for h in
                                                           c.search([queries[1]], k=4, rerank=16).hits]
        ids, got = c.score_all([queries[0]])
        want = index.score_matrix(index.encode([queries[0]])).mean(0)
        torch.testing.assert_close(torch.tensor(got), want.double(), rtol=1e-5, atol=1e-4)


def _raw_topk(address, sample):
    import grpc

    from forvalue.server.protocol import pb, pb_grpc

    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.InfluenceStub(ch)
        try:
            stub.TopK(pb.TopKRequest(samples=[sample], k=3), timeout=60)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("image, mime, field, match", [
    (b"not an image", "image/png", "samples[0].image", "not a recognised image"),
    ("jpeg", "image/png", "samples[0].image", "declared as image/png but the content is JPEG"),
    ("png", "image/svg+xml", "samples[0].image_mime_type", "not supported"),
    ("png", "", "samples[0].image_mime_type", "required with an image"),
])
def test_bad_images_are_invalid_argument(vlm_server, image, mime, field, match):
    import grpc

    from forvalue.server.protocol import pb

    data = {"png": make_image(0), "jpeg": make_image(0, fmt="JPEG")}.get(image, image)
    code, details = _raw_topk(vlm_server.address, pb.ValuationSample(prompt="p", response=" r", image=data,
                                                                     image_mime_type=mime))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field) and match in details


def test_text_only_server_refuses_images(influence_server):
    import grpc

    from forvalue.server.protocol import pb

    code, details = _raw_topk(influence_server.address, pb.ValuationSample(
        prompt="p", response=" r", image=make_image(0), image_mime_type="image/png"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "text-only" in details


# --------------------------------------------------------------------------------------------- example + CLI


def test_shapes_dataset(tmp_path):
    from forvalue.indexer.shapes import STYLES, make_shapes_dataset, write_shapes_example

    a = make_shapes_dataset(n_classes=3, n_train_per_class=4, n_test_per_class=2, noise=0.5, seed=3, image_size=32)
    b = make_shapes_dataset(n_classes=3, n_train_per_class=4, n_test_per_class=2, noise=0.5, seed=3, image_size=32)
    assert [r for r, _ in a] == [r for r, _ in b]
    assert all(x.tobytes() == y.tobytes() for (_, x), (_, y) in zip(a, b))
    train = [r for r, _ in a if r["split"] == "train"]
    assert len(train) == 12 and sum(not r["clean"] for r in train) == 6
    for r in train:
        said = STYLES[[s.label for s in STYLES].index(r["label"])].caption(r["shape"], r["color"])
        assert (r["response"] == said) == r["clean"]
    n = write_shapes_example(tmp_path / "shapes.jsonl", n_classes=2, n_train_per_class=2, n_test_per_class=1,
                             image_size=32)
    samples = read_samples(tmp_path / "shapes.jsonl")
    assert n == len(samples) == 6 and all(s.image.startswith(str(tmp_path / "shapes_images")) for s in samples)
    assert decode_image(open(samples[0].image, "rb").read()).size == (32, 32)


def test_cli_example_and_eval_with_a_tiny_vlm(tmp_path, vlm_model_dir):
    from click.testing import CliRunner

    from forvalue.client.cli import main

    data = tmp_path / "d" / "shapes.jsonl"
    r = CliRunner().invoke(main, ["example", "--vlm", "--out", str(data), "--classes", "3", "--train-per-class",
                                  "4", "--test-per-class", "1", "--noise", "0.5", "--image-size", "32"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["eval", str(data), "--model", vlm_model_dir, "--json", "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["n_train"] == 12 and rep["n_valuation"] == 3 and 0 <= rep["auc_mean"] <= 1 and "clean_auc" in rep
    r = CliRunner().invoke(main, ["example", "--vlm", "--out", str(data), "--classes", "7"])
    assert r.exit_code == 2 and "6 caption styles" in r.output
