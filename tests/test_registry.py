"""The model registry, the new families' templates, hub pushes, `sftkit list` and the custom-registration examples."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import tiny

from sftkit import model as loader
from sftkit import registry
from sftkit.data.formats import Message
from sftkit.data.loading import DATASETS
from sftkit.data.templates import TEMPLATES, render
from sftkit.hub import HubError, maybe_push, push_plan, push_to_hub
from sftkit.errors import ModelLoadError
from sftkit.model import attn_implementation, get_model_tokenizer
from sftkit.registry import MODELS, UnsupportedModelError, infer_model_type, register_model, resolve_lora_targets
from sftkit_cli.registry import list_command

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "custom"

README_FAMILIES = """
qwen-7b qwen-7b-chat qwen-14b qwen-14b-chat qwen-7b-chat-int4 qwen-14b-chat-int4 qwen-7b-chat-int8 qwen-14b-chat-int8
qwen-vl qwen-vl-chat baichuan-7b baichuan-13b baichuan-13b-chat baichuan2-7b baichuan2-7b-chat baichuan2-13b
baichuan2-13b-chat baichuan2-7b-chat-int4 baichuan2-13b-chat-int4 chatglm2-6b chatglm2-6b-32k chatglm3-6b-base chatglm3-6b
chatglm3-6b-32k llama2-7b llama2-7b-chat llama2-13b llama2-13b-chat llama2-70b llama2-70b-chat openbuddy-llama2-13b-chat
openbuddy-llama-65b-chat openbuddy-llama2-70b-chat openbuddy-mistral-7b-chat internlm-7b internlm-7b-chat
internlm-7b-chat-8k internlm-20b internlm-20b-chat xverse-7b xverse-7b-chat xverse-13b xverse-13b-chat bluelm-7b
bluelm-7b-chat bluelm-7b-32k bluelm-7b-chat-32k mistral-7b mistral-7b-instruct ziya2-13b ziya2-13b-chat skywork-13b
polylm-13b seqgpt-560m
""".split()
TODAY_FAMILIES = [
    *(f"qwen2.5-{size}{kind}" for size in ("0.5b", "1.5b", "3b", "7b", "14b", "32b", "72b") for kind in ("", "-instruct")),
    *(f"qwen3-{size}" for size in ("0.6b", "1.7b", "4b", "8b", "14b", "32b")),
    *(f"{family}-{kind}" for family, sizes in (("llama3", ("8b", "70b")), ("llama3.1", ("8b", "70b")), ("llama3.2", ("1b", "3b")))
      for size in sizes for kind in (size, f"{size}-instruct")),
    "mistral-nemo-base", "mistral-nemo-instruct",
    *(f"gemma2-{size}{kind}" for size in ("2b", "9b", "27b") for kind in ("", "-it")),
    *(f"gemma3-{size}{kind}" for size in ("1b", "4b", "12b", "27b") for kind in ("-pt", "-it")),
    "phi3-mini-4k-instruct", "phi3-mini-128k-instruct", "phi3-medium-4k-instruct", "phi4", "phi4-mini-instruct",
    *(f"smollm2-{size}{kind}" for size in ("135m", "360m", "1.7b") for kind in ("", "-instruct")),
    *(f"qwen2-vl-{size}{kind}" for size in ("2b", "7b", "72b") for kind in ("", "-instruct")),
    *(f"qwen2.5-vl-{size}-instruct" for size in ("3b", "7b", "32b", "72b")),
    *(f"qwen3-vl-{size}-instruct" for size in ("2b", "4b", "8b", "32b")),
]


class Downloads:
    """Stands in for sftkit.model.resolve_model_dir: records each call and answers with `answer` (a local folder)."""

    def __init__(self):
        self.calls, self.answer = [], None

    def __call__(self, model, *, hub="modelscope", revision=None, cache_dir=None):
        self.calls.append((model, hub, revision, cache_dir))
        if self.answer is None:
            raise AssertionError("nothing should be downloaded here")
        return self.answer


@pytest.fixture
def no_download(monkeypatch):
    downloads = Downloads()
    monkeypatch.setattr(loader, "resolve_model_dir", downloads)
    return downloads


@pytest.fixture
def scratch_registries():
    """Entries a test registers disappear after it, so other tests see the built-in registries."""
    before = (dict(MODELS), dict(TEMPLATES), dict(DATASETS))
    yield
    for current, saved in zip((MODELS, TEMPLATES, DATASETS), before):
        current.clear()
        current.update(saved)


def test_every_family_is_registered_with_a_template_that_exists():
    assert set(README_FAMILIES + TODAY_FAMILIES) <= set(MODELS)
    for info in MODELS.values():
        assert info.template in TEMPLATES, info.model_type
        assert info.lora_target_modules and (info.model_id_or_path or info.hf_model_id), info.model_type
    assert MODELS["qwen-7b-chat"].lora_target_modules == ("c_attn",)
    assert MODELS["chatglm3-6b"].lora_target_modules == ("query_key_value",)
    assert MODELS["baichuan2-7b-chat"].lora_target_modules == ("W_pack",)
    assert MODELS["phi4"].lora_target_modules == ("qkv_proj",)
    assert MODELS["chatglm3-6b"].trust_remote_code and not MODELS["qwen2.5-7b-instruct"].trust_remote_code
    assert MODELS["smollm2-135m-instruct"].tags == (registry.EMBEDDED_TAG,)


def test_infer_model_type_from_hub_ids_and_folder_names(tmp_path):
    assert infer_model_type("Qwen/Qwen2.5-7B-Instruct") == "qwen2.5-7b-instruct"
    assert infer_model_type("qwen/qwen-7b-chat") == "qwen-7b-chat"
    assert infer_model_type("meta-llama/Llama-3.1-8B-Instruct") == "llama3.1-8b-instruct"
    assert infer_model_type("LLM-Research/Meta-Llama-3.1-8B-Instruct") == "llama3.1-8b-instruct"
    assert infer_model_type("THUDM/chatglm3-6b") == "chatglm3-6b"
    ms_cache = tmp_path / "hub" / "Qwen" / "Qwen2___5-0___5B-Instruct"
    hf_cache = tmp_path / "models--google--gemma-2-9b-it" / "snapshots" / "0123abc"
    plain = tmp_path / "SmolLM2-135M-Instruct"
    for folder in (ms_cache, hf_cache, plain):
        folder.mkdir(parents=True)
    assert infer_model_type(str(ms_cache)) == "qwen2.5-0.5b-instruct"
    assert infer_model_type(str(hf_cache)) == "gemma2-9b-it"
    assert infer_model_type(str(plain) + "/") == "smollm2-135m-instruct"
    assert infer_model_type("nobody/unknown-model") is None
    assert infer_model_type(str(tmp_path)) is None
    assert infer_model_type(None) is None


def test_lora_targets_default_and_all():
    assert resolve_lora_targets("qwen-7b-chat", ("DEFAULT",)) == ("c_attn",)
    assert resolve_lora_targets("llama2-7b-chat", "DEFAULT") == ("q_proj", "k_proj", "v_proj")
    assert resolve_lora_targets("llama2-7b-chat", ["DEFAULT", "o_proj", "q_proj"]) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert resolve_lora_targets("qwen-7b-chat", ("ALL",)) == "all-linear"
    assert resolve_lora_targets(None, (r".*\.(q|v)_proj",)) == r".*\.(q|v)_proj"  # one regex stays a full-match string
    assert resolve_lora_targets(None, ("q_proj",)) == ("q_proj",)
    assert resolve_lora_targets(None, "all-linear") == "all-linear"
    assert resolve_lora_targets(None, ("up_proj", "down_proj")) == ("up_proj", "down_proj")
    with pytest.raises(ValueError, match="needs a model type"):
        resolve_lora_targets(None, ("DEFAULT",))
    with pytest.raises(ModelLoadError, match="did you mean qwen2.5-7b-instruct"):
        resolve_lora_targets("qwen2.5-7b-instruc", ("DEFAULT",))


def test_remote_code_needs_consent_before_any_download(no_download):
    with pytest.raises(ModelLoadError, match=r"'chatglm3-6b' runs Python code .*pass --trust_remote_code true"):
        get_model_tokenizer("chatglm3-6b")
    assert no_download.calls == []


def test_requirements_are_checked_with_the_pip_command(no_download, tiny_model_dir, scratch_registries):
    register_model("test-needs", tiny_model_dir, "q_proj", "chatml", requires=("surely-not-installed-pkg>=1",))
    with pytest.raises(ModelLoadError) as error:
        get_model_tokenizer("test-needs")
    assert "needs surely-not-installed-pkg>=1 (not installed): pip install 'surely-not-installed-pkg>=1'" in str(error.value)
    assert registry.missing_requirements(["torch", "transformers>=4.37"]) == []
    assert no_download.calls == []


def test_a_family_that_cannot_load_on_current_transformers_says_why(no_download, tiny_model_dir, scratch_registries):
    register_model("test-old", tiny_model_dir, "q_proj", "chatml", requires=("transformers<4.34",), trust_remote_code=True)
    assert registry.model_status(MODELS["test-old"]) == \
        "incompatible: its code needs transformers<4.34, and sftkit needs transformers>=4.56"
    with pytest.raises(UnsupportedModelError, match=r"'test-old' cannot load with sftkit: its code needs transformers<4\.34"):
        get_model_tokenizer("test-old", trust_remote_code=True)
    assert no_download.calls == []


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is None, reason="needs sentencepiece (sftkit[old-models])")
def test_a_remote_sentencepiece_tokenizer_that_loads_its_model_late_loads(tmp_path):
    """Baichuan's tokenizer loads its SentencePiece model after the base __init__, which transformers >= 4.34 breaks."""
    import shutil

    import sentencepiece
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny.CORPUS), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=120,
                                             minloglevel=2)
    shutil.copy(Path(tiny.__file__).parent / "remote_code" / "latesp" / "tokenization_latesp.py", tmp_path)
    auto_map = {"AutoTokenizer": ["tokenization_latesp.LateSentencePieceTokenizer", None]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": auto_map, "model_max_length": 512}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "baichuan", "auto_map": auto_map}))
    with pytest.raises((AttributeError, TypeError)):  # its vocabulary is asked for before it has one
        AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=True)
    tokenizer = loader.load_tokenizer(str(tmp_path), trust_remote_code=True)
    ids = tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert ids and tokenizer.decode(ids) == "the quick brown fox" and tokenizer.pad_token == "<unk>"


