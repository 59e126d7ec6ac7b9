"""Protobuf ↔ domain objects for the influence service, and validation of requests.

Server side: `topk_query` / `score_all_query` validate a request against the `ServerConfig` limits and
return plain queries, raising `InvalidRequestError` naming the offending field; `topk_response`,
`score_chunks` and `info_response` turn library results into messages. Client side: `samples_to_pb`,
`direction_to_pb`, `search_result`, `info_dict` turn them back into the in-process types
(`forvalue.indexer.index.Hit` / `SearchResult`).

The training sample's prompt and response travel in their own Hit fields (truncatable); its other stored
fields go in `metadata` as a google.protobuf.Struct, whose numbers are doubles: integral values come back
as Python ints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from google.protobuf import json_format

from forvalue.indexer.data import Sample
from forvalue.indexer.errors import ConfigError, InvalidRequestError, ResourceExhaustedError
from forvalue.indexer.filters import Where, check_field
from forvalue.indexer.formats import ROLES, Chat
from forvalue.indexer.results import (
    DEFAULT_EXACT_BUDGET, Explanation, Group, GroupedResult, Hit, PairContribution, SearchResult, TokenContribution,
    check_direction, check_scores, index_info,
)

from .config import ServerConfig
from .protocol import pb

_DIRECTIONS = {pb.DIRECTION_UNSPECIFIED: ("most",), pb.MOST: ("most",), pb.LEAST: ("least",),
               pb.BOTH: ("most", "least")}
_TO_PB = {"most": pb.MOST, "least": pb.LEAST, "both": pb.BOTH}
_FROM_PB = {pb.MOST: "most", pb.LEAST: "least"}
_SCORES = {pb.SCORES_UNSPECIFIED: "exact", pb.EXACT: "exact", pb.CERTIFIED: "certified"}
_SCORES_TO_PB = {"exact": pb.EXACT, "certified": pb.CERTIFIED}
_OWN_FIELDS = ("id", "prompt", "response")  # Hit fields of their own, not repeated in metadata


@dataclass(frozen=True)
class TopKQuery:
    """A validated TopK request.

    Attributes:
        samples: (prompt, response) pairs, or (prompt, response, vision.ImageRef) for a VLM index.
        k: answers per direction. directions: ("most",), ("least",) or both. rerank: first-stage
        candidates scored exactly (>= k). group: one answer for the mean of the samples, or one per sample.
        max_text_chars: truncation of returned texts, 0 = none.
        explain_pairs: top token pairs of the Explanation attached to every hit; 0 = no explanation.
        where: metadata filter (empty: every row). group_by: metadata field to aggregate by ("" = none;
        then k is the top rows kept per group).
        scores: "exact" or "certified" (hits with certified score intervals, `Index.search`).
        exact_budget: with "certified": candidates at most scored exactly to tighten the intervals.
    """

    samples: list[tuple[str, str]]
    k: int
    directions: tuple[str, ...]
    rerank: int
    group: bool
    max_text_chars: int
    explain_pairs: int = 0
    where: Where = Where()
    group_by: str = ""
    scores: str = "exact"
    exact_budget: int = DEFAULT_EXACT_BUDGET


@dataclass(frozen=True)
class ScoreAllQuery:
    samples: list[tuple[str, str]]
    chunk_size: int
    where: Where = Where()


def where_from_pb(items: Sequence[pb.FieldFilter], name: str = "where") -> Where:
    """A validated filter from FieldFilter messages.

    Raises:
        InvalidRequestError: naming `where[i].field` or `where[i].values` (no field, a text field, no
            values, a value that is not a string, number or bool).
    """
    pairs = []
    for i, f in enumerate(items):
        try:
            check_field(f.field, f"{name}[{i}].field")
        except ConfigError as exc:
            raise InvalidRequestError(f"{name}[{i}].field", str(exc).split(": ", 1)[-1]) from None
        if not f.values:
            raise InvalidRequestError(f"{name}[{i}].values", f"give at least one value for field {f.field!r}")
        for j, v in enumerate(f.values):
            kind = v.WhichOneof("kind")
            if kind not in ("string_value", "number_value", "bool_value"):
                raise InvalidRequestError(f"{name}[{i}].values[{j}]", f"must be a string, number or bool, got {kind}")
            pairs.append((f.field, getattr(v, kind)))
    return Where.of(pairs)


def where_to_pb(where: Where | None) -> list[pb.FieldFilter]:
    """Client side: a Where as FieldFilter messages (values as their canonical strings)."""
    if not where:
        return []
    out = []
    for field, values in where.terms:
        msg = pb.FieldFilter(field=field)
        for v in values:
            msg.values.add().string_value = v
        out.append(msg)
    return out


def _samples(items: Sequence[pb.ValuationSample], config: ServerConfig, accepts_images: bool
             ) -> list[tuple[str, str]]:
    if not items:
        raise InvalidRequestError("samples", "at least one valuation sample is needed")
    if len(items) > config.max_samples:
        raise InvalidRequestError("samples", f"at most {config.max_samples} per request, got {len(items)}")
    out = []
    for i, s in enumerate(items):
        if not s.response.strip() and not s.messages:
            raise InvalidRequestError(f"samples[{i}].response", "must not be empty or whitespace only")
        for name in ("prompt", "response"):
            n = len(getattr(s, name))
            if n > config.max_sample_chars:
                raise InvalidRequestError(f"samples[{i}].{name}", f"at most {config.max_sample_chars} characters "
                                          f"(the server's --max-sample-chars), got {n}")
        if s.image and not accepts_images:
            raise InvalidRequestError(f"samples[{i}].image", "this index is text-only; send no image")
        if s.image and not s.image_mime_type:
            raise InvalidRequestError(f"samples[{i}].image_mime_type", "required with an image")
        if s.image_mime_type and not s.image:
            raise InvalidRequestError(f"samples[{i}].image_mime_type", "set without an image")
        if s.messages:
            out.append((s.prompt, s.response, _chat(s, i, config)))
        elif s.image:  # decoded here, so that a bad image is the caller's INVALID_ARGUMENT, not a failed batch
            out.append((s.prompt, s.response, _image(s, f"samples[{i}].image")))
        else:
            out.append((s.prompt, s.response))
    return out


def _chat(s: pb.ValuationSample, i: int, config: ServerConfig):
    """The sample's conversation as a `formats.Chat`, after checking roles, sizes and the scored turns."""
    if s.image:
        raise InvalidRequestError(f"samples[{i}].image", "a conversation cannot carry an image yet; send one or the "
                                                         "other")
    total = 0
    for j, m in enumerate(s.messages):
        if m.role not in ROLES:
            raise InvalidRequestError(f"samples[{i}].messages[{j}].role", f"{m.role!r} is not one of {', '.join(ROLES)}")
        total += len(m.content)
    if total > config.max_sample_chars:
        raise InvalidRequestError(f"samples[{i}].messages", f"at most {config.max_sample_chars} characters in all "
                                  f"(the server's --max-sample-chars), got {total}")
    chat = Chat(tuple((m.role, m.content) for m in s.messages), tuple(s.scored_turns))
    try:
        chat.check()
    except ValueError as exc:
        raise InvalidRequestError(f"samples[{i}].scored_turns", str(exc)) from exc
    return chat


