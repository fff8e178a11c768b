"""mask / truncate / collate / build_example on their own."""
import pytest
import torch

from sftkit.data.formats import Message
from sftkit.data.pipeline import IGNORE_INDEX, Encoded, build_example, build_examples, collate, loss_weights, mask, truncate

ROLES = [None, "user", None, "assistant", "assistant", None, "user", None, "tool_call", "tool", "assistant"]
ENCODED = Encoded(list(range(100, 111)), ROLES)


def trained_positions(labels):
    return [i for i, label in enumerate(labels) if label != IGNORE_INDEX]


def test_mask_assistant_trains_answers_and_calls_never_results():
    assert trained_positions(mask(ENCODED, "assistant")) == [3, 4, 8, 10]


def test_mask_last_trains_only_after_final_user_turn():
    assert trained_positions(mask(ENCODED, "last")) == [8, 10]


def test_mask_all_still_skips_tool_results():
    assert trained_positions(mask(ENCODED, "all")) == [i for i in range(11) if i != 9]


def test_mask_rejects_unknown_mode():
    with pytest.raises(ValueError, match="train_on"):
        mask(ENCODED, "everything")


def test_loss_weights_by_role():
    labels = mask(ENCODED)
    weights = loss_weights(ENCODED, labels, {"tool_call": 2.0, "assistant": 1.0})
    assert weights == [0, 0, 0, 1, 1, 0, 0, 0, 2, 0, 1]


def test_truncate_sides_and_drop():
    ids, labels = list(range(6)), [IGNORE_INDEX, IGNORE_INDEX, 2, 3, IGNORE_INDEX, IGNORE_INDEX]
    assert truncate(ids, labels, 4, "right") == ([0, 1, 2, 3], labels[:4])
    assert truncate(ids, labels, 4, "left") == ([2, 3, 4, 5], labels[2:])
    assert truncate(ids, labels, 2, "right") is None
    assert truncate(ids, labels, None) == (ids, labels)
    with pytest.raises(ValueError):
        truncate(ids, labels, 4, "middle")


def test_collate_pads_right_to_multiple():
    batch = collate([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], pad_token_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3, -100], [4, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["input_ids"].dtype == torch.long and "loss_weights" not in batch


def test_collate_carries_loss_weights():
    batch = collate([{"input_ids": [1, 2], "labels": [1, 2], "loss_weights": [0.0, 2.0]}, {"input_ids": [3], "labels": [3]}], pad_token_id=0)
    assert batch["loss_weights"].tolist() == [[0.0, 2.0], [1.0, 0.0]]


def test_build_example_from_raw_row(tokenizer):
    example = build_example({"instruction": "hi", "output": "hello"}, tokenizer=tokenizer, template="chatml")
    assert len(example["input_ids"]) == len(example["labels"])
    assert tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX]) == "hello<|im_end|>"


def test_build_example_drops_when_truncation_removes_every_answer(tokenizer):
    row = {"instruction": "a long question " * 20, "output": "short"}
    assert build_example(row, tokenizer=tokenizer, template="chatml", max_length=10) is None
    kept, dropped = build_examples([[Message("user", "a long question " * 20), Message("assistant", "ok")]] * 3,
                                   tokenizer=tokenizer, template="chatml", max_length=10)
    assert (kept, dropped) == ([], {"nothing trainable left after truncation": 3})
    kept, dropped = build_examples([[Message("user", "hi"), Message("assistant", "ok")]], tokenizer=tokenizer, template="chatml")
    assert not dropped and kept[0]["conversation"][1].content == "ok"


def test_build_example_loss_scale_survives_truncation(tokenizer):
    row = {"query": "weather?", "response": '<|startofthink|>{"api_name": "w"}<|endofthink|>\n\n<|startofexec|>sun<|endofexec|>\nSunny.'}
    full = build_example(row, tokenizer=tokenizer, template="chatml", loss_scale={"tool_call": 2.0})
    cut = build_example(row, tokenizer=tokenizer, template="chatml", loss_scale={"tool_call": 2.0}, max_length=len(full["input_ids"]) - 3)
    assert set(full["loss_weights"]) == {0.0, 1.0, 2.0}
    assert cut["loss_weights"] == full["loss_weights"][: len(cut["input_ids"])]
    assert cut["input_ids"] == full["input_ids"][: len(cut["input_ids"])]


def test_pack_best_fit_and_positions_restart():
    from sftkit.data.pipeline import pack

    examples = [{"input_ids": [n] * n, "labels": [n] * n} for n in [5, 3, 7, 2, 8, 1, 4]]
    rows = pack(examples, 10)
    assert sorted(len(row["input_ids"]) for row in rows) == [10, 10, 10]
    assert sorted(token for row in rows for token in row["input_ids"]) == sorted(t for e in examples for t in e["input_ids"])
    for row in rows:
        starts = [i for i, position in enumerate(row["position_ids"]) if position == 0]
        assert all(row["labels"][i] == IGNORE_INDEX for i in starts)  # no example predicts the next one
    with pytest.raises(ValueError, match="does not fit"):
        pack([{"input_ids": [1] * 11, "labels": [1] * 11}], 10)


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_packed_loss_equals_unpacked(train_on, tokenizer):
    from sftkit.data.pipeline import collate_packed, pack
    from sftkit.loss import loss_sum
    import tiny

    model = tiny.make_model(tokenizer)
    rows = [{"query": f"What is {a} plus 2?", "response": f"It is {a + 2}, of course." * (a % 3 + 1)} for a in range(7)]
    examples = [build_example(row, tokenizer=tokenizer, template="chatml", train_on=train_on) for row in rows]
    expected = sum(float(loss_sum(model, collate([e], 0))[0]) for e in examples)
    expected_tokens = sum(loss_sum(model, collate([e], 0))[1] for e in examples)
    packed = pack(examples, 96)
    assert len(packed) < len(examples)
    got, tokens = loss_sum(model, collate_packed(packed, tokenizer.pad_token_id))
    assert tokens == expected_tokens
    assert abs(float(got) - expected) < 1e-3


def test_length_grouped_order_is_a_seeded_permutation_with_similar_lengths():
    from sftkit.data.pipeline import length_grouped_order

    lengths = [((i * 37) % 100) + 1 for i in range(400)]
    order = length_grouped_order(lengths, 8, seed=3)
    assert sorted(order) == list(range(400)) and order == length_grouped_order(lengths, 8, seed=3)
    spread = sum(max(lengths[i] for i in order[k:k + 8]) - min(lengths[i] for i in order[k:k + 8]) for k in range(0, 400, 8))
    assert spread < 0.25 * sum(max(lengths) - min(lengths) for _ in range(50))


def test_build_examples_batched_equals_one_by_one(tokenizer):
    from sftkit.data.formats import to_messages
    from sftkit.data.pipeline import build_examples

    rows = [{"query": f"What is {a} plus 2?", "response": f"It is {a + 2}." * (a % 3 + 1)} for a in range(9)]
    one_by_one = [build_example(row, tokenizer=tokenizer, template="chatml", max_length=40) for row in rows]
    batched, dropped = build_examples([to_messages(row) for row in rows], tokenizer=tokenizer, template="chatml",
                                      max_length=40, chunk=4)
    assert sum(dropped.values()) == sum(example is None for example in one_by_one)
    assert [{k: e[k] for k in ("input_ids", "labels")} for e in batched] == [e for e in one_by_one if e is not None]
