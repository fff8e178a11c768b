import json
import math
import random

import pytest

from sftkit.metrics import (
    ToolCall,
    _lcs_length,
    ERROR_KINDS,
    agent_metrics,
    bleu4,
    call_errors,
    corpus_bleu4,
    corpus_rouge_l,
    error_counts,
    metric_tokens,
    parse_tool_calls,
    rouge_l,
    score_tool_calls,
    split_final_answer,
    text_metrics,
)


def think(payload: str) -> str:
    return f"<|startofthink|>{payload}<|endofthink|>"


def msagent_call(name: str, parameters: dict, tag: str = "JSON") -> str:
    call = {"api_name": name, "url": f"http://api/{name}", "parameters": parameters}
    body = json.dumps(call, ensure_ascii=False)
    return think(f"```{tag}\n{body}\n```")


def exec_result(result: str) -> str:
    return f"<|startofexec|>```JSON\n{result}\n```<|endofexec|>"


# --- tokens -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, tokens",
    [
        ("Hello, World! It's 3.14", ["hello", "world", "it", "s", "3", "14"]),
        ("你好，世界。", ["你", "好", "世", "界"]),
        ("我爱Python编程!", ["我", "爱", "python", "编", "程"]),
        ("ＧＰＴ４很强", ["gpt4", "很", "强"]),  # full-width folds to ASCII
        ("東京へ行きます・カレー。", list("東京へ行きますカレー")),
        ("안녕 하세요", ["안", "녕", "하", "세", "요"]),
        ("人々", ["人", "々"]),
        ("Café_au_lait", ["café", "au", "lait"]),
        ("「…」!?", []),
    ],
)
def test_metric_tokens(text, tokens):
    assert metric_tokens(text) == tokens


# --- ROUGE-L ------------------------------------------------------------------------------------------


def test_rouge_l_english_by_hand():
    # LCS "the cat on the mat" = 5; P = 5/6, R = 5/5, F = 2PR/(P+R) = 10/11.
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    assert rouge_l("The CAT, sat.", "the cat sat") == 1.0


def test_rouge_l_chinese_per_character():
    # 今天天气 is common: LCS 4 of 6 characters each side, P = R = F = 2/3.
    assert rouge_l("今天天气很好", "今天天气不错") == pytest.approx(2 / 3)
    assert rouge_l("你好，世界！", "你好世界") == 1.0


def test_rouge_l_mixed_scripts():
    # 我 爱 python 编 程 vs 我 喜 欢 python: LCS (我, python) = 2 -> F = 2*2 / (5 + 4).
    assert rouge_l("我爱Python编程", "我喜欢python") == pytest.approx(4 / 9)


def test_rouge_l_empty_rules():
    assert rouge_l("", "abc") == 0.0
    assert rouge_l("abc", "") == 0.0
    assert rouge_l("", "") == 1.0
    assert rouge_l("...", "！？") == 1.0  # no tokens on either side
    assert rouge_l("abc", "xyz") == 0.0


def test_corpus_rouge_l_is_the_mean():
    mean = (2 / 3 + 1) / 2
    assert corpus_rouge_l(["今天天气很好", "a b"], ["今天天气不错", "a b"]) == pytest.approx(mean)
    with pytest.raises(ValueError):
        corpus_rouge_l(["a"], [])
    with pytest.raises(ValueError):
        corpus_rouge_l([], [])


def test_lcs_matches_dynamic_programming():
    def lcs_table(a, b):
        row = [0] * (len(b) + 1)
        for x in a:
            diagonal = 0
            for j, y in enumerate(b, 1):
                diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
        return row[-1]

    rng = random.Random(0)
    for _ in range(300):
        a = rng.choices("abcd", k=rng.randint(0, 40))
        b = rng.choices("abcd", k=rng.randint(0, 40))
        assert _lcs_length(a, b) == lcs_table(a, b)


