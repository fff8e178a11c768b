"""Quantized bases: QLoRA with bitsandbytes 4/8-bit on CPU, GPTQ checkpoints, 8-bit AdamW."""
import copy
import importlib.util
import json
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import tiny
from tiny import ALL_LINEAR_LLAMA, logits, randomize_lora_B
from sftkit.lora import (
    LoRAConfig,
    LoRALinear,
    LoRAQuantLinear,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unload_lora,
)
from sftkit.model import ModelLoadError, load_model
from sftkit.quant import (
    QuantizationError,
    QuantizationOptions,
    bnb_config,
    is_quantized,
    is_quantized_linear,
    make_optimizer,
)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_GPTQ = all(importlib.util.find_spec(name) is not None for name in ("gptqmodel", "optimum"))
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes: pip install bitsandbytes")
# peft 0.21 calls a transformers 5 API that is deprecated; bitsandbytes warns that CPU int8 matmuls run in fp16.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:MatMul8bitLt"),
]

NF4 = QuantizationOptions(bits=4)


@pytest.fixture(scope="module")
def input_ids(tokenizer):
    return torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))




def train_steps(model, input_ids, steps=4, lr=1e-2) -> list[float]:
    """A few AdamW steps on the LoRA parameters, checking after the first backward that only they got gradients."""
    optimizer = torch.optim.AdamW(lora_state_dict(model).values(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        if step == 0:
            with_grad = {name for name, param in model.named_parameters() if param.grad is not None}
            assert with_grad == set(lora_state_dict(model))
            # B starts at zero, so only B's gradient is non-zero on the first step.
            assert all(p.grad.abs().sum() > 0 for name, p in lora_state_dict(model).items() if "lora_B" in name)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# -- options --------------------------------------------------------------------------------------------------


def test_options_validate_every_field_and_zero_means_off():
    assert not QuantizationOptions().enabled
    assert QuantizationOptions(bits=0) == QuantizationOptions()
    with pytest.raises(ValueError) as error:
        QuantizationOptions(bits=3, bnb_4bit_quant_type="int4", bnb_4bit_compute_dtype="fp64")
    assert all(field in str(error.value) for field in ("bits", "bnb_4bit_quant_type", "bnb_4bit_compute_dtype"))


@pytest.mark.parametrize("double_quant", [True, False])
def test_bnb_config_carries_the_options(double_quant):
    options = QuantizationOptions(bits=4, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=double_quant)
    config = bnb_config(options, torch.bfloat16)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "fp4"
    assert config.bnb_4bit_use_double_quant is double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16  # "auto" follows the load dtype
    explicit = bnb_config(QuantizationOptions(bits=4, bnb_4bit_compute_dtype="fp32"), torch.bfloat16)
    assert explicit.bnb_4bit_compute_dtype == torch.float32
    assert bnb_config(QuantizationOptions(bits=8), torch.float32).load_in_8bit


def test_missing_bitsandbytes_says_what_to_install(monkeypatch, tiny_model_dir):
    find_spec = importlib.util.find_spec
    hidden = {"bitsandbytes"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else find_spec(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install 'sftkit\[quant\]'.*pip install bitsandbytes"):
        load_model(tiny_model_dir, quantization=NF4)
    with pytest.raises(QuantizationError, match="pip install bitsandbytes"):
        make_optimizer("adamw_8bit", [nn.Parameter(torch.zeros(2))], lr=1e-3)


def test_quantizing_a_gptq_checkpoint_again_is_refused(tmp_path):
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gptq"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"already quantized \(gptq\)"):
        load_model(str(tmp_path), quantization=NF4)


# -- bitsandbytes QLoRA ---------------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize(
    "options, layer_class",
    [
        (QuantizationOptions(bits=4, bnb_4bit_quant_type="nf4"), "Linear4bit"),
        (QuantizationOptions(bits=4, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False), "Linear4bit"),
        (QuantizationOptions(bits=8), "Linear8bitLt"),
    ],
    ids=["nf4", "fp4", "int8"],
)
def test_lora_trains_on_a_quantized_base(tiny_model_dir, input_ids, options, layer_class):
    model = load_model(tiny_model_dir, quantization=options)
    assert is_quantized(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == layer_class and is_quantized_linear(q_proj)
    if options.bits == 4:
        assert q_proj.weight.quant_state.quant_type == options.bnb_4bit_quant_type
        assert q_proj.weight.quant_state.nested is options.bnb_4bit_use_double_quant
    assert not any(param.requires_grad for param in model.parameters())

    full_precision_total = count_parameters(load_model(tiny_model_dir))[1]
    assert count_parameters(model) == (0, full_precision_total)  # packed weights count as the weights they hold

    names = inject_lora(model, LoRAConfig(r=8, dropout=0.0))
    assert names == ALL_LINEAR_LLAMA  # all-linear finds the quantized linears, not the head
    assert type(model.lm_head) is nn.Linear
    assert all(isinstance(model.get_submodule(name), LoRAQuantLinear) for name in names)
    assert {param.dtype for param in lora_state_dict(model).values()} == {torch.float32}

    losses = train_steps(model, input_ids)
    assert losses[-1] < losses[0] - 0.1, losses


@needs_bnb
def test_unquantized_half_params_go_to_float32_and_compute_follows_dtype(tiny_model_dir, input_ids):
    """peft's k-bit preparation: norms, embeddings and head in float32; the 4-bit matmuls in the load dtype."""
    model = load_model(tiny_model_dir, dtype="bf16", quantization=NF4)
    float_dtypes = {param.dtype for param in model.parameters() if param.dtype.is_floating_point}
    assert float_dtypes == {torch.float32}
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    assert logits(model, input_ids).dtype == torch.float32


@needs_bnb
@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames it activation_checkpointing_enable
def test_gradient_checkpointing_on_a_4bit_base_gives_the_same_lora_grads(tiny_model_dir, input_ids):
    model = load_model(tiny_model_dir, quantization=NF4, gradient_checkpointing=True)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    randomize_lora_B(model)
    model.train()

    def lora_grads():
        model(input_ids, labels=input_ids).loss.backward()
        grads = {name: param.grad.clone() for name, param in lora_state_dict(model).items()}
        model.zero_grad(set_to_none=True)
        return grads

    checkpointed = lora_grads()
    model.gradient_checkpointing_disable()
    plain = lora_grads()
    assert all(torch.allclose(checkpointed[name], plain[name], atol=1e-6) for name in plain)


@needs_bnb
def test_adapter_from_a_4bit_base_loads_on_the_full_precision_base(tiny_model_dir, input_ids, tmp_path):
    """How QLoRA adapters are used: trained on the 4-bit base, applied (and merged) on the full-precision one."""
    from peft import PeftModel

    quantized = load_model(tiny_model_dir, quantization=NF4)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    inject_lora(quantized, config)
    randomize_lora_B(quantized)
    save_adapter(quantized, config, str(tmp_path))

    base = load_model(tiny_model_dir)
    ours = copy.deepcopy(base)
    assert load_adapter(ours, str(tmp_path)) == config
    assert all(type(layer) is LoRALinear for layer in ours.modules() if isinstance(layer, LoRALinear))
    saved = lora_state_dict(quantized)
    assert all(torch.equal(param, saved[name]) for name, param in lora_state_dict(ours).items())
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert (logits(ours, input_ids) - logits(theirs, input_ids)).abs().max() <= 1e-5
    assert (logits(ours, input_ids) - logits(base, input_ids)).abs().max() > 1e-3

    again = load_model(tiny_model_dir, quantization=NF4)  # and back onto a quantized base, to train on
    load_adapter(again, str(tmp_path))
    assert torch.equal(logits(again, input_ids), logits(quantized, input_ids))


@needs_bnb
def test_chat_loads_a_qlora_checkpoint_on_the_quantized_base(tiny_model_dir, tmp_path):
    """sft_args.json of a QLoRA run makes inference quantize the base the same way, as ms-swift does."""
    from sftkit.chat import load_for_inference

    quantized = load_model(tiny_model_dir, quantization=NF4)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    inject_lora(quantized, config)
    save_adapter(quantized, config, str(tmp_path / "checkpoint-1"))
    args = {"model_dir": tiny_model_dir, "template": "chatml", "quantization_bit": 4, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "sft_args.json").write_text(json.dumps(args))
    model, _, settings = load_for_inference(str(tmp_path / "checkpoint-1"))
    assert is_quantized(model) and settings.template == "chatml"
    assert any(isinstance(layer, LoRAQuantLinear) for layer in model.modules())


@needs_bnb
def test_merging_into_quantized_weights_is_refused(tiny_model_dir):
    model = load_model(tiny_model_dir, quantization=QuantizationOptions(bits=8))
    inject_lora(model, LoRAConfig(target_modules=["q_proj"]))
    message = "loses quality: reload the base in full precision and merge there"
    with pytest.raises(ValueError, match=message):
        merge_lora(model)
    with pytest.raises(ValueError, match=message):
        unload_lora(model)


def test_plain_model_is_not_quantized(tokenizer):
    assert not is_quantized(tiny.make_model(tokenizer))


# -- 8-bit AdamW ----------------------------------------------------------------------------------------------


@needs_bnb
def test_adamw_8bit_runs_on_cpu_close_to_adamw():
    """Tensors of 4096+ elements get 8-bit moments (state1/state2 uint8); smaller ones keep float32 moments."""
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 64, generator=generator), torch.randn(8, generator=generator)]
    runs = {}
    for name in ("adamw", "adamw_8bit"):
        params = [nn.Parameter(tensor.clone()) for tensor in start]
        optimizer = make_optimizer(name, params, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
        for _ in range(3):
            sum((param**2).sum() for param in params).backward()
            optimizer.step()
            optimizer.zero_grad()
        runs[name] = (params, optimizer)
    (exact, adamw), (approximate, adamw_8bit) = runs["adamw"], runs["adamw_8bit"]
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw_8bit.state[approximate[0]]["state1"].dtype == torch.uint8
    assert adamw_8bit.state[approximate[1]]["state1"].dtype == torch.float32
    # 8-bit moments round a little: the two runs' updates differ by ~1.5% of their size.
    assert all((a - b).norm() < 0.05 * (a - s).norm() for a, b, s in zip(exact, approximate, start))
    assert (approximate[0] - start[0]).abs().min() > 0  # every element moved


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="adamw, adamw_8bit"):
        make_optimizer("sgd", [nn.Parameter(torch.zeros(2))], lr=1e-3)


# -- GPTQ -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_dirs(tmp_path_factory, tokenizer):
    """(full-precision dir, GPTQ dir) of a tiny llama, quantized here on CPU: hidden 128 and group size 32,
    since the kernels need in_features divisible by the group size and by 32."""
    from transformers import GPTQConfig

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # read when gptqmodel is imported; the CI box has 2 cores

    full_dir = tmp_path_factory.mktemp("tiny-llama-128")
    model = tiny.make_model(tokenizer, hidden=128)
    model.save_pretrained(full_dir)
    tokenizer.save_pretrained(full_dir)
    gptq_config = GPTQConfig(bits=4, group_size=32, dataset=tiny.CORPUS[:8], tokenizer=tokenizer)
    quantized = AutoModelForCausalLM.from_pretrained(
        full_dir, dtype=torch.float16, quantization_config=gptq_config, device_map={"": "cpu"}
    )
    gptq_dir = tmp_path_factory.mktemp("tiny-llama-gptq")
    quantized.save_pretrained(gptq_dir)
    tokenizer.save_pretrained(gptq_dir)
    return str(full_dir), str(gptq_dir)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Attempting to save a model with offloaded modules")  # CPU placement, not offload
@pytest.mark.skipif(not HAS_GPTQ, reason="needs gptqmodel and optimum: pip install gptqmodel optimum")
def test_lora_trains_on_a_gptq_checkpoint(gptq_dirs, input_ids, tmp_path):
    full_dir, gptq_dir = gptq_dirs
    model = load_model(gptq_dir)
    assert is_quantized(model)
    assert not any(param.requires_grad for param in model.parameters())
    names = inject_lora(model, LoRAConfig(r=8, dropout=0.0))
    assert names == ALL_LINEAR_LLAMA
    assert all(isinstance(model.get_submodule(name).base_layer.qweight, torch.Tensor) for name in names)
    losses = train_steps(model, input_ids, steps=5)
    assert losses[-1] < losses[0] - 0.1, losses
    with pytest.raises(ValueError, match="reload the base in full precision"):
        merge_lora(model)

    config = LoRAConfig(r=8, dropout=0.0)
    save_adapter(model, config, str(tmp_path))
    reloaded = load_model(gptq_dir)
    load_adapter(reloaded, str(tmp_path))
    # gptqmodel's CPU kernel repacks its weight on the first forward in train mode and keeps that layout, whose
    # results differ from the inference layout's by ~1e-3: compare the two models in the same layout.
    with torch.no_grad():
        reloaded.train()(input_ids)
    assert torch.allclose(logits(reloaded, input_ids), logits(model, input_ids), atol=1e-5)
    full = load_model(full_dir)
    load_adapter(full, str(tmp_path))
    merge_lora(full)  # the adapter merges into the full-precision base
    with pytest.raises(ModelLoadError, match="already quantized"):
        load_model(gptq_dir, quantization=NF4)
