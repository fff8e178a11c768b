"""Cost of constrained tool calls: the mask per token (inside a call and outside), generation tokens/s free,
constrained token by token, with scored calls, and with scored calls on grounded values, and the per-token cost of
the structured-generation libraries the choice was made from.

    python bench/constrained_decoding.py --ckpt_dir CKPT    # a tuned agent (e.g. the recipe's best checkpoint)
    python bench/constrained_decoding.py                    # the embedded SmolLM2: it never opens a call, so only
                                                            # the outside-a-call cost shows in tokens/s
    python bench/constrained_decoding.py --quick            # tiny tokenizer and model, seconds (used by the tests)

Rows are the first --rows conversations of examples/agent/test_general.jsonl. The mask cost replays each
reference reply token by token through the constraint (it also checks that no reference call is refused);
generation runs the prompts in batches until each call closes, the four sides in turn, --repeats times. A scored
call's candidate tokens are extra forwards that make no reply token, so they lower tokens/s.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_state, tiny_tokenizer, write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARIES = ("llguidance", "xgrammar", "lm-format-enforcer", "outlines-core")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", default=None, help="checkpoint to generate with (default: the embedded SmolLM2)")
    parser.add_argument("--data", default=os.path.join(ROOT, "examples", "agent", "test_general.jsonl"))
    parser.add_argument("--rows", type=int, default=40, help="conversations replayed and generated for")
    parser.add_argument("--batch_size", type=int, default=20)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2,
                        help="generation runs of each side, in turns (free token scored grounded grounded scored ...)")
    parser.add_argument("--quick", action="store_true", help="a tiny tokenizer and random model instead of SmolLM2")
    parser.add_argument("--out", default="bench/results/constrained_decoding.json")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from sftkit.prompts import prompt_ids, response_text, split_last_turn
    from sftkit.constrained import ToolCallGuide
    from sftkit.data.loading import load_conversations
    from sftkit.tools import conversation_tools

    torch.manual_seed(0)
    model, tokenizer, template, system, name = bench_model(args)
    conversations, _ = load_conversations([args.data])
    cases = [split_last_turn(conversation) for conversation in conversations[:args.rows]]
    tools = [conversation_tools(prompt, system) for prompt, _ in cases]

    started = time.perf_counter()
    guide = ToolCallGuide(tokenizer, template, scored=False)
    setup_s = time.perf_counter() - started
    guides = {"free": None, "token": guide, "scored": ToolCallGuide(tokenizer, template, scored=True),
              "grounded": ToolCallGuide(tokenizer, template, scored=True, grounded=True)}
    side_tools = {side: [guides[side].tools_for(prompt, system) for prompt, _ in cases] if guides[side] else None
                  for side in guides}
    compile_ms = []
    for row_tools in tools:
        started = time.perf_counter()
        guide.grammar(tuple(row_tools))
        compile_ms.append((time.perf_counter() - started) * 1e3)
    mask = replay(guide, tokenizer, [response_text(reference, template) for _, reference in cases], tools, torch)

    prompts = [prompt_ids(prompt, tokenizer, template, system) for prompt, _ in cases]
    runs = generation_runs(model, tokenizer, template, prompts, guides, side_tools, args)
    summary = {side: statistics.median(run["tokens_per_s"] for run in runs if run["side"] == side) for side in guides}
    result = {
        "benchmark": "constrained_decoding",
        "machine": machine_state(),
        "settings": {"model": name, "template": template, "rows": len(cases), "batch_size": args.batch_size,
                     "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "data": os.path.relpath(args.data, ROOT)},
        "guide": {"setup_s": round(setup_s, 3), "grammar_compile_ms_median": round(statistics.median(compile_ms), 2),
                  "distinct_tool_sets": len({tuple(t.name for t in row) for row in tools})},
        "mask_per_token": mask,
        "generation": {"runs": runs, "tokens_per_s": summary,
                       "token_over_free": round(summary["token"] / summary["free"], 3),
                       "scored_over_free": round(summary["scored"] / summary["free"], 3),
                       "grounded_over_free": round(summary["grounded"] / summary["free"], 3)},
        "libraries": library_costs(tokenizer, tools, cases, template),
    }
    print(f"[bench] mask per token: {mask['in_call_us']['mean']:.0f} us in a call, {mask['outside_us']['mean']:.1f} us outside; "
          f"generation token by token/free x{result['generation']['token_over_free']}, "
          f"scored/free x{result['generation']['scored_over_free']}, grounded/free x{result['generation']['grounded_over_free']}")
    write_json(args.out, result)
    return result




def bench_model(args) -> tuple:
    """(model, tokenizer, template, system prompt, name): the checkpoint or embedded SmolLM2, or with --quick a
    tiny random llama."""
    if not args.quick:
        from sftkit.inference import load_for_inference

        model, tokenizer, settings = load_for_inference(args.ckpt_dir)
        return model, tokenizer, settings.template, settings.system, args.ckpt_dir or "SmolLM2-135M-Instruct (embedded)"
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer, "chatml", None, "tiny random llama"

def generation_runs(model, tokenizer, template, prompts: list, guides: dict, side_tools: dict, args) -> list[dict]:
    """Each side generates for every prompt until its call closes, the sides in turns, --repeats times."""
    from sftkit.data.templates import get_template
    from sftkit.generation import GenerationConfig, generate_batch, stop_criteria
    from sftkit.prompts import tool_call_end

    stops, call_end = stop_criteria(tokenizer, get_template(template)), tool_call_end(template)
    opener = guides["token"].opener.decode()
    gen_config = GenerationConfig(max_new_tokens=args.max_new_tokens)
    runs = []
    for repeat in range(args.repeats):
        for side in (list(guides) if repeat % 2 == 0 else list(guides)[::-1]):
            generated = in_calls = 0
            started = time.perf_counter()
            for start in range(0, len(prompts), args.batch_size):
                constraint = guides[side].constraint(side_tools[side][start:start + args.batch_size]) if guides[side] else None
                texts = generate_batch(model, tokenizer, prompts[start:start + args.batch_size], gen_config, *stops,
                                       stop_after=(call_end,), constraint=constraint)
                for text in texts:
                    generated += len(tokenizer(text, add_special_tokens=False)["input_ids"])
                    in_calls += sum(len(tokenizer(chunk.partition(call_end)[0], add_special_tokens=False)["input_ids"])
                                    for chunk in text.split(opener)[1:])
            seconds = time.perf_counter() - started
            run = {"side": side, "repeat": repeat, "seconds": round(seconds, 3), "generated_tokens": generated,
                   "tokens_in_calls": in_calls, "tokens_per_s": round(generated / seconds, 2)}
            print(f"[bench] {side}: {run['tokens_per_s']} tokens/s ({generated} tokens, {in_calls} inside calls)", flush=True)
            runs.append(run)
    return runs

def replay(guide, tokenizer, replies: list[str], tools: list, torch) -> dict:
    """Feed each reference reply through restrict/advance as if generated; time both, split by inside/outside a call."""
    inside, outside, refused = [], [], 0
    width = len(tokenizer)
    for reply, row_tools in zip(replies, tools):
        constraint = guide.constraint([row_tools])
        if constraint is None:
            continue
        for token in tokenizer(reply, add_special_tokens=False)["input_ids"]:
            logits = torch.zeros(1, width)
            in_call = constraint.matchers[0] is not None
            started = time.perf_counter()
            constraint.restrict(logits)
            refused += bool(logits[0, token] == float("-inf"))
            constraint.advance([token])
            (inside if in_call else outside).append((time.perf_counter() - started) * 1e6)
        refused += constraint.failures
    return {"in_call_us": _stats(inside), "outside_us": _stats(outside), "reference_tokens_refused": refused}


def _stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p99": 0.0}
    ordered = sorted(values)
    return {"count": len(values), "mean": round(statistics.fmean(values), 2), "p50": round(ordered[len(ordered) // 2], 2),
            "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 2)}


def library_costs(tokenizer, tools: list, cases: list, template) -> dict:
    """Mask time per token of each library over the reference calls' JSON, with the same call schema (no fence)."""
    from sftkit.prompts import response_text
    from sftkit.metrics import parse_tool_calls
    from sftkit.tools import call_schema

    jobs = []
    for row_tools, (_, reference) in zip(tools, cases):
        for call in parse_tool_calls(response_text(reference, template))[0] if row_tools else []:
            text = json.dumps({"api_name": call.name, "parameters": call.arguments}, ensure_ascii=False)
            jobs.append((call_schema(row_tools), tokenizer(text, add_special_tokens=False)["input_ids"]))
    jobs = jobs[:20]
    results = {}
    for library in LIBRARIES:
        try:
            runner = RUNNERS[library](tokenizer)
        except ImportError as error:
            results[library] = {"available": False, "why": str(error).splitlines()[0]}
            continue
        setup, compile_ms, per_token, accepted, unsupported = runner.setup_s, [], [], 0, []
        for schema, ids in jobs:
            started = time.perf_counter()
            try:
                check = runner.compile(schema)
            except (ValueError, RuntimeError) as error:  # a schema feature the library lacks
                unsupported.append(str(error).splitlines()[0])
                continue
            compile_ms.append((time.perf_counter() - started) * 1e3)
            times, ok = check(ids)
            per_token += times
            accepted += ok
        results[library] = {"available": True, "tokenizer_setup_s": round(setup, 3),
                            "compile_ms_median": round(statistics.median(compile_ms), 2) if compile_ms else None,
                            "mask_us_per_token": _stats(per_token), "reference_calls_accepted": f"{accepted}/{len(jobs)}",
                            "schemas_unsupported": sorted(set(unsupported))}
    return results


