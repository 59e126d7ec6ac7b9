"""Train a tiny Qwen2-VL-type model on the shapes set until it reads the images; then value the flipped captions.

No real VLM weights can be had here (no downloads), and a randomly initialised VLM cannot see: its clean_auc
on the 50%-flipped shapes set is chance. This tool gives issue 17's VLM line a model that can see:

1. builds a tiny Qwen2-VL from a config (a word-piece tokenizer learnt from the set's texts, holding Qwen's
   special tokens and chat template; the PIL image processor: 64 px images → 56 px → 16 patches of 14 px → 4
   image tokens with the default --patch 14);
2. trains it (AdamW, fixed steps, seeded, one CPU thread by default) on shapes rows generated with other seeds
   than the evaluated set's (seed 0), on the positions forvalue scores: the response tokens and the EOS after
   them, each sample encoded by forvalue's own `VisionProcessor.encode`, so training and valuation see the
   same inputs;
3. measures its caption accuracy on held-out rows of yet another seed: greedy decoding, exact match of the
   whole caption; shape and colour accuracy read from the decoded caption (chance: 1/30, 1/5, 1/6);
4. saves model and processor with save_pretrained under out/tiny-vlm/<hash of the settings>/model (a second
   run with the same settings loads it instead of training), and the same model at its initialisation
   beside it (untrained/, the control);
5. writes the shapes sets with `forvalue example --vlm` (clean, and --noise 0.5) and runs `forvalue eval
   FILE --model DIR --tokens response --method exact --json` on them, for the trained and the untrained model.

Prints one JSON object: caption_accuracy, shape_accuracy, colour_accuracy, their chance levels, auc and
recall (clean set), noisy_auc, noisy_recall and clean_auc (flipped set), gnorm_clean_auc and cosine_clean_auc
(the flipped rows told apart by ‖G_i‖ alone, and by the unit-normalised mean value), value_<kind>_clean and
value_<kind>_flipped (the mean value split over the training rows' shape, colour, format and EOS tokens), the
untrained model's numbers, sizes, steps, losses and train_seconds.

    .venv/bin/python tools/train_tiny_vlm.py --json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
VERSION = "tiny-vlm-v1"  # bump when the training recipe changes: old cached models are then not reused

TRAIN_SEED_OFFSET = 1000  # training rows: make_shapes_dataset(seed=1000 + seed); the evaluated set is seed 0
HELDOUT_SEED_OFFSET = 2000  # held-out rows for the caption accuracy

BASE = ["<pad>", "<s>", "</s>", "<unk>"]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class Settings:
    """What decides the trained model (hashed into its cache directory)."""

    seed: int = 0
    hidden: int = 64  # text hidden size = the vision merger's output size
    layers: int = 3  # text decoder layers
    heads: int = 4
    vision_dim: int = 64  # vision tower width
    vision_depth: int = 2  # vision tower blocks
    patch: int = 14  # vision patch side in pixels; 2 x 2 patches merge into one image token
    train_rows: int = 3000  # generated training rows (seed 1000 + seed), split evenly over the 6 styles
    heldout_rows: int = 300  # held-out rows for the caption accuracy (seed 2000 + seed)
    steps: int = 2000
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 100
    image_size: int = 64  # the example's default: `forvalue example --vlm` draws 64 px images

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "vision_dim", "vision_depth", "patch", "train_rows",
                     "heldout_rows", "steps", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden % (2 * self.heads) or self.vision_dim % 2:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of 2 x heads ({self.heads}) and "
                             f"vision_dim ({self.vision_dim}) even")
        if not self.lr > 0 or self.warmup < 0:
            raise ValueError(f"lr must be > 0 and warmup >= 0, got {self.lr} and {self.warmup}")

    def key(self) -> str:
        blob = json.dumps({"version": VERSION, **dataclasses.asdict(self)}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ model


def make_tokenizer():
    """A word-piece tokenizer for the shapes set: BPE over printable ASCII and newline, its merges learnt
    (deterministically) from the style prompts, every caption of every style and the chat template's role
    names, so each word of the set is one token (a sequence is ~35 tokens, not ~100 characters); Qwen's special
    tokens are atomic. Any other text still tokenises, character by character."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from forvalue.indexer.shapes import COLOURS, SHAPES, STYLES

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # words keep their leading space, so the shape and colour of a caption are tokens of their own
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r" ?[A-Za-z]+| ?[0-9]+| ?[^A-Za-z0-9 ]| "), behavior="isolated")
    tok.decoder = decoders.Fuse()
    texts = ["user\n", "assistant\n"] + [st.prompt for st in STYLES]
    texts += [st.caption(s, c) for st in STYLES for s in SHAPES for c in COLOURS]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, min_frequency=1, special_tokens=BASE,
                                                       initial_alphabet=chars, show_progress=False))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>")


