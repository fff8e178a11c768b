"""Grounded tool values: narrow each offered tool's string and date parameters to what the conversation names.

A small model that picks the right tool still writes "Kyre" for "Kyoto", "FB271" for "qf271" and the day after
tomorrow as tomorrow. When a conversation's values are copied from it (a city, a ticker, a quoted title) or are
days it names ("today", "in 9 days", "on 2026-06-06", "next Friday"), the grammar can offer only those, and the
model still chooses among them. Pure functions: they rewrite the tools' JSON schemas, which the constraint
compiles like any other (sftkit.constrained).

- A date parameter (`"format": "date"`) may take the dates the user's turns name: ISO dates, and English
  relative days resolved against the system prompt's "Today is YYYY-MM-DD". A conversation that names no day
  leaves it free.
- A string parameter without enum, const or format may take a run of words from the user's turns or the tool
  results (edge punctuation and quotes stripped), as written or in upper, lower or capitalised case, kept only
  where the parameter's pattern matches. With no such run it is left free.

This is off by default (`--ground_tool_values`): a tool whose values are composed ("an email saying ...", an
expression from "twelve times three") needs free values.
"""
from __future__ import annotations

import datetime
import json
import re
from dataclasses import replace

from .data.formats import Message
from .metrics import unfenced
from .tools import Tool

# Runs of at most this many words are values; a longer run is rarely one argument.
MAX_SPAN_WORDS = 12
# The system prompt's own date, in the spellings prompts use.
_TODAY = re.compile(r"(?i)\b(?:today|current date|the date)(?: is|:)\s*(\d{4}-\d{2}-\d{2})")
_ISO = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})\b")
_NUMBER_WORDS = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty".split())}
_COUNT = r"(\d{1,3}|a|an|" + "|".join(_NUMBER_WORDS) + r")"
_WEEKDAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december"]
# Relative days, longest first: "the day after tomorrow" must not also read as "tomorrow".
_FIXED = [(re.compile(rf"(?i)\b(?:{phrase})\b"), offset) for phrase, offset in [
    (r"the day after tomorrow|day after tomorrow", 2), (r"the day before yesterday", -2), (r"tomorrow", 1),
    (r"yesterday", -1), (r"today|tonight", 0)]]
_IN_DAYS = re.compile(rf"(?i)\b(?:in {_COUNT} (days?|weeks?)|{_COUNT} (days?|weeks?) (?:from now|from today|later|ago))\b")
_WEEKDAY = re.compile(r"(?i)\b(?:(next|this|on|coming) )?(" + "|".join(_WEEKDAYS) + r")\b")
_NEXT_WEEK = re.compile(r"(?i)\bnext week\b")
_MONTH_DAY = re.compile(r"(?i)\b(?:(" + "|".join(_MONTHS) + r") (\d{1,2})(?:st|nd|rd|th)?|(\d{1,2})(?:st|nd|rd|th)? (?:of )?("
                        + "|".join(_MONTHS) + r"))(?:,? (\d{4}))?\b")
_EDGE = "\"'“”‘’«».,!?;:"


def ground_tools(tools: tuple[Tool, ...], conversation: list[Message]) -> tuple[Tool, ...]:
    """The tools with their date and string parameters narrowed to what `conversation` names."""
    dates = sorted(named_dates(conversation))
    spans = word_spans(conversation)
    return tuple(replace(tool, parameters=_grounded_object(tool.parameters, dates, spans)) for tool in tools)


def _grounded_object(schema: dict, dates: list[str], spans: list[str]) -> dict:
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        return schema
    return {**schema, "properties": {name: _grounded_value(value, dates, spans) for name, value in properties.items()}}


def _grounded_value(schema: dict, dates: list[str], spans: list[str]) -> dict:
    """One parameter's schema narrowed to an enum of the named values it admits; unchanged where none is named."""
    if any(key in schema for key in ("enum", "const", "anyOf", "oneOf")) or schema.get("type", "string") != "string":
        return schema
    if schema.get("format") == "date":
        return {**schema, "enum": dates} if dates else schema
    if "format" in schema:
        return schema
    pattern = _compiled(schema.get("pattern"))
    if pattern is False:
        return schema
    values = dict.fromkeys(form for span in spans for form in (span, span.upper(), span.lower(), span.capitalize())
                           if pattern is None or pattern.search(form))
    return {**schema, "type": "string", "enum": sorted(values)} if values else schema


