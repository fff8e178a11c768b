"""Preference losses against their published formulas computed by hand, log-probabilities, the reference with
adapters off, preference rows in every schema and the examples built from them."""
import json
import math

import pytest
import torch

from sftkit.data.errors import DataError
from sftkit.data.formats import Message
from sftkit.data.loading import load_conversations
from sftkit.data.pipeline import IGNORE_INDEX, build_preference_example, build_preference_examples, collate_preference
from sftkit.data.preference_formats import PreferenceRow, to_preference
from sftkit.lora import LoRAConfig, adapters_disabled, inject_lora
from sftkit.loss import sequence_log_probs
from sftkit.preference import (PreferenceSettings, cpo_loss, dpo_loss, kto_loss, orpo_loss, preference_losses, simpo_loss,
                               summarise)

CHOSEN, REJECTED = [-5.0, -12.0, -3.5], [-7.0, -10.0, -3.0]
REF_CHOSEN, REF_REJECTED = [-6.0, -11.0, -4.0], [-6.5, -10.5, -3.2]
CHOSEN_TOKENS, REJECTED_TOKENS = [5, 8, 2], [7, 4, 3]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def margins():
    return [(c - rc) - (r - rr) for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]


def dpo(loss_type, beta=0.1, label_smoothing=0.0):
    return dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta=beta, loss_type=loss_type,
                    label_smoothing=label_smoothing, chosen_tokens=t(CHOSEN_TOKENS), rejected_tokens=t(REJECTED_TOKENS))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_sigmoid_is_the_papers_loss_and_conservative_dpo(label_smoothing):
    losses, chosen_rewards, rejected_rewards = dpo("sigmoid", beta=0.1, label_smoothing=label_smoothing)
    expected = [-(1 - label_smoothing) * log_sigmoid(0.1 * h) - label_smoothing * log_sigmoid(-0.1 * h) for h in margins()]
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert chosen_rewards.tolist() == pytest.approx([0.1 * (c - r) for c, r in zip(CHOSEN, REF_CHOSEN)])
    assert rejected_rewards.tolist() == pytest.approx([0.1 * (c - r) for c, r in zip(REJECTED, REF_REJECTED)])


def test_dpo_robust_hinge_and_ipo():
    eps, beta = 0.2, 0.1
    robust = [(-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps) for h in margins()]
    assert dpo("robust", beta, eps)[0].tolist() == pytest.approx(robust, rel=1e-12)
    assert dpo("hinge", beta)[0].tolist() == pytest.approx([max(0.0, 1 - beta * h) for h in margins()], rel=1e-12)
    ipo = [((c - rc) / tc - (r - rr) / tr - 1 / (2 * beta)) ** 2 for c, r, rc, rr, tc, tr in
           zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_TOKENS, REJECTED_TOKENS)]
    assert dpo("ipo", beta)[0].tolist() == pytest.approx(ipo, rel=1e-12)
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, ipo, hinge, robust"):
        dpo("sppo")


def test_orpo_is_the_odds_ratio_of_per_token_probabilities():
    chosen = [c / n for c, n in zip(CHOSEN, CHOSEN_TOKENS)]
    rejected = [r / n for r, n in zip(REJECTED, REJECTED_TOKENS)]

    def log_odds(mean_log_prob):
        p = math.exp(mean_log_prob)
        return math.log(p / (1 - p))

    losses, chosen_rewards, _, ratio = orpo_loss(t(chosen), t(rejected), beta=0.25)
    expected = [-0.25 * log_sigmoid(log_odds(c) - log_odds(r)) for c, r in zip(chosen, rejected)]
    assert losses.tolist() == pytest.approx(expected, rel=1e-10)
    assert ratio.tolist() == pytest.approx([log_odds(c) - log_odds(r) for c, r in zip(chosen, rejected)], rel=1e-10)
    assert chosen_rewards.tolist() == pytest.approx([0.25 * c for c in chosen])


