"""The speed levers against their eager references: fused LoRA, fused linear + cross-entropy, compiled layers,
host-side batch facts, the prefetching window source, fused AdamW, and a whole run with every lever on."""
import json
import threading

import pytest
import torch
import torch.nn.functional as F

import tiny
from sftkit import speed, window
from sftkit.attention import find_documents, use_varlen_attention
from sftkit.config import TrainConfig
from sftkit.data.pipeline import collate, collate_packed, pack
from sftkit.fused import chunk_loss_and_grad, linear_cross_entropy, lora_linear
from sftkit.lora import LoRAConfig, LoRALinear, inject_lora, use_fused_lora
from sftkit.loss import _plain_head, loss_sum, trainable_positions
from sftkit.memory import ModelShape, estimate_activations


def examples(lengths=(7, 12, 5, 9, 3, 11), seed=0):
    generator = torch.Generator().manual_seed(seed)
    made = []
    for length in lengths:
        ids = torch.randint(10, 500, (length,), generator=generator).tolist()
        made.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
    return made


def lora_model(tokenizer, dropout=0.0, varlen=True, seed=0):
    model = tiny.make_model(tokenizer, seed=seed)
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules="all-linear"))
    tiny.randomize_lora_B(model)
    if varlen:
        use_varlen_attention(model)
    return model.train()


def loss_and_grads(model, batches, **loss_options):
    model.zero_grad()
    total = sum(loss_sum(model, batch, **loss_options)[0] for batch in batches)
    total.backward()
    return total.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(expected, actual, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual[0], expected[0], rtol=rtol, atol=atol)
    assert expected[1].keys() == actual[1].keys()
    for name, want in expected[1].items():
        torch.testing.assert_close(actual[1][name], want, rtol=rtol * 10, atol=atol, msg=name)


# --- fused LoRA -------------------------------------------------------------------------------------------------


def layer_pair(bias: bool, dropout: float):
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=bias)
    eager = LoRALinear(base, LoRAConfig(r=4, alpha=8, dropout=dropout))
    torch.nn.init.normal_(eager.lora_B.weight)
    fused = LoRALinear(torch.nn.Linear(24, 40, bias=bias), LoRAConfig(r=4, alpha=8, dropout=dropout))
    fused.load_state_dict(eager.state_dict())
    fused.fused = "compute"
    eager.weight.requires_grad_(False), fused.weight.requires_grad_(False)
    return eager.train(), fused.train()


def run_layer(layer, x, seed=1):
    torch.manual_seed(seed)
    x = x.clone().requires_grad_()
    out = layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.requires_grad}
    return out.detach(), grads, x.grad


@pytest.mark.parametrize("bias,dropout", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_fused_lora_layer_equals_eager(bias, dropout):
    """Output, adapter gradients and input gradient; with dropout the mask is drawn as nn.Dropout draws it on CPU."""
    eager, fused = layer_pair(bias, dropout)
    if bias:
        eager.bias.requires_grad_(True), fused.bias.requires_grad_(True)
    x = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2))
    want, got = run_layer(eager, x), run_layer(fused, x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert want[1].keys() == got[1].keys() and ("bias" in got[1]) == bias
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-5)


def test_fused_lora_dropout_is_applied():
    """The dropout test above can fail: without dropout the fused layer gives another output."""
    _, fused = layer_pair(False, 0.3)
    x = torch.randn(2, 4, 24)
    torch.manual_seed(1)
    dropped = fused(x)
    assert not torch.allclose(dropped, fused.eval()(x))


@pytest.mark.parametrize("update_dtype", ["compute", "fp32"])
def test_fused_lora_under_bf16_autocast_matches_eager(update_dtype):
    """bf16 base, float32 adapters, CPU autocast: the same numbers as the eager layer up to bf16 rounding."""
    eager, fused = layer_pair(False, 0.0)
    for layer in (eager, fused):
        layer.weight.data = layer.weight.data.bfloat16()
    fused.fused = update_dtype
    x = torch.randn(4, 24, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = run_layer(eager, x), run_layer(fused, x)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2e-2, atol=2e-2)
    for name in want[1]:
        assert got[1][name].dtype == torch.float32  # the adapters' gradients reach their float32 masters
        torch.testing.assert_close(got[1][name], want[1][name], rtol=3e-2, atol=3e-2, msg=name)