def test_rouge_l_matches_rouge_score_with_our_tokens():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    class Tokens:
        def tokenize(self, text):
            return metric_tokens(text)

    pairs = [
        ("the cat sat on the mat", "the cat on the mat"),
        ("今天天气很好，我们去公园吧", "今天天气不错，去公园散步"),
        ("调用weather API查询Paris的天气", "查询 paris 天气 via the weather api"),
    ]
    default = rouge_scorer.RougeScorer(["rougeL"])
    # Why we tokenise ourselves: the default tokenizer drops every Chinese character.
    assert default.score("今天天气不错", "今天天气很好")["rougeL"].fmeasure == 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Tokens())
    for prediction, reference in pairs:
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l(prediction, reference) == pytest.approx(expected)


# --- BLEU-4 -------------------------------------------------------------------------------------------


def test_bleu4_identical_is_one():
    assert bleu4("the cat sat on the mat", "The cat sat on the mat.") == pytest.approx(1.0)
    assert bleu4("今天天气很好", "今天天气很好") == pytest.approx(1.0)


def test_bleu4_by_hand():
    # 1-grams 5/6, 2-grams 3/5, 3-grams 1/4, 4-grams 0/3 smoothed to 0.1/3; equal lengths, no brevity penalty.
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    assert bleu4("the cat sat on the mat", "the cat is on the mat") == pytest.approx(expected)


def test_bleu4_short_and_empty_rules():
    assert bleu4("你好", "你好") == pytest.approx(0.01**0.25)  # nltk method1: empty 3- and 4-gram orders
    assert bleu4("", "") == 1.0
    assert bleu4("", "abc") == 0.0
    assert bleu4("abc", "") == 0.0
    assert bleu4("a b c d", "e f g h") == 0.0  # no unigram match


def test_bleu4_brevity_penalty():
    # All n-grams of the 4-token prediction match; reference has 8 tokens: BP = exp(1 - 8/4).
    assert bleu4("a b c d", "a b c d e f g h") == pytest.approx(math.exp(-1))


BLEU_PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    (
        "he read the book because he was interested in world history",
        "he was interested in world history because he read the book",
    ),
    ("今天天气很好，我们去公园吧", "今天天气不错，去公园散步"),
    ("调用weather API查询Paris的天气", "查询 paris 天气 via the weather api"),
    ("a b c d e", "a b c"),
    ("x y", "x y z w v"),
]


def test_bleu4_matches_nltk_method1():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    smoothing = bleu_score.SmoothingFunction().method1
    for prediction, reference in BLEU_PAIRS:
        expected = bleu_score.sentence_bleu(
            [metric_tokens(reference)], metric_tokens(prediction), smoothing_function=smoothing
        )
        assert bleu4(prediction, reference) == pytest.approx(expected)


def test_corpus_bleu4_pools_counts_like_nltk():
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    # nltk adds one phantom n-gram per sentence shorter than n, so compare on sentences of 4+ tokens.
    pairs = [(p, r) for p, r in BLEU_PAIRS if len(metric_tokens(p)) >= 4]
    preds, refs = [p for p, _ in pairs], [r for _, r in pairs]
    expected = bleu_score.corpus_bleu(
        [[metric_tokens(r)] for r in refs],
        [metric_tokens(p) for p in preds],
        smoothing_function=bleu_score.SmoothingFunction().method1,
    )
    assert corpus_bleu4(preds, refs) == pytest.approx(expected)
    assert corpus_bleu4(["", ""], ["", ""]) == 1.0
    with pytest.raises(ValueError):
        corpus_bleu4(["a"], ["a", "b"])


def test_text_metrics():
    scores = text_metrics(["the cat sat on the mat"], ["the cat on the mat"])
    # BLEU: 1-grams 5/6, 2-grams 3/5, 3-grams 1/4, 4-grams 0/3 -> 0.1/3; prediction longer, no penalty.
    bleu = (5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25
    assert scores == {"rouge_l": pytest.approx(10 / 11), "bleu4": pytest.approx(bleu)}


# --- parsing tool calls -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        '```JSON\n{"api_name": "weather", "url": "http://w", "parameters": {"city": "Paris"}}\n```',
        '```json\n{"api_name": "weather", "parameters": {"city": "Paris"}}\n```',
        '```\n{"api_name": "weather", "parameters": {"city": "Paris"}}\n```',
        '  {"api_name": "weather", "parameters": {"city": "Paris"}}  ',
        '{"name": "weather", "arguments": {"city": "Paris"}}',
        '{"name": "weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
    ],
)
def test_parse_accepted_spellings(payload):
    assert parse_tool_calls(f"ok {think(payload)} done") == ([ToolCall("weather", {"city": "Paris"})], [])


