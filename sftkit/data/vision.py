"""What the data pipeline needs from a vision-language model's processor, and the pixels of an example.

sftkit drives the model's own image processor and expands the image placeholder itself, as the model's
processor would: transformers' full processors also need a video processor, which it cannot build where
torchvision is missing, and the pipeline needs the token counts before any pixels exist.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .images import image_size, open_image
from .pipeline import collate


@dataclass(frozen=True)
class VisionProcessor:
    """How images enter a vision-language model.

    `placeholder` is written where an image goes in the prompt and holds one `image_token`, which encoding
    repeats once per vision feature of that image (its patches over merge_size^2); `image_processor` (the
    model's own) turns images into patches and their (t, h, w) grids.
    """

    image_processor: object
    image_token: str
    image_token_id: int
    placeholder: str
    merge_size: int = 1

    def tokens_for(self, reference: str) -> int:
        """How many image tokens an image becomes, from its size alone (its header is read, not its pixels)."""
        width, height = image_size(reference)
        return self.image_processor.get_number_of_image_patches(height, width, {}) // self.merge_size ** 2

    def pixels(self, images: list) -> dict:
        """{"pixel_values": [patches, channels x patch volume], "image_grid_thw": [images, 3]} for PIL images."""
        output = self.image_processor(images=images, return_tensors="np")
        return {"pixel_values": np.asarray(output["pixel_values"], dtype=np.float32),
                "image_grid_thw": np.asarray(output["image_grid_thw"], dtype=np.int64)}

    def key(self) -> dict:
        """Everything that decides the examples, for the tokenized-data cache."""
        return {"image_processor": self.image_processor.to_dict(), "image_token_id": self.image_token_id,
                "placeholder": self.placeholder, "merge_size": self.merge_size}


def vision_processor(image_processor, tokenizer, config) -> VisionProcessor:
    """A VisionProcessor from the model's image processor, tokenizer and config: the image token the config
    names, framed by its vision start/end tokens where it has them (the Qwen2-VL family)."""
    token_id = getattr(config, "image_token_id", None)
    if token_id is None:
        raise ValueError(f"the {config.model_type} config names no image_token_id")
    start, end = (getattr(config, f"vision_{edge}_token_id", None) for edge in ("start", "end"))
    image_token, start_token, end_token = (tokenizer.convert_ids_to_tokens(i) if i is not None else "" for i in (token_id, start, end))
    return VisionProcessor(image_processor, image_token, token_id, start_token + image_token + end_token,
                           getattr(image_processor, "merge_size", 1))


def with_pixels(example: dict, processor: VisionProcessor) -> dict:
    """The example plus what the model's forward takes for its images: pixel values, (t, h, w) grids and
    mm_token_type_ids (1 at image tokens). Made per batch: the pixels of a whole dataset would not fit in memory."""
    if not example.get("images"):
        return example
    pixels = processor.pixels([open_image(reference) for reference in example["images"]])
    tokens = (pixels["image_grid_thw"].prod(-1) // processor.merge_size ** 2).tolist()
    if tokens != list(example["image_tokens"]):
        raise DataError(f"the images {list(example['images'])} now give {tokens} image tokens, but the example was "
                        f"tokenized for {list(example['image_tokens'])}: did an image change on disk?")
    types = [int(token == processor.image_token_id) for token in example["input_ids"]]
    return {**example, **pixels, "mm_token_type_ids": types}


def collate_images(examples: list[dict], pad_token_id: int, processor: VisionProcessor, **options) -> dict:
    """collate() (with its options) for a vision-language model: each example's pixels made, then batched with the ids.
    The padding mask stays: the Qwen2-VL family reads it to place its 3-D rotary positions."""
    return collate([with_pixels(example, processor) for example in examples], pad_token_id, **options)
