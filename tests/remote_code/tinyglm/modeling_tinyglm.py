"""A tiny stand-in for ChatGLM2/3's remote code (written for sftkit's tests), with the layout that matters to a
trainer: hidden states [sequence, batch, hidden], the head at transformer.output_layer (no lm_head, so
get_output_embeddings() is None), a fused query_key_value, its own tuple KV cache, and forwards without **kwargs."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_tinyglm import TinyGLMConfig


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden, mask, past):
        length, batch, _ = hidden.shape
        query, key, value = self.query_key_value(hidden).view(length, batch, 3, self.heads, self.head_dim).unbind(2)
        if past is not None:  # [past, batch, heads, head_dim], sequence first as ChatGLM2 keeps it
            key, value = torch.cat([past[0], key]), torch.cat([past[1], value])
        present = (key, value)
        query, key, value = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return self.dense(context.permute(2, 0, 1, 3).reshape(length, batch, -1)), present


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden)))


class GLMBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden, mask, past):
        attended, present = self.self_attention(self.input_layernorm(hidden), mask, past)
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), present


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.seq_length, config.hidden_size)

    def forward(self, input_ids, position_ids):
        return (self.word_embeddings(input_ids) + self.position_embeddings(position_ids)).transpose(0, 1)


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class TinyGLMPreTrainedModel(PreTrainedModel):
    config_class = TinyGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class TinyGLMModel(TinyGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def forward(self, input_ids, position_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, output_hidden_states=None, return_dict=None):
        batch, length = input_ids.shape
        past_length = past_key_values[0][0].shape[0] if past_key_values else 0
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=input_ids.device).expand(batch, -1)
        hidden = self.embedding(input_ids, position_ids)
        total = past_length + length
        causal = torch.ones(length, total, dtype=torch.bool, device=input_ids.device).tril(past_length)
        mask = causal[None, None]
        if attention_mask is not None:
            # A left-padded position still sees itself, so no attention row is empty (no NaN to spread).
            itself = torch.arange(total, device=input_ids.device)[None] == torch.arange(length, device=input_ids.device)[:, None] + past_length
            mask = (mask & attention_mask[:, None, None, :total].bool()) | itself
        presents = []
        for index, layer in enumerate(self.encoder.layers):
            hidden, present = layer(hidden, mask, past_key_values[index] if past_key_values else None)
            presents.append(present)
        hidden = self.encoder.final_layernorm(hidden)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=tuple(presents) if use_cache else None)


class TinyGLMForConditionalGeneration(TinyGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = TinyGLMModel(config)
        self.post_init()

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                return_last_logit=False):
        outputs = self.transformer(input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   past_key_values=past_key_values, use_cache=use_cache)
        hidden = outputs.last_hidden_state
        if return_last_logit:
            hidden = hidden[-1:]
        logits = self.transformer.output_layer(hidden).transpose(0, 1).contiguous()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)