def test_refusals_that_need_no_download(no_download):
    with pytest.raises(UnsupportedModelError, match="is Qwen-VL v1: its vision tower runs from code in its repository") as error:
        get_model_tokenizer("qwen-vl-chat", trust_remote_code=True)
    assert "qwen2-vl-2b-instruct" in str(error.value)
    assert isinstance(error.value, NotImplementedError)
    with pytest.raises(ModelLoadError, match="has no ModelScope id: use --hub hf"):
        get_model_tokenizer("polylm-chat-13b")
    with pytest.raises(ModelLoadError, match="has no Hugging Face id: use --hub modelscope"):
        get_model_tokenizer("skywork-13b-chat", hub="hf", trust_remote_code=True)
    with pytest.raises(ModelLoadError, match="loads only in fp16"):
        get_model_tokenizer("qwen-7b-chat-int4", "bf16", trust_remote_code=True)
    assert no_download.calls == []


def test_hub_ids_and_the_embedded_default(no_download, tiny_model_dir):
    no_download.answer = tiny_model_dir
    model, tokenizer = get_model_tokenizer("qwen2.5-0.5b-instruct", load_model=False, revision="v1", cache_dir="/c")
    assert model is None and tokenizer.pad_token is not None
    get_model_tokenizer("qwen2.5-0.5b-instruct", load_model=False, hub="hf")
    get_model_tokenizer("smollm2-135m-instruct", load_model=False)
    assert no_download.calls == [("Qwen/Qwen2.5-0.5B-Instruct", "modelscope", "v1", "/c"),
                           ("Qwen/Qwen2.5-0.5B-Instruct", "hf", None, None), (None, "modelscope", None, None)]