def test_fused_lora_model_equals_eager_model(tokenizer):
    batches = [collate(examples()[:3], tokenizer.pad_token_id), collate_packed(pack(examples(), 24), tokenizer.pad_token_id)]
    reference = loss_and_grads(lora_model(tokenizer), batches)
    model = lora_model(tokenizer)
    assert use_fused_lora(model) == 14  # 7 linears in each of 2 layers
    assert_same(reference, loss_and_grads(model, batches))


def test_fused_lora_saves_its_input_once(tokenizer):
    """q, k and v read one input: the fused layers keep it once, eager LoRA keeps copies."""
    def saved_bytes(model):
        seen = {}

        def pack_hook(tensor):
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        batch = collate(examples(), tokenizer.pad_token_id)
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda tensor: tensor):
            loss_sum(model, batch)[0].backward()
        return sum(seen.values())

    eager = lora_model(tokenizer, dropout=0.1)
    fused = lora_model(tokenizer, dropout=0.1)
    use_fused_lora(fused)
    assert saved_bytes(fused) < saved_bytes(eager)


def test_fused_lora_rejects_an_unknown_update_dtype(tokenizer):
    with pytest.raises(ValueError, match="update_dtype"):
        use_fused_lora(lora_model(tokenizer), "fp8")


def test_lora_linear_refuses_a_trainable_base():
    weight = torch.randn(6, 4, requires_grad=True)
    out = lora_linear(torch.randn(2, 4), weight, None, torch.randn(2, 4), torch.randn(6, 2), 1.0)
    with pytest.raises(NotImplementedError, match="frozen"):
        out.sum().backward()


# --- fused linear + cross-entropy --------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted,chunk", [(False, 1024), (True, 3)])
def test_linear_cross_entropy_equals_eager_chunks(weighted, chunk):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=generator)
    weight = torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 50, (10,), generator=generator)
    weights = torch.rand(10, generator=generator) if weighted else None

    def eager(h, w):
        losses = F.cross_entropy((h @ w.t()).float(), targets, reduction="none")
        return (losses * weights if weighted else losses).sum()

    leaves = [tensor.clone().requires_grad_() for tensor in (hidden, weight)]
    want = eager(*leaves)
    (want * 0.5).backward()
    fused_leaves = [tensor.clone().requires_grad_() for tensor in (hidden, weight)]
    got = linear_cross_entropy(*fused_leaves, targets, weights, chunk_size=chunk)
    (got * 0.5).backward()
    torch.testing.assert_close(got, want)
    for fused_leaf, leaf in zip(fused_leaves, leaves):
        torch.testing.assert_close(fused_leaf.grad, leaf.grad, rtol=1e-5, atol=1e-6)


def test_chunk_gradient_is_softmax_minus_target():
    logits = torch.randn(4, 7, requires_grad=True)
    targets = torch.tensor([0, 3, 6, 2])
    loss, grad = chunk_loss_and_grad(logits.detach(), targets, None)
    expected = F.cross_entropy(logits, targets, reduction="sum")
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(grad, logits.grad)


def test_fused_loss_equals_the_chunked_loss_on_a_model(tokenizer):
    batches = [collate(examples(), tokenizer.pad_token_id)]
    batches[0]["loss_weights"] = torch.rand(batches[0]["labels"].shape)
    reference = loss_and_grads(lora_model(tokenizer), batches, chunk_size=5)
    assert_same(reference, loss_and_grads(lora_model(tokenizer), batches, chunk_size=5, fused=True))


def test_fused_loss_trains_a_full_model_head(tokenizer):
    batches = [collate(examples(), tokenizer.pad_token_id)]
    reference, fused = tiny.make_model(tokenizer), tiny.make_model(tokenizer)
    assert_same(loss_and_grads(reference, batches), loss_and_grads(fused, batches, fused=True), rtol=1e-5, atol=2e-5)


def test_fused_loss_keeps_no_logits_for_backward(tokenizer):
    """The chunked loss keeps each chunk's float32 logits (trainable x vocab); the fused one keeps none."""
    batch = collate(examples(), tokenizer.pad_token_id)

    def saved_logits(fused):
        model, shapes = lora_model(tokenizer), []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
            loss_sum(model, batch, fused=fused)[0].backward()
        weight_shape = model.get_output_embeddings().weight.shape
        return [shape for shape in shapes if shape and shape[-1] == len(tokenizer) and shape != weight_shape]

    assert saved_logits(fused=False) and not saved_logits(fused=True)