def _image(s: pb.ValuationSample, name: str):
    """The sample's image as a `vision.ImageRef`, after checking its type, size and pixels."""
    from forvalue.indexer.images import MIME_TYPES, ImageRef, decode_image

    if s.image_mime_type.lower() not in MIME_TYPES:
        raise InvalidRequestError(f"{name}_mime_type", f"{s.image_mime_type!r} is not supported; use one of "
                                                       f"{', '.join(sorted(MIME_TYPES))}")
    data = bytes(s.image)
    decode_image(data, s.image_mime_type, lambda message: InvalidRequestError(name, message))
    return ImageRef(data=data, mime_type=s.image_mime_type, source=name)


# token estimates (no tokenizer on the event loop): they size batches and price requests, never the forward pass
CHARS_PER_TOKEN = 4  # English text under a BPE tokenizer
IMAGE_TOKENS = 256  # a typical image's placeholder tokens in a VLM prompt


def estimate_tokens(samples: list[tuple]) -> int:
    """A cheap estimate of the tokens of (prompt, response[, image]) samples: ⌈characters / 4⌉ + 1 (EOS) per
    sample, plus IMAGE_TOKENS per image.

    An estimate on purpose (no tokenizer call on the event loop): it only bounds how much work one shared
    pass takes on; the pass itself splits its model calls by exact token counts (ForwardConfig.batch_tokens).
    """
    def chars(s: tuple) -> int:
        if len(s) > 2 and isinstance(s[2], Chat):  # the template's markup: about 8 tokens a turn
            return sum(len(c) + 8 * CHARS_PER_TOKEN for _, c in s[2].messages)
        return len(s[0]) + len(s[1])

    return sum(-(-chars(s) // CHARS_PER_TOKEN) + 1
               + (IMAGE_TOKENS if len(s) > 2 and s[2] is not None and not isinstance(s[2], Chat) else 0)
               for s in samples)


def check_topk_cost(query: TopKQuery, config: ServerConfig, shape: dict) -> None:
    """Refuse, before any work, a TopK query that costs more than the server's limits allow.

    Args:
        shape: the served index's `Index.shape()`: rows, mean bytes of a stored row, mean tokens of a row.

    Raises:
        InvalidRequestError: the samples' estimated tokens above max_request_tokens; answers × k above
            max_answer_hits; explained hits above max_explained_hits (each message names the limit).
        ResourceExhaustedError: the reply is estimated above max_message_bytes.
    """
    tokens = estimate_tokens(query.samples)
    if tokens > config.max_request_tokens:
        raise InvalidRequestError("samples", f"about {tokens} tokens in all, above the server's limit of "
                                             f"{config.max_request_tokens} a request (max_request_tokens); send "
                                             "fewer or shorter samples, or split them over several requests")
    answers = (1 if query.group else len(query.samples)) * len(query.directions)
    asked = answers * query.k
    if asked > config.max_answer_hits:
        raise InvalidRequestError("k", f"{answers} answer(s) × k {query.k} = {asked} hits, above the server's limit "
                                       f"of {config.max_answer_hits} a request (max_answer_hits); lower k, group "
                                       "the samples (group = true) or ask for one direction")
    hits = answers * min(query.k, max(int(shape["rows"]), 1))
    if query.explain_pairs and hits > config.max_explained_hits:
        raise InvalidRequestError("explain", f"{hits} explained hits, above the server's limit of "
                                             f"{config.max_explained_hits} a request (max_explained_hits); lower k, "
                                             "group the samples or explain in several requests")
    size = reply_bytes(query, shape, hits, tokens)
    if not query.group_by and size > config.max_message_bytes:
        raise ResourceExhaustedError(f"the reply would be about {size / 2**20:.0f} MiB, above the message limit "
                                     f"of {config.max_message_bytes / 2**20:.0f} MiB (max_message_bytes); ask for "
                                     "fewer hits (k), cut the texts (max_text_chars) or explain fewer pairs")


def reply_bytes(query: TopKQuery, shape: dict, hits: int, tokens: int) -> int:
    """An upper-side estimate of a TopK reply's size: per hit its stored row (cut to max_text_chars) and, when
    explained, its tokens (query and training, ~24 bytes each) and top pairs (~64 bytes each)."""
    row = float(shape["row_bytes"])
    if query.max_text_chars:
        row = min(row, 8.0 * query.max_text_chars + 256)  # two texts of ≤ max_text_chars (≤ 4 bytes a character)
    per_hit = row + 64
    if query.explain_pairs:
        query_tokens = tokens if query.group else tokens / max(len(query.samples), 1)
        per_hit += 24 * (query_tokens + float(shape["row_tokens"])) + 64 * query.explain_pairs
    return int(hits * per_hit)


def topk_query(request: pb.TopKRequest, config: ServerConfig, accepts_images: bool = False) -> TopKQuery:
    """Validate a TopK request.

    Raises:
        InvalidRequestError: no or too many samples, an empty response, a prompt or response longer than
            max_sample_chars, an image for a text-only index or one that is not a valid image (vision.py),
            k outside 1..k_cap, an unknown direction, rerank < 0, 0 < rerank < k or above max_rerank,
            max_text_chars < 0, explain_pairs outside 0..max_explain_pairs, an unknown scores, exact_budget
            below -1 or above max_rerank, certified scores with group_by.
    """
    samples = _samples(request.samples, config, accepts_images)
    if not 1 <= request.k <= config.k_cap:
        raise InvalidRequestError("k", f"must be between 1 and {config.k_cap}, got {request.k}")
    if request.direction not in _DIRECTIONS:
        raise InvalidRequestError("direction", f"unknown value {request.direction}; use MOST, LEAST or BOTH")
    rerank = request.rerank
    if rerank < 0:
        raise InvalidRequestError("rerank", f"must be >= 0 (0 = server default), got {rerank}")
    if rerank == 0:
        rerank = max(config.default_rerank, request.k)
    elif rerank < request.k:
        raise InvalidRequestError("rerank", f"must be 0 (server default) or >= k ({request.k}), got {rerank}")
    if rerank > config.max_rerank:
        raise InvalidRequestError("rerank", f"must be at most {config.max_rerank}, got {rerank}")
    if request.max_text_chars < 0:
        raise InvalidRequestError("max_text_chars", f"must be >= 0 (0 = no limit), got {request.max_text_chars}")
    if not 0 <= request.explain_pairs <= config.max_explain_pairs:
        raise InvalidRequestError("explain_pairs", f"must be between 0 (server default, "
                                  f"{config.default_explain_pairs}) and {config.max_explain_pairs}, "
                                  f"got {request.explain_pairs}")
    explain_pairs = (request.explain_pairs or config.default_explain_pairs) if request.explain else 0
    where = where_from_pb(request.where)
    if request.group_by:
        try:
            check_field(request.group_by, "group_by")
        except ConfigError as exc:
            raise InvalidRequestError("group_by", str(exc).split(": ", 1)[-1]) from None
        if explain_pairs:
            raise InvalidRequestError("explain", "cannot be combined with group_by; explain the group's hits "
                                                 "with a TopK call filtered by where")
    if request.scores not in _SCORES:
        raise InvalidRequestError("scores", f"unknown value {request.scores}; use EXACT or CERTIFIED")
    scores = _SCORES[request.scores]
    if request.group_by and scores != "exact":
        raise InvalidRequestError("scores", "group_by answers are exact (they score every row in scope); ask "
                                            "for EXACT scores or leave group_by out")
    if not -1 <= request.exact_budget <= config.max_rerank:
        raise InvalidRequestError("exact_budget", f"must be between -1 (none) and {config.max_rerank}, with 0 "
                                                  f"the server default ({DEFAULT_EXACT_BUDGET}); got "
                                                  f"{request.exact_budget}")
    budget = {0: DEFAULT_EXACT_BUDGET, -1: 0}.get(request.exact_budget, request.exact_budget)
    return TopKQuery(samples, request.k, _DIRECTIONS[request.direction], rerank, request.group,
                     request.max_text_chars, explain_pairs, where, request.group_by, scores, budget)


def score_all_query(request: pb.ScoreAllRequest, config: ServerConfig, accepts_images: bool = False
                    ) -> ScoreAllQuery:
    """Validate a ScoreAll request.

    Raises:
        InvalidRequestError: as for samples in `topk_query`; chunk_size < 0 or above max_chunk.
    """
    samples = _samples(request.samples, config, accepts_images)
    if not 0 <= request.chunk_size <= config.max_chunk:
        raise InvalidRequestError("chunk_size", f"must be between 0 (server default) and {config.max_chunk}, "
                                                f"got {request.chunk_size}")
    return ScoreAllQuery(samples, request.chunk_size or config.default_chunk, where_from_pb(request.where))


def _cut(text: str, limit: int) -> tuple[str, bool]:
    if limit and len(text) > limit:
        return text[:limit], True
    return text, False


def hit_to_pb(hit: Hit, max_text_chars: int = 0) -> pb.Hit:
    """An answer's hit; prompt and response cut to `max_text_chars` characters (0 = whole)."""
    prompt, cut_p = _cut(str(hit.metadata.get("prompt", "")), max_text_chars)
    response, cut_r = _cut(str(hit.metadata.get("response", "")), max_text_chars)
    msg = pb.Hit(id=hit.id, score=hit.score, rank=hit.rank, row=hit.row, prompt=prompt, response=response,
                 truncated=cut_p or cut_r)
    msg.metadata.update({k: v for k, v in hit.metadata.items() if k not in _OWN_FIELDS})
    if hit.explanation is not None:
        msg.explanation.CopyFrom(explanation_to_pb(hit.explanation))
    if hit.percentile is not None:
        msg.percentile = hit.percentile
    if hit.cosine is not None:
        msg.cosine = hit.cosine
    if hit.percentile_low is not None:
        msg.percentile_low, msg.percentile_high = hit.percentile_low, hit.percentile_high
    if hit.score_low is not None:
        msg.score_low, msg.score_high = hit.score_low, hit.score_high
    if hit.rank_certified is not None:
        msg.rank_certified = hit.rank_certified
    return msg


def explanation_to_pb(e: Explanation) -> pb.Explanation:
    def tokens(items: list[TokenContribution]) -> list[pb.TokenContribution]:
        return [pb.TokenContribution(token=t.token, position=t.position, contribution=t.contribution,
                                     sample=t.sample) for t in items]

    return pb.Explanation(query_tokens=tokens(e.query_tokens), train_tokens=tokens(e.train_tokens), total=e.total,
                          top_pairs=[pb.PairContribution(query_position=p.query_position,
                                                         train_position=p.train_position, query_token=p.query_token,
                                                         train_token=p.train_token, contribution=p.contribution,
                                                         query_sample=p.query_sample) for p in e.top_pairs])


def answer_to_pb(query_index: int, result: SearchResult | GroupedResult, max_text_chars: int = 0) -> pb.Answer:
    if isinstance(result, GroupedResult):
        return pb.Answer(query_index=query_index, direction=_TO_PB[result.direction], exact_scored=result.scored,
                         candidates=result.scored,
                         groups=[pb.Group(key=g.key or "", missing=g.key is None, count=g.count, total=g.total,
                                          mean=g.mean, hits=[hit_to_pb(h, max_text_chars) for h in g.hits])
                                 for g in result.groups], cut_samples=result.cut_samples)
    msg = pb.Answer(query_index=query_index, direction=_TO_PB[result.direction], candidates=result.candidates,
                    exact_scored=result.exact_scored or 0, hits=[hit_to_pb(h, max_text_chars) for h in result.hits],
                    cut_samples=result.cut_samples)
    if result.set_certified is not None:
        msg.set_certified = result.set_certified
    return msg


def topk_response(answers: Sequence[tuple[int, SearchResult | GroupedResult]], version: str, max_text_chars: int = 0
                  ) -> pb.TopKResponse:
    """A TopK response from (query index or GROUP, result) pairs, all answered by index `version`."""
    assert all(r.version == version for _, r in answers), "one response mixes index versions"
    return pb.TopKResponse(index_version=version,
                           answers=[answer_to_pb(q, r, max_text_chars) for q, r in answers])


def score_chunks(ids: Sequence[str], scores: Sequence[float], chunk_size: int, version: str,
                 rows: Sequence[int] | None = None, cut_samples: Sequence[int] = (),
                 cosines: Sequence[float] | None = None) -> Iterator[pb.ScoreAllChunk]:
    """ScoreAll's stream: consecutive chunks of (ids, scores, rows, cosines), each with its offset (entries
    before it) and the version; rows default to 0..n-1, cosines to none; the first chunk also names the
    valuation samples that were shortened to the model's max_length."""
    assert len(ids) == len(scores) and (cosines is None or len(cosines) == len(ids))
    rows = list(range(len(ids))) if rows is None else list(rows)
    cos = [] if cosines is None else list(cosines)
    for a in range(0, len(ids), chunk_size):
        yield pb.ScoreAllChunk(offset=a, ids=ids[a : a + chunk_size], scores=scores[a : a + chunk_size],
                               rows=rows[a : a + chunk_size], index_version=version,
                               cut_samples=cut_samples if a == 0 else (), cosines=cos[a : a + chunk_size])


def delete_response(result) -> pb.DeleteResponse:
    """An admin Delete's reply from a deletion.DeleteResult."""
    return pb.DeleteResponse(index_version=result.version, deleted=result.deleted, already_deleted=result.already,
                             unknown=result.unknown, hidden_rows=result.hidden_rows)


def info_response(manifest: dict, version: str) -> pb.InfoResponse:
    """Info about an index version from its manifest (file checksums left out)."""
    info = index_info(manifest, version)
    msg = pb.InfoResponse(**{k: v for k, v in info.items() if k != "manifest"})
    msg.manifest.update(info["manifest"])
    return msg


# --- client side -------------------------------------------------------------------------------------


def samples_to_pb(samples: Sequence[Sample | tuple[str, str]]) -> list[pb.ValuationSample]:
    """Valuation samples as messages.

    Raises:
        InvalidRequestError: a prompt or response is not valid Unicode text (lone surrogates, e.g. from
            undecodable command-line bytes): protobuf strings must be UTF-8; an image (a sample's third
            element, or a Sample's image file) cannot be read or is not a supported image.
    """
    out = []
    for i, s in enumerate(samples):
        if isinstance(s, Sample):
            s = s.as_input()
        prompt, response = str(s[0]), str(s[1])
        third = tuple(x for x in s[2:3] if x is not None)
        chat = third[0] if third and isinstance(third[0], Chat) else None
        image = () if chat is not None else third
        for name, text in (("prompt", prompt), ("response", response)):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidRequestError(f"samples[{i}].{name}", f"not valid UTF-8 text ({exc.reason} at "
                                                                  f"character {exc.start})") from exc
        msg = pb.ValuationSample(prompt=prompt, response=response)
        if chat is not None:
            msg.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in chat.messages)
            msg.scored_turns.extend(chat.scored)
        if image:  # for a VLM index: the image's bytes and type (read from a path when given one)
            data, mime = _image_payload(image[0], f"samples[{i}].image")
            msg.image, msg.image_mime_type = data, mime
        out.append(msg)
    return out