def test_register_with_a_decorator_patches_what_the_one_loader_loads(tiny_model_dir, scratch_registries):
    calls = []

    @register_model("test-custom", tiny_model_dir, ["q_proj", "v_proj"], "chatml")
    @register_model("test-custom-2", tiny_model_dir, ["q_proj"], "chatml")
    def left_padding(model, tokenizer):
        calls.append(model)
        tokenizer.padding_side = "left"

    model, tokenizer = get_model_tokenizer("test-custom", load_model=False)
    get_model_tokenizer("test-custom-2", load_model=False)
    assert model is None and calls == [None, None] and tokenizer.padding_side == "left"
    assert MODELS["test-custom"].patch is left_padding and MODELS["test-custom-2"].patch is left_padding
    with pytest.raises(ValueError, match="already registered"):
        register_model("test-custom", tiny_model_dir, ["q_proj"], "chatml")
    with pytest.raises(TypeError):
        register_model("test-kwargs", tiny_model_dir, ["q_proj"], "chatml", bits=4)  # no loader plugins through **kwargs
    from transformers import AutoModelForCausalLM

    register_model("test-plain", tiny_model_dir, "q_proj", "chatml", automodel_class=AutoModelForCausalLM)
    model, tokenizer = get_model_tokenizer("test-plain", model_kwargs={"gradient_checkpointing": True})
    assert type(model).__name__ == "LlamaForCausalLM" and MODELS["test-plain"].lora_target_modules == ("q_proj",)
    assert model.is_gradient_checkpointing  # the one loader handles every option, whichever class loads