def test_compiled_loss_kernel_equals_the_eager_loss(tokenizer):
    batches = [collate(examples(), tokenizer.pad_token_id)]
    from sftkit.loss import SFT_LOSS

    loss_fn = speed.training_loss(SFT_LOSS, speed.Levers(fused_loss=True, compile=True), backend="eager")
    assert loss_fn.args[0].keywords["chunk_kernel"] is not chunk_loss_and_grad
    model = lora_model(tokenizer)
    model.zero_grad()
    total = loss_fn(model, batches[0])[0]
    total.backward()
    compiled = total.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    assert_same(loss_and_grads(lora_model(tokenizer), batches), compiled)
    assert speed.training_loss(SFT_LOSS, speed.Levers()) is SFT_LOSS


def test_soft_capped_heads_keep_the_eager_loss(tokenizer):
    model = tiny.make_model(tokenizer)
    assert _plain_head(model, model.get_output_embeddings())
    model.config.final_logit_softcapping = 30.0
    assert not _plain_head(model, model.get_output_embeddings())


def test_memory_estimate_counts_no_logits_with_the_fused_loss():
    shape = ModelShape(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16, vocab=32000)
    chunked = estimate_activations(shape, 4096, 2048)
    fused = estimate_activations(shape, 4096, 2048, fused_loss=True)
    assert fused.logits == 2048 * 64 * 4 and chunked.logits == 2048 * 32000 * 4


# --- host-side batch facts ---------------------------------------------------------------------------------------


def test_collated_boundaries_are_the_documents_in_the_positions(tokenizer):
    batch = collate_packed(pack(examples(), 24), tokenizer.pad_token_id, pad_to_multiple_of=16)
    assert batch["input_ids"].shape[1] % 16 == 0
    assert torch.equal(batch["document_boundaries"], find_documents(batch["position_ids"]).boundaries)


def test_trainable_positions_pick_the_masked_rows(tokenizer):
    from sftkit.loss import trainable_rows

    batch = collate(examples(), tokenizer.pad_token_id)
    hidden = torch.randn(*batch["input_ids"].shape, 8)
    by_mask = trainable_rows(hidden, batch)
    by_index = trainable_rows(hidden, {**batch, "trainable_positions": trainable_positions(batch["labels"])})
    for want, got in zip(by_mask, by_index):
        assert (want is None and got is None) or torch.equal(want, got)


def test_packed_rows_reach_the_mask_function_without_a_padding_mask(tokenizer, monkeypatch):
    """transformers' own check of an all-ones mask reads it from the device; the marked mask is never read."""
    import transformers.masking_utils as masking

    seen = []
    original = masking.sdpa_mask
    monkeypatch.setattr(masking, "sdpa_mask", lambda *a, **k: seen.append(k.get("attention_mask")) or original(*a, **k))
    loss_sum(lora_model(tokenizer), collate_packed(pack(examples(), 24), tokenizer.pad_token_id))
    assert seen and all(mask is None for mask in seen)


def test_forward_passes_split_on_cpu_in_one_process_only(tmp_path):
    from sftkit.config import RLHFConfig
    from sftkit.distributed import World
    from sftkit.errors import OptionError
    from sftkit.preflight import check_setup

    cpu = torch.device("cpu")
    assert speed.resolve_levers(TrainConfig(), cpu, processes=2).forward_tokens is None  # DDP ranks must stay in step
    assert speed.resolve_levers(TrainConfig(), torch.device("cuda")).forward_tokens is None
    assert speed.resolve_levers(TrainConfig(max_forward_tokens=0), cpu).forward_tokens is None
    assert speed.resolve_levers(TrainConfig(max_forward_tokens=512), torch.device("cuda")).forward_tokens == 512
    with pytest.raises(OptionError, match="max_forward_tokens: splits micro-batches in one process only"):
        check_setup(TrainConfig(max_forward_tokens=512, output_dir=str(tmp_path)), World(0, 2))
    assert "max_forward_tokens does not combine" in " ".join(TrainConfig(max_forward_tokens=512, fsdp="full_shard").problems())
    assert speed.resolve_levers(RLHFConfig(rlhf_type="kto"), cpu).forward_tokens is None  # its KL is per micro-batch
    assert "does not apply to kto" in " ".join(RLHFConfig(rlhf_type="kto", max_forward_tokens=512).problems())


