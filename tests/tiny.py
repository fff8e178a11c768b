"""Tiny tokenizers and models built on the fly, so tests never need a hub or real weights."""
from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>"]

CORPUS = [
    "You are a helpful assistant. Answer the question briefly.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate to Chinese: hello world. 你好，世界。今天天气很好。",
    "[INST] <<SYS>> system <</SYS>> [/INST] ### Instruction: ### Input: ### Response:",
    "<|startofthink|>```JSON\n{\"api_name\": \"weather\", \"parameters\": {\"city\": \"Paris\"}}\n```<|endofthink|>",
    "<|startofexec|>```JSON\n{\"result\": \"sunny, 21 C\"}\n```<|endofexec|>",
    "user assistant system tool function name arguments: 0 1 2 3 4 5 6 7 8 9 + - * / = ? ! , . ; :",
    "The quick brown fox jumps over the lazy dog. Numbers like 42 and 3.14 appear too.",
    "Human: Assistant: <reserved_106> <reserved_107> [gMASK]sop <|user|> <|assistant|> <|system|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
] * 4


def make_tokenizer(vocab_size: int = 600, extra_special_tokens=(), chat_template: str = CHATML_JINJA):
    """A byte-level BPE tokenizer with ChatML specials and chat template, trained in well under a second."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        chat_template=chat_template,
    )


def make_model(tokenizer, arch: str = "llama", hidden: int = 64, layers: int = 2, seed: int = 0, tied: bool = False):
    """A randomly initialised causal LM of the given transformers architecture (tied: the head is the input embeddings)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tied,
    )
    if arch in ("gemma", "gemma2", "gemma3_text", "gemma3"):
        kwargs["head_dim"] = hidden // 4
    if arch == "gemma3":  # Gemma 3 4B+: the text model inside an image-text model, with a tiny vision tower
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        special = {key: kwargs[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings")}
        config = AutoConfig.for_model(arch, text_config=kwargs, vision_config=vision, mm_tokens_per_image=4, **special)
    else:
        config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny(path, arch: str = "llama", seed: int = 0, tied: bool = False) -> str:
    """Write a tiny model + tokenizer with save_pretrained so the real loading path runs on it."""
    tokenizer = make_tokenizer()
    model = make_model(tokenizer, arch=arch, seed=seed, tied=tied)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


ALL_LINEAR_LLAMA = sorted(
    f"model.layers.{i}.{module}"
    for i in range(2)
    for module in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
)


def logits(model, input_ids):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids).logits


def randomize_lora_B(model, seed=1):
    """B starts at zero, which would make every adapter comparison trivially pass."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


REMOTE_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_code", "tinyglm")
TINYGLM_FILES = ("configuration_tinyglm.py", "modeling_tinyglm.py", "tokenization_tinyglm.py")


def save_tinyglm(path, seed: int = 0) -> str:
    """A tiny model with ChatGLM2/3's layout, saved as remote code (config auto_map + its .py files), as the hub has it."""
    import json
    import shutil

    import torch

    from remote_code.tinyglm.configuration_tinyglm import TinyGLMConfig
    from remote_code.tinyglm.modeling_tinyglm import TinyGLMForConditionalGeneration
    from remote_code.tinyglm.tokenization_tinyglm import TinyGLMTokenizer

    tokenizer = TinyGLMTokenizer()
    config = TinyGLMConfig(padded_vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    config.auto_map = {"AutoConfig": "configuration_tinyglm.TinyGLMConfig",
                       "AutoModel": "modeling_tinyglm.TinyGLMForConditionalGeneration",
                       "AutoModelForCausalLM": "modeling_tinyglm.TinyGLMForConditionalGeneration"}
    torch.manual_seed(seed)
    os.makedirs(path, exist_ok=True)
    TinyGLMForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    tokenizer_config = os.path.join(path, "tokenizer_config.json")
    with open(tokenizer_config, encoding="utf-8") as handle:
        settings = json.load(handle)
    settings["auto_map"] = {"AutoTokenizer": ["tokenization_tinyglm.TinyGLMTokenizer", None]}
    with open(tokenizer_config, "w", encoding="utf-8") as handle:
        json.dump(settings, handle)
    for name in TINYGLM_FILES:
        shutil.copy(os.path.join(REMOTE_CODE, name), path)
    return str(path)


# --- vision-language ------------------------------------------------------------------------------------------

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen/Qwen2-VL-2B-Instruct's chat_template (from its chat_template.json), the real format the "qwen" template must match.
QWEN2_VL_CHAT_TEMPLATE = open(os.path.join(os.path.dirname(__file__), "data", "qwen2_vl_chat_template.jinja")).read()
# Smallest and largest image the tiny image processor keeps: 4 to 16 image tokens (patch 14, merged 2 x 2).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def make_vision_tokenizer():
    """The tiny tokenizer plus the Qwen2-VL vision tokens, with Qwen2-VL's own chat template."""
    return make_tokenizer(extra_special_tokens=VISION_TOKENS, chat_template=QWEN2_VL_CHAT_TEMPLATE)


def make_image_processor(patch_size: int = 14):
    """Qwen2-VL's image processor (the PIL one: torchvision is not needed) with tiny image sizes."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    scale = (patch_size / 14) ** 2
    return Qwen2VLImageProcessorPil(min_pixels=int(MIN_PIXELS * scale), max_pixels=int(MAX_PIXELS * scale),
                                    patch_size=patch_size, merge_size=2, temporal_patch_size=2)


def make_vision_model(tokenizer, arch: str = "qwen2_vl", hidden: int = 64, seed: int = 0):
    """A randomly initialised Qwen2-VL-family model (2 text layers, a 2-block vision tower)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_parameters=rope,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = {
        "qwen2_vl": dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=14),
        "qwen2_5_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, fullatt_block_indexes=[1], window_size=56),
        "qwen3_vl": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden, patch_size=16,
                         deepstack_visual_indexes=[1], num_position_embeddings=64),
    }[arch]
    if arch == "qwen3_vl":
        text.update(head_dim=hidden // 4, rope_parameters={**rope, "mrope_interleaved": True})
    config = AutoConfig.for_model(
        arch, text_config=text, vision_config=dict(vision, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config)


def save_tiny_vlm(path, arch: str = "qwen2_vl", seed: int = 0) -> str:
    """A tiny vision-language model saved like a published one: weights, tokenizer, preprocessor_config.json."""
    tokenizer = make_vision_tokenizer()
    model = make_vision_model(tokenizer, arch=arch, seed=seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    make_image_processor(16 if arch == "qwen3_vl" else 14).save_pretrained(path)
    return str(path)


SHAPE_COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220)}


def make_pngs(folder, sizes=((56, 56), (84, 56), (112, 112))) -> list[str]:
    """A few PNGs of coloured squares on white, one per size (in pixels, width x height)."""
    from PIL import Image, ImageDraw

    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, (size, color) in enumerate(zip(sizes, list(SHAPE_COLORS.values()) * len(sizes))):
        image = Image.new("RGB", size, (255, 255, 255))
        ImageDraw.Draw(image).rectangle([size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4], fill=color)
        paths.append(os.path.join(str(folder), f"image{index}.png"))
        image.save(paths[-1])
    return paths