def test_parse_call_without_arguments():
    assert parse_tool_calls(think('{"name": "now"}')) == ([ToolCall("now", {})], [])


@pytest.mark.parametrize(
    "payload",
    [
        '{"api_name": "weather", "parameters": {"city": "Paris"}',  # bad JSON
        '{"url": "http://w", "parameters": {"city": "Paris"}}',  # no api_name
        '{"api_name": "", "parameters": {}}',  # empty name
        '{"api_name": 3, "parameters": {}}',  # name not a string
        '{"name": "weather", "arguments": "{city: Paris}"}',  # arguments string is not JSON
        '{"name": "weather", "arguments": ["Paris"]}',  # arguments not an object
        '["weather", "Paris"]',  # not an object
        "I will call the weather tool",
    ],
)
def test_parse_failures_are_kept(payload):
    assert parse_tool_calls(think(payload)) == ([], [payload])


def test_unclosed_think_is_a_failure():
    text = msagent_call("a", {"x": 1}) + '<|startofthink|>{"api_name": "b", "parameters": {}}'
    calls, failed = parse_tool_calls(text)
    assert calls == [ToolCall("a", {"x": 1})]
    assert failed == ['{"api_name": "b", "parameters": {}}']


def test_parse_multiple_calls_in_order():
    first, second = msagent_call("a", {"x": 1}), msagent_call("b", {}, tag="")
    text = first + exec_result('{"y": 2}') + second + exec_result("{}") + "ok"
    assert parse_tool_calls(text) == ([ToolCall("a", {"x": 1}), ToolCall("b", {})], [])
    assert parse_tool_calls("plain chat, no call") == ([], [])


def test_split_final_answer():
    call = msagent_call("weather", {"city": "Paris"})
    answered = call + exec_result('{"t": 21}') + "\n  It is 21 degrees. "
    assert split_final_answer(answered) == "It is 21 degrees."
    assert split_final_answer(call + " Calling now.") == "Calling now."
    assert split_final_answer("  just chatting \n") == "just chatting"
    # A call after the last result: the answer follows that call, not the result.
    assert split_final_answer(call + exec_result("{}") + call + "second") == "second"
    assert split_final_answer(call + exec_result("{}")) == ""


# --- scoring tool calls -------------------------------------------------------------------------------


def test_score_numeric_strings_and_stripping():
    predicted = [ToolCall("f", {"n": "3", "x": " 2.50 ", "city": " Paris ", "ok": True, "ids": ["1", 2]})]
    reference = [ToolCall("f", {"n": 3, "x": 2.5, "city": "Paris", "ok": True, "ids": [1, "2"]})]
    assert score_tool_calls(predicted, reference)["args_exact"] == 1
    # true is not 1, and case still matters.
    predicted = [ToolCall("f", {"ok": 1, "city": "paris", "v": None})]
    reference = [ToolCall("f", {"ok": True, "city": "Paris", "v": 0})]
    score = score_tool_calls(predicted, reference)
    assert (score["name_correct"], score["args_exact"], score["args_f1"]) == (1, 0, 0.0)


def test_score_nested_arguments():
    predicted = [ToolCall("f", {"opts": {"k": "1", "tags": [" a "]}})]
    reference = [ToolCall("f", {"opts": {"tags": ["a"], "k": 1}})]
    assert score_tool_calls(predicted, reference)["args_exact"] == 1


