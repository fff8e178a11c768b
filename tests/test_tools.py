"""Offered tools are read from system prompts as MSAgent-Bench and role-based rows write them."""
import json
from pathlib import Path

from sftkit.data.formats import Message, to_messages
from sftkit.tools import Tool, call_schema, conversation_tools, offered_tools

FORMATS = Path(__file__).resolve().parent.parent / "examples" / "data" / "formats"
# As ModelScope-Agent-7B's model card writes its system prompt (parameters as a list, required as true).
MODELSCOPE_AGENT_SYSTEM = (
    "当前对话可以使用的插件信息如下，请自行判断是否需要调用插件来解决当前用户问题。\n\n"
    '1. {"name": "modelscope_image-generation", "description": "图片生成服务", "parameters": '
    '[{"name": "text", "description": "用户输入的文本信息", "required": true}]}\n\n'
    '2. {"name": "modelscope_speech-generation", "description": "文本转语音", "parameters": '
    '[{"name": "input", "description": "要转成语音的文本", "required": "True"}, '
    '{"name": "gender", "description": "用户身份", "required": "False"}]}'
)


def test_msagent_numbered_specs_with_parameter_lists():
    tools = offered_tools(MODELSCOPE_AGENT_SYSTEM)
    assert [tool.name for tool in tools] == ["modelscope_image-generation", "modelscope_speech-generation"]
    assert tools[0].parameters == {"type": "object", "properties": {"text": {}}, "required": ["text"],
                                   "additionalProperties": False}
    assert tools[1].parameters["required"] == ["input"] and set(tools[1].parameters["properties"]) == {"input", "gender"}


def test_msagent_paras_with_types_enums_and_urls():
    row = json.loads((FORMATS / "msagent.jsonl").read_text(encoding="utf-8").splitlines()[0])
    weather, currency = offered_tools(row["conversations"][0]["value"])
    assert weather == Tool("weather", {"type": "object", "properties": {"city": {"type": "string"},
                                                                         "unit": {"type": "string", "enum": ["C", "F"]}},
                                       "required": ["city"], "additionalProperties": False},
                           "http://tools.example.com/weather")
    assert currency.parameters["properties"]["amount"] == {"type": "number"}
    assert currency.parameters["required"] == ["amount", "from", "to"]


def test_paths_spelling_and_type_names():
    spec = {"name": "tts", "url": "http://x", "paths": [{"name": "tts", "parameters": [
        {"name": "text", "type": "str", "required": "True"}, {"name": "speed", "type": "float"},
        {"name": "voice", "type": "mystery"}]}]}
    (tool,) = offered_tools("Tools:\n- " + json.dumps(spec))
    assert tool.parameters["properties"] == {"text": {"type": "string"}, "speed": {"type": "number"}, "voice": {}}
    assert tool.url == "http://x"


def test_role_rows_tools_field_through_the_real_formatter():
    row = json.loads((FORMATS / "messages_tools.jsonl").read_text(encoding="utf-8").splitlines()[0])
    conversation = to_messages(row)
    tools = conversation_tools(conversation)
    assert [tool.name for tool in tools] == ["get_weather", "convert_currency"]
    assert tools[0].parameters == {"type": "object", "properties": {"city": {"type": "string"},
                                                                     "unit": {"type": "string", "enum": ["C", "F"]}},
                                   "required": ["city"], "additionalProperties": False}
    assert tools[0].url is None


def test_array_lines_duplicates_and_prose_are_handled():
    system = ("You are helpful. {not json}\n"
              '[{"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}, {"name": "b"}]\n'
              '{"name": "a", "parameters": {"type": "object", "properties": {"y": {}}}}\n'
              '{"description": "no name"}\n3. plain words')
    tools = offered_tools(system)
    assert [tool.name for tool in tools] == ["a", "b"]
    assert tools[0].parameters["properties"] == {"x": {"type": "integer"}}  # the first spec of a name wins
    assert tools[1].parameters == {"type": "object", "properties": {}, "additionalProperties": False}
    assert offered_tools(None) == () and offered_tools("no tools here") == ()


def test_conversation_tools_prefers_the_conversation_system_message():
    spec = '{"name": "inline"}'
    assert [t.name for t in conversation_tools([Message("system", spec), Message("user", "hi")], '{"name": "default"}')] == ["inline"]
    assert [t.name for t in conversation_tools([Message("user", "hi")], '{"name": "default"}')] == ["default"]


def test_call_schema_allows_both_spellings_per_tool_with_its_own_arguments():
    weather = Tool("weather", {"type": "object", "properties": {"city": {}}, "additionalProperties": False}, "http://w")
    book = Tool("book", {"type": "object", "properties": {"day": {}}, "additionalProperties": False})
    options = call_schema([weather, book])["anyOf"]
    assert [(option["properties"].get("api_name", option["properties"].get("name"))["const"]) for option in options] == \
        ["weather", "weather", "book", "book"]
    assert options[0]["properties"]["url"] == {"const": "http://w"} and options[2]["properties"]["url"] == {"type": "string"}
    assert options[1]["properties"]["arguments"] is weather.parameters and options[3]["required"] == ["name", "arguments"]
    assert all(option["additionalProperties"] is False for option in options)
