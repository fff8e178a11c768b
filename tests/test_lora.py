"""sftkit's LoRA against peft, the reference: same outputs, each side loads the other's adapter, same merge."""
import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import tiny
from tiny import ALL_LINEAR_LLAMA, logits, randomize_lora_B
from sftkit.lora import (
    PEFT_PREFIX,
    LoRAConfig,
    LoRALinear,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)

QV = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
QV += [name.replace("layers.0", "layers.1") for name in QV]
# peft 0.21 calls a transformers 5 API that is deprecated; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")



@pytest.fixture(scope="module")
def input_ids(tokenizer):
    return torch.randint(0, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))



def max_diff(a, b):
    return (a - b).abs().max().item()



def peft_model_for(model, config):
    """The peft reference, built from our own peft dict (which also checks peft accepts it)."""
    return get_peft_model(model, LoraConfig(**config.to_peft_dict()))


def tied_model(tokenizer):
    config = tiny.make_model(tokenizer).config
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


# -- init and forward ----------------------------------------------------------------------------------------


def test_injected_model_starts_equal_to_base(tokenizer, input_ids):
    base = tiny.make_model(tokenizer)
    model = copy.deepcopy(base)
    inject_lora(model, LoRAConfig(r=8))
    assert torch.equal(logits(model, input_ids), logits(base, input_ids))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear)
    assert not torch.all(layer.lora_A.weight == 0)
    assert layer.lora_A.weight.abs().max() <= 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt 5) bound
    assert torch.all(layer.lora_B.weight == 0)


def test_gaussian_init_has_std_one_over_r(tokenizer):
    model = tiny.make_model(tokenizer)
    inject_lora(model, LoRAConfig(r=4, init="gaussian"))
    weights = torch.cat([layer.lora_A.weight.flatten() for layer in model.modules() if isinstance(layer, LoRALinear)])
    assert weights.std().item() == pytest.approx(1 / 4, rel=0.1)


@pytest.mark.parametrize("arch, use_rslora", [("llama", False), ("qwen2", True), ("mistral", False)])
def test_same_logits_and_merge_as_peft(tokenizer, input_ids, arch, use_rslora):
    base = tiny.make_model(tokenizer, arch=arch)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, use_rslora=use_rslora)
    ours = copy.deepcopy(base)
    names = inject_lora(ours, config)
    randomize_lora_B(ours)
    theirs = peft_model_for(copy.deepcopy(base), config)
    set_peft_model_state_dict(theirs, {PEFT_PREFIX + key: value for key, value in lora_state_dict(ours).items()})

    assert names == sorted(theirs.base_model.targeted_module_names)
    assert max_diff(logits(ours, input_ids), logits(base, input_ids)) > 1e-3
    assert max_diff(logits(ours, input_ids), logits(theirs, input_ids)) <= 1e-5
    merged_theirs = theirs.merge_and_unload().state_dict()
    merged_ours = unload_lora(ours).state_dict()
    assert merged_ours.keys() == merged_theirs.keys()
    assert all(torch.allclose(merged_ours[key], merged_theirs[key], atol=1e-6) for key in merged_ours)


def test_rslora_scaling():
    assert LoRAConfig(r=16, alpha=32).scaling == 2.0
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == 8.0


def test_bf16_layers_stay_bf16(tokenizer, input_ids):
    model = tiny.make_model(tokenizer).to(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    randomize_lora_B(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    unmerged = logits(model, input_ids)
    assert unmerged.dtype == torch.bfloat16
    merge_lora(model)
    assert max_diff(logits(model, input_ids).float(), unmerged.float()) < 0.1


def test_float32_adapters_on_a_bf16_base(tokenizer, input_ids):
    """What train does: a frozen bf16 base with float32 adapters that the optimizer updates."""
    model = tiny.make_model(tokenizer).to(torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    randomize_lora_B(model)
    for param in lora_state_dict(model).values():
        param.data = param.data.float()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora_state_dict(model).values())
    unmerged = logits(model, input_ids)
    assert unmerged.dtype == torch.bfloat16
    merge_lora(model)
    assert max_diff(logits(model, input_ids).float(), unmerged.float()) < 0.1


def test_bf16_merge_adds_in_float32_and_rounds_once():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64, dtype=torch.bfloat16), LoRAConfig(r=8))
    nn.init.normal_(layer.lora_B.weight, std=0.02)
    A, B, W = layer.lora_A.weight.float(), layer.lora_B.weight.float(), layer.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.weight, (W.float() + B @ A * layer.scaling).to(torch.bfloat16))


