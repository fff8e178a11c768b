"""The built-in datasets: ms-swift's late-2023 list, each with the preprocessing ms-swift gave its raw rows.

Each preprocess is a pure function from one raw hub row to a canonical row (query/response/history/system,
conversations or messages, see formats.py), a list of them, or Drop(reason) for a row left out on purpose.
Prompt texts for the task datasets (classification, generation) are ms-swift's, so results compare.
"""
from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from .errors import DataError
from .loading import Drop, register_dataset


def text(row: dict, key: str, field: str | None = None) -> str:
    """A required string field (numbers are written as text); `field` names it in errors when nested."""
    if key not in row or row[key] is None:
        raise DataError("missing field", field=field or key)
    value = row[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field or key)
    return value


def literal_list(row: dict, key: str, repair=None) -> list:
    """A list field that hubs often store as the text of a JSON or Python literal; never evaluates code."""
    if key not in row or row[key] is None:
        raise DataError("missing field", field=key)
    value = row[key]
    if isinstance(value, str):
        source = repair(value) if repair else value
        try:
            value = json.loads(source)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(source)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as error:
                raise DataError(f"not a JSON or Python list literal ({type(error).__name__})", field=key) from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise DataError(f"expected a list of objects, got {type(value).__name__}", field=key)
    return value


@dataclass(frozen=True)
class Columns:
    """Take these raw columns as the canonical ones and nothing else (ms-swift renamed, then dropped the rest)."""

    mapping: tuple[tuple[str, str], ...]

    def __call__(self, row: dict) -> dict:
        return {canonical: text(row, raw) for raw, canonical in self.mapping}

    def __str__(self) -> str:
        return "columns " + ", ".join(f"{raw}->{canonical}" for raw, canonical in self.mapping)


def columns(**mapping: str) -> Columns:
    return Columns(tuple(mapping.items()))


@dataclass(frozen=True)
class Prompted:
    """A task row turned into a prompt: `prompt` formatted with the raw `query_key`, `response_key` the answer."""

    prompt: str
    query_key: str
    response_key: str

    def __call__(self, row: dict) -> dict:
        return {"query": self.prompt.format(query=text(row, self.query_key)), "response": text(row, self.response_key)}

    def __str__(self) -> str:
        return f"prompt with {self.query_key}, answer {self.response_key}"


@dataclass(frozen=True)
class Classification:
    """A sentence (or sentence pair) / label row as ms-swift's classification prompt; the answer is the label name."""

    labels: tuple[str, ...]
    task: str
    pair: bool

    def __call__(self, row: dict) -> dict | Drop:
        label = row.get("label")
        if label is None or label == "":
            return Drop("no label")
        try:
            index = int(float(label))
        except (TypeError, ValueError):
            raise DataError(f"not a label number: {label!r}", field="label") from None
        if index == -1:
            return Drop("label -1 (unlabelled row)")
        if not 0 <= index < len(self.labels):
            raise DataError(f"label {index} is outside 0..{len(self.labels) - 1}", field="label")
        inputs = (f"Sentence1: {text(row, 'sentence1')}\nSentence2: {text(row, 'sentence2')}" if self.pair
                  else f"Sentence: {text(row, 'sentence')}")
        query = f"Task: {self.task}\n{inputs}\nCategory: {', '.join(self.labels)}\nOutput:"
        return {"query": query, "response": self.labels[index]}

    def __str__(self) -> str:
        return f"classification prompt ({self.task})"


def alpaca_zh(row: dict) -> dict:
    """Alpaca-GPT4-zh writes many inputs as '输入：...'; the marker is dropped before joining."""
    instruction, extra = text(row, "instruction"), row.get("input") or ""
    extra = extra[3:] if extra.startswith("输入：") else extra
    return {"query": f"{instruction}\n{extra}" if extra else instruction, "response": text(row, "output")}