def build_model(s: Settings):
    """(model, processor): a Qwen2-VL of the settings' sizes at its (seeded) initialisation, and forvalue's
    `VisionProcessor` for it."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from forvalue.indexer.vision import QWEN2_VL, VisionProcessor

    tok = make_tokenizer()
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(QWEN_SPECIALS)))
    half = s.hidden // s.heads // 2  # rotary frequencies per head, split over (time, height, width)
    section = [half - 2 * (half // 4), half // 4, half // 4]
    text = dict(vocab_size=len(tok), hidden_size=s.hidden, intermediate_size=4 * s.hidden, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=s.heads, max_position_embeddings=1024,
                pad_token_id=0, bos_token_id=1, eos_token_id=ids["<|im_end|>"], tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0})
    vision = dict(depth=s.vision_depth, embed_dim=s.vision_dim, hidden_size=s.hidden, num_heads=2, mlp_ratio=2,
                  patch_size=s.patch, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(s.seed)
    model = Qwen2VLForConditionalGeneration(cfg)
    factor = 2 * s.patch  # Qwen2-VL resizes images to multiples of patch x merge
    side = max(factor, (s.image_size // factor) * factor)
    ip = Qwen2VLImageProcessorPil(min_pixels=factor**2, max_pixels=side**2, patch_size=s.patch,
                                  temporal_patch_size=2, merge_size=2)
    return model, VisionProcessor(QWEN2_VL, tok, ip, QWEN_TEMPLATE, model.config)


# ------------------------------------------------------------------------------------------------ data


def shapes_rows(n: int, seed: int, image_size: int) -> list[tuple[dict, bytes]]:
    """n clean shapes rows (rounded up to a multiple of the 6 styles) of `seed`, each with its PNG bytes."""
    from forvalue.indexer.shapes import STYLES, make_shapes_dataset

    per = -(-n // len(STYLES))
    out = []
    for row, img in make_shapes_dataset(len(STYLES), per, 1, 0.0, seed, image_size):
        if row["split"] == "train":
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out.append((row, buf.getvalue()))
    return out


def encode_rows(processor, rows: list[tuple[dict, bytes]]) -> list:
    """Each row as forvalue encodes it for valuation (`VisionEncoded`: ids, scored positions, pixels)."""
    from forvalue.indexer.features import ForwardConfig
    from forvalue.indexer.images import ImageRef

    fwd = ForwardConfig(tokens="response")
    return [processor.encode(r["prompt"], r["response"], ImageRef(data=png), fwd) for r, png in rows]


def model_inputs(model, processor, seqs: list[list[int]], pixels: list[dict], left: bool = False) -> dict:
    """Padded input ids, mask and the images' tensors of a batch (as `vision.forward_batch` builds them)."""
    from forvalue.indexer.vision import _forward_params

    n = max(len(x) for x in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, x in enumerate(seqs):
        sl = slice(n - len(x), n) if left else slice(0, len(x))
        ids[i, sl] = torch.tensor(x)
        mask[i, sl] = 1
    inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    for key in pixels[0]:
        inputs[key] = torch.cat([p[key] for p in pixels])
    if "mm_token_type_ids" in _forward_params(type(model)):
        inputs["mm_token_type_ids"] = (ids == processor.image_token_id).long()
    for module in (model, getattr(model, "model", None)):  # generation state: not carried between batches
        if module is not None and getattr(module, "rope_deltas", None) is not None:
            module.rope_deltas = None
    return inputs


def batch_loss(model, processor, batch: list) -> torch.Tensor:
    """Mean cross-entropy over the scored positions (response tokens and EOS) of `batch` (`VisionEncoded`s)."""
    inputs = model_inputs(model, processor, [e.ids for e in batch], [e.pixels for e in batch])
    logits = model(**inputs).logits
    rows = torch.cat([torch.full((len(e.positions),), i) for i, e in enumerate(batch)])
    cols = torch.cat([torch.tensor(e.positions) for e in batch])
    targets = torch.cat([torch.tensor([e.ids[p + 1] for p in e.positions]) for e in batch])
    return torch.nn.functional.cross_entropy(logits[rows, cols].float(), targets)


# ------------------------------------------------------------------------------------------------ train


def train(model, processor, encoded: list, s: Settings, log_every: int = 0) -> list[float]:
    """Trains `model` in place for s.steps AdamW steps (linear warm-up, cosine decay to 10%) on batches of
    s.batch rows drawn without replacement, epoch by epoch, in a seeded order. Returns the loss of each step."""
    g = torch.Generator().manual_seed(s.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def rate(step: int) -> float:
        if step < s.warmup:
            return (step + 1) / s.warmup
        t = (step - s.warmup) / max(1, s.steps - s.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    model.train()
    order: list[int] = []
    losses = []
    for step in range(s.steps):
        if len(order) < s.batch:
            order += torch.randperm(len(encoded), generator=g).tolist()
        batch, order = [encoded[i] for i in order[: s.batch]], order[s.batch :]
        loss = batch_loss(model, processor, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{s.steps} loss {sum(losses[-log_every:]) / log_every:.4f}", file=sys.stderr)
    model.eval()
    return losses


# ------------------------------------------------------------------------------------------------ accuracy


@torch.no_grad()
def greedy_captions(model, processor, encoded: list, max_new: int, batch: int = 64) -> list[str]:
    """Greedy-decoded response of each encoded row, from its prompt and image (stops at EOS)."""
    eos = processor.eos_token_id
    out = []
    for a in range(0, len(encoded), batch):
        chunk = encoded[a : a + batch]
        seqs = [e.ids[: e.positions[0] + 1] for e in chunk]  # the prompt: up to the first scored position
        new: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        for _ in range(max_new):
            inputs = model_inputs(model, processor, seqs, [e.pixels for e in chunk], left=True)
            nxt = model(**inputs).logits[:, -1].argmax(-1).tolist()
            for i, t in enumerate(nxt):
                if not done[i]:
                    if t == eos:
                        done[i] = True
                    else:
                        new[i].append(t)
                seqs[i] = seqs[i] + [t]
            if all(done):
                break
        out += [processor.tokenizer.decode(x) for x in new]
    return out


def caption_scores(rows: list[dict], captions: list[str]) -> dict:
    """Exact-match caption accuracy and the shape / colour accuracy of the decoded captions, read by matching
    each caption against the style's caption of every (shape, colour)."""
    from forvalue.indexer.shapes import COLOURS, SHAPES, STYLES

    styles = {st.label: st for st in STYLES}
    exact = shape = colour = 0
    for row, got in zip(rows, captions, strict=True):
        st = styles[row["label"]]
        said = {st.caption(s, c): (s, c) for s in SHAPES for c in COLOURS}.get(got)
        exact += got == row["response"]
        shape += said is not None and said[0] == row["shape"]
        colour += said is not None and said[1] == row["color"]
    n = len(rows)
    return {"caption_accuracy": exact / n, "shape_accuracy": shape / n, "colour_accuracy": colour / n,
            "chance_caption_accuracy": 1 / (len(SHAPES) * len(COLOURS)), "chance_shape_accuracy": 1 / len(SHAPES),
            "chance_colour_accuracy": 1 / len(COLOURS), "n_heldout": n}


# ------------------------------------------------------------------------------------------------ eval


def forvalue_cli(args: list[str]) -> str:
    """Runs the `forvalue` command in this process (same torch thread setting) and returns its stdout."""
    from forvalue.client.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main.main(args=args, prog_name="forvalue", standalone_mode=False)
    return buf.getvalue()


def eval_sets(folder: Path, train_per_class: int, test_per_class: int) -> dict[str, Path]:
    """The clean and the 50%-flipped shapes sets (`forvalue example --vlm`, seed 0), written once into `folder`."""
    out = {}
    for name, noise in (("clean", "0"), ("flipped", "0.5")):
        path = folder / f"shapes-{name}-{train_per_class}-{test_per_class}.jsonl"
        if not path.exists():
            forvalue_cli(["example", "--vlm", "--out", str(path), "--noise", noise, "--train-per-class",
                          str(train_per_class), "--test-per-class", str(test_per_class)])
        out[name] = path
    return out


def eval_model(model_dir: Path, sets: dict[str, Path]) -> dict:
    """`forvalue eval --tokens response --method exact --json` on the clean and flipped sets."""
    r = {}
    for name, path in sets.items():
        r[name] = json.loads(forvalue_cli(["eval", str(path), "--model", str(model_dir), "--tokens", "response",
                                           "--method", "exact", "--json"]))
    c, f = r["clean"], r["flipped"]
    return {"auc": c["auc_mean"], "auc_std": c["auc_std"], "recall": c["recall_mean"], "recall_std": c["recall_std"],
            "noisy_auc": f["auc_mean"], "noisy_auc_std": f["auc_std"], "noisy_recall": f["recall_mean"],
            "noisy_recall_std": f["recall_std"], "clean_auc": f["clean_auc"],
            "clean_share_top10": f["clean_share_top10"], "n_train": f["n_train"], "n_valuation": f["n_valuation"]}


def token_kind(token: str, eos: bool) -> str:
    """What a caption token is: "shape", "colour" (what only the image tells), "eos" or "format"."""
    from forvalue.indexer.shapes import COLOURS, SHAPES

    word = token.strip().strip('#"')
    return "eos" if eos else "shape" if word in SHAPES else "colour" if word in COLOURS else "format"


def flipped_analysis(model_dir: Path, path: Path) -> dict:
    """Where the flipped set's mean values come from, and whether ‖G_i‖ alone tells the flipped rows apart.

    v_i = mean_v S(v, i) = <Ḡ, G_i> with Ḡ = mean_v G_v (|V| × d, small here) splits over the training
    row's positions k: c_k = (Ḡ h_k)[y_k] − π_k · (Ḡ h_k); summed per token kind (token_kind) and averaged
    over clean and over flipped rows. Also the clean_auc of −‖G_i‖ (exact, `score.g_norms`: a flipped
    caption surprises a model that sees the image, so its G is large) and of the unit-normalised mean value
    v_i / ‖G_i‖ (issue 17's cosine variant; the query's norm does not change a ranking).
    """
    from forvalue.indexer.config import ScoreConfig
    from forvalue.indexer.data import load_eval_sets
    from forvalue.indexer.evaluate import value_matrix
    from forvalue.indexer.features import ForwardConfig, Head
    from forvalue.indexer.forward import extract_features
    from forvalue.indexer.metrics import auc
    from forvalue.indexer.model import load_model
    from forvalue.indexer.score import g_norms, reference_G

    lm = load_model(model_dir)
    valuation, train = load_eval_sets(path)
    fwd = ForwardConfig(tokens="response", dtype=torch.float64)
    S, _ = value_matrix(lm, valuation, train, fwd, ScoreConfig(method="exact"))
    head = Head.from_model(lm.model, fwd.dtype)
    fv = extract_features(lm.model, lm.preprocessor, [x.as_input() for x in valuation], fwd, head)
    ft = extract_features(lm.model, lm.preprocessor, [x.as_input() for x in train], fwd, head)
    v = S.double().mean(0)
    norm = g_norms(ft, head)
    clean = torch.tensor([x.clean is not False for x in train])
    a = ft.h @ reference_G(fv, head).mean(0).T  # (T, |V|): Ḡ h_k
    c = a[torch.arange(len(ft.y)), ft.y] - (torch.softmax(head.logits(ft.h), -1) * a).sum(-1)
    tok = lm.preprocessor.tokenizer
    kinds = [token_kind(tok.convert_ids_to_tokens(int(y)), int(y) == tok.eos_token_id) for y in ft.y]
    per = {k: torch.zeros(ft.n, dtype=torch.float64) for k in ("shape", "colour", "eos", "format")}
    for j in range(ft.n):
        for p in range(int(ft.offsets[j]), int(ft.offsets[j + 1])):
            per[kinds[p]][j] += c[p]
    assert torch.allclose(sum(per.values()), v, rtol=1e-6, atol=1e-6), "the split does not add up to the value"
    out = {"gnorm_clean_auc": auc((-norm).numpy(), clean.numpy()),
           "cosine_clean_auc": auc((v / norm.clamp(min=1e-12)).numpy(), clean.numpy()),
           "gnorm_clean_mean": float(norm[clean].mean()), "gnorm_flipped_mean": float(norm[~clean].mean())}
    for k, x in per.items():
        out[f"value_{k}_clean"], out[f"value_{k}_flipped"] = float(x[clean].mean()), float(x[~clean].mean())
    return out


# ------------------------------------------------------------------------------------------------ main


def save(model, processor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def run(s: Settings, out: Path, eval_train_per_class: int = 15, eval_test_per_class: int = 3,
        log_every: int = 0) -> dict:
    """Trains (or loads from the cache) the model of `s`, measures it and returns the report."""
    root = out / s.key()
    model_dir, untrained_dir, result_file = root / "model", root / "untrained", root / "train.json"
    if result_file.exists():
        trained = json.loads(result_file.read_text())
    else:
        model, processor = build_model(s)
        save(model, processor, untrained_dir)
        t0 = time.perf_counter()
        encoded = encode_rows(processor, shapes_rows(s.train_rows, TRAIN_SEED_OFFSET + s.seed, s.image_size))
        encode_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        losses = train(model, processor, encoded, s, log_every)
        train_seconds = time.perf_counter() - t0
        held = shapes_rows(s.heldout_rows, HELDOUT_SEED_OFFSET + s.seed, s.image_size)
        held_enc = encode_rows(processor, held)
        max_new = max(len(e.positions) for e in encoded) + 4
        t0 = time.perf_counter()
        captions = greedy_captions(model, processor, held_enc, max_new)
        tail = max(1, s.steps // 20)
        trained = {**caption_scores([r for r, _ in held], captions), "decode_seconds": time.perf_counter() - t0,
                   "examples": [{"response": r["response"], "decoded": c} for (r, _), c in zip(held[:6], captions)],
                   "loss_first": sum(losses[:tail]) / tail, "loss_last": sum(losses[-tail:]) / tail,
                   "train_seconds": train_seconds, "encode_seconds": encode_seconds,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "vision_parameters": sum(p.numel() for n, p in model.named_parameters() if "visual" in n),
                   "n_train_rows": len(encoded), "image_tokens": processor.n_image_tokens(encoded[0].pixels)}
        save(model, processor, model_dir)
        result_file.write_text(json.dumps(trained, indent=2) + "\n")
    sets = eval_sets(out / "data", eval_train_per_class, eval_test_per_class)
    report = {"settings": dataclasses.asdict(s), "model_dir": str(model_dir), **trained,
              **eval_model(model_dir, sets)}
    report.update(flipped_analysis(model_dir, sets["flipped"]))
    untrained = {**eval_model(untrained_dir, sets), **flipped_analysis(untrained_dir, sets["flipped"])}
    report.update({f"untrained_{k}": untrained[k] for k in ("auc", "recall", "noisy_auc", "noisy_recall",
                                                           "clean_auc", "clean_share_top10", "gnorm_clean_auc",
                                                           "cosine_clean_auc")})
    report["threads"] = torch.get_num_threads()
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = Settings()
    for f in dataclasses.fields(Settings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(d, f.name)), default=getattr(d, f.name))
    p.add_argument("--out", default=str(ROOT / "out" / "tiny-vlm"), help="Cache folder (models by settings hash).")
    p.add_argument("--eval-train-per-class", type=int, default=15, help="`forvalue example` training rows per class.")
    p.add_argument("--eval-test-per-class", type=int, default=3, help="`forvalue example` valuation rows per class.")
    p.add_argument("--threads", type=int, default=1, help="torch threads.")
    p.add_argument("--log-every", type=int, default=100, help="Print the mean loss every N steps on stderr (0: never).")
    p.add_argument("--json", action="store_true", help="Print the JSON object only (it is printed either way).")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    s = Settings(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Settings)})
    report = run(s, Path(a.out), a.eval_train_per_class, a.eval_test_per_class, a.log_every)
    print(json.dumps(report, sort_keys=True))
    return report


if __name__ == "__main__":
    main()
