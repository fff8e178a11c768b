"""What the page shows, built from the library's results: chat messages, evaluation tables, highlighted tokens,
the length histogram. Functions of their inputs only, so they are tested without a browser.
"""
from __future__ import annotations

import json

from ..data.formats import Message

TRAINED = "trained"


def chat_messages(history: list[Message]) -> list[dict]:
    """A conversation as chat bubbles; a tool call and a tool result are each a titled block of their own."""
    shown = []
    for message in history:
        if message.role == "user":
            shown.append({"role": "user", "content": message.content})
        elif message.role == "tool_call":
            shown.append({"role": "assistant", "content": _code(message.content), "metadata": {"title": "🔧 tool call"}})
        elif message.role == "tool":
            shown.append({"role": "assistant", "content": _code(message.content),
                          "metadata": {"title": "📎 tool result"}})
        elif message.role == "assistant" and message.content:
            shown.append({"role": "assistant", "content": message.content})
    return shown


def _code(text: str) -> str:
    """JSON pretty-printed in a code block (as the model wrote it when it does not parse)."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("JSON").removeprefix("json").strip()
    try:
        return "```json\n" + json.dumps(json.loads(body), indent=2, ensure_ascii=False) + "\n```"
    except ValueError:
        return "```\n" + text.strip() + "\n```"


def metric_rows(report: dict) -> list[list]:
    """[name, value] for every metric and count of an evaluation report."""
    rows = [[name, value] for name, value in report["metrics"].items() if not isinstance(value, (list, dict))]
    return rows + [[name, value] for name, value in report["counts"].items()]


def example_rows(report: dict, best_first: bool = False) -> list[list]:
    """[index, score, prompt, reference, prediction] per example, worst (or best) ROUGE-L first."""
    rows = sorted(report["examples"], key=lambda row: row["rouge_l"], reverse=best_first)
    return [[row["index"], round(row["rouge_l"], 4), row["prompt"], row["reference"], row["prediction"]] for row in rows]


def highlighted(examples_runs: list[list[tuple[str, bool]]]) -> list[tuple[str, str | None]]:
    """Each example's (text, trainable) runs as highlighted spans under a header line, trainable ones labelled."""
    spans = []
    for index, runs in enumerate(examples_runs):
        spans.append((f"{'' if index == 0 else chr(10) * 2}── example {index} ──\n", None))
        spans += [(text, TRAINED if trainable else None) for text, trainable in runs]
    return spans


def length_figure(lengths: list[int], bins: int = 20):
    """A histogram of tokens per example as a matplotlib Figure (no pyplot, so a server thread may draw it)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 3))
    axes = figure.subplots()
    axes.hist(lengths, bins=min(bins, max(1, len(set(lengths)))), color="#4c9a5a", edgecolor="white")
    axes.set_xlabel("tokens per example (before truncation)")
    axes.set_ylabel("examples")
    axes.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return figure
