"""Register a local JSONL file as a named dataset and preview how its rows become tokens.

    python examples/custom/custom_dataset.py data.jsonl [--tokenizer DIR] [--template chatml]

The file's own column names are mapped to the query/response schema; afterwards the name works
anywhere a dataset goes (--dataset my-dataset).
"""
from __future__ import annotations

import argparse

from sftkit.config import PreviewConfig
from sftkit.data.loading import register_dataset
from sftkit.data.preview import preview


def main(path: str, tokenizer: str | None, template: str) -> None:
    register_dataset("my-dataset", path=path, columns={"question": "query", "answer": "response"}, exist_ok=True)
    preview(PreviewConfig(dataset=("my-dataset",), tokenizer=tokenizer, template=template, num_examples=2, color=False))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a .jsonl file with question and answer columns")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--template", default="chatml", help="chat template name")
    arguments = parser.parse_args()
    main(arguments.path, arguments.tokenizer, arguments.template)