def test_cpu_keeps_the_eager_paths_and_cuda_turns_the_levers_on():
    assert speed.resolve_levers(TrainConfig(max_length=128), torch.device("cpu")) == speed.Levers(forward_tokens=1024)
    config = TrainConfig(max_length=128)
    cuda = speed.resolve_levers(config, torch.device("cuda"))
    assert cuda.fused_lora == "compute" and cuda.fused_loss and cuda.asynchronous and not cuda.compile
    assert speed.resolve_levers(TrainConfig(fused_lora=False, fused_loss=False), torch.device("cuda")).fused_lora is None
    assert speed.resolve_levers(TrainConfig(sft_type="full", fused_lora=True), torch.device("cpu")).fused_lora is None
    # DeepSpeed's ZeRO-3 gathers weights only around their modules' forwards: the fused paths stay off.
    zero = speed.resolve_levers(TrainConfig(deepspeed="zero3"), torch.device("cuda"))
    assert zero.fused_lora is None and not zero.fused_loss
    assert any("deepspeed" in problem for problem in TrainConfig(deepspeed="zero3", fused_loss=True).problems())
    assert any("torch_compile" in problem for problem in TrainConfig(cuda_graphs=True).problems())


def test_static_shapes_for_cuda_graphs(tokenizer):
    """Every packed batch max_length wide with as many document boundaries, so each compiled layer sees one shape."""
    rows = pack(examples(lengths=(7, 12, 5, 9, 3, 11, 20, 4, 6)), 24)
    config = TrainConfig(max_length=32, batch_size=2, packing=True, torch_compile=True, cuda_graphs=True)
    levers = speed.resolve_levers(config, torch.device("cpu"), rows)
    model = lora_model(tokenizer)
    collate_fn = speed.training_collate(collate_packed, levers, model)
    batches = [collate_fn(rows[i:i + 2], tokenizer.pad_token_id) for i in range(0, len(rows) - 1, 2)]
    assert len({batch["input_ids"].shape for batch in batches}) == 1 and batches[0]["input_ids"].shape[1] == 32
    assert len({batch["document_boundaries"].shape for batch in batches}) == 1
    reference = loss_and_grads(lora_model(tokenizer), [collate_packed(rows[:2], tokenizer.pad_token_id)])
    assert_same(reference, loss_and_grads(lora_model(tokenizer), batches[:1]))


def test_padded_training_batches_need_no_mask(tokenizer):
    levers = speed.Levers(width_multiple=64)
    batch = speed.training_collate(collate, levers, lora_model(tokenizer))(examples(), tokenizer.pad_token_id)
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] == 64
    with_mask = speed.training_collate(collate, levers, lora_model(tokenizer, varlen=False))(examples(), tokenizer.pad_token_id)
    assert "attention_mask" in with_mask


# --- the window: prefetching and no reads from the device ---------------------------------------------------------


def test_prefetcher_gives_what_the_inline_source_gives_and_raises_its_errors():
    def counter():
        state = {"n": 0}

        def produce():
            state["n"] += 1
            if state["n"] == 6:
                raise RuntimeError("collate failed")
            return state["n"]
        return produce

    inline, ahead = window.Inline(counter()), window.Prefetcher(counter())
    assert [inline() for _ in range(5)] == [ahead() for _ in range(5)] == [1, 2, 3, 4, 5]
    with pytest.raises(RuntimeError, match="collate failed"):
        ahead()
    ahead.close()
    endless = window.Prefetcher(lambda: 1)
    endless.close()
    assert not any(thread.name == "sftkit-prefetch" and thread.is_alive() for thread in threading.enumerate())


def test_accumulate_reads_nothing_from_the_device(tokenizer, monkeypatch):
    """The window's loss stays a tensor: the loop reads it once, with the gradient norm (window.settle)."""
    from sftkit.backend import LossModule
    from sftkit.loss import SFT_LOSS

    model = lora_model(tokenizer)
    module = LossModule(model, SFT_LOSS)

    class Backend:
        forward = staticmethod(module)
        backward = staticmethod(lambda loss: loss.backward())
        no_sync = staticmethod(lambda last: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))

    collate_fn = speed.training_collate(collate_packed, speed.Levers(), model)
    rows = pack(examples(), 24)
    shards = [(rows[:1], 1.0), (rows[1:], 1.0)]
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    loss, metrics = window.accumulate(Backend, shards, [collate_fn(shard, tokenizer.pad_token_id) for shard, _ in shards],
                                      torch.device("cpu"), torch.autocast("cpu", enabled=False), 40,
                                      window.distributed.World())
    monkeypatch.undo()
    # The CPU attention reads its document spans (once per layer and micro-batch); CUDA's varlen kernel does not.
    assert isinstance(loss, torch.Tensor) and metrics == {} and reads == ["tolist"] * 2 * 2
    assert window.settle(loss, torch.tensor(2.0), metrics, 40, window.distributed.World()) == \
        (pytest.approx(loss.item() / 40), 2.0, {})