def test_attention_implementation(monkeypatch):
    monkeypatch.setattr(loader, "_flash_attn_missing", lambda: None)
    assert attn_implementation(None) == ("flash_attention_2", "attention: flash_attention_2")
    assert attn_implementation(False)[0] == "sdpa"
    monkeypatch.setattr(loader, "_flash_attn_missing", lambda: "flash attention needs a CUDA GPU")
    assert attn_implementation(None) == ("sdpa", "attention: sdpa (flash attention needs a CUDA GPU)")
    implementation, message = attn_implementation(True)
    assert implementation == "sdpa" and "not flash_attention_2 as asked: flash attention needs a CUDA GPU" in message


CONVERSATION = [Message("system", "You are terse."), Message("user", "What is 2+2?"), Message("assistant", "4."),
                Message("user", "And 3+3?"), Message("assistant", "6.")]
SPECIALS = {"gemma": ("<bos>", "<eos>"), "phi3": ("<s>", "<|endoftext|>")}
# Written by hand from each model's documented chat format, not produced by the code under test.
GOLDEN = {
    "qwen2_5": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
               "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n",
    "qwen3": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
             "<|im_start|>assistant\n<think>\n\n</think>\n\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
             "<|im_start|>assistant\n<think>\n\n</think>\n\n6.<|im_end|>\n",
    "gemma": "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4.<end_of_turn>\n"
             "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n6.<end_of_turn>\n",
    "phi3": "<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4.<|end|>\n"
            "<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n6.<|end|>\n",
    "phi4": "<|im_start|>system<|im_sep|>You are terse.<|im_end|><|im_start|>user<|im_sep|>What is 2+2?<|im_end|>"
            "<|im_start|>assistant<|im_sep|>4.<|im_end|><|im_start|>user<|im_sep|>And 3+3?<|im_end|>"
            "<|im_start|>assistant<|im_sep|>6.<|im_end|>",
    "phi4-mini": "<|system|>You are terse.<|end|><|user|>What is 2+2?<|end|><|assistant|>4.<|end|>"
                 "<|user|>And 3+3?<|end|><|assistant|>6.<|end|>",
    "mistral-nemo": "<s>[INST]You are terse.\n\nWhat is 2+2?[/INST]4.</s>[INST]And 3+3?[/INST]6.</s>",
    "bluelm": "<s>You are terse.[|Human|]:What is 2+2?[|AI|]:4.</s>[|Human|]:And 3+3?[|AI|]:6.</s>",
    "ziya": "<s>You are terse.<human>:What is 2+2?\n<bot>:4.</s>\n<human>:And 3+3?\n<bot>:6.</s>",
    "skywork": "<s>You are terse.</s><s>[USER]What is 2+2?[SEP][BOT]4.[SEP]</s><s>[USER]And 3+3?[SEP][BOT]6.[SEP]</s>",
    "polylm": "<|user|>\nYou are terse.\n\nWhat is 2+2?\n<|assistant|>\n4.</s><|user|>\nAnd 3+3?\n<|assistant|>\n6.</s>",
    "seqgpt": "输入: You are terse.\n\nWhat is 2+2?\n输出: [GEN]4.</s>输入: And 3+3?\n输出: [GEN]6.</s>",
    "openbuddy": "<s>You are terse.\n\nUser: What is 2+2?\nAssistant: 4.</s>\nUser: And 3+3?\nAssistant: 6.</s>",
    "default-generation": "<s>You are terse.\n\nWhat is 2+2?4.</s>And 3+3?6.</s>",
    "chatglm-generation": "[gMASK]sopYou are terse.\n\nWhat is 2+2?4.</s>And 3+3?6.</s>",
}
GOLDEN_NO_SYSTEM = {
    "qwen2_5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n",
    "qwen3": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n4.<|im_end|>\n",
    "phi3": "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4.<|end|>\n",
    "phi4": "<|im_start|>user<|im_sep|>What is 2+2?<|im_end|><|im_start|>assistant<|im_sep|>4.<|im_end|>",
    "skywork": "<s></s><s>[USER]What is 2+2?[SEP][BOT]4.[SEP]</s>",
    "openbuddy": "<s>User: What is 2+2?\nAssistant: 4.</s>",
}


