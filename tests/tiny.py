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


def make_tokenizer(vocab_size: int = 600):
    """A byte-level BPE tokenizer with ChatML specials and chat template, trained in well under a second."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
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
        chat_template=CHATML_JINJA,
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
