"""A tiny stand-in for ChatGLM2/3's remote code (written for sftkit's tests): its config field names."""
from transformers import PretrainedConfig


class TinyGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, padded_vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                 seq_length=512, layernorm_epsilon=1e-5, **kwargs):
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        super().__init__(**kwargs)