def rendered(name, conversation):
    bos, eos = SPECIALS.get(name, ("<s>", "</s>"))
    return "".join(text for text, _ in render(conversation, name, bos_token=bos, eos_token=eos))


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_template_golden_strings(name):
    assert rendered(name, CONVERSATION) == GOLDEN[name]
    if name in GOLDEN_NO_SYSTEM:
        assert rendered(name, CONVERSATION[1:3]) == GOLDEN_NO_SYSTEM[name]


RUN = [("save", "/run/checkpoint-10", True), ("save", "/run/checkpoint-20", False), ("save", "/run/checkpoint-30", True),
       ("end", "/run/best", False)]
PUSHED = {
    "end": [("/run/best", "")],
    "push_best": [("/run/checkpoint-10", ""), ("/run/checkpoint-30", ""), ("/run/best", "")],
    "push_last": [("/run/checkpoint-10", ""), ("/run/checkpoint-20", ""), ("/run/checkpoint-30", ""), ("/run/best", "")],
    "checkpoint": [("/run/checkpoint-10", "last-checkpoint"), ("/run/checkpoint-20", "last-checkpoint"),
                   ("/run/checkpoint-30", "last-checkpoint"), ("/run/best", "")],
    "all_checkpoints": [("/run/checkpoint-10", "checkpoint-10"), ("/run/checkpoint-20", "checkpoint-20"),
                        ("/run/checkpoint-30", "checkpoint-30"), ("/run/best", "")],
}


@pytest.mark.parametrize("strategy", sorted(PUSHED))
def test_push_strategies_against_a_fake_uploader(strategy):
    uploads = []
    for event, checkpoint, is_best in RUN:
        maybe_push(strategy, event, checkpoint, is_best, lambda folder, path: uploads.append((folder, path)))
    assert uploads == PUSHED[strategy]


def test_push_plan_rejects_unknown_names_and_skips_missing_folders():
    assert not push_plan("end", "end", None, True)
    with pytest.raises(ValueError, match="push_hub_strategy must be one of"):
        push_plan("every_save", "save", "/run/checkpoint-10", True)
    with pytest.raises(ValueError, match="push event"):
        push_plan("end", "epoch", "/run/checkpoint-10", True)


class FakeHubApi:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def login(self, token):
        if self.fail:
            raise self.fail
        self.calls.append(("login", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs["visibility"], kwargs["exist_ok"]))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs["folder_path"], kwargs["path_in_repo"]))


def test_push_to_hub_logs_in_creates_and_uploads(tmp_path, monkeypatch):
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    with pytest.raises(HubError, match="needs an access token: pass --hub_token or set MODELSCOPE_API_TOKEN"):
        push_to_hub(str(tmp_path), "me/model", api=FakeHubApi())
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", "secret")
    api = FakeHubApi()
    push_to_hub(str(tmp_path), "me/model", "last-checkpoint", private=True, api=api)
    assert api.calls == [("login", "secret"), ("create_repo", "me/model", "private", True),
                         ("upload_folder", "me/model", str(tmp_path), "last-checkpoint")]
    with pytest.raises(HubError, match="ConnectionError: no network. Offline"):
        push_to_hub(str(tmp_path), "me/model", token="t", api=FakeHubApi(fail=ConnectionError("no network")))
    with pytest.raises(HubError, match="is not a folder"):
        push_to_hub(str(tmp_path / "missing"), "me/model", token="t", api=FakeHubApi())


