"""Tool calls constrained to the offered tools: once the model opens a call, only tokens that keep it a valid call pass.

Text outside calls is never masked. When a row's generated text completes the template's call opener
(`<|startofthink|>`), the rest of the call must match a grammar built from the tools the conversation offers
(sftkit.tools): an optional ```JSON fence, one JSON object naming an offered tool with that tool's argument keys
and value types, then the closer (`<|endofthink|>`). The grammar runs in llguidance, which computes the allowed
tokens of a byte-level grammar over the real vocabulary (docs/constrained_decoding.md says why this library).

A token can straddle the opener: with a byte-level BPE `|>```` ends the opener and starts the fence. So a token
that would complete the opener is allowed only when what follows the opener inside it can start a valid call,
and that remainder is fed to the grammar when the call opens.

Scored (the default where a row offers several tools): a call is not picked token by token. When it opens, the
model writes its best call to each offered tool alone (one batch), and the call the model finds likeliest as a
whole wins; its tokens are then forced. A small model often opens the similar-named tool with the wrong
parameters (`weather_forecast` for "weather in Paris"), and then has to invent a value ("days": 3) that it
finds unlikely: the whole call's probability says what the first diverging token could not.

Grounded (`grounded=True`, off by default): each tool's date and string parameters are first narrowed to the
days and words the conversation names (sftkit.grounding).
"""
from __future__ import annotations

import json
import warnings
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from .data.formats import Message
from .data.templates import Template, get_template
from .grounding import ground_tools
from .tools import Tool, call_schema, conversation_tools

# Compact JSON as json.dumps writes it is what the data holds, but MSAgent-Bench also pretty-prints calls;
# a short run of whitespace between JSON tokens admits both without letting a model pad forever.
JSON_OPTIONS = {"item_separator": ",", "key_separator": ":", "whitespace_flexible": True,
                "whitespace_pattern": r"[ \t\n]{0,16}"}

_VOCABULARIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# Compiled grammars a guide keeps before it starts again.
MAX_GRAMMARS = 1024


@dataclass(frozen=True)
class _Vocabulary:
    """llguidance's view of a tokenizer, and every token's bytes (special tokens as their text)."""

    lltokenizer: object
    token_bytes: tuple[bytes, ...]


def _vocabulary(tokenizer) -> _Vocabulary:
    """Built once per tokenizer object (about 0.3 s for a 49k vocabulary)."""
    cached = _VOCABULARIES.get(tokenizer)
    if cached is None:
        import llguidance.hf

        lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
        token_bytes = tuple(lltokenizer.decode_bytes([token]) for token in range(len(tokenizer)))
        cached = _VOCABULARIES[tokenizer] = _Vocabulary(lltokenizer, token_bytes)
    return cached