def test_lora_weights_follow_a_non_float_base_to_float32():
    base = nn.Linear(8, 4)
    base.weight = nn.Parameter(torch.ones(4, 8, dtype=torch.int8), requires_grad=False)
    layer = LoRALinear(base, LoRAConfig(r=2))
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_cpu(tokenizer, input_ids):
    cpu = tiny.make_model(tokenizer)
    inject_lora(cpu, LoRAConfig(r=4, dropout=0.0))
    randomize_lora_B(cpu)
    gpu = tiny.make_model(tokenizer).to("cuda", torch.bfloat16)
    inject_lora(gpu, LoRAConfig(r=4, dropout=0.0))
    assert {(p.device.type, p.dtype) for p in gpu.parameters()} == {("cuda", torch.bfloat16)}
    with torch.no_grad():
        for key, value in lora_state_dict(gpu).items():
            value.copy_(lora_state_dict(cpu)[key])
    assert max_diff(logits(gpu, input_ids.cuda()).float().cpu(), logits(cpu, input_ids)) < 0.1
    gpu.train()
    gpu(input_ids.cuda(), labels=input_ids.cuda()).loss.backward()
    assert all(p.grad is not None for name, p in gpu.named_parameters() if "lora_" in name)


# -- adapters in peft's format --------------------------------------------------------------------------------


def test_sftkit_adapter_loads_in_peft(tokenizer, input_ids, tmp_path):
    base = tiny.make_model(tokenizer)
    ours = copy.deepcopy(base)
    config = LoRAConfig(r=4, alpha=16)
    inject_lora(ours, config)
    randomize_lora_B(ours)
    save_adapter(ours, config, tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert max_diff(logits(theirs, input_ids), logits(ours, input_ids)) <= 1e-5


def test_peft_adapter_loads_in_sftkit(tokenizer, input_ids, tmp_path):
    base = tiny.make_model(tokenizer, arch="qwen2")
    theirs = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    randomize_lora_B(theirs)
    theirs.save_pretrained(tmp_path)

    ours = copy.deepcopy(base)
    config = load_adapter(ours, tmp_path)
    assert config == LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    assert sorted(name for name, m in ours.named_modules() if isinstance(m, LoRALinear)) == QV
    assert max_diff(logits(ours, input_ids), logits(theirs, input_ids)) <= 1e-5


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], r".*\.(q_proj|v_proj)"])
def test_adapter_files_equal_peft_files(tiny_model_dir, tmp_path, target_modules):
    config = LoRAConfig(r=4, alpha=8, dropout=0.1, target_modules=target_modules)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inject_lora(ours, config)
    save_adapter(ours, config, tmp_path / "ours")
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=target_modules, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft_config).save_pretrained(tmp_path / "peft")

    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert ours_config.keys() == peft_config.keys()
    assert ours_config["base_model_name_or_path"] == tiny_model_dir
    for key in peft_config.keys() - {"peft_version", "target_modules"}:
        assert ours_config[key] == peft_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(peft_config["target_modules"])

    ours_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_tensors.keys() == peft_tensors.keys()
    assert all(ours_tensors[key].shape == peft_tensors[key].shape for key in ours_tensors)
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_config_round_trips_through_peft_dict():
    config = LoRAConfig(r=16, alpha=32, dropout=0.1, target_modules=["v_proj", "q_proj"], use_rslora=True,
                        init="gaussian")
    assert LoRAConfig.from_peft_dict(config.to_peft_dict()) == config
    assert LoRAConfig(target_modules="ALL").target_modules == "all-linear"


def test_peft_features_we_lack_are_refused():
    with pytest.raises(ValueError, match="use_dora"):
        LoRAConfig.from_peft_dict({**LoRAConfig().to_peft_dict(), "use_dora": True})
    with pytest.raises(ValueError, match="pissa"):
        LoRAConfig.from_peft_dict({**LoRAConfig().to_peft_dict(), "init_lora_weights": "pissa"})


def test_invalid_config_reports_every_problem():
    with pytest.raises(ValueError, match="r must be.*dropout must be.*init must be"):
        LoRAConfig(r=0, dropout=1.5, init="pissa")


def test_strict_load_names_missing_and_unexpected_keys(tokenizer, tmp_path):
    model = tiny.make_model(tokenizer)
    config = LoRAConfig(r=4, target_modules=["q_proj"])
    inject_lora(model, config)
    save_adapter(model, config, tmp_path)
    weights_path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights_path)
    missing = PEFT_PREFIX + "model.layers.1.self_attn.q_proj.lora_B.weight"
    extra = PEFT_PREFIX + "model.layers.1.self_attn.k_proj.lora_A.weight"

    save_file({key: value for key, value in tensors.items() if key != missing}, weights_path)
    fresh = tiny.make_model(tokenizer)
    with pytest.raises(ValueError, match=f"missing keys: {missing}"):
        load_adapter(fresh, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())  # refused before touching the model

    save_file({**tensors, extra: tensors[missing.replace("lora_B", "lora_A")].clone()}, weights_path)
    with pytest.raises(ValueError, match=f"unexpected keys: {extra}"):
        load_adapter(fresh, tmp_path)


def test_save_refuses_a_config_that_does_not_describe_the_model(tokenizer, tmp_path):
    model = tiny.make_model(tokenizer)
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="does not select exactly"):
        save_adapter(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path)
    with pytest.raises(ValueError, match="r=8"):
        save_adapter(model, LoRAConfig(r=8, target_modules=["q_proj"]), tmp_path)