# The Firefly task kinds ms-swift trains on; rows of any other kind are left out.
FIREFLY_KINDS = frozenset({
    "ProseGeneration", "MRC", "JinYongGeneration", "TextCorrection", "ClassicalChinese", "BELLE", "StoryGeneration",
    "Couplet", "Cot", "Dictionary", "Translation", "Program", "SentimentAnalyze", "OpenQA", "AncientPoem",
    "TextMatching", "NLI", "Summary", "KeywordRecognition", "ProductDesc", "LyricGeneration", "Composition",
    "MusicComment", "NER",
})


def firefly(row: dict) -> dict | Drop:
    kind = row.get("kind")
    if kind not in FIREFLY_KINDS:
        return Drop(f"Firefly kind outside the trained list: {kind}")
    return {"query": text(row, "input"), "response": text(row, "target")}


def sharegpt_pairs(row: dict) -> dict:
    """ShareGPT-Chinese-English-90k: `conversation` is a list (often its Python literal) of {human, assistant} turns."""
    messages = []
    for index, turn in enumerate(literal_list(row, "conversation")):
        messages += [{"role": "user", "content": text(turn, "human", f"conversation[{index}].human")},
                     {"role": "assistant", "content": text(turn, "assistant", f"conversation[{index}].assistant")}]
    return {"messages": messages}


_MSAGENT_TOOL = re.compile(r'\d\. {"(?:plugin_)?name": "(.+?)"')
_MSAGENT_PLUGIN = re.compile(r'\d\. {"plugin_name": "(.+?)"')


def _msagent(row: dict, tool_pattern: re.Pattern) -> dict | Drop:
    turns = literal_list(row, "conversations")
    first_user = next((index for index, turn in enumerate(turns) if turn.get("from") == "user"), None)
    if first_user is None:
        return Drop("no user turn")
    preamble = "\n".join(str(turn.get("value", "")) for turn in turns[:first_user])
    if len(set(tool_pattern.findall(preamble))) <= 1:
        return Drop("fewer than two tools listed before the first user turn (ms-swift's MSAgent-Bench filter)")
    return {"conversations": turns}


def msagent(row: dict) -> dict | Drop:
    """MSAgent-Bench: `conversations` is the Python literal of a list; rows listing under two tools are left out."""
    return _msagent(row, _MSAGENT_TOOL)


def msagent_mini(row: dict) -> dict | Drop:
    """The mini variant keeps only the rows whose tools are listed as `plugin_name` entries (two or more)."""
    return _msagent(row, _MSAGENT_PLUGIN)


def _comma_between_objects(literal: str) -> str:
    # AgentInstruct's copy stores the repr of an array of dicts: objects on separate lines without commas.
    return re.sub(r"}\s*\n\s*{", "},\n{", literal)


def agent_instruct(row: dict) -> dict:
    """AgentInstruct: human/gpt `conversations`, stored on ModelScope as a comma-less literal that needs repair."""
    return {"conversations": literal_list(row, "conversations", repair=_comma_between_objects)}


def codefuse_chat(row: dict) -> dict:
    """CodeExercise-Python-27k: `chat_rounds` of {role: human|bot|system, content}."""
    return {"messages": [{"role": turn.get("role"), "content": turn.get("content")} for turn in literal_list(row, "chat_rounds")]}


MS_BENCH_SYSTEM = "You are a helpful assistant."


def ms_bench(row: dict) -> dict | Drop:
    """ms_bench: the default system prompt is dropped, and so are rows that mention MOSS or hold a transcript."""
    turns = literal_list(row, "conversations")
    if turns and turns[0].get("from") == "system" and turns[0].get("value") == MS_BENCH_SYSTEM:
        turns = turns[1:]
    for turn in turns:
        value = str(turn.get("value", "")).lower()
        if "moss" in value or "human:" in value or "assistant:" in value:
            return Drop("mentions MOSS or holds a Human:/Assistant: transcript (ms-swift's ms-bench filter)")
    return {"conversations": turns}


def leetcode_python(row: dict) -> dict:
    """The problem statement (before the one ```python block) is the query; the code then the explanation answer."""
    combined = text(row, "code_with_problem")
    start = combined.find("```python")
    if start == -1 or start != combined.rfind("```python"):
        raise DataError("expected exactly one ```python block", field="code_with_problem")
    problem = combined[:start]
    problem = problem[2:] if problem.startswith("# ") else problem
    return {"query": problem, "response": f"{combined[start:].strip()}\n\n{text(row, 'explanation_only')}"}


