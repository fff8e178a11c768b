"""Varlen attention: packed rows and right-padded batches train exactly as the masked reference, with no T x T mask."""
import json

import pytest
import torch
import torch.nn.functional as F

import tiny
from sftkit.attention import VARLEN, find_documents, is_right_padded, use_varlen_attention
from sftkit.data.pipeline import collate, collate_flat, collate_packed, pack
from sftkit.lora import LoRAConfig, inject_lora
from sftkit.loss import loss_sum

ARCHITECTURES = [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 4})]  # mistral: a window shorter than the documents


def examples(lengths=(7, 12, 5, 9, 3, 11), seed=0):
    generator = torch.Generator().manual_seed(seed)
    made = []
    for length in lengths:
        ids = torch.randint(10, 500, (length,), generator=generator).tolist()
        made.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return made


def lora_model(tokenizer, arch="llama", varlen=False, **config):
    model = tiny.make_model(tokenizer, arch=arch)
    for key, value in config.items():
        setattr(model.config, key, value)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear"))
    tiny.randomize_lora_B(model)
    if varlen:
        use_varlen_attention(model)
    return model.train()


def loss_and_grads(model, batches):
    """Summed loss over the batches and the gradients of the trainable parameters."""
    model.zero_grad()
    total = sum(loss_sum(model, batch)[0] for batch in batches)
    total.backward()
    return total.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def assert_same(expected, actual):
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5)
    for want, got in zip(expected[1], actual[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch,config", ARCHITECTURES, ids=[a for a, _ in ARCHITECTURES])
def test_packed_rows_give_the_loss_and_gradients_of_each_example_alone(tokenizer, arch, config):
    data = examples()
    rows = collate_packed(pack(data, 24), tokenizer.pad_token_id)
    assert rows["input_ids"].shape[0] > 1 and (rows["position_ids"] == 0).sum() > rows["input_ids"].shape[0]
    reference = loss_and_grads(lora_model(tokenizer, arch, **config), [collate([e], tokenizer.pad_token_id) for e in data])
    assert_same(reference, loss_and_grads(lora_model(tokenizer, arch, varlen=True, **config), [rows]))


@pytest.mark.parametrize("arch,config", ARCHITECTURES, ids=[a for a, _ in ARCHITECTURES])
def test_right_padded_batch_without_its_mask_equals_the_masked_batch(tokenizer, arch, config):
    batches = [collate(part, tokenizer.pad_token_id) for part in (examples()[:3], examples()[3:])]
    assert all((batch["attention_mask"] == 0).any() for batch in batches)
    reference = loss_and_grads(lora_model(tokenizer, arch, **config), batches)
    assert_same(reference, loss_and_grads(lora_model(tokenizer, arch, varlen=True, **config), batches))


@pytest.mark.parametrize("arch,config", ARCHITECTURES, ids=[a for a, _ in ARCHITECTURES])
def test_padding_free_batch_equals_the_padded_batch(tokenizer, arch, config):
    """--padding_free: the same micro-batches as padded rows, one row each without a pad, the same loss and gradients."""
    parts = (examples()[:3], examples()[3:])
    padded = [collate(part, tokenizer.pad_token_id) for part in parts]
    flat = [collate_flat(part, tokenizer.pad_token_id) for part in parts]
    assert [batch["input_ids"].shape for batch in flat] == [(1, 24), (1, 23)]  # 7+12+5 and 9+3+11 tokens, no pad
    assert [batch["document_boundaries"].tolist() for batch in flat] == [[0, 7, 19, 24], [0, 9, 12, 23]]
    reference = loss_and_grads(lora_model(tokenizer, arch, **config), padded)
    assert_same(reference, loss_and_grads(lora_model(tokenizer, arch, varlen=True, **config), flat))


def test_padding_free_pads_only_to_the_asked_multiple(tokenizer):
    batch = collate_flat(examples()[:3], tokenizer.pad_token_id, pad_to_multiple_of=16)
    assert batch["input_ids"].shape == (1, 32)
    assert batch["labels"][0, 24:].eq(-100).all() and batch["document_boundaries"].tolist() == [0, 7, 19, 24, 32]


def test_documents_ignored_would_change_the_loss(tokenizer):
    """The packed test can fail: causal attention across the documents of a row gives another loss."""
    rows = collate_packed(pack(examples(), 24), tokenizer.pad_token_id)
    leaking = {"input_ids": rows["input_ids"], "labels": rows["labels"]}  # no positions: one long causal sequence
    model = lora_model(tokenizer, varlen=True)
    assert not torch.allclose(loss_sum(model, rows)[0], loss_sum(model, leaking)[0])


@pytest.fixture
def attention_masks(monkeypatch):
    """Every attn_mask that reaches torch's SDPA, as None or a shape."""
    seen = []
    original = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        mask = kwargs.get("attn_mask")
        seen.append(None if mask is None else tuple(mask.shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def test_varlen_attention_never_gets_a_square_mask(tokenizer, attention_masks):
    padded = collate(examples()[:3], tokenizer.pad_token_id)
    packed = collate_packed(pack(examples(), 24), tokenizer.pad_token_id)
    loss_sum(lora_model(tokenizer), padded)
    assert attention_masks and all(mask is not None and mask[-1] == mask[-2] for mask in attention_masks)  # the spy sees masks
    attention_masks.clear()
    model = lora_model(tokenizer, varlen=True)
    loss_sum(model, padded)
    loss_sum(model, packed)
    assert attention_masks and all(mask is None for mask in attention_masks)


def test_documents_are_the_ones_transformers_finds(tokenizer):
    from transformers.masking_utils import find_packed_sequence_indices

    batch = collate_packed(pack(examples(), 24), tokenizer.pad_token_id)
    documents = find_documents(batch["position_ids"])
    ids = torch.full(batch["position_ids"].shape, -1)
    for number, (row, start, end) in enumerate(documents.spans):
        ids[row, start:end] = number
    expected = find_packed_sequence_indices(batch["position_ids"])
    for row in range(ids.shape[0]):  # the same segmentation, whatever the numbering
        assert torch.equal(torch.unique_consecutive(ids[row], return_counts=True)[1],
                           torch.unique_consecutive(expected[row], return_counts=True)[1])
    assert documents.boundaries[-1] == batch["position_ids"].numel()


def left_padded(data, pad_id):
    width = max(len(e["input_ids"]) for e in data)
    pads = [width - len(e["input_ids"]) for e in data]
    return {"input_ids": torch.tensor([[pad_id] * n + e["input_ids"] for n, e in zip(pads, data)]),
            "labels": torch.tensor([[-100] * n + e["labels"] for n, e in zip(pads, data)]),
            "attention_mask": torch.tensor([[0] * n + [1] * len(e["input_ids"]) for n, e in zip(pads, data)])}


def test_left_padded_batch_keeps_its_mask(tokenizer):
    """Pads first: without the mask real tokens would see them, so a left-padded batch keeps it."""
    batch = left_padded(examples()[:3], tokenizer.pad_token_id)
    assert not is_right_padded(batch["attention_mask"])
    reference = loss_sum(lora_model(tokenizer), batch)[0]
    torch.testing.assert_close(loss_sum(lora_model(tokenizer, varlen=True), batch)[0], reference)
    unmasked = {key: value for key, value in batch.items() if key != "attention_mask"}
    assert not torch.allclose(loss_sum(lora_model(tokenizer, varlen=True), unmasked)[0], reference)


def test_generation_with_left_padding_is_unchanged(tokenizer):
    prompts = [[5, 17, 99, 42, 8, 61], [23, 7]]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def generated(model):
        with torch.no_grad():
            return model.eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                         pad_token_id=tokenizer.pad_token_id)

    assert torch.equal(generated(lora_model(tokenizer, varlen=True)), generated(lora_model(tokenizer)))


def test_only_sdpa_is_replaced(tokenizer):
    model = tiny.make_model(tokenizer)
    model.set_attn_implementation("eager")
    assert "replaces only sdpa" in use_varlen_attention(model) and model.config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")
    use_varlen_attention(model)
    assert model.config._attn_implementation == VARLEN and model.model.layers[0].self_attn.config._attn_implementation == VARLEN


def test_saved_model_does_not_name_the_varlen_attention(tokenizer, tmp_path):
    """A full fine-tune's config.json must load where sftkit's attention is not registered."""
    model = tiny.make_model(tokenizer)
    use_varlen_attention(model)
    model.save_pretrained(tmp_path)
    assert VARLEN not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen flash kernel needs CUDA")
def test_cuda_varlen_kernel_equals_attention_per_document(tokenizer):
    from sftkit.attention import _flash_varlen, _varlen_kernel, varlen_attention_forward

    module = lora_model(tokenizer, varlen=True).model.layers[0].self_attn.cuda()
    documents = find_documents(collate_packed(pack(examples(), 24), tokenizer.pad_token_id)["position_ids"])
    generator = torch.Generator().manual_seed(0)
    shape = (documents.rows, 4, documents.width, 16)
    query = torch.randn(shape, generator=generator).cuda().bfloat16()
    key, value = (torch.randn((documents.rows, 2, documents.width, 16), generator=generator).cuda().bfloat16() for _ in range(2))
    kernel = _varlen_kernel(query, 0.0, {})
    assert kernel is not None, "torch's varlen kernel does not run on this GPU"
    fused = _flash_varlen(kernel, query, key, value, documents, 0.25, None)
    per_document, _ = varlen_attention_forward(module, query.float(), key.float(), value.float(), None, scaling=0.25,
                                               packed_documents=documents)
    torch.testing.assert_close(fused.float(), per_document, rtol=2e-2, atol=2e-2)


def test_padding_free_is_the_default_where_attention_stays_per_example():
    from sftkit.config import TrainConfig
    from sftkit.objective import example_collate

    said = []
    assert example_collate(TrainConfig(), said.append, varlen=True) is collate_flat
    assert example_collate(TrainConfig(), said.append, varlen=False) is collate  # a dense mask over the row: padded
    assert example_collate(TrainConfig(padding_free=False), said.append, varlen=True) is collate
    assert "padding-free batches" in said[0] and "padding-free needs varlen attention" in said[1] and len(said) == 2