def test_list_models_is_one_aligned_row_per_entry():
    result = CliRunner().invoke(list_command, ["models"])
    assert result.exit_code == 0, result.output
    header, *rows = result.output.splitlines()
    assert header.split() == ["model_type", "status", "modelscope_id", "hf_id", "template", "lora_targets", "dtype",
                              "max_length", "remote_code", "tags", "aliases"]
    assert len(rows) == len(MODELS)
    starts = [header.index(column) for column in header.split()]
    for row in rows:
        assert all(row[start - 2:start] == "  " and row[start] != " " for start in starts[1:]), row
    row = next(row for row in rows if row.startswith("qwen2.5-7b-instruct "))
    assert row.split() == ["qwen2.5-7b-instruct", "tested", "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
                           "qwen2_5", "q_proj,k_proj,v_proj", "auto", "32768", "no", "-", "-"]


def test_list_as_json_and_the_other_registries():
    models = json.loads(CliRunner().invoke(list_command, ["models", "--format", "json"]).output)
    assert {"model_type": "chatglm3-6b", "status": "remote code (untested here)", "modelscope_id": "ZhipuAI/chatglm3-6b",
            "hf_id": "THUDM/chatglm3-6b", "template": "chatglm3", "lora_targets": "query_key_value", "dtype": "auto",
            "max_length": 8192, "remote_code": True, "tags": "", "aliases": ""} in models
    by_type = {row["model_type"]: row for row in models}
    assert by_type["mistral-7b-instruct"]["aliases"] == "mistral-7b-chat"
    assert by_type["baichuan-7b"]["status"] == "remote code (untested here)"
    assert by_type["qwen-vl-chat"]["status"].startswith("incompatible: Qwen-VL v1")
    templates = CliRunner().invoke(list_command, ["templates"]).output
    assert "qwen3 " in templates and "<think>\\n\\n</think>\\n\\n" in templates
    assert "[gMASK]sop<|system|>\\n{{SYSTEM}}<|user|>" in templates  # token pieces read as their tokens
    datasets = json.loads(CliRunner().invoke(list_command, ["datasets", "--format", "json"]).output)
    assert any(row["name"] == "alpaca-en" and row["modelscope_id"] == "AI-ModelScope/alpaca-gpt4-data-en" for row in datasets)
    assert CliRunner().invoke(list_command, ["tokenizers"]).exit_code == 2


def test_every_status_is_one_the_suite_stands_behind():
    """Each entry is tested (its architecture trains, merges and generates in tests/test_families.py), remote code, or
    incompatible with a reason: a new family on an architecture no test builds fails here until it gets a test."""
    statuses = {info.model_type: registry.model_status(info) for info in MODELS.values()}
    assert {status for status in statuses.values() if not status.startswith("incompatible: ")} == {
        "tested", registry.REMOTE_CODE_STATUS}
    assert statuses["polylm-chat-13b"] == statuses["seqgpt-560m"] == statuses["gemma3-4b-it"] == "tested"
    assert statuses["chatglm3-6b"] == statuses["qwen-7b-chat"] == registry.REMOTE_CODE_STATUS
    assert sorted(t for t, status in statuses.items() if status.startswith("incompatible")) == ["qwen-vl", "qwen-vl-chat"]


def test_seed_names_are_aliases(no_download, tiny_model_dir):
    assert registry.get_model_info("mistral-7b-chat") is MODELS["mistral-7b-instruct"]
    assert resolve_lora_targets("mistral-7b-chat", "DEFAULT") == ("q_proj", "k_proj", "v_proj")
    no_download.answer = tiny_model_dir
    get_model_tokenizer("mistral-7b-chat", load_model=False)
    assert no_download.calls == [("AI-ModelScope/Mistral-7B-Instruct-v0.1", "modelscope", None, None)]
    with pytest.raises(ValueError, match="already registered"):
        register_model("mistral-7b-chat", tiny_model_dir, "q_proj", "chatml")


class ReadOnlyEos:
    """InternLM-chat's remote tokenizer: eos_token_id a read-only property (giving </s>)."""

    eos_token = "</s>"

    @property
    def eos_token_id(self):
        return 2