def blossom_math(row: dict) -> dict:
    return {"query": text(row, "input"), "response": f"{text(row, 'output')}\n\nAnswer: {text(row, 'answer')}"}


def text2sql(row: dict) -> dict:
    """Text-to-SQL v2 rows: the question in `instruction`, the table schema in `input`, the SQL in `response`."""
    schema = row.get("input") or ""
    question = text(row, "instruction")
    return {"query": f"{question}\n{schema}" if schema else question, "response": text(row, "response")}


def sql_create_context(row: dict) -> dict:
    return {"instruction": text(row, "question"), "input": text(row, "context"), "output": text(row, "answer")}


def tigerbot_law(row: dict) -> dict:
    """A law article as text to continue (no query): type, title, the chapters present, then the content."""
    chapters = "".join(str(row[f"chapter{i}"]) for i in (1, 2, 3) if row.get(f"chapter{i}") is not None)
    return {"query": "", "response": f"{text(row, 'type')}\n{text(row, 'title')}\n{chapters}{text(row, 'content')}"}


def poetry(row: dict) -> dict:
    return {"query": "", "response": text(row, "text1")}


ADVERTISE_PROMPT = "Task: Generating advertisements based on keywords.\nKeywords: {query}\nAdvertisements:"
QUESTION_GENERATION_PROMPT = "Task: Question Generation\nContext: {context}\nAnswer: {answer}\nQuestion:"
HC3_PROMPT = ("Classification Task: Are the following responses from a human or from ChatGPT?\nQuestion: {question}\n"
              "Answer: {answer}\nCategory: Human, ChatGPT\nOutput:")


def dureader_question(row: dict) -> dict:
    """DuReader-robust QG: text1 is 'answer[SEP]context', text2 the question to generate."""
    parts = text(row, "text1").split("[SEP]")
    if len(parts) != 2:
        raise DataError("expected 'answer[SEP]context'", field="text1")
    answer, context = parts
    return {"query": QUESTION_GENERATION_PROMPT.format(context=context, answer=answer), "response": text(row, "text2")}


def hc3(row: dict) -> list[dict]:
    """Each human and each ChatGPT answer becomes its own classification example."""
    question = text(row, "question")
    examples = []
    for key, label in (("human_answers", "Human"), ("chatgpt_answers", "ChatGPT")):
        answers = row.get(key) or []
        if not isinstance(answers, list):
            raise DataError("expected a list of answers", field=key)
        examples += [{"query": HC3_PROMPT.format(question=question, answer=answer), "response": label} for answer in answers]
    return examples


COCO_QUERY = "<image>please describe the image."


def coco_caption(row: dict) -> dict:
    """COCO 2014 captions in ms-swift's multimodal row shape: an <image> tag in the query, the path in `images`."""
    image = row.get("image")
    path = image.get("path") if isinstance(image, dict) else image
    if not isinstance(path, str) or not path:
        raise DataError("expected an image path or URL (or {path: ...})", field="image")
    return {"query": COCO_QUERY, "response": text(row, "caption").split("&&")[0], "images": [path]}


MULTI_ALPACA_LANGUAGES = ("ar", "de", "es", "fr", "id", "ja", "ko", "pt", "ru", "th", "vi")
SHAREGPT_ZH = ("common-zh", "computer-zh", "unknow-zh")
SHAREGPT_EN = ("common-en", "computer-en")
AGENT_INSTRUCT_PARTS = ("alfworld", "db", "kg", "mind2web", "os", "webshop")
HC3_ZH = ("baike", "open_qa", "nlpcc_dbqa", "finance", "medicine", "law", "psychology")
NLI_LABELS = ("neutral", "entailment", "contradiction")
CODEFUSE_PYTHON = dict(ms_id="codefuse-ai/CodeExercise-Python-27k", preprocess=codefuse_chat, tags=("coding",))
MEDICAL_ZH = dict(ms_id="huangjintao/medical_zh", subsets="zh", split=("train", "val"),
                  preprocess=columns(instruction="query", output="response"), tags=("medical",))