def test_simpo_and_cpo():
    chosen = [c / n for c, n in zip(CHOSEN, CHOSEN_TOKENS)]
    rejected = [r / n for r, n in zip(REJECTED, REJECTED_TOKENS)]
    simpo = simpo_loss(t(chosen), t(rejected), beta=2.0, gamma=0.5)[0]
    assert simpo.tolist() == pytest.approx([-log_sigmoid(2.0 * c - 2.0 * r - 0.5) for c, r in zip(chosen, rejected)], rel=1e-12)
    cpo = cpo_loss(t(CHOSEN), t(REJECTED), beta=0.1, label_smoothing=0.1)[0]
    expected = [-0.9 * log_sigmoid(0.1 * (c - r)) - 0.1 * log_sigmoid(-0.1 * (c - r)) for c, r in zip(CHOSEN, REJECTED)]
    assert cpo.tolist() == pytest.approx(expected, rel=1e-12)


def test_kto_uses_the_clamped_mismatched_kl_as_baseline():
    completion, reference = [-5.0, -9.0, -4.0], [-6.0, -8.0, -4.5]
    mismatched, ref_mismatched = [-20.0, -18.0, -25.0], [-21.0, -18.5, -24.0]
    desirable = [True, False, True]
    kl = max(0.0, sum(m - r for m, r in zip(mismatched, ref_mismatched)) / 3)
    losses, rewards, estimate = kto_loss(t(completion), t(reference), t(mismatched), t(ref_mismatched),
                                         torch.tensor(desirable), beta=0.1, desirable_weight=1.5, undesirable_weight=0.5)
    expected = [1.5 * (1 - sigmoid(0.1 * (c - r - kl))) if good else 0.5 * (1 - sigmoid(0.1 * (kl - (c - r))))
                for c, r, good in zip(completion, reference, desirable)]
    assert float(estimate) == pytest.approx(kl) and kl > 0
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert rewards.tolist() == pytest.approx([0.1 * (c - r) for c, r in zip(completion, reference)])
    # A negative estimate is clamped to 0 and the baseline carries no gradient.
    mismatched_tensor = t([-30.0, -30.0, -30.0]).requires_grad_()
    _, _, clamped = kto_loss(t(completion), t(reference), mismatched_tensor, t(ref_mismatched), torch.tensor(desirable), beta=0.1)
    assert float(clamped) == 0.0 and not clamped.requires_grad


def test_nll_terms_and_metrics_of_a_batch():
    log_probs, tokens = t(CHOSEN + REJECTED), torch.tensor(CHOSEN_TOKENS + REJECTED_TOKENS)
    reference = t(REF_CHOSEN + REF_REJECTED)
    plain, totals = preference_losses(PreferenceSettings("dpo", beta=0.1), log_probs, tokens, reference)
    with_rpo, rpo_totals = preference_losses(PreferenceSettings("dpo", beta=0.1, rpo_alpha=0.5), log_probs, tokens, reference)
    nll = [-c / n for c, n in zip(CHOSEN, CHOSEN_TOKENS)]
    assert (with_rpo - plain).tolist() == pytest.approx([0.5 * value for value in nll])
    means = summarise({name: (float(s), float(c)) for name, (s, c) in rpo_totals.items()})
    assert means["nll_loss"] == pytest.approx(sum(nll) / 3, abs=1e-6)
    rewards = [0.1 * h for h in margins()]
    assert means["rewards/margins"] == pytest.approx(sum(rewards) / 3, abs=1e-6)
    assert means["rewards/accuracies"] == pytest.approx(sum(r > 0 for r in rewards) / 3, abs=1e-6)
    assert "nll_loss" not in totals and list(means)[:4] == ["rewards/chosen", "rewards/rejected", "rewards/margins",
                                                            "rewards/accuracies"]
    orpo, _ = preference_losses(PreferenceSettings("orpo", beta=0.1), log_probs, tokens)
    odds = orpo_loss(t(CHOSEN) / t(CHOSEN_TOKENS), t(REJECTED) / t(REJECTED_TOKENS), beta=0.1)[0]
    assert orpo.tolist() == pytest.approx((odds + t(nll)).tolist())


