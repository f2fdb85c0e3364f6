"""gpt-oss's chat format, harmony: a conversation rendered into the tokens the model was
trained on, and the model's reply parsed back into messages.

Every message is ``<|start|>{header}<|message|>{content}<|end|>``. The header names the
author (system, developer, user, assistant, or a tool), the channel of an assistant message
(``<|channel|>analysis``: its reasoning; ``final``: the answer; ``commentary``: tool calls and
preambles), a recipient (``to=functions.get_weather``) and the content type of a tool call
(``<|constrain|>json``). A prompt ends with ``<|start|>assistant``; the model then writes one
or more messages (its reasoning first, the header's ``<|start|>assistant`` of each message
after the first included) and stops at ``<|return|>`` (its answer is done) or ``<|call|>``
(it wants a tool run). The format is OpenAI's, as the gpt-oss models were trained on it
(OpenAI cookbook, "OpenAI harmony response format"); a checkpoint's tokenizer.json
(o200k_harmony) holds its special tokens.

    from gptext import chat
    tok = gptext.get_tokenizer("path/to/gpt-oss-20b")
    messages = [chat.system_message(reasoning="low"), chat.Message("user", "What is 2 + 2?")]
    answer = chat.reply(model, tok, messages)   # [Message(assistant, analysis, ...), Message(..., final, ...)]

Content is always encoded as text: a user's message that contains ``<|end|>`` cannot close
its message early. Function tools (Tool) are defined in the developer message; the model's
call is parsed like any other message (commentary channel, recipient ``functions.{name}``),
and its output goes back as tool_message(name, output). The built-in browser and python
tools are not written here.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
from typing import Iterable, Sequence

import tiktoken
import torch

__all__ = ["Message", "Parser", "SPECIAL_TOKENS", "STOP_TOKENS", "Tool", "developer_message", "encode", "parse",
           "render", "reply", "special_ids", "system_message", "tool_message"]

START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = (
    "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
SPECIAL_TOKENS = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)
STOP_TOKENS = (RETURN, CALL)  # the model's turn is over: sampling stops
REASONING_EFFORTS = ("low", "medium", "high")
IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."  # the identity gpt-oss was trained with


@dataclasses.dataclass(frozen=True)
class Message:
    """One harmony message. role: "system", "developer", "user", "assistant", or the name of
    the tool whose output it carries (e.g. "functions.get_weather", with recipient
    "assistant"); channel: an assistant message's "analysis", "commentary" or "final";
    recipient: whom a tool call goes to; content_type: a tool call's argument format ("json")."""

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None

    def __post_init__(self):
        for name in ("role", "channel", "recipient", "content_type"):
            value = getattr(self, name)
            if value is None and name != "role":
                continue
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise ValueError(f"Message {name} must be a non-empty string without spaces, got {value!r}")
        if not isinstance(self.content, str):
            raise ValueError(f"Message content must be a string, got {type(self.content).__name__}")