CMNLI = dict(ms_id="modelscope/clue", hf_id="clue/clue", subsets="cmnli",
             preprocess=Classification(NLI_LABELS, "Natural Language Inference", True), tags=("classification",))
COCO = dict(ms_id="modelscope/coco_2014_caption", subsets="coco_2014_caption", preprocess=coco_caption,
            tags=("multi-modal", "vision"))

# name -> where it lives and how its rows convert. No preprocess: the raw rows already have a known schema
# (alpaca instruction/input/output, query/response, conversations, messages), as ms-swift's SmartPreprocessor found.
BUILTIN = {
    # general
    "alpaca-en": dict(ms_id="AI-ModelScope/alpaca-gpt4-data-en", hf_id="vicgalle/alpaca-gpt4", tags=("general",)),
    "alpaca-zh": dict(ms_id="AI-ModelScope/alpaca-gpt4-data-zh", hf_id="llm-wizard/alpaca-gpt4-data-zh",
                      preprocess=alpaca_zh, tags=("general",)),
    "multi-alpaca-all": dict(ms_id="damo/nlp_polylm_multialpaca_sft", subsets=MULTI_ALPACA_LANGUAGES,
                             tags=("general", "multilingual")),
    "instinwild-en": dict(ms_id="wyj123456/instinwild", subsets="subset", tags=("general",)),
    "instinwild-zh": dict(ms_id="wyj123456/instinwild", subsets="default", tags=("general",)),
    "cot-en": dict(ms_id="YorickHe/CoT", tags=("general",)),
    "cot-zh": dict(ms_id="YorickHe/CoT_zh", tags=("general",)),
    "firefly-all-zh": dict(ms_id="wyj123456/firefly", hf_id="YeungNLP/firefly-train-1.1M", preprocess=firefly,
                           tags=("general",)),
    "instruct-en": dict(ms_id="wyj123456/instruct", preprocess=columns(prompt="query", completion="response"),
                        tags=("general",)),
    "gpt4all-en": dict(ms_id="wyj123456/GPT4all", preprocess=columns(prompt="query", response="response"),
                       tags=("general",)),
    "sharegpt-en": dict(ms_id="huangjintao/sharegpt", subsets=SHAREGPT_EN, preprocess=sharegpt_pairs,
                        tags=("general", "multi-round")),
    "sharegpt-zh": dict(ms_id="huangjintao/sharegpt", subsets=SHAREGPT_ZH, preprocess=sharegpt_pairs,
                        tags=("general", "multi-round")),
    "sharegpt": dict(ms_id="huangjintao/sharegpt", subsets=SHAREGPT_ZH + SHAREGPT_EN, preprocess=sharegpt_pairs,
                     tags=("general", "multi-round")),
    "ms-bench": dict(ms_id="iic/ms_bench", preprocess=ms_bench, tags=("general", "multi-round")),
    # agent
    "damo-agent-zh": dict(ms_id="damo/MSAgent-Bench", preprocess=msagent, tags=("agent", "multi-round")),
    "damo-agent-mini-zh": dict(ms_id="damo/MSAgent-Bench", preprocess=msagent_mini, tags=("agent", "multi-round")),
    "agent-instruct-all-en": dict(ms_id="huangjintao/AgentInstruct_copy", hf_id="THUDM/AgentInstruct",
                                  subsets=AGENT_INSTRUCT_PARTS, hf_subsets=(), hf_split=AGENT_INSTRUCT_PARTS,
                                  preprocess=agent_instruct, tags=("agent", "multi-round")),
    # coding
    "code-alpaca-en": dict(ms_id="wyj123456/code_alpaca_en", hf_id="sahil2801/CodeAlpaca-20k", tags=("coding",)),
    "code-python-zh": CODEFUSE_PYTHON,
    "codefuse-python-en": CODEFUSE_PYTHON,
    "codefuse-evol-instruction-zh": dict(ms_id="codefuse-ai/Evol-instruction-66k",
                                         preprocess=columns(instruction="query", output="response"), tags=("coding",)),
    "leetcode-python-en": dict(ms_id="AI-ModelScope/leetcode-solutions-python", preprocess=leetcode_python,
                               tags=("coding",)),
    # medical: the English rows' question is `input` (their `instruction` is one fixed sentence)
    "medical-en": dict(ms_id="huangjintao/medical_zh", subsets="en", split=("train", "val"),
                       preprocess=columns(input="query", output="response"), tags=("medical",)),
    "medical-zh": MEDICAL_ZH,
    "medical-mini-zh": dict(MEDICAL_ZH, sample=50000),
    # law
    "lawyer-llama-zh": dict(ms_id="AI-ModelScope/lawyer_llama_data", hf_id="Skepsun/lawyer_llama_data",
                            preprocess=columns(instruction="query", output="response"), tags=("law",)),
    "tigerbot-law-zh": dict(ms_id="AI-ModelScope/tigerbot-law-plugin", preprocess=tigerbot_law,
                            tags=("law", "text-generation")),
    # math
    "blossom-math-zh": dict(ms_id="AI-ModelScope/blossom-math-v2", hf_id="Azure99/blossom-math-v2",
                            preprocess=blossom_math, tags=("math",)),
    "school-math-zh": dict(ms_id="AI-ModelScope/school_math_0.25M", hf_id="BelleGroup/school_math_0.25M", tags=("math",)),
    # sql
    "text2sql-en": dict(ms_id="AI-ModelScope/texttosqlv2_25000_v2", hf_id="Clinton/texttosqlv2_25000_v2",
                        preprocess=text2sql, tags=("sql",)),
    "sql-create-context-en": dict(ms_id="AI-ModelScope/sql-create-context", hf_id="b-mc2/sql-create-context",
                                  preprocess=sql_create_context, tags=("sql",)),
    # text generation
    "advertise-gen-zh": dict(ms_id="lvjianjin/AdvertiseGen", hf_id="shibing624/AdvertiseGen",
                             preprocess=Prompted(ADVERTISE_PROMPT, "content", "summary"), tags=("text-generation",)),
    "dureader-robust-zh": dict(ms_id="modelscope/DuReader_robust-QG", split=("train", "validation"),
                               preprocess=dureader_question, tags=("text-generation",)),
    # classification
    "cmnli-zh": CMNLI,
    "cmnli-mini-zh": dict(CMNLI, sample=20000),
    "jd-sentiment-zh": dict(ms_id="DAMO_NLP/jd", preprocess=Classification(("negative", "positive"),
                                                                           "Sentiment Classification", False),
                            tags=("classification",)),
    "hc3-zh": dict(ms_id="simpleai/HC3-Chinese", hf_id="Hello-SimpleAI/HC3-Chinese", subsets=HC3_ZH, preprocess=hc3,
                   tags=("classification",)),
    "hc3-en": dict(ms_id="simpleai/HC3", hf_id="Hello-SimpleAI/HC3", subsets=("finance", "medicine"), preprocess=hc3,
                   tags=("classification",)),
    # other
    "finance-en": dict(ms_id="wyj123456/finance_en", hf_id="ssbuild/alpaca_finance_en", tags=("financial",)),
    "poetry-zh": dict(ms_id="modelscope/chinese-poetry-collection", preprocess=poetry, tags=("text-generation",)),
    "cls-fudan-news-zh": dict(ms_id="damo/zh_cls_fudan-news", preprocess=columns(prompt="query", answer="response"),
                              tags=("classification",)),
    "ner-jave-zh": dict(ms_id="damo/zh_ner-JAVE", preprocess=columns(prompt="query", answer="response"), tags=("ner",)),
    # vision: image captions, rows in ms-swift's multimodal shape
    "coco-en": COCO,
    "coco-mini-en": dict(COCO, sample=20000),
}

for _name, _entry in BUILTIN.items():
    register_dataset(_name, **_entry)