def test_score_multi_call_positional():
    reference = [ToolCall("search", {"q": "paris", "n": 5}), ToolCall("weather", {"city": "Paris", "day": 1})]
    predicted = [
        ToolCall("search", {"q": "paris", "n": "5"}),  # exact
        ToolCall("weather", {"city": "Paris", "day": 2}),  # name right, 1 of 2 pairs
        ToolCall("extra", {"a": 1}),  # no reference at this position
    ]
    score = score_tool_calls(predicted, reference)
    # Pairs: 3 matched; 5 predicted, 4 expected -> F1 = 6 / 9.
    assert score == {
        "name_correct": 2,
        "args_exact": 1,
        "args_f1": pytest.approx(6 / 9),
        "n_ref": 2,
        "n_pred": 3,
        "arg_pairs_matched": 3,
        "arg_pairs_pred": 5,
        "arg_pairs_ref": 4,
    }


def test_score_swapped_order_is_wrong():
    a, b = ToolCall("a", {"x": 1}), ToolCall("b", {"y": 2})
    score = score_tool_calls([b, a], [a, b])
    assert (score["name_correct"], score["args_exact"], score["args_f1"]) == (0, 0, 0.0)


def test_score_pairs_only_match_under_the_right_name():
    score = score_tool_calls([ToolCall("wrong", {"city": "Paris"})], [ToolCall("weather", {"city": "Paris"})])
    assert (score["name_correct"], score["args_f1"]) == (0, 0.0)


def test_score_unparsed_calls_count_as_wrong():
    reference = [ToolCall("a", {"x": 1}), ToolCall("b", {"y": 2})]
    in_place = score_tool_calls([None, ToolCall("b", {"y": 2})], reference)
    assert (in_place["name_correct"], in_place["args_exact"], in_place["n_pred"]) == (1, 1, 2)
    assert in_place["args_f1"] == pytest.approx(2 * 1 / (1 + 2))
    unknown_place = score_tool_calls([ToolCall("a", {"x": 1})], reference, failed=1)
    assert (unknown_place["name_correct"], unknown_place["n_pred"]) == (1, 2)


def test_score_no_calls_either_side():
    assert score_tool_calls([], []) == {
        "name_correct": 0,
        "args_exact": 0,
        "args_f1": 1.0,
        "n_ref": 0,
        "n_pred": 0,
        "arg_pairs_matched": 0,
        "arg_pairs_pred": 0,
        "arg_pairs_ref": 0,
    }


# --- agent_metrics ------------------------------------------------------------------------------------


def test_agent_metrics_end_to_end():
    weather = msagent_call("weather", {"city": "北京", "days": 3})
    search = msagent_call("search", {"q": "故宫", "n": 5})
    broken = '```JSON\n{"api_name": "weather", "parameters": {"city": "北京"}\n```'
    examples = [
        {  # two calls, both exact ("3" == 3), answer identical
            "prediction": msagent_call("weather", {"city": " 北京", "days": "3"})
            + exec_result("{}")
            + search
            + exec_result("{}")
            + "明天晴。",
            "reference": weather + exec_result("{}") + search + exec_result("{}") + "明天晴。",
        },
        {  # first call broken: in place, wrong; second right; answer half right
            "prediction": think(broken) + search + exec_result("{}") + "今天天气很好",
            "reference": weather + search + exec_result("{}") + "今天天气不错",
        },
        {"prediction": "你好！", "reference": "你好！"},  # chit-chat, correctly no call
        # chit-chat with a spurious call
        {"prediction": msagent_call("weather", {"city": "上海"}) + "好的", "reference": "好的"},
    ]
    metrics = agent_metrics(examples)
    # Reference calls: 2 + 2 = 4; names right: 2 + 1; exact: 2 + 1.
    # Pairs: example 1 matched 4 of 4/4; example 2 matched 2, predicted 2, expected 4; example 4 predicted 1.
    assert metrics == {
        "tool_name_acc": pytest.approx(3 / 4),
        "args_exact_match": pytest.approx(3 / 4),
        "args_f1": pytest.approx(2 * 6 / (7 + 8)),
        "answer_rouge_l": pytest.approx((1 + 2 / 3 + 1 + 1) / 4),
        "no_call_acc": pytest.approx(1 / 2),
        "n_examples": 4,
        "n_ref_calls": 4,
        "n_pred_calls": 5,
        "n_unparsed": 1,
        "unparsed": [{"index": 1, "payload": broken}],
    }