# -- target matching ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target_modules, expected",
    [
        (r".*\.(q_proj|v_proj)", QV),
        (["q_proj", "v_proj"], QV),
        (["self_attn.o_proj"], ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]),
        ("all-linear", ALL_LINEAR_LLAMA),
        ("ALL", ALL_LINEAR_LLAMA),
    ],
)
def test_targets_match_like_peft(tokenizer, target_modules, expected):
    model = tiny.make_model(tokenizer)
    assert inject_lora(copy.deepcopy(model), LoRAConfig(target_modules=target_modules)) == expected
    peft_targets = "all-linear" if target_modules == "ALL" else target_modules
    peft_model = get_peft_model(model, LoraConfig(target_modules=peft_targets, task_type="CAUSAL_LM"))
    assert sorted(peft_model.base_model.targeted_module_names) == expected


def test_all_linear_skips_a_tied_output_head(tokenizer):
    assert inject_lora(tied_model(tokenizer), LoRAConfig()) == ALL_LINEAR_LLAMA


def test_merge_refuses_a_tied_weight(tokenizer):
    model = tied_model(tokenizer)
    inject_lora(model, LoRAConfig(target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="lm_head"):
        merge_lora(model)


# A list entry matches whole dotted components only, and a string must match the whole name.
@pytest.mark.parametrize("target_modules", [["qkv_proj"], ["proj"], "q_proj"])
def test_no_match_names_existing_modules(tokenizer, target_modules):
    with pytest.raises(ValueError, match="matches no layer.*q_proj, k_proj, v_proj.*model.layers.0.self_attn.q_proj"):
        inject_lora(tiny.make_model(tokenizer), LoRAConfig(target_modules=target_modules))


def test_non_linear_target_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="LlamaMLP"):
        inject_lora(tiny.make_model(tokenizer), LoRAConfig(target_modules=["mlp"]))


def test_injecting_twice_is_an_error(tokenizer):
    model = tiny.make_model(tokenizer)
    inject_lora(model, LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(model, LoRAConfig(target_modules=["v_proj"]))


# -- merge ----------------------------------------------------------------------------------------------------


def test_merge_is_idempotent_and_round_trips(tokenizer, input_ids):
    model = tiny.make_model(tokenizer)
    inject_lora(model, LoRAConfig(r=4))
    randomize_lora_B(model)
    base_weights = {key: value.clone() for key, value in model.state_dict().items() if "lora_" not in key}
    unmerged = logits(model, input_ids)

    merge_lora(model)
    merged_once = {key: value.clone() for key, value in model.state_dict().items()}
    merge_lora(model)
    assert all(torch.equal(value, merged_once[key]) for key, value in model.state_dict().items())
    assert max_diff(logits(model, input_ids), unmerged) <= 1e-5
    assert any(not torch.equal(merged_once[key], value) for key, value in base_weights.items())

    unmerge_lora(model)
    unmerge_lora(model)
    assert all(torch.allclose(model.state_dict()[key], value, atol=1e-6) for key, value in base_weights.items())
    assert max_diff(logits(model, input_ids), unmerged) <= 1e-5


def test_unloaded_model_saves_and_loads_as_the_base_architecture(tiny_model_dir, input_ids, tmp_path):
    base_keys = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().keys()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inject_lora(model, LoRAConfig(r=4))
    randomize_lora_B(model)
    expected = logits(model, input_ids)

    unload_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == base_keys
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.state_dict().keys() == base_keys
    assert max_diff(logits(reloaded, input_ids), expected) <= 1e-5


# -- training -------------------------------------------------------------------------------------------------


def test_only_lora_parameters_train(tokenizer, input_ids):
    model = tiny.make_model(tokenizer)
    base_total = sum(p.numel() for p in model.parameters())
    inject_lora(model, LoRAConfig(r=4))
    randomize_lora_B(model)
    lora_total = sum(value.numel() for value in lora_state_dict(model).values())
    assert count_parameters(model) == (lora_total, base_total + lora_total)

    model.train()
    model(input_ids, labels=input_ids).loss.backward()
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name


def test_dropout_only_in_train_mode(tokenizer, input_ids):
    model = tiny.make_model(tokenizer)
    inject_lora(model, LoRAConfig(r=4, dropout=0.5))
    randomize_lora_B(model)
    model.train()
    with torch.no_grad():
        assert max_diff(model(input_ids).logits, model(input_ids).logits) > 1e-4
    assert torch.equal(logits(model, input_ids), logits(model, input_ids))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames it activation_checkpointing_enable
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_lora_grads(tokenizer, input_ids, use_reentrant):
    def lora_grads(checkpointing):
        model = tiny.make_model(tokenizer)
        inject_lora(model, LoRAConfig(r=4, dropout=0.0))
        randomize_lora_B(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            # Frozen embeddings give the checkpointed blocks inputs without grad; reentrant checkpointing then
            # drops the LoRA grads. transformers 5 registers this hook itself, 4.x only for peft models.
            model.enable_input_require_grads()
        model.train()
        model(input_ids, labels=input_ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    reference, checkpointed = lora_grads(False), lora_grads(True)
    assert reference.keys() == checkpointed.keys()
    for name, grad in checkpointed.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.allclose(grad, reference[name], atol=1e-6), name
