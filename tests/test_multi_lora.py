"""Several adapters on one base: each batch row gets exactly its own adapter's output (peft and ours as references)."""
import copy

import pytest
import torch

import tiny
from serving import save_two_adapters
from sftkit.lora import LoRAConfig, LoRALinear, inject_lora, load_adapter, save_adapter
from sftkit.serve.multi_lora import MultiLoRALinear, serve_adapters

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def base(tokenizer):
    return tiny.make_model(tokenizer, seed=2).eval()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    return save_two_adapters(base, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def input_ids(tokenizer):
    return torch.randint(0, len(tokenizer), (3, 9), generator=torch.Generator().manual_seed(0))


def reference_logits(base, folder, input_ids):
    from peft import PeftModel

    model = copy.deepcopy(base)
    if folder is None:
        return tiny.logits(model, input_ids)
    return tiny.logits(PeftModel.from_pretrained(model, folder), input_ids)


def test_every_row_gets_its_own_adapter(base, adapters, input_ids):
    served = copy.deepcopy(base)
    rows = serve_adapters(served, adapters)
    for choice in ([None, "ours", "peft"], ["peft", "peft", "ours"], ["ours"] * 3, [None] * 3):
        rows.assign(choice, "cpu")
        logits = tiny.logits(served, input_ids)
        for row, name in enumerate(choice):
            expected = reference_logits(base, adapters.get(name), input_ids[row:row + 1])[0]
            assert (logits[row] - expected).abs().max().item() <= 1e-5, (choice, row)


def test_a_loaded_lora_checkpoint_is_served_beside_the_others(base, adapters, input_ids):
    served = copy.deepcopy(base)
    load_adapter(served, adapters["ours"])
    rows = serve_adapters(served, {"peft": adapters["peft"]}, loaded_as="run")
    assert not any(isinstance(module, LoRALinear) for module in served.modules())
    rows.assign(["run", "peft", None], "cpu")
    logits = tiny.logits(served, input_ids)
    for row, folder in enumerate([adapters["ours"], adapters["peft"], None]):
        expected = reference_logits(base, folder, input_ids[row:row + 1])[0]
        assert (logits[row] - expected).abs().max().item() <= 1e-5


def test_an_adapter_of_another_base_is_refused_before_anything_changes(base, adapters, tokenizer, tmp_path):
    wider = tiny.make_model(tokenizer, hidden=32)
    config = LoRAConfig(r=4, target_modules=("q_proj",))
    inject_lora(wider, config)
    save_adapter(wider, config, tmp_path / "wider")
    served = copy.deepcopy(base)
    with pytest.raises(ValueError, match="belongs to another base model"):
        serve_adapters(served, {"ours": adapters["ours"], "wider": str(tmp_path / "wider")})
    assert not any(isinstance(module, MultiLoRALinear) for module in served.modules())
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        serve_adapters(served, {"missing": str(tmp_path)})
