"""Register your own chat template and see exactly what the model will read and learn.

    python examples/custom/custom_template.py

Trainable text (the answers and each answer's end marker) is shown in [[ ]].
"""
from __future__ import annotations

from sftkit.data.formats import Message
from sftkit.data.templates import Template, register_template, render

QA = Template(
    prefix="{{SYSTEM}}\n",
    prefix_no_system="",
    prompt="Q: {{QUERY}}\nA: ",
    suffix="\n<end>",  # part of every answer, so the model learns to stop
    separator="\n",
)


def main() -> None:
    register_template("qa", QA, exist_ok=True)
    conversation = [Message("system", "Answer with one number."), Message("user", "2+2?"), Message("assistant", "4"),
                    Message("user", "3+3?"), Message("assistant", "6")]
    print("".join(f"[[{text}]]" if role == "assistant" else text for text, role in render(conversation, "qa")))


if __name__ == "__main__":
    main()