@pytest.mark.slow
def test_orpo_cpo_and_simpo_match_trl():
    """TRL as a test-time reference: its ORPO and CPO trainers' loss methods on the same log-probabilities."""
    from types import SimpleNamespace

    pytest.importorskip("trl")
    orpo_module = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    cpo_module = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    device = SimpleNamespace(device="cpu")
    chosen, rejected = (t(CHOSEN) / t(CHOSEN_TOKENS)).float(), (t(REJECTED) / t(REJECTED_TOKENS)).float()
    trl_ratio = orpo_module.ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.1, accelerator=device), chosen, rejected)[0]
    torch.testing.assert_close(orpo_loss(chosen, rejected, beta=0.1)[0], -trl_ratio)
    for loss_type, inputs, ours in (
            ("sigmoid", (t(CHOSEN).float(), t(REJECTED).float()),
             cpo_loss(t(CHOSEN).float(), t(REJECTED).float(), beta=0.1, label_smoothing=0.1)[0]),
            ("simpo", (chosen, rejected), simpo_loss(chosen, rejected, beta=2.0, gamma=0.5, label_smoothing=0.1)[0])):
        settings = SimpleNamespace(alpha=0.0, beta=0.1 if loss_type == "sigmoid" else 2.0, loss_type=loss_type,
                                   label_smoothing=0.1, simpo_gamma=0.5, accelerator=device)
        torch.testing.assert_close(ours, cpo_module.CPOTrainer.cpo_loss(settings, *inputs)[0])


# --- log-probabilities and the reference -----------------------------------------------------------------------------


def test_sequence_log_probs_equal_full_logits(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"prompt": "What is 1 plus 2?", "chosen": "3.", "rejected": "It is four, I think."},
            {"prompt": "Hi", "chosen": "Hello there, friend.", "rejected": "Go away."}]
    batch = collate_preference([build_preference_example(row, tokenizer=tokenizer, template="chatml") for row in rows],
                               tokenizer.pad_token_id)
    sums, counts = sequence_log_probs(model, batch, chunk_size=3)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    picked = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = (picked * (targets != IGNORE_INDEX)).sum(-1)
    torch.testing.assert_close(sums.detach(), expected, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == (targets != IGNORE_INDEX).sum(-1).tolist()


def test_adapters_disabled_is_the_base_model_and_restores(tiny_model_dir):
    import tiny
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inject_lora(model, LoRAConfig(r=4, dropout=0.0))
    tiny.randomize_lora_B(model)
    input_ids = torch.tensor([[5, 17, 42, 99, 7]])
    adapted = tiny.logits(model, input_ids)
    with adapters_disabled(model):
        torch.testing.assert_close(tiny.logits(model, input_ids), tiny.logits(base, input_ids))
    torch.testing.assert_close(tiny.logits(model, input_ids), adapted)
    assert not torch.allclose(adapted, tiny.logits(base, input_ids))


# --- preference rows -------------------------------------------------------------------------------------------------

USER, ANSWER, WRONG = Message("user", "2+2?"), [Message("assistant", "4")], [Message("assistant", "5")]


@pytest.mark.parametrize("record,expected", [
    ({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, PreferenceRow([USER], ANSWER, WRONG)),
    ({"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Be terse."},
     PreferenceRow([Message("system", "Be terse."), USER], ANSWER, WRONG)),
    ({"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "5"}]}, PreferenceRow([USER], ANSWER, WRONG)),
    ({"chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
      "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}]},
     PreferenceRow([USER], ANSWER, WRONG)),
    ({"query": "2+2?", "response": "4", "rejected_response": "5"}, PreferenceRow([USER], ANSWER, WRONG)),
    ({"query": "2+2?", "response": "4", "rejected_response": "5", "history": [["1+1?", "2"]], "system": "S"},
     PreferenceRow([Message("system", "S"), Message("user", "1+1?"), Message("assistant", "2"), USER], ANSWER, WRONG)),
    ({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "rejected_response": "5"},
     PreferenceRow([USER], ANSWER, WRONG)),
    ({"prompt": "2+2?", "completion": "4", "label": True}, PreferenceRow([USER], chosen=ANSWER)),
    ({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}], "label": "false"},
     PreferenceRow([USER], rejected=WRONG)),
    ({"query": "2+2?", "response": "5", "label": 0}, PreferenceRow([USER], rejected=WRONG)),
])
def test_every_preference_schema_is_detected_per_row(record, expected):
    assert to_preference(record, paired=expected.paired) == expected


def test_agent_completions_keep_tool_calls_and_results():
    call = '<|startofthink|>{"api_name": "calc"}<|endofthink|>\n\n<|startofexec|>{"result": 4}<|endofexec|>\nIt is 4.'
    row = to_preference({"query": "2+2?", "response": call, "rejected_response": "5"})
    assert [m.role for m in row.chosen] == ["tool_call", "tool", "assistant"] and row.rejected == WRONG


@pytest.mark.parametrize("record,field,message", [
    ({"prompt": "2+2?", "chosen": "4"}, "rejected", "missing field"),
    ({"prompt": "2+2?", "chosen": "", "rejected": "5"}, "chosen", "empty response"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "4", "rejected": "5"},
     "prompt", "must end with a user message"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "4"}, {"role": "user", "content": "more"}], "rejected": "5"},
     "chosen[1].role", "answer turn only"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "wizard", "content": "4"}], "rejected": "5"},
     "chosen[0].role", "unknown role"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "4"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "5"}]}, "rejected", "share everything"),
    ({"query": "q", "response": "4", "rejected_response": 5}, "rejected_response", "expected a string"),
    ({"prompt": "q", "completion": "4", "label": "maybe"}, "label", "true (desirable) or false"),
    ({"prompt": "q", "completion": "4", "label": True}, "label", "--rlhf_type kto"),
])
def test_bad_preference_rows_name_the_field(record, field, message):
    with pytest.raises(DataError) as error:
        to_preference(record)
    assert error.value.field == field and message in str(error.value)