def _image_payload(image, name: str) -> tuple[bytes, str]:
    """(bytes, MIME type) of an image given as a `vision.ImageRef`, a path or bytes.

    Raises:
        InvalidRequestError: the image cannot be read or is not a supported image.
    """
    from forvalue.indexer.errors import DataError
    from forvalue.indexer.images import ImageRef

    if not isinstance(image, ImageRef):
        image = ImageRef(data=bytes(image)) if isinstance(image, (bytes, bytearray)) else ImageRef(path=str(image))
    try:
        return image.payload()
    except DataError as exc:
        raise InvalidRequestError(name, str(exc)) from exc


def direction_to_pb(direction: str) -> int:
    """"most", "least" or "both" → the Direction enum value.

    Raises:
        ConfigError: another name.
    """
    return _TO_PB[check_direction(direction, both=True)]


def _plain(value):
    """Struct values → JSON-like Python: integral doubles back to int."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def struct_to_dict(struct) -> dict:
    return _plain(json_format.MessageToDict(struct))


def hit_from_pb(msg: pb.Hit) -> Hit:
    """The in-process Hit; its metadata holds id, prompt and response (as sent) and the other stored fields."""
    metadata = {"id": msg.id, "prompt": msg.prompt, "response": msg.response, **struct_to_dict(msg.metadata)}
    hit = Hit(id=msg.id, score=msg.score, rank=msg.rank, row=msg.row, metadata=metadata,
              percentile=msg.percentile if msg.HasField("percentile") else None,
              cosine=msg.cosine if msg.HasField("cosine") else None,
              percentile_low=msg.percentile_low if msg.HasField("percentile_low") else None,
              percentile_high=msg.percentile_high if msg.HasField("percentile_high") else None,
              score_low=msg.score_low if msg.HasField("score_low") else None,
              score_high=msg.score_high if msg.HasField("score_high") else None,
              rank_certified=msg.rank_certified if msg.HasField("rank_certified") else None)
    if msg.HasField("explanation"):
        hit = dataclasses.replace(hit, explanation=explanation_from_pb(msg.explanation))
    return hit


def explanation_from_pb(msg: pb.Explanation) -> Explanation:
    """The in-process Explanation of a hit."""
    def tokens(items) -> list[TokenContribution]:
        return [TokenContribution(t.token, t.position, t.contribution, t.sample) for t in items]

    return Explanation(query_tokens=tokens(msg.query_tokens), train_tokens=tokens(msg.train_tokens),
                       top_pairs=[PairContribution(p.query_position, p.train_position, p.query_token, p.train_token,
                                                   p.contribution, p.query_sample) for p in msg.top_pairs],
                       total=msg.total)


def search_result(answer: pb.Answer, version: str) -> SearchResult:
    """The in-process SearchResult of one answer (certified when it says whether its set is, or its hits carry
    score intervals: through a router only the latter)."""
    certified = answer.HasField("set_certified") or any(h.HasField("score_low") for h in answer.hits)
    return SearchResult(hits=[hit_from_pb(h) for h in answer.hits], version=version,
                        direction=_FROM_PB[answer.direction], candidates=answer.candidates,
                        exact_scored=answer.exact_scored if certified else (answer.exact_scored or None),
                        cut_samples=tuple(answer.cut_samples), scores="certified" if certified else "exact",
                        set_certified=answer.set_certified if answer.HasField("set_certified") else None)


def scores_to_pb(scores: str) -> int:
    """The protobuf Scores value of "exact" or "certified".

    Raises:
        ConfigError: another name.
    """
    return _SCORES_TO_PB[check_scores(scores)]


def grouped_result(answer: pb.Answer, version: str, field: str) -> GroupedResult:
    """The in-process GroupedResult of one group-by answer."""
    groups = [Group(None if g.missing else g.key, g.count, g.total, g.mean, [hit_from_pb(h) for h in g.hits])
              for g in answer.groups]
    return GroupedResult(field, groups, version, _FROM_PB[answer.direction], answer.exact_scored,
                         tuple(answer.cut_samples))


def info_dict(msg: pb.InfoResponse) -> dict:
    return {"index_version": msg.index_version, "model_name": msg.model_name,
            "model_fingerprint": msg.model_fingerprint, "tokens": msg.tokens, "n_samples": msg.n_samples,
            "sketch_dim": msg.sketch_dim, "index_kind": msg.index_kind, "manifest": struct_to_dict(msg.manifest)}