class _Llguidance:
    def __init__(self, tokenizer):
        import llguidance
        import llguidance.hf

        started = time.perf_counter()
        self.llguidance, self.lltokenizer = llguidance, llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
        self.setup_s = time.perf_counter() - started

    def compile(self, schema):
        grammar = self.llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})

        def check(ids):
            matcher, times = self.llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0), []
            for token in ids:
                started = time.perf_counter()
                mask = matcher.compute_bitmask()
                times.append((time.perf_counter() - started) * 1e6)
                if not mask[token // 8] >> (token % 8) & 1 or not matcher.consume_token(token):
                    return times, False
            return times, True
        return check


class _Xgrammar:
    def __init__(self, tokenizer):
        import xgrammar

        started = time.perf_counter()
        self.xgrammar = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
        self.compiler = xgrammar.GrammarCompiler(self.info)
        self.setup_s = time.perf_counter() - started

    def compile(self, schema):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

        def check(ids):
            matcher, times = self.xgrammar.GrammarMatcher(compiled), []
            bitmask = self.xgrammar.allocate_token_bitmask(1, self.info.vocab_size)
            for token in ids:
                started = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask)
                times.append((time.perf_counter() - started) * 1e6)
                if not int(bitmask[0, token // 32]) >> (token % 32) & 1 or not matcher.accept_token(token):
                    return times, False
            return times, True
        return check


class _FormatEnforcer:
    """lm-format-enforcer's transformers integration does not import under transformers 5; its data is built by hand."""

    def __init__(self, tokenizer):
        from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

        started = time.perf_counter()
        zero, special, regular = tokenizer.encode("0", add_special_tokens=False)[-1], set(tokenizer.all_special_ids), []
        for token in range(len(tokenizer)):
            if token not in special:
                after_zero, alone = tokenizer.decode([zero, token])[1:], tokenizer.decode([token])
                regular.append((token, after_zero, len(after_zero) > len(alone)))
        self.data = TokenEnforcerTokenizerData(regular, lambda ids: tokenizer.decode(ids).rstrip("\ufffd"),
                                               tokenizer.eos_token_id, False, len(tokenizer))
        self.start = tokenizer.eos_token_id
        self.setup_s = time.perf_counter() - started

    def compile(self, schema):
        from lmformatenforcer import JsonSchemaParser, TokenEnforcer

        enforcer = TokenEnforcer(self.data, JsonSchemaParser(schema))

        def check(ids):
            prefix, times = [self.start], []
            for token in ids:
                started = time.perf_counter()
                allowed = enforcer.get_allowed_tokens(prefix)
                times.append((time.perf_counter() - started) * 1e6)
                allowed = getattr(allowed, "allowed_tokens", allowed)
                if token not in allowed:
                    return times, False
                prefix.append(token)
            return times, True
        return check


class _OutlinesCore:
    def __init__(self, tokenizer):
        import llguidance.hf
        from outlines_core import Vocabulary

        started = time.perf_counter()
        lltokenizer, vocabulary = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer)), {}
        for token in range(len(tokenizer)):
            data = lltokenizer.decode_bytes([token])
            if token != tokenizer.eos_token_id and data:
                vocabulary.setdefault(data, []).append(token)
        self.vocabulary = Vocabulary(tokenizer.eos_token_id, vocabulary)
        self.setup_s = time.perf_counter() - started

    def compile(self, schema):
        from outlines_core import Guide, Index
        from outlines_core.json_schema import build_regex_from_schema

        index = Index(build_regex_from_schema(json.dumps(schema)), self.vocabulary)

        def check(ids):
            guide, times = Guide(index), []
            for token in ids:
                started = time.perf_counter()
                allowed = guide.get_tokens()
                times.append((time.perf_counter() - started) * 1e6)
                if token not in allowed:
                    return times, False
                guide.advance(token)
            return times, True
        return check


RUNNERS = {"llguidance": _Llguidance, "xgrammar": _Xgrammar, "lm-format-enforcer": _FormatEnforcer, "outlines-core": _OutlinesCore}

if __name__ == "__main__":
    main()
