"""Tiny random models pushed to write given tokens (tool calls for the constrained-decoding tests), and a constraint
that records what the generation loop shows it."""
import weakref

import torch

from sftkit.generation import cache_argument


class Steered(torch.nn.Module):
    """A tiny random model pushed to write given token ids first (one list per row), then left to its own logits."""

    def __init__(self, inner, scripts):
        super().__init__()
        self.inner, self.scripts, self.step = inner, scripts, 0
        self.config, self.generation_config = inner.config, inner.generation_config

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, past_key_values=None, **kwargs):
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            self.step = 0  # a new generation
        output = self.inner(input_ids=input_ids, **{cache_argument(self.inner): past_key_values}, **kwargs)
        logits = output.logits.clone()
        for row, script in enumerate(self.scripts[:len(logits)]):  # a scored call's candidates may be fewer rows
            if self.step < len(script):
                logits[row, -1, script[self.step]] += 1e4
        self.step += 1
        output.logits = logits
        return output


class Preferring(torch.nn.Module):
    """A tiny random model pushed to open a call and write `liked` (the call's ids after the opener), except at the
    token where `tempting` (a call to another tool) first differs from it: there `tempting`'s token is pushed harder.

    Token by token, the tempting tool wins at that token and the rest of its call is the random model's own,
    unlikely; scored as whole calls, the liked call wins."""

    def __init__(self, inner, opener, liked, tempting):
        super().__init__()
        self.inner, self.opener, self.liked, self.tempting = inner, opener, liked, tempting
        self.fork = next(i for i, (a, b) in enumerate(zip(liked, tempting)) if a != b)
        self.config, self.generation_config = inner.config, inner.generation_config
        self.generations = {}  # id of a generation's cache -> (the cache, each row's script, what each row generated)

    @property
    def device(self):
        return self.inner.device

    def forward(self, input_ids, past_key_values=None, **kwargs):
        key = id(past_key_values)
        known = self.generations.get(key)
        if known is None or known[0]() is not past_key_values:  # a new generation, or a scored call's candidates
            forked = past_key_values.get_seq_length() > 0
            self.generations[key] = (weakref.ref(past_key_values),
                                     [self.liked if forked else self.opener + self.liked for _ in input_ids],
                                     [[] for _ in input_ids])
        else:
            cache, scripts, rows = known
            self.generations[key] = (cache, scripts, [row + [int(token)] for row, token in zip(rows, input_ids[:, -1])])
        output = self.inner(input_ids=input_ids, **{cache_argument(self.inner): past_key_values}, **kwargs)
        logits = output.logits.clone()
        for row, (script, generated) in enumerate(zip(*self.generations[key][1:])):
            logits[row, -1, script[min(len(generated), len(script) - 1)]] += 10.0
            if generated == script[:len(script) - len(self.liked) + self.fork]:
                logits[row, -1, self.tempting[self.fork]] += 20.0
        output.logits = logits
        return output


class Record:
    """A constraint that keeps every step's logits; with `forks` (rows, e.g. [1, 1, 1]), forks those rows after the
    second token, as a scored call's candidates are forked."""

    def __init__(self, forks=()):
        self.logits, self.forked, self.forks = [], None, list(forks)

    def begin(self, model):
        pass

    def restrict(self, logits):
        self.logits.append(logits.clone())
        return logits

    def advance(self, tokens, fork=None):
        if self.forks and len(self.logits) == 2:
            self.forked = fork(self.forks)