def test_agent_metrics_unparsed_attempt_is_not_a_no_call():
    metrics = agent_metrics([{"prediction": "<|startofthink|>{oops", "reference": "hi"}])
    assert metrics["no_call_acc"] == 0.0
    assert metrics["tool_name_acc"] is None  # no reference calls to measure
    assert metrics["unparsed"] == [{"index": 0, "payload": "{oops"}]


def test_agent_metrics_rejects_broken_references():
    with pytest.raises(ValueError, match="example 0"):
        agent_metrics([{"prediction": "", "reference": think("{not json")}])
    with pytest.raises(ValueError):
        agent_metrics([])


# --- error kinds --------------------------------------------------------------------------------------


def test_call_errors_name_each_kind_by_hand():
    offered = {"book_table", "get_weather", "stock_price"}
    reference = msagent_call("book_table", {"restaurant": "Nopa", "people": 4, "date": "2026-03-15"}) + exec_result("{}") + \
        msagent_call("stock_price", {"symbol": "ORCL"}) + exec_result("{}") + "Done."
    cases = {
        "invented name": (msagent_call("get_table", {"restaurant": "Nopa"}) + msagent_call("stock_price", {"symbol": "ORCL"}),
                          [("unknown_tool", 0, "get_table is not offered (expected book_table)")]),
        "other offered tool": (msagent_call("get_weather", {"city": "Nopa"}) + msagent_call("stock_price", {"symbol": "ORCL"}),
                               [("wrong_offered_tool", 0, "get_weather for book_table")]),
        "keys and values": (msagent_call("book_table", {"restaurant": "Nopa", "people": "4", "days": 2, "date": "2026-03-16"})
                            + msagent_call("stock_price", {"symbol": "Quote"}),
                            [("extra_parameter", 0, "book_table: days"), ("wrong_value", 0, 'book_table.date: "2026-03-16" for "2026-03-15"'),
                             ("wrong_value", 1, 'stock_price.symbol: "Quote" for "ORCL"')]),
        "missing key, broken and absent call": (msagent_call("book_table", {"restaurant": "Nopa", "people": 4}) + think("{oops"),
                                                [("missing_parameter", 0, "book_table: date"), ("unparsable_call", 1, "{oops")]),
        "one call short": (msagent_call("book_table", {"restaurant": "Nopa", "people": 4, "date": "2026-03-15"}),
                           [("missing_call", 1, "expected stock_price")]),
        "exact": (msagent_call("book_table", {"people": 4.0, "date": "2026-03-15", "restaurant": " Nopa"}) +
                  msagent_call("stock_price", {"symbol": "ORCL"}), []),
    }
    for name, (prediction, expected) in cases.items():
        found = [(e["kind"], e["call"], e["detail"]) for e in call_errors(prediction, reference, offered)]
        assert found == expected, name


def test_call_errors_without_reference_calls_or_offered_list():
    assert [e["kind"] for e in call_errors(msagent_call("stock_price", {"symbol": "X"}), "Hello!", {"stock_price"})] == ["extra_call"]
    # An invented tool is unknown wherever it stands; without the offered list a wrong name is just wrong.
    assert [e["kind"] for e in call_errors(msagent_call("nope", {}), "Hello!", {"stock_price"})] == ["unknown_tool"]
    assert [e["kind"] for e in call_errors(msagent_call("nope", {}), msagent_call("stock_price", {}))] == ["wrong_tool"]
    assert call_errors("Hello!", "Hi!", set()) == []


def test_error_counts_list_every_kind():
    counts = error_counts([[{"kind": "wrong_value"}, {"kind": "wrong_value"}], [], [{"kind": "unknown_tool"}]])
    assert list(counts) == list(ERROR_KINDS)
    assert counts["wrong_value"] == 2 and counts["unknown_tool"] == 1 and sum(counts.values()) == 3