def _compiled(pattern):
    """The parameter's pattern as a Python regex; None when it has none, False when Python cannot read it."""
    if not isinstance(pattern, str):
        return None
    try:
        return re.compile(pattern)
    except re.error:
        return False


def word_spans(conversation: list[Message], max_words: int = MAX_SPAN_WORDS) -> list[str]:
    """Every run of up to max_words words in the user turns and tool results, edge punctuation stripped, and every
    string a JSON tool result holds (an id a later call passes on), deduplicated."""
    spans: dict[str, None] = {}
    for message in conversation:
        if message.role not in ("user", "tool"):
            continue
        if message.role == "tool":
            spans.update(dict.fromkeys(_json_strings(message.content)))
        for line in message.content.splitlines():
            words = line.split()
            for start in range(len(words)):
                for end in range(start + 1, min(start + max_words, len(words)) + 1):
                    span = " ".join(words[start:end]).strip(_EDGE)
                    if span:
                        spans[span] = None
    return list(spans)


def _json_strings(text: str) -> list[str]:
    """The non-empty strings anywhere in a JSON text (fenced or not); none when it is not JSON."""
    try:
        stack, found = [json.loads(unfenced(text))], []
    except ValueError:
        return []
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack += value.values()
        elif isinstance(value, list):
            stack += value
        elif isinstance(value, str) and value.strip():
            found.append(value)
    return found


def conversation_today(conversation: list[Message]) -> datetime.date | None:
    """The date the system prompt says it is ("Today is 2026-04-05."), if it says."""
    for message in conversation:
        if message.role == "system":
            found = _TODAY.search(message.content)
            if found:
                return _date(*found.group(1).split("-"))
    return None


def named_dates(conversation: list[Message]) -> set[str]:
    """ISO days the user's turns name: written out, or relative to the system prompt's today."""
    today = conversation_today(conversation)
    days: set[datetime.date] = set()
    for message in conversation:
        if message.role == "user":
            days |= text_dates(message.content, today)
    return {day.isoformat() for day in days}


def text_dates(text: str, today: datetime.date | None) -> set[datetime.date]:
    """The days one text names. Without `today` only dates written in full count."""
    days = {day for day in (_date(*match.groups()) for match in _ISO.finditer(text)) if day}
    if today is None:
        return days
    rest = text
    for pattern, offset in _FIXED:
        if pattern.search(rest):
            days.add(today + datetime.timedelta(days=offset))
            rest = pattern.sub(" ", rest)
    for match in _IN_DAYS.finditer(rest):
        count, unit = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
        amount = _count(count) * (7 if unit.lower().startswith("week") else 1)
        days.add(today + datetime.timedelta(days=-amount if match.group(0).lower().endswith("ago") else amount))
    if _NEXT_WEEK.search(rest):
        days.add(today + datetime.timedelta(days=7))
    for match in _WEEKDAY.finditer(rest):
        ahead = (_WEEKDAYS.index(match.group(2).lower()) - today.weekday()) % 7 or 7
        days.add(today + datetime.timedelta(days=ahead))
        if (match.group(1) or "").lower() == "next":  # "next Friday" is this coming one or the one after it
            days.add(today + datetime.timedelta(days=ahead + 7))
    days |= {day for day in (_month_day(match, today) for match in _MONTH_DAY.finditer(rest)) if day}
    return days


def _count(word: str) -> int:
    word = word.lower()
    return 1 if word in ("a", "an") else _NUMBER_WORDS.get(word) if word in _NUMBER_WORDS else int(word)


def _month_day(match: re.Match, today: datetime.date) -> datetime.date | None:
    """"March 5" or "5th of March" (, 2027): the next such day from today when no year is written."""
    month_name, day = (match.group(1), match.group(2)) if match.group(1) else (match.group(4), match.group(3))
    month = _MONTHS.index(month_name.lower()) + 1
    if match.group(5):
        return _date(match.group(5), month, day)
    this_year = _date(today.year, month, day)
    return this_year if this_year is None or this_year >= today else _date(today.year + 1, month, day)


def _date(year, month, day) -> datetime.date | None:
    try:
        return datetime.date(int(year), int(month), int(day))
    except ValueError:
        return None