def test_fused_adamw_takes_the_same_steps():
    parameters = [torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(i))) for i in range(2)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in parameters]
    from sftkit.quant import make_optimizer

    for group, fused in ((parameters, False), (copies, True)):
        optimizer = make_optimizer("adamw", group, 1e-2, weight_decay=0.1, fused=fused)
        for step in range(3):
            for p in group:
                p.grad = torch.full_like(p, 0.1 * (step + 1))
            optimizer.step()
    for p, copy in zip(parameters, copies):
        torch.testing.assert_close(copy, p)


# --- compiled layers (backend "eager": dynamo's capture, guards and graph breaks, without code generation) -------


@pytest.mark.slow
def test_compiled_layers_equal_eager_and_new_widths_do_not_recompile(tokenizer):
    import torch._dynamo

    torch._dynamo.reset()
    packed = collate_packed(pack(examples(), 24), tokenizer.pad_token_id, pad_to_multiple_of=8)
    padded = collate(examples()[:3], tokenizer.pad_token_id, pad_to_multiple_of=8, attention_mask=False)
    wider = collate_packed(pack(examples(lengths=(20, 30, 9, 4)), 40), tokenizer.pad_token_id, pad_to_multiple_of=8)
    assert wider["input_ids"].shape[1] != packed["input_ids"].shape[1]
    assert wider["document_boundaries"].shape != packed["document_boundaries"].shape
    reference = lora_model(tokenizer)
    compiled = lora_model(tokenizer)
    use_fused_lora(compiled)
    assert speed.compile_regions(compiled, backend="eager") == 2
    graphs = []
    for batch in (packed, padded, wider):
        assert_same(loss_and_grads(reference, [batch]), loss_and_grads(compiled, [batch]), rtol=1e-5, atol=2e-5)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    # Packed rows of another width and document count reuse the packed graphs (dynamic shapes); the padded batch
    # (no documents: attention inside the graph) has graphs of its own.
    assert graphs[0] > 0 and graphs[2] == graphs[1] > graphs[0]


@pytest.mark.slow
def test_every_lever_on_trains_like_the_eager_run(tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"query": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}."})
                              for a in range(4) for b in range(4)) + "\n")
    from sftkit.train import train

    def losses(name, **levers):
        config = TrainConfig(model=tiny_model_dir, dataset=(str(data),), dataset_test_ratio=0.125, max_steps=3, eval_steps=3,
                             logging_steps=1, learning_rate=5e-3, output_dir=str(tmp_path / name), add_output_dir_suffix=False,
                             template="chatml", lora_dropout=0.0, packing=True, max_length=64, batch_size=2,
                             gradient_accumulation_steps=2, **levers)
        records = []
        train(config, on_record=records.append)
        return [(r["loss"], r["grad_norm"]) for r in records if "loss" in r]

    eager = losses("eager")
    fused = losses("fused", fused_lora=True, fused_loss=True)
    assert len(eager) == 3
    for (loss, norm), (fused_loss, fused_norm) in zip(eager, fused):
        assert fused_loss == pytest.approx(loss, rel=1e-4) and fused_norm == pytest.approx(norm, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_window_never_waits_for_the_device(tokenizer):
    """torch's sync debug mode raises on any device-to-host read inside the window."""
    model = lora_model(tokenizer).cuda().to(torch.bfloat16)
    use_fused_lora(model)
    from sftkit.backend import LossModule

    module = LossModule(model, lambda m, b: loss_sum(m, b, fused=True))

    class Backend:
        forward = staticmethod(module)
        backward = staticmethod(lambda loss: loss.backward())
        no_sync = staticmethod(lambda last: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))

    levers = speed.Levers(fused_lora="compute", fused_loss=True, asynchronous=True)
    collate_fn = speed.training_collate(collate_packed, levers, model)
    rows = pack(examples(), 24)
    shards = [(rows[:1], 1.0), (rows[1:], 1.0)]
    collated = [collate_fn(shard, tokenizer.pad_token_id) for shard, _ in shards]
    window.accumulate(Backend, shards, collated, torch.device("cuda"), torch.autocast("cuda", dtype=torch.bfloat16), 40,
                      window.distributed.World(), non_blocking=True)  # warm-up: lazy initialisations may sync once
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = window.accumulate(Backend, shards, collated, torch.device("cuda"), torch.autocast("cuda", dtype=torch.bfloat16),
                                 40, window.distributed.World(), non_blocking=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)
