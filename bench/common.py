"""What both benchmarks share: seeded synthetic chat data, tiny stand-ins for --quick, machine facts, JSON output.

The data is English-looking text (words drawn from a fixed vocabulary with Zipf-like frequencies, in
sentences) so that tokenizers see realistic pieces; lengths are long-tailed (lognormal, clipped) because
real SFT data is, and that tail is what makes random batching pad.
"""
from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time

VOCABULARY = """
the of and to in a is that for it as was with be by on not he this are or his from at which but have an they
you were her she there been one all we their has would when if so no what can more out about up them some
could him into its then two time only my do first any now over such like other how our new people years way
also may these well very after most should made where between many being those world under great same life
while both long work because make each day little need state year know part take place through back still
number help find system good high small large set every much under point turn used show play home read hand
port spell add even land here must big such follow act why ask men change went light kind off house picture
try again animal try mother answer found study learn water food energy market model data value river city
question simple example result method process group answer plan idea build test field local general public
service report course level power money health family music table paper light color class period sound
reason often begin among force measure record common produce step north south east west rule govern fact
open season size move ready list hour short travel early ground interest reach fast verb sing listen table
morning teacher choose deep solve bring support product share design source center feature create design
simple clear strong careful quiet patient kind useful direct quick bright early late easy hard fresh warm
train learn write explain describe compare check improve return assume include reduce increase follow
because however therefore although instead meanwhile finally first second third next usually sometimes
""".split()

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a careful assistant that answers questions about science and history in plain language.",
    "You are a friendly tutor. Explain each step clearly and check the reasoning before giving the answer.",
    "You are a concise assistant. Keep answers short unless the user asks for detail.",
    "You help people plan travel, write emails and organise their work. Be practical and specific.",
]

CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TextMaker:
    """Sentences of vocabulary words whose token count (per the given tokenizer) reaches a target."""

    def __init__(self, tokenizer, rng: random.Random):
        self.rng = rng
        self.words = sorted(set(VOCABULARY), key=VOCABULARY.index)
        self.cum_weights = list(_cumulative([1.0 / (rank + 1) ** 0.9 for rank in range(len(self.words))]))
        # A word's tokens after a space; sentence starts and punctuation make counts approximate, and the
        # benchmarks report the real token lengths of what they built.
        self.word_tokens = {word: len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) for word in self.words}

    def text(self, target_tokens: int) -> str:
        sentences, tokens = [], 0
        while tokens < target_tokens:
            words = self.rng.choices(self.words, cum_weights=self.cum_weights, k=self.rng.randint(6, 18))
            room = target_tokens - tokens
            kept, used = [], 1  # the full stop
            for word in words:
                if used + self.word_tokens[word] > room and kept:
                    break
                kept.append(word)
                used += self.word_tokens[word]
            sentences.append(" ".join(kept).capitalize() + self.rng.choice(".....?!"))
            tokens += used
        return " ".join(sentences)


def _cumulative(values):
    total = 0.0
    for value in values:
        total += value
        yield total


def lognormal_length(rng: random.Random, median: int, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


def chat_row(maker: TextMaker, rng: random.Random, total_tokens: int) -> dict:
    """One `messages` row of about total_tokens tokens: optional system, 1-3 rounds, answers ~75% of the text."""
    messages = []
    if rng.random() < 0.7:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    rounds = rng.choices([1, 2, 3], weights=[0.75, 0.18, 0.07])[0]
    budget = max(16 * rounds, total_tokens - 24 - 10 * rounds)  # room left by the template and the system prompt
    for _ in range(rounds):
        share = budget / rounds
        user = max(4, round(share * rng.uniform(0.15, 0.35)))
        messages.append({"role": "user", "content": maker.text(user)})
        messages.append({"role": "assistant", "content": maker.text(max(8, round(share) - user))})
    return {"messages": messages}


def chat_rows(tokenizer, count: int, *, seed: int, median: int, sigma: float = 0.8, max_tokens: int = 1024) -> list[dict]:
    """`count` chat rows with lognormal lengths (median `median` tokens, clipped to [32, max_tokens])."""
    rng = random.Random(seed)
    maker = TextMaker(tokenizer, rng)
    return [chat_row(maker, rng, lognormal_length(rng, median, sigma, 32, max_tokens)) for _ in range(count)]


def mixed_rows(tokenizer, count: int, *, seed: int, median: int = 200, sigma: float = 0.8, max_tokens: int = 1024) -> list[dict]:
    """Rows in the schemas people feed SFT tools: single-turn chat (50%), multi-turn chat (25%), alpaca (25%)."""
    rng = random.Random(seed)
    maker = TextMaker(tokenizer, rng)
    rows = []
    for _ in range(count):
        total = lognormal_length(rng, median, sigma, 32, max_tokens)
        kind = rng.random()
        if kind < 0.5:
            messages = ([{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.6 else [])
            user = max(4, round(total * rng.uniform(0.15, 0.35)))
            rows.append({"messages": messages + [{"role": "user", "content": maker.text(user)},
                                                 {"role": "assistant", "content": maker.text(max(8, total - user - 24))}]})
        elif kind < 0.75:
            rounds = rng.randint(2, 4)
            messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.6 else []
            for _ in range(rounds):
                share = total / rounds
                user = max(4, round(share * rng.uniform(0.15, 0.35)))
                messages += [{"role": "user", "content": maker.text(user)},
                             {"role": "assistant", "content": maker.text(max(8, round(share) - user - 10))}]
            rows.append({"messages": messages})
        else:
            instruction = max(4, round(total * rng.uniform(0.08, 0.2)))
            extra = round(total * rng.uniform(0.1, 0.3)) if rng.random() < 0.5 else 0
            rows.append({"instruction": maker.text(instruction), "input": maker.text(extra) if extra else "",
                         "output": maker.text(max(8, total - instruction - extra - 24))})
    return rows


def tiny_tokenizer(vocab_size: int = 800):
    """A byte-level BPE tokenizer with ChatML specials and chat template, trained on the benchmark's words in ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    words = sorted(set(VOCABULARY))
    corpus = [" ".join(words[i:i + 20]) + ". " + " ".join(words[i:i + 20]).capitalize() + "?" for i in range(0, len(words), 20)]
    tok.train_from_iterator(corpus * 4 + SYSTEM_PROMPTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", chat_template=CHATML_JINJA)


def save_tiny_model(path: str) -> str:
    """A 2-layer random llama and its tokenizer, written with save_pretrained so the real loaders run."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def token_stats(lengths: list[int]) -> dict:
    ordered = sorted(lengths)
    return {"count": len(ordered), "total": sum(ordered), "min": ordered[0], "median": statistics.median(ordered),
            "mean": round(statistics.fmean(ordered), 1), "p90": ordered[int(0.9 * (len(ordered) - 1))], "max": ordered[-1]}


def machine_state() -> dict:
    """What the figures depend on: hardware, load, library versions, commit."""
    import torch
    import transformers

    state = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "platform": platform.platform(), "python": platform.python_version(),
             "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
             "transformers": transformers.__version__, "load_average": _load_average(),
             "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import peft

        state["peft"] = peft.__version__
    except ImportError:
        state["peft"] = None
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        state["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                         text=True, timeout=10).stdout.strip() or None
        state["dirty"] = bool(subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True,
                                             text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        state["commit"] = None
    return state


def _load_average():
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    print(f"[bench] wrote {path}", file=sys.stderr)