class ToolCallGuide:
    """What constraining calls needs once per tokenizer and template; `constraint()` makes one per generation.

    The server keeps one per loaded model and passes `guide.constraint([tools])` to generate_stream or
    generate_batch.
    """

    def __init__(self, tokenizer, template: "str | Template", scored: bool = True, grounded: bool = False):
        opener, found, closer = get_template(template).tool_call.partition("{{CONTENT}}")
        if not found or not opener or not closer:
            raise ValueError("the template's tool_call has no opener and closer around {{CONTENT}} to constrain")
        self.vocabulary = _vocabulary(tokenizer)
        self.tokenizer, self.opener, self.closer = tokenizer, opener.encode(), closer
        self.scored, self.grounded = scored, grounded
        self._grammars: dict[tuple, str | None] = {}
        self._valid_starts: dict[tuple[str, bytes], bool] = {}
        self._fresh: dict[str, object] = {}
        self.completions = _opener_completions(self.vocabulary.token_bytes, self.opener)

    def constraint(self, tools_by_row: list) -> "CallConstraint | None":
        """A fresh per-row state for one generation call; a row offering no tools is never constrained (None: no row offers any)."""
        if not any(tools_by_row):
            return None
        return CallConstraint(self, [tuple(tools or ()) for tools in tools_by_row])

    def for_conversations(self, conversations: list[list[Message]], system: str | None = None) -> "CallConstraint | None":
        """The constraint for prompts built from these conversations: each row gets the tools its system prompt offers."""
        return self.constraint([self.tools_for(conversation, system) for conversation in conversations])

    def tools_for(self, conversation: list[Message], system: str | None = None) -> tuple[Tool, ...]:
        """The tools a conversation offers, their values narrowed to what it names when the guide is grounded."""
        tools = conversation_tools(conversation, system)
        if not self.grounded or not tools:
            return tools
        if system is not None and not any(message.role == "system" for message in conversation):
            conversation = [Message("system", system), *conversation]  # its "Today is" line dates the request
        return ground_tools(tools, conversation)

    def grammar(self, tools: tuple[Tool, ...]) -> str | None:
        """The Lark grammar of a call to one of `tools` then the closer (cached); None, with a warning, if it cannot compile."""
        key = tuple((tool.name, json.dumps(tool.parameters, sort_keys=True), tool.url) for tool in tools)
        if key not in self._grammars:
            if len(self._grammars) >= MAX_GRAMMARS:  # grounded tools make a grammar per conversation: a server's would grow
                for cache in (self._grammars, self._valid_starts, self._fresh):
                    cache.clear()
            import llguidance

            schema = {"x-guidance": JSON_OPTIONS, **call_schema(tools)}
            lark = "\n".join([
                "%llguidance {}",
                "start: FENCE_OPEN call FENCE_CLOSE closer | call closer",
                f"call: %json {json.dumps(schema, ensure_ascii=False)}",
                f"closer: {self._literal(self.closer)}",
                r"FENCE_OPEN: /```[A-Za-z]{0,8}\n/",
                r'FENCE_CLOSE: "\n```"',
            ])
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
            error = llguidance.LLMatcher.validate_grammar(grammar, self.vocabulary.lltokenizer)
            if error and not error.startswith("WARNING"):
                names = ", ".join(tool.name for tool in tools)
                warnings.warn(f"calls to the tools {names} are left unconstrained: their specs do not compile: {error}")
                grammar = None
            self._grammars[key] = grammar
        return self._grammars[key]

    def _literal(self, text: str) -> str:
        """A Lark literal for a marker: the special token itself where the tokenizer has one for it, else the text."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and self.vocabulary.lltokenizer.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json.dumps(text, ensure_ascii=False)

    def matcher(self, grammar: str, start: bytes):
        """A matcher that has read `start` (the part of a call already inside the opener's last token); None if it cannot."""
        import llguidance

        # log_level 0: a start that does not fit is an expected answer here, not a warning to print
        matcher = llguidance.LLMatcher(self.vocabulary.lltokenizer, grammar, log_level=0)
        tokens = self.vocabulary.lltokenizer.tokenize_bytes(start) if start else []
        if matcher.is_error() or (tokens and not matcher.consume_tokens(tokens)):
            return None
        return matcher

    def valid_start(self, grammar: str, start: bytes) -> bool:
        """Whether a call may begin with these bytes; checked on one untouched matcher per grammar, without consuming."""
        key = (grammar, start)
        if key not in self._valid_starts:
            if grammar not in self._fresh:
                self._fresh[grammar] = self.matcher(grammar, b"")
            tokens = self.vocabulary.lltokenizer.tokenize_bytes(start) if start else []
            fresh = self._fresh[grammar]
            self._valid_starts[key] = fresh is not None and fresh.validate_tokens(tokens) == len(tokens)
        return self._valid_starts[key]


def _opener_completions(token_bytes: tuple[bytes, ...], opener: bytes) -> dict[int, list[tuple[int, bytes]]]:
    """For each k, the tokens that finish the opener when the text ends with its first k bytes, with what follows.

    k = 0 holds tokens that contain the whole opener.
    """
    completions: dict[int, list[tuple[int, bytes]]] = {k: [] for k in range(len(opener))}
    for token, data in enumerate(token_bytes):
        if opener in data:
            completions[0].append((token, data[data.index(opener) + len(opener):]))
        for k in range(1, len(opener)):
            if data.startswith(opener[k:]):
                completions[k].append((token, data[len(opener) - k:]))
    return completions


class CallConstraint:
    """Per-row state of one generation: outside a call (watching for the opener) or inside one (a matcher, or the
    scored call's tokens still to force).

    `begin` hears the model before the first step; `restrict` masks a [batch, vocab] logits
    tensor in place before the next token is picked; `advance` reads the picked tokens. A row the caller has
    finished with is `drop`ped so it costs nothing more.
    """

    def __init__(self, guide: ToolCallGuide, tools_by_row: list[tuple[Tool, ...]]):
        self.guide, self.tools = guide, tools_by_row
        self.grammars = [guide.grammar(tools) if tools else None for tools in tools_by_row]
        self.tails = [b""] * len(tools_by_row)
        self.matchers: list = [None] * len(tools_by_row)
        self.forced: list[deque] = [deque() for _ in tools_by_row]
        self.model = None  # set by begin when calls are scored
        self.failures = 0  # calls left unconstrained part way (reported by the benchmark; expected to stay 0)

    def begin(self, model) -> None:
        """Keep the model to score calls with."""
        if self.guide.scored:
            self.model = model

    def drop(self, row: int) -> None:
        self.grammars[row], self.matchers[row] = None, None
        self.forced[row].clear()

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        for row, grammar in enumerate(self.grammars):
            if grammar is None:
                continue
            if self.forced[row]:
                token = self.forced[row][0]
                kept = logits[row, token].clone()
                logits[row] = float("-inf")
                logits[row, token] = kept
            elif self.matchers[row] is not None:
                if not _mask_row(logits, row, self.matchers[row], len(self.guide.vocabulary.token_bytes)):
                    self._fail(row)
            else:
                blocked = self._bad_openings(row, grammar)
                if blocked:
                    logits[row, blocked] = float("-inf")
        return logits

    def _bad_openings(self, row: int, grammar: str) -> list[int]:
        """Tokens that would complete the opener followed by bytes no call can start with."""
        tail, opener = self.tails[row], self.guide.opener
        ks = [0] + [k for k in range(1, len(opener)) if tail.endswith(opener[:k])]
        return [token for k in ks for token, start in self.guide.completions[k]
                if not self.guide.valid_start(grammar, start)]

    def advance(self, tokens: list[int], fork=None) -> None:
        """Read each row's picked token; fork(rows) gives those rows' states (a row once per time it is listed), to
        score the calls these tokens open."""
        opener, opened = self.guide.opener, []
        for row, token in enumerate(tokens):
            if self.grammars[row] is None:
                continue
            if self.forced[row]:
                self.forced[row].popleft()
                continue
            matcher = self.matchers[row]
            if matcher is not None:
                if not matcher.consume_token(token):
                    self._fail(row)
                elif matcher.is_stopped():
                    self.matchers[row] = None
                continue
            text = self.tails[row] + self.guide.vocabulary.token_bytes[token]
            found = text.find(opener)
            if found < 0:
                self.tails[row] = text[-(len(opener) - 1):] if len(opener) > 1 else b""
                continue
            self.tails[row] = b""
            opened.append((row, text[found + len(opener):]))
        if opened:
            self._open(opened, fork)

    def _open(self, opened: list[tuple[int, bytes]], fork) -> None:
        """Calls have opened in these rows, each `start` already inside its call: score them together (where several
        tools are offered) or match them token by token."""
        scored = [(row, start) for row, start in opened if len(self.tools[row]) > 1] \
            if self.model is not None and fork is not None else []
        if scored:
            forked = fork([row for row, _ in scored for _ in self.tools[row]])
            best = scored_calls(self.model, self.guide, forked, [(self.tools[row], start) for row, start in scored])
            for (row, _), tokens in zip(scored, best):
                self.forced[row] = deque(tokens or ())
        for row, start in opened:
            if self.forced[row]:
                continue
            matcher = self.guide.matcher(self.grammars[row], start)
            if matcher is None:
                self._fail(row)
            elif not matcher.is_stopped():
                self.matchers[row] = matcher

    def _fail(self, row: int) -> None:
        """The grammar has no way on (it should not happen): leave the rest of this call unconstrained, and say so."""
        self.failures += 1
        self.matchers[row] = None
        warnings.warn("a tool call could not be constrained further; the rest of it is generated freely")


def _mask_row(logits: torch.Tensor, row: int, matcher, size: int) -> bool:
    """Mask the tokens the matcher does not allow in one row; False when it allows none (or is in error)."""
    allowed = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")[:size]
    if matcher.is_error() or not allowed.any():
        return False
    logits[row, :size].masked_fill_(torch.from_numpy(allowed == 0).to(logits.device), float("-inf"))
    logits[row, size:] = float("-inf")
    return True


# A call longer than this many tokens is not a candidate (the unscored path then matches it token by token).
MAX_CALL_TOKENS = 256


def scored_calls(model, guide: ToolCallGuide, forked: tuple, calls: list[tuple[tuple[Tool, ...], bytes]],
                 max_tokens: int = MAX_CALL_TOKENS) -> list[list[int] | None]:
    """For each opened call (its offered tools, and `start`: what of the call the opener's last token already
    holds), the tokens of the likeliest complete call up to and including the closer; None where no candidate
    finished within max_tokens.

    `forked` (generation.fork_rows: input ids, attention mask, start) holds one row per candidate, the calls' rows
    repeated once per tool, right after the opener's last token. All candidates run as one batch, each greedy and
    constrained to its one tool; a candidate's score is the sum of its tokens' log-probabilities under the
    unmasked logits, so a token the grammar forces still costs what the model thinks of it.
    """
    from .generation import GenerationConfig, _token_steps

    candidates = _Candidates(guide, [(tool, start) for tools, start in calls for tool in tools])
    if any(candidates.live):
        input_ids, attention_mask, state = forked
        for _ in _token_steps(model, input_ids, attention_mask, GenerationConfig(max_new_tokens=max_tokens), candidates,
                              start=state):
            if not any(candidates.live):
                break
    best, first = [], 0
    for tools, _ in calls:
        finished = [row for row in range(first, first + len(tools)) if candidates.finished[row]]
        best.append(candidates.tokens[max(finished, key=lambda row: candidates.scores[row])] if finished else None)
        first += len(tools)
    return best


class _Candidates:
    """The rows of scored_calls: row i writes a call to its one tool only and sums its log-probabilities."""

    def __init__(self, guide: ToolCallGuide, rows: list[tuple[Tool, bytes]]):
        self.matchers = [_single_tool_matcher(guide, tool, start) for tool, start in rows]
        self.live = [matcher is not None and not matcher.is_stopped() for matcher in self.matchers]
        self.finished = [False] * len(rows)
        self.scores, self.tokens = [0.0] * len(rows), [[] for _ in rows]
        self.size, self.log_probs = len(guide.vocabulary.token_bytes), None

    def begin(self, model) -> None:
        pass

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        self.log_probs = torch.log_softmax(logits, dim=-1)
        for row, matcher in enumerate(self.matchers):
            if self.live[row] and not _mask_row(logits, row, matcher, self.size):
                self.live[row] = False
        return logits

    def advance(self, tokens: list[int], fork=None) -> None:
        for row, token in enumerate(tokens):
            if not self.live[row]:
                continue
            self.scores[row] += float(self.log_probs[row, token])
            self.tokens[row].append(token)
            matcher = self.matchers[row]
            if not matcher.consume_token(token):
                self.live[row] = False
            elif matcher.is_stopped():
                self.live[row], self.finished[row] = False, True


def _single_tool_matcher(guide: ToolCallGuide, tool: Tool, start: bytes):
    grammar = guide.grammar((tool,))
    return guide.matcher(grammar, start) if grammar else None


def tool_call_guide(tokenizer, template: "str | Template", scored: bool = True,
                    grounded: bool = False) -> ToolCallGuide | None:
    """A guide for the template's call markers, or None for a template without them (nothing to constrain)."""
    try:
        return ToolCallGuide(tokenizer, template, scored, grounded)
    except ValueError:
        return None