def test_internlm_chat_ends_turns_with_eoa():
    tokenizer = type("InternLMTokenizer", (ReadOnlyEos,), {})()
    registry.fix_internlm_chat(None, tokenizer)
    assert tokenizer.eos_token == "<eoa>" and "eos_token_id" not in type(tokenizer).__dict__


def test_baichuan_13b_gets_its_input_embeddings():
    class BaichuanForCausalLM(nn.Module):  # its remote code: no get_input_embeddings
        def get_input_embeddings(self):
            raise NotImplementedError

    model = BaichuanForCausalLM()
    model.model = nn.Module()
    model.model.embed_tokens = nn.Embedding(5, 2)
    registry.fix_baichuan(model, None)
    assert model.get_input_embeddings() is model.model.embed_tokens


class NormHead(nn.Module):
    """Baichuan2's head as its remote code writes it: normalised weights, in place at the first evaluation."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
        self.first_flag = True

    def forward(self, hidden_states):
        return nn.functional.linear(hidden_states, nn.functional.normalize(self.weight.float()))  # float32: the bug


def test_baichuan2_head_keeps_its_dtype_and_checkpointing_flag_reads_right():
    model = nn.Module()
    model.model, model.lm_head = nn.Module(), NormHead()
    model.model.gradient_checkpointing = [False]  # as Baichuan2-13B's config.json writes it
    registry.fix_baichuan2(model, None)
    assert model.model.gradient_checkpointing is False
    hidden = torch.randn(3, 4).to(torch.bfloat16)
    expected = nn.functional.linear(hidden, nn.functional.normalize(model.lm_head.weight).to(torch.bfloat16))
    trained = model.lm_head.train()(hidden)
    assert trained.dtype == torch.bfloat16 and torch.equal(trained, expected)
    evaluated = model.lm_head.eval()(hidden)
    assert torch.equal(evaluated, expected) and not model.lm_head.first_flag
    assert torch.allclose(model.lm_head.weight.float().norm(dim=1), torch.ones(6), atol=1e-2)  # normalised in place


def test_qwen_v1_gets_its_end_token_and_a_safe_embedding_dropout(tokenizer):
    import copy

    model = nn.Module()
    model.transformer = nn.Module()
    model.transformer.drop = nn.Dropout(0.0)
    qwen_tokenizer = copy.deepcopy(tokenizer)
    qwen_tokenizer.pad_token = None
    registry.fix_qwen_chat(model, qwen_tokenizer)
    assert qwen_tokenizer.eos_token == "<|im_end|>" and qwen_tokenizer.pad_token == "<|endoftext|>"
    embeddings = torch.randn(2, 3)
    assert model.transformer.drop(embeddings) is not embeddings  # a copy: in-place adds after it leave autograd's input
    registry.fix_qwen_base(None, qwen_tokenizer)
    assert qwen_tokenizer.eos_token == "<|endoftext|>"


def example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_custom_model_example(tiny_model_dir, scratch_registries, capsys):
    example("custom_model").main(tiny_model_dir)
    out = capsys.readouterr().out
    assert "my-model: LlamaForCausalLM" in out and "tokenizer padding left" in out
    assert MODELS["my-model"].model_id_or_path == tiny_model_dir


def test_custom_template_example(scratch_registries, capsys):
    example("custom_template").main()
    assert capsys.readouterr().out == "Answer with one number.\nQ: 2+2?\nA: [[4\n<end>]]\nQ: 3+3?\nA: [[6\n<end>]]\n"


def test_custom_dataset_example(tiny_model_dir, scratch_registries, tmp_path, capsys):
    data = tmp_path / "faq.jsonl"
    data.write_text(json.dumps({"question": "What is sftkit?", "answer": "A fine-tuning toolkit."}) + "\n", encoding="utf-8")
    example("custom_dataset").main(str(data), tiny_model_dir, "chatml")
    out = capsys.readouterr().out
    assert "[[A fine-tuning toolkit.<|im_end|>]]" in out and "1 of 1 rows kept" in out


def test_no_flash_attn_install_hint_on_a_machine_without_cuda(monkeypatch):
    """Without CUDA, installing flash-attn would not help: the reason given is the missing GPU, not the package."""
    import importlib.util

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)  # flash-attn not installed either
    for asked in (None, True):
        implementation, message = attn_implementation(asked)
        assert implementation == "sdpa" and "needs a CUDA GPU" in message and "pip install" not in message
