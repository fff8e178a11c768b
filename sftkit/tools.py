"""The tools a conversation offers, read from its system prompt, and the JSON schema of a call to one of them.

Two real spellings are read: MSAgent-Bench's numbered lines (`1. {"name", "description", "parameters": [{"name",
"required", ...}]}`, also `paras` or `paths[0].parameters`) and the `tools` field of role-based rows, which
formats.tools_text writes one JSON spec per line (OpenAI `{"type": "function", "function": {...}}` or a bare
`{"name", "parameters": <JSON schema>}`). Pure functions: no model, no tokenizer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from .data.formats import Message

# A list item marker in front of a spec: "1. ", "2) ", "- ", "* ".
_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*])?\s*")
# JSON-schema keywords that constrain a value; anything else in a parameter spec (description, required) is not one.
_VALUE_KEYWORDS = ("type", "enum", "const", "pattern", "format", "items", "minimum", "maximum", "exclusiveMinimum",
                   "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "properties", "required",
                   "additionalProperties", "anyOf", "oneOf")
# Type names as tool specs write them -> JSON schema types; an unknown type constrains nothing.
_TYPES = {"string": "string", "str": "string", "text": "string", "number": "number", "float": "number",
          "double": "number", "integer": "integer", "int": "integer", "boolean": "boolean", "bool": "boolean",
          "array": "array", "list": "array", "object": "object", "dict": "object", "null": "null"}


@dataclass(frozen=True)
class Tool:
    """One offered tool: its name, a JSON schema of its argument object, and its URL when the spec names one."""

    name: str
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}, "additionalProperties": False})
    url: str | None = None


def offered_tools(system: str | None) -> tuple[Tool, ...]:
    """Every tool spec found in a system prompt, in order; a name offered twice keeps its first spec."""
    tools: dict[str, Tool] = {}
    for line in (system or "").splitlines():
        text = _ITEM.sub("", line, count=1).strip()
        if not text.startswith(("{", "[")):
            continue
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            continue
        for spec in parsed if isinstance(parsed, list) else [parsed]:
            tool = tool_from_spec(spec)
            if tool is not None and tool.name not in tools:
                tools[tool.name] = tool
    return tuple(tools.values())


def conversation_tools(messages: list[Message], system: str | None = None) -> tuple[Tool, ...]:
    """The tools a conversation offers: in its system message, else in the system prompt it will be rendered with."""
    text = next((message.content for message in messages if message.role == "system"), system)
    return offered_tools(text)


def tool_from_spec(spec) -> Tool | None:
    """A Tool from one spec in any of the spellings above; None when it names no tool."""
    if not isinstance(spec, dict):
        return None
    if isinstance(spec.get("function"), dict):
        spec = spec["function"]
    name = spec.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    parameters = spec.get("parameters", spec.get("paras"))
    paths = spec.get("paths")
    if parameters is None and isinstance(paths, list) and paths and isinstance(paths[0], dict):
        parameters = paths[0].get("parameters")
    url = spec.get("url") if isinstance(spec.get("url"), str) else None
    return Tool(name.strip(), _arguments_schema(parameters), url)


def _arguments_schema(parameters) -> dict:
    """A closed JSON object schema: the declared properties only, the required ones required."""
    if isinstance(parameters, dict):
        properties = parameters.get("properties") if isinstance(parameters.get("properties"), dict) else {}
        required = [name for name in parameters.get("required") or [] if name in properties]
        properties = {name: _value_schema(value) for name, value in properties.items()}
    elif isinstance(parameters, list):
        specs = [item for item in parameters if isinstance(item, dict) and isinstance(item.get("name"), str)]
        properties = {item["name"]: _value_schema(item) for item in specs}
        required = [item["name"] for item in specs if _is_true(item.get("required"))]
    else:
        properties, required = {}, []
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(dict.fromkeys(required))
    return schema


def _value_schema(spec) -> dict:
    """The value-constraining keywords of one parameter spec, with its type name normalised."""
    if not isinstance(spec, dict):
        return {}
    schema = {key: spec[key] for key in _VALUE_KEYWORDS if key in spec}
    if not isinstance(schema.get("required"), list):  # MSAgent-Bench's per-parameter flag, not an object's list
        schema.pop("required", None)
    kind = schema.pop("type", None)
    kinds = [_TYPES.get(str(item).lower()) for item in (kind if isinstance(kind, list) else [kind])]
    if kind is not None and all(kinds):
        schema["type"] = kinds[0] if len(kinds) == 1 else kinds
    elif kind is None and ("pattern" in schema or "format" in schema):
        schema["type"] = "string"  # a pattern or format only constrains strings: without a type, any number would pass
    return schema


def _is_true(value) -> bool:
    """MSAgent-Bench writes required as true or as the string "True"."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def call_schema(tools: tuple[Tool, ...] | list[Tool]) -> dict:
    """JSON schema of one call to one of `tools`, in either spelling the data uses.

    MSAgent-Bench `{"api_name", "url", "parameters"}` (url optional, fixed where the spec names one) or OpenAI
    `{"name", "arguments"}`; each tool's arguments follow its own schema, so keys of another tool cannot appear.
    """
    if not tools:
        raise ValueError("a call schema needs at least one offered tool")
    options = []
    for tool in tools:
        url = {"const": tool.url} if tool.url else {"type": "string"}
        options.append({"type": "object", "properties": {"api_name": {"const": tool.name}, "url": url,
                                                           "parameters": tool.parameters},
                        "required": ["api_name", "parameters"], "additionalProperties": False})
        options.append({"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
                        "required": ["name", "arguments"], "additionalProperties": False})
    return {"anyOf": options}
