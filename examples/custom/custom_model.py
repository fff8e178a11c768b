"""Register your own model type, then load it by name like a built-in one.

    python examples/custom/custom_model.py /path/to/a/transformers/model

sftkit loads every model the same way; the decorated function is the entry's patch, called with the loaded
model (None when only the tokenizer is asked for) and tokenizer: the place for whatever a model needs fixed.
"""
from __future__ import annotations

import argparse

from sftkit.model import get_model_tokenizer
from sftkit.registry import register_model


def main(model_dir: str) -> None:
    @register_model("my-model", model_dir, ["q_proj", "k_proj", "v_proj"], "chatml", exist_ok=True)
    def left_padding(model, tokenizer):
        tokenizer.padding_side = "left"  # batched generation pads on the left

    model, tokenizer = get_model_tokenizer("my-model")
    print(f"my-model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"tokenizer padding {tokenizer.padding_side}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a local folder with config.json, weights and tokenizer")
    main(parser.parse_args().model_dir)
