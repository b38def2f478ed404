"""The draft model of speculative decoding: a small model on the entry node that guesses the
next few tokens greedily, for the served model to verify in one trip through the mesh.

It shares the served model's tokenizer (`check_same_tokenizer` refuses another with one
line), holds the whole draft model as one shard, and keeps a KV cache per session that
follows the answer: each `DraftModel.propose` cuts the cache back to the longest prefix of
the new context it already holds (the drafts the served model rejected fall away), feeds the
rest in one step, then drafts one position at a time. Pure model code: no networking, no
threads; it times its own work (`ms_per_token`) as `meshllm.model.runtime.Runtime` does.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from meshllm.model.cache import prepare
from meshllm.model.engine import Engine, check_device, eos_ids
from meshllm.model.formats import resolve_format
from meshllm.model.shape import load_config, model_shape
from meshllm.model.shard import open_shard
from meshllm.model.source import resolve
from meshllm.model.span import ShardLike
from meshllm.model.text import load_tokenizer

__all__ = ["BUILTIN", "MAX_DRAFT_TOKENS", "DraftModel", "check_same_tokenizer", "tokenizer_digest"]

BUILTIN = "builtin"
"""`--draft-model builtin`: the bundled default model (meshllm.model.source.default_gguf_path)."""
MAX_DRAFT_TOKENS = 16
"""The most tokens one `propose` drafts."""
TIMING_WINDOW = 32
"""`ms_per_token` averages over this many of the last calls that drafted something."""
_SPECIAL = ("bos_token_id", "eos_token_id")
"""The special ids that must agree too (pad and unk never reach a draft: conversions differ on them)."""


# -- the tokenizer check ---------------------------------------------------------------------


def _specials(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    return {name: getattr(tokenizer, name, None) for name in _SPECIAL}


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of a tokenizer's token -> id map (added tokens included) and its special
    ids: two tokenizers with the same digest turn text into the same ids and end answers on
    the same token. About 50 ms on the default model's 49k tokens."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)  # by id
    ids = [vocab[t] for t in tokens]
    h = hashlib.sha256()
    h.update(json.dumps(tokens, ensure_ascii=False).encode())
    if ids != list(range(len(ids))):  # ids with gaps: the order alone does not give them
        h.update(json.dumps(ids).encode())
    h.update(json.dumps(_specials(tokenizer)).encode())
    return h.hexdigest()[:16]


def _difference(draft: PreTrainedTokenizerBase, served: PreTrainedTokenizerBase) -> str:
    """What differs between two tokenizers, in a few words (the first difference found)."""
    a, b = draft.get_vocab(), served.get_vocab()
    if len(a) != len(b):
        return f"vocabularies of {len(a)} and {len(b)} tokens"
    for token, i in sorted(a.items(), key=lambda kv: kv[1]):
        if b.get(token) != i:
            return f"token {token!r} is id {i} in the draft, {b.get(token)} in the served model"
    sa, sb = _specials(draft), _specials(served)
    for name in _SPECIAL:
        if sa[name] != sb[name]:
            return f"{name.removesuffix('_token_id')} id {sa[name]} in the draft, {sb[name]} in the served model"
    return "their vocabularies differ"


def check_same_tokenizer(draft: PreTrainedTokenizerBase, served: PreTrainedTokenizerBase, draft_name: str,
                         served_name: str) -> str:
    """The shared digest (`tokenizer_digest`); ValueError with one line naming both models
    when the draft's tokenizer is not the served model's."""
    digest = tokenizer_digest(draft)
    if digest != tokenizer_digest(served):
        raise ValueError(f"the draft model {draft_name} does not share the tokenizer of {served_name}: "
                         f"{_difference(draft, served)}")
    return digest


def _served_name(tokenizer: PreTrainedTokenizerBase) -> str:
    path = str(getattr(tokenizer, "name_or_path", "") or "")
    return Path(path).name or "the served model"


# -- the draft model -------------------------------------------------------------------------


class DraftModel:
    """A whole model as one shard, drafting greedy tokens with a KV cache per session.

    Not thread-safe: like `Runtime`, every call runs on the node's single worker thread
    (each `propose` enters `torch.inference_mode` itself).
    """

    def __init__(self, shard: ShardLike, tokenizer: PreTrainedTokenizerBase, *, name: str,
                 eos_token_ids: Iterable[int], max_positions: int, digest: str) -> None:
        """`shard`: layers [0, num_layers) of the draft model (it may be shared with an engine
        that serves other sessions: the draft's sessions are keyed ``draft:<id>``). `digest`:
        the tokenizer digest `check_same_tokenizer` gave (`load` and `from_engine` check)."""
        if shard.start_layer != 0 or shard.end_layer != int(shard.config.num_hidden_layers):
            raise ValueError(f"a draft model runs every layer; this shard holds [{shard.start_layer}, "
                             f"{shard.end_layer}) of {shard.config.num_hidden_layers}")
        self.name = name
        self.tokenizer_digest = digest
        """`tokenizer_digest` of the tokenizer it shares with the served model."""
        self.shard = shard
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_positions = max_positions
        self.max_sessions = int(getattr(shard, "max_sessions", 64))
        """Sessions with a cache at once (the shard's limit); a new one drops the least recently used."""
        self._done: OrderedDict[str, list[int]] = OrderedDict()
        """Per session, least recently used first: the tokens whose keys and values the cache holds."""
        self._timings: deque[tuple[float, int]] = deque(maxlen=TIMING_WINDOW)

    @classmethod
    def load(cls, source: str | Path, *, served_tokenizer: PreTrainedTokenizerBase, weights: str = "auto",
             device: str = "cpu", cache_dir: str | Path | None = None, served_name: str | None = None,
             max_sessions: int = 64) -> "DraftModel":
        """Load `source` (a `.gguf` file, a Hugging Face folder, or ``builtin``) whole, in weight
        format `weights` (``auto``: the file's own). A GGUF is converted once into the weight
        cache (meshllm.model.cache.prepare). Raises `ModelSourceError` when the source cannot
        be used, ValueError when its tokenizer is not `served_tokenizer`'s (`served_name`
        names the served model in that message)."""
        prepared = prepare(resolve(None if str(source) == BUILTIN else source),
                           Path(cache_dir) if cache_dir else None)
        tokenizer = load_tokenizer(prepared.folder)
        name = prepared.name
        digest = check_same_tokenizer(tokenizer, served_tokenizer, name, served_name or _served_name(served_tokenizer))
        fmt = resolve_format(prepared, weights)
        config = load_config(prepared)
        shard = open_shard(prepared, 0, int(config.num_hidden_layers), weights=fmt, device=check_device(device),
                           max_sessions=max_sessions)
        return cls(shard, tokenizer, name=name, eos_token_ids=eos_ids(prepared, tokenizer),
                   max_positions=model_shape(config, fmt).max_positions, digest=digest)

    @classmethod
    def from_engine(cls, engine: Engine, *, served_tokenizer: PreTrainedTokenizerBase,
                    served_name: str | None = None) -> "DraftModel":
        """Draft with the weights an `Engine` of one whole shard already holds (the fallback
        model and the draft model loaded once); the engine's own sessions are untouched."""
        if len(engine.shards) != 1:
            raise ValueError("a draft model runs an engine of one shard")
        name = engine.info.name
        digest = check_same_tokenizer(engine.tokenizer, served_tokenizer, name,
                                      served_name or _served_name(served_tokenizer))
        return cls(engine.shards[0], engine.tokenizer, name=name, eos_token_ids=engine.info.eos_token_ids,
                   max_positions=engine.info.max_positions, digest=digest)

    # -- what it costs ---------------------------------------------------------------------

    @property
    def weights(self) -> str:
        """The weight format in memory (f32, f16, int8, int4)."""
        return self.shard.weights

    @property
    def nbytes(self) -> int:
        """Bytes of the weights held (what comes out of the memory budget)."""
        return self.shard.nbytes

    @property
    def ms_per_token(self) -> float | None:
        """Milliseconds of the draft's own work per drafted token over its last calls (the
        catch-up on accepted tokens included); None before it drafted anything."""
        seconds = sum(s for s, _ in self._timings)
        tokens = sum(n for _, n in self._timings)
        return None if tokens == 0 else 1000.0 * seconds / tokens

    # -- sessions --------------------------------------------------------------------------

    @property
    def sessions(self) -> tuple[str, ...]:
        """The sessions holding a cache, least recently used first."""
        return tuple(self._done)

    def cached_positions(self, session_id: str) -> int:
        """Positions the session's cache holds (0 for none)."""
        return len(self._done.get(session_id, ()))

    def drop(self, session_id: str) -> None:
        """Free a session's cache. Unknown ids are ignored."""
        self._done.pop(session_id, None)
        self.shard.drop(_key(session_id))

    # -- drafting --------------------------------------------------------------------------

    def propose(self, session_id: str, context: Sequence[int], k: int) -> list[int]:
        """Up to `k` (1..16) greedy next tokens after `context` (the prompt and the answer so
        far, exactly as the served model sees them). Fewer when the draft ends on one of its
        EOS tokens (included, last) or the context window leaves less room; [] when the
        window has no room left (or every cache slot of the shard is another's).

        The cache is cut back to the longest prefix of `context` it holds and the rest is
        fed in one step: whatever the served model accepted of the last draft, the next call
        starts from what the served model saw."""
        if not 1 <= k <= MAX_DRAFT_TOKENS:
            raise ValueError(f"a draft is 1 to {MAX_DRAFT_TOKENS} tokens, not {k}")
        if not context:
            raise ValueError("a draft needs a context of at least one token")
        room = self.max_positions - len(context)
        if room <= 0:
            return []
        t0 = time.perf_counter()
        with torch.inference_mode():
            start = self._rewind(session_id, context)
            if start is None:
                return []
            try:
                drafted = self._draft(session_id, list(context), start, min(k, room))
            except BaseException:
                self.drop(session_id)
                raise
        self._timings.append((time.perf_counter() - t0, len(drafted)))
        return drafted

    def _draft(self, session_id: str, done: list[int], start: int, k: int) -> list[int]:
        """Feed `done[start:]` at `start` (the cache holds `done[:start]`), then draft up to
        `k` tokens; `done` ends as what the cache holds: the context and every drafted token
        but the last."""
        shard, key = self.shard, _key(session_id)
        logits = shard.head(shard.forward(key, shard.embed(done[start:]), start))  # (vocab,)
        drafted: list[int] = []
        self._done[session_id] = done
        while True:
            token = int(torch.argmax(logits))
            drafted.append(token)
            if len(drafted) == k or token in self.eos_token_ids:
                return drafted
            logits = shard.head(shard.forward(key, shard.embed([token]), len(done)))
            done.append(token)

    def _rewind(self, session_id: str, context: Sequence[int]) -> int | None:
        """Cut the session's cache to its longest prefix of `context` that leaves at least
        one token to feed; the positions kept (0: start afresh). None when no cache slot is
        free."""
        key = _key(session_id)
        done = self._done.get(session_id)
        if done is not None and self.shard.cache_length(key) != len(done):
            done = None  # the cache went away under it (a shared shard's owner dropped it)
        if done is None:
            self._done.pop(session_id, None)
            return 0 if self._make_room(key) else None
        self._done.move_to_end(session_id)
        keep = min(_common_prefix(done, context), len(context) - 1)
        if keep == 0:
            return 0
        if keep < len(done):
            layers = self.shard.num_span_layers
            self.shard.keep_layers(key, 0, layers, keep)
            if self.shard.layer_lengths(key) != [keep] * layers:  # a sliding-window layer cannot be cut
                return 0
        return keep

    def _make_room(self, key: str) -> bool:
        """Drop the least recently used sessions until the shard can hold one more cache."""
        while len(self.shard.session_ids) >= self.max_sessions and key not in self.shard.session_ids:
            if not self._done:
                return False
            self.drop(next(iter(self._done)))
        return True


def _key(session_id: str) -> str:
    """The session's key in the shard (apart from an engine's own sessions on a shared shard)."""
    return f"draft:{session_id}"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
