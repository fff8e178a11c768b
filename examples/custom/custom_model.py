"""Register your own model type, then load it by name like a built-in one.

    python examples/custom/custom_model.py /path/to/a/transformers/model

The decorated function is the loader of the new model type: here the default one plus a tokenizer
change, the place for whatever a model needs at load time.
"""
from __future__ import annotations

import argparse

from sftkit.registry import get_model_tokenizer, get_model_tokenizer_from_dir, register_model


def main(model_dir: str) -> None:
    @register_model("my-model", model_dir, ["q_proj", "k_proj", "v_proj"], "chatml", exist_ok=True)
    def get_my_model(model_dir, torch_dtype, model_kwargs, load_model=True, **kwargs):
        model, tokenizer = get_model_tokenizer_from_dir(model_dir, torch_dtype, model_kwargs, load_model, **kwargs)
        tokenizer.padding_side = "left"  # batched generation pads on the left
        return model, tokenizer

    model, tokenizer = get_model_tokenizer("my-model")
    print(f"my-model: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"tokenizer padding {tokenizer.padding_side}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a local folder with config.json, weights and tokenizer")
    main(parser.parse_args().model_dir)