def system_message(reasoning: str = "medium", date: str | None = None, knowledge_cutoff: str = "2024-06",
                   function_tools: bool = False) -> Message:
    """The system message gpt-oss expects: its identity, knowledge cutoff, today's date (when
    given, e.g. "2025-06-28"), the reasoning effort ("low", "medium" or "high") and the
    channels every message must name; function_tools adds the rule that calls to functions go
    to the commentary channel."""
    if reasoning not in REASONING_EFFORTS:
        raise ValueError(f"reasoning must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning!r}")
    lines = [IDENTITY, f"Knowledge cutoff: {knowledge_cutoff}"]
    if date is not None:
        lines.append(f"Current date: {date}")
    lines += ["", f"Reasoning: {reasoning}", "",
              "# Valid channels: analysis, commentary, final. Channel must be included for every message."]
    if function_tools:
        lines.append("Calls to these tools must go to the commentary channel: 'functions'.")
    return Message("system", "\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and its arguments as a JSON
    schema of an object ("properties", "required"; None or no properties: no arguments).
    The model calls it as a commentary message to ``functions.{name}`` with JSON content; the
    output goes back as tool_message(name, output). A conversation with tools needs
    system_message(function_tools=True)."""

    name: str
    description: str = ""
    parameters: dict | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Tool name must be an identifier, got {self.name!r}")
        schema = self.parameters
        if schema is not None and not (isinstance(schema, dict) and schema.get("type", "object") == "object"
                                       and isinstance(schema.get("properties", {}), dict)):
            raise ValueError(f"Tool {self.name}: parameters must be a JSON schema of an object (type \"object\", "
                             f"a properties dict), got {schema!r}")


def developer_message(instructions: str | None = None, tools: Sequence[Tool] = ()) -> Message:
    """The developer message: the instructions (what other chat formats call the system
    prompt) and the function tools the model may call, defined in the TypeScript-like form
    gpt-oss was trained to read."""
    sections = []
    if instructions is not None:
        sections.append(f"# Instructions\n\n{instructions}")
    if tools:
        for tool in tools:
            if not isinstance(tool, Tool):
                raise ValueError(f"tools must be chat.Tool, got a {type(tool).__name__}")
        body = "\n\n".join(_function(tool) for tool in tools)
        sections.append(f"# Tools\n\n## functions\n\nnamespace functions {{\n\n{body}\n\n}} // namespace functions")
    if not sections:
        raise ValueError("a developer message needs instructions or tools")
    return Message("developer", "\n\n".join(sections))


def tool_message(name: str, output: str) -> Message:
    """The output of a call to function tool `name`, as it goes back to the model."""
    return Message(f"functions.{name}", output, channel="commentary", recipient="assistant")


def _comment(text: str | None) -> list[str]:
    return [f"// {line}" for line in text.splitlines()] if text else []


def _function(tool: Tool) -> str:
    """``type name = (_: {fields}) => any;`` under its description, or ``() => any`` without
    arguments: each argument under its description, ``?`` when optional, its default after."""
    properties = (tool.parameters or {}).get("properties") or {}
    signature = f"(_: {_object(tool.parameters)})" if properties else "()"
    return "\n".join(_comment(tool.description) + [f"type {tool.name} = {signature} => any;"])


def _object(schema: dict) -> str:
    required = set(schema.get("required") or ())
    lines = []
    for name, prop in schema["properties"].items():
        prop = prop if isinstance(prop, dict) else {}
        field = f"{name}{'' if name in required else '?'}: {_type(prop)},"
        if "default" in prop:
            default = prop["default"]
            shown = default if isinstance(default, str) else json.dumps(default)
            field += f" // default: {shown}"
        lines += _comment(prop.get("description")) + [field]
    return "{\n" + "\n".join(lines) + "\n}"


def _type(prop: dict) -> str:
    """A JSON schema's type in TypeScript's words: string, number, boolean, null, T[], a
    union of enum values or of alternatives, an object's fields; any when it says none."""
    if "enum" in prop:
        return " | ".join(json.dumps(value) for value in prop["enum"])
    choices = prop.get("anyOf") or prop.get("oneOf")
    if choices:
        return " | ".join(_type(choice) for choice in choices)
    kind = prop.get("type")
    if isinstance(kind, list):
        return " | ".join(_type({**prop, "type": k}) for k in kind)
    if kind == "array":
        item = _type(prop.get("items") or {})
        return f"({item})[]" if " | " in item else f"{item}[]"
    if kind == "object":
        return _object(prop) if prop.get("properties") else "object"
    return {"string": "string", "number": "number", "integer": "number", "boolean": "boolean",
            "null": "null"}.get(kind, "any")


def _pieces(messages: Sequence[Message], next_role: str | None) -> list[tuple[bool, str]]:
    """The conversation as (special, text) pieces: special tokens and the text between them.
    The reasoning of a finished turn (analysis messages before a later final one) is left
    out, as gpt-oss was trained to see it; the reasoning of a turn still going on (a tool
    call's) stays."""
    messages = list(messages)
    for m in messages:
        if not isinstance(m, Message):
            raise ValueError(f"a conversation is a list of chat.Message, got a {type(m).__name__}")
    last_final = max((i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"),
                     default=-1)
    pieces: list[tuple[bool, str]] = []
    for i, m in enumerate(messages):
        if m.role == "assistant" and m.channel == "analysis" and i < last_final:
            continue
        pieces += [(True, START), (False, m.role)]
        if m.recipient is not None and m.role != "assistant":
            pieces.append((False, f" to={m.recipient}"))  # a tool's output names its reader after the author
        if m.channel is not None:
            pieces += [(True, CHANNEL), (False, m.channel)]
        if m.recipient is not None and m.role == "assistant":
            pieces.append((False, f" to={m.recipient}"))  # a call names the tool after the channel
        if m.content_type is not None:
            pieces += [(False, " "), (True, CONSTRAIN), (False, m.content_type)]
        # A finished message ends with <|end|>, a call with <|call|> (the tool's output follows it).
        end = CALL if m.role == "assistant" and m.recipient is not None else END
        pieces += [(True, MESSAGE), (False, m.content), (True, end)]
    if next_role is not None:
        pieces += [(True, START), (False, next_role)]
    return pieces


def render(messages: Sequence[Message], next_role: str | None = "assistant") -> str:
    """The conversation as harmony text, ending with the header that asks `next_role` for
    the next message (None: nothing after the last message)."""
    return "".join(text for _, text in _pieces(messages, next_role))


def special_ids(tok: tiktoken.Encoding) -> dict[str, int]:
    """Harmony's special tokens' ids in `tok`; ValueError naming those it lacks."""
    missing = [t for t in SPECIAL_TOKENS if t not in tok.special_tokens_set]
    if missing:
        raise ValueError(f"tokenizer {tok.name!r} lacks harmony's special tokens {', '.join(missing)}: the chat "
                         f"format needs gpt-oss's o200k_harmony vocabulary (the tokenizer.json of a gpt-oss "
                         f"checkpoint)")
    return {t: tok.encode_single_token(t) for t in SPECIAL_TOKENS}


def encode(tok: tiktoken.Encoding, messages: Sequence[Message], next_role: str | None = "assistant") -> list[int]:
    """The token ids of render(messages, next_role): the structure as special tokens, every
    role, header and content as text (so text that looks like a special token stays text)."""
    ids = special_ids(tok)
    out: list[int] = []
    for special, text in _pieces(messages, next_role):
        if special:
            out.append(ids[text])
        elif text:
            out += tok.encode_ordinary(text)
    return out


class Parser:
    """Reads a completion token by token into messages (the model's reply, after a prompt
    that ended with ``<|start|>{role}``). feed(token) returns the text the token adds to a
    message's content ("" for header and structure tokens), so a reply can be shown as it is
    sampled; `index` (0, 1, ...), `role`, `channel`, `recipient` and `content_type` are those
    of the message that text belongs to. Stops being fed at a stop token (`done`, with `stop`
    set to it). Lenient about what a model may get wrong: a header never closed yields no
    message; a message cut off (by max_new_tokens) is kept by finish()."""

    def __init__(self, tok: tiktoken.Encoding, role: str = "assistant"):
        self._tok, self._role = tok, role
        self._ids = {i: t for t, i in special_ids(tok).items()}
        self.messages: list[Message] = []
        self.done, self.stop = False, None
        self.index, self.role, self.channel, self.recipient, self.content_type = -1, None, None, None, None
        self._begin(role)

    def _begin(self, role: str | None) -> None:
        self._in_header = True
        self._header: list[tuple[str | None, bytes]] = [(None, role.encode() if role else b"")]
        self._content = bytearray()
        self._text = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _read_header(self) -> None:
        """Header fields from its parts: the author's part ("assistant", "functions.x
        to=assistant"), the channel's ("commentary to=functions.x ") and the content type's."""
        role = channel = recipient = content_type = None
        for marker, raw in self._header:
            words = raw.decode("utf-8", errors="replace").split()
            for word in words:
                if word.startswith("to="):
                    recipient = word[3:] or None
            words = [w for w in words if not w.startswith("to=")]
            if marker is None:
                role = words[0] if words else None
            elif marker == CHANNEL:
                channel = words[0] if words else None
            elif marker == CONSTRAIN:
                content_type = words[0] if words else None
        self.index += 1
        self.role, self.channel, self.recipient, self.content_type = role or self._role, channel, recipient, \
            content_type

    def _close(self) -> None:
        if not self._in_header:
            content = bytes(self._content).decode("utf-8", errors="replace")
            self.messages.append(Message(self.role, content, self.channel, self.recipient, self.content_type))

    def feed(self, token: int) -> str:
        """Reads one token; returns the content text it completes (UTF-8 may need several)."""
        if self.done:
            raise ValueError(f"the reply already ended with {self.stop}")
        special = self._ids.get(int(token))
        if special is None:
            raw = self._tok.decode_single_token_bytes(int(token))
            if self._in_header:
                marker, part = self._header[-1]
                self._header[-1] = (marker, part + raw)
                return ""
            self._content += raw
            return self._text.decode(raw)
        if special in (CHANNEL, CONSTRAIN) and self._in_header:
            self._header.append((special, b""))
        elif special == MESSAGE and self._in_header:
            self._read_header()
            self._in_header = False
        elif special in (START, END, RETURN, CALL):
            tail = "" if self._in_header else self._text.decode(b"", final=True)
            self._close()
            self._begin(None)  # after <|end|>, text without a <|start|> is taken as the next header
            if special in STOP_TOKENS:
                self.done, self.stop = True, special
            return tail
        return ""  # a header token inside content, or <|message|> twice: not harmony, left out

    def finish(self) -> list[Message]:
        """The messages read, the one cut off without an end included."""
        if not self.done:
            self._close()
            self._begin(None)
            self.done = True
        return self.messages


def parse(tok: tiktoken.Encoding, tokens: Iterable[int], role: str = "assistant") -> list[Message]:
    """The messages of a completion's token ids (the stop token may be included or not)."""
    parser = Parser(tok, role)
    for token in tokens:
        if parser.done:
            break
        parser.feed(int(token))
    return parser.finish()


def reply(model, tok: tiktoken.Encoding, messages: Sequence[Message], max_new_tokens: int = 512,
          temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
          generator: torch.Generator | None = None) -> list[Message]:
    """The assistant's messages in reply to the conversation (its reasoning, then its answer
    or a tool call), sampled with the KV cache until a stop token or max_new_tokens (the
    last message then cut off). Arguments as for GPT.generate."""
    from .generate import stream

    prompt = encode(tok, messages)
    stops = [special_ids(tok)[t] for t in STOP_TOKENS]
    if max(prompt + stops) >= model.config.vocab_size:
        raise ValueError(f"the tokenizer gives id {max(prompt + stops)}, beyond the model's vocabulary of "
                         f"{model.config.vocab_size}: it is not this model's tokenizer")
    parser = Parser(tok)
    device = model.lm_head.weight.device
    for token in stream(model, torch.tensor([prompt], device=device), max_new_tokens, temperature, top_k, top_p,
                        stops, generator):  # stream is looked up when called: tests may stand in for it
        parser.feed(int(token[0]))
        if parser.done:
            break
    return parser.finish()