def test_bad_rows_are_located_and_skips_counted(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "q", "chosen": "a", "rejected": "b"}, {"instruction": "q", "output": "a"},
        {"prompt": "q", "chosen": "a", "rejected": "b"}]) + "\n")
    with pytest.raises(DataError, match=rf"{path}:2: no preference schema.*got keys: instruction, output"):
        load_conversations([str(path)], convert=to_preference)
    rows, report = load_conversations([str(path)], strategy="skip", convert=to_preference)
    assert len(rows) == 2 and report.kept == 2 and sum(report.skipped.values()) == 1


# --- examples --------------------------------------------------------------------------------------------------------


def test_preference_example_shares_the_prompt_and_trains_only_the_answers(tokenizer):
    example = build_preference_example({"prompt": "What is 2 plus 2?", "chosen": "It is 4.", "rejected": "Five."},
                                       tokenizer=tokenizer, template="chatml")
    chosen, rejected = example["sequences"]
    shared = 0
    while chosen["input_ids"][shared] == rejected["input_ids"][shared]:
        shared += 1
    for sequence, answer in ((chosen, "It is 4."), (rejected, "Five.")):
        trained = [token for token in sequence["labels"] if token != IGNORE_INDEX]
        assert tokenizer.decode(trained) == answer + "<|im_end|>"
        assert all(label == IGNORE_INDEX for label in sequence["labels"][:shared])
    assert example["conversation"] == [Message("user", "What is 2 plus 2?"), Message("assistant", "It is 4.")]
    assert build_preference_example({"prompt": "What is 2 plus 2? " * 20, "chosen": "4", "rejected": "5"},
                                    tokenizer=tokenizer, template="chatml", max_length=16) is None


def test_kto_examples_unpair_and_score_the_next_completion(tokenizer):
    rows = [to_preference({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) for i in range(2)]
    rows.append(to_preference({"prompt": "q2", "completion": "fine 2", "label": True}, paired=False))
    examples, dropped = build_preference_examples(rows, tokenizer=tokenizer, template="chatml", unpaired=True)
    assert dropped == 0 and [e["desirable"] for e in examples] == [True, False, True, False, True]
    answers = [tokenizer.decode([t for t in e["sequences"][i]["labels"] if t != IGNORE_INDEX]) for e in examples for i in (0, 1)]
    completions, mismatched = answers[0::2], answers[1::2]
    assert mismatched == completions[1:] + completions[:1]
    batch = collate_preference(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 10 and batch["desirable"].tolist() == [True, False, True, False, True]
