"""Build a small, randomly initialised Qwen2-VL for the shapes task and save it like a published model.

    python examples/vision/make_model.py --out output/vision-model

It is the Qwen2-VL architecture at toy scale (4 text layers of width 128, a 4-block vision tower), with a
byte-level BPE tokenizer trained on the task's words, Qwen2-VL's special tokens and chat template, and
Qwen2-VL's image processor set to 112 x 112 pixels (16 image tokens). On a CPU it learns the captions from
scratch in minutes; with a GPU, fine-tune the real thing instead (recipe-qwen2-vl.yaml).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dataset import COLOURS, PIXELS, QUESTION, SHAPES, SIZES  # noqa: E402

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
# Qwen/Qwen2-VL-2B-Instruct's chat template, reduced to what string contents need.
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
                 "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                 "{% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = [f"a {size} {colour} {shape}" for size in SIZES for colour in COLOURS for shape in SHAPES]
    corpus = words + [QUESTION, "system user assistant You are a helpful assistant.", "0 1 2 3 4 5 6 7 8 9 . , ? !"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def make_model(tokenizer, seed: int = 0):
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=4, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="output/vision-model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = make_tokenizer()
    model = make_model(tokenizer, args.seed)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    Qwen2VLImageProcessorPil(min_pixels=PIXELS * PIXELS, max_pixels=PIXELS * PIXELS).save_pretrained(args.out)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"wrote a {parameters / 1e6:.2f}M-parameter Qwen2-VL to {args.out}")


if __name__ == "__main__":
    main()
