"""OpenAI request parsing and validation, and the response objects (no I/O here).

Every bad input raises :class:`APIError`, which the HTTP layer turns into an
OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}``.
"""

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional


class APIError(Exception):
    def __init__(self, message, status=400, param=None, code=None, type="invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Params:
    """One validated completion request."""
    kind: str                           # "chat" or "text"
    prompt_ids: List[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


ROLES = ("system", "developer", "user", "assistant")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get(body, name, check, what, default=None):
    v = body.get(name)
    if v is None:
        return default
    if not check(v):
        raise APIError(f"'{name}' must be {what}, got {json.dumps(v)[:80]}", param=name, code="invalid_type")
    return v


def _range(name, v, lo=None, hi=None, lo_open=False):
    if v is None:
        return
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        bound = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in [{lo}, {hi}]" if not lo_open else f"in ({lo}, {hi}]"
        raise APIError(f"'{name}' must be {bound}, got {v}", param=name, code="invalid_value")


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError("request body must be a JSON object", code="invalid_json")
    return body


def message_text(m, i) -> str:
    content = m.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise APIError(f"messages[{i}].content: only text parts are supported", param="messages")
        return "".join(parts)
    raise APIError(f"messages[{i}].content must be a string or a list of text parts", param="messages",
                   code="invalid_type")


def parse_messages(body) -> List[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError("'messages' must be a non-empty list", param="messages", code="invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(f"messages[{i}] must be an object with a role in {list(ROLES)}", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": message_text(m, i)})
    return out


def convert_chat(messages) -> str:
    """The plain rendering for tokenizers without a chat template (mlx_lm.server's)."""
    names = {"system": "ASSISTANT's RULE: ", "user": "USER: ", "assistant": "ASSISTANT: "}
    return ("".join(f"{names[m['role']]}{m['content']}\n" for m in messages) + names["assistant"]).rstrip()


def render_chat(tokenizer, messages, template_args=None) -> List[int]:
    """Token ids of a conversation, with the generation prompt appended."""
    if tokenizer.chat_template is not None:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  **(template_args or {})))
    return tokenizer.encode(convert_chat(messages))


def parse_request(body: dict, kind: str, *, tokenizer, model_ids, default_max_tokens, context_length,
                  default_temp=0.0, template_args=None) -> Params:
    model = _get(body, "model", lambda v: isinstance(v, str), "a string")
    if model is not None and model not in model_ids:
        raise APIError(f"model '{model}' is not served here; this server serves '{model_ids[0]}'",
                       param="model", code="model_not_found")
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise APIError(f"only n=1 is supported, got n={n}", param="n", code="invalid_value")

    if kind == "chat":
        messages = parse_messages(body)
        targs = dict(template_args or {})
        targs.update(_get(body, "chat_template_kwargs", lambda v: isinstance(v, dict), "an object", {}))
        try:
            ids = render_chat(tokenizer, messages, targs)
        except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
            raise APIError(f"the chat template failed on these messages: {e}", param="messages") from None
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            ids = list(prompt)
            vocab = getattr(tokenizer, "vocab_size", None)
            if any(t < 0 or (vocab and t >= vocab) for t in ids):
                raise APIError("'prompt' token ids out of the vocabulary", param="prompt", code="invalid_value")
        elif isinstance(prompt, list):
            raise APIError("'prompt' must be a string, a list of one string, or a non-empty list of token ids "
                           "(several prompts per request are not supported)", param="prompt", code="invalid_type")
        else:
            raise APIError("'prompt' must be a string", param="prompt", code="invalid_type")
    if not ids:
        raise APIError("the prompt is empty", param="prompt" if kind == "text" else "messages")

    max_tokens = _get(body, "max_completion_tokens", _is_int, "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", _is_int, "an integer")
        _range("max_tokens", max_tokens, 1)
    else:
        _range("max_completion_tokens", max_tokens, 1)
    if max_tokens is None:
        max_tokens = default_max_tokens
    if context_length and len(ids) >= context_length:
        raise APIError(f"the prompt is {len(ids)} tokens; this model's context is {context_length} tokens",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    if context_length:
        max_tokens = min(max_tokens, context_length - len(ids))

    p = Params(kind=kind, prompt_ids=ids, max_tokens=max_tokens)
    p.temperature = float(_get(body, "temperature", _is_num, "a number", default_temp))
    _range("temperature", p.temperature, 0)
    p.top_p = float(_get(body, "top_p", _is_num, "a number", 1.0))
    _range("top_p", p.top_p, 0, 1, lo_open=True)
    p.top_k = _get(body, "top_k", _is_int, "an integer", 0)
    _range("top_k", p.top_k, 0)
    p.min_p = float(_get(body, "min_p", _is_num, "a number", 0.0))
    _range("min_p", p.min_p, 0, 1)
    p.seed = _get(body, "seed", _is_int, "an integer")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError("'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    p.stop = [s for s in (stop or []) if s]
    if len(p.stop) > 16:
        raise APIError("'stop' takes at most 16 strings", param="stop", code="invalid_value")
    p.stream = _get(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    so = _get(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    p.include_usage = _get(so, "include_usage", lambda v: isinstance(v, bool), "a boolean", False)
    if kind == "chat":
        p.logprobs = _get(body, "logprobs", lambda v: isinstance(v, bool), "a boolean", False)
        p.top_logprobs = _get(body, "top_logprobs", _is_int, "an integer", 0)
        _range("top_logprobs", p.top_logprobs, 0, 20)
        if p.top_logprobs and not p.logprobs:
            raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    else:  # completions: logprobs is the number of top alternatives (0 = the sampled token's only)
        lp = _get(body, "logprobs", _is_int, "an integer")
        _range("logprobs", lp, 0, 20)
        p.logprobs, p.top_logprobs = lp is not None, lp or 0
    return p


# ---- responses -----------------------------------------------------------------------------------

def new_id(kind):
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens, completion_tokens, cached_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_logprobs(items):
    """items: [(token_text, logprob, [(text, logprob), ...])] -> chat ``logprobs`` object."""
    def entry(t, lp):
        return {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))}
    return {"content": [dict(entry(t, lp), top_logprobs=[entry(a, b) for a, b in top]) for t, lp, top in items]}


def text_logprobs(items, offset0=0):
    offs, o = [], offset0
    for t, _, _ in items:
        offs.append(o)
        o += len(t)
    return {"tokens": [t for t, _, _ in items], "token_logprobs": [lp for _, lp, _ in items],
            "top_logprobs": [{a: b for a, b in top} for _, _, top in items], "text_offset": offs}


class ResponseBuilder:
    """OpenAI objects for one request: the final object, or SSE chunks."""

    def __init__(self, params: Params, model_id: str):
        self.p, self.model = params, model_id
        self.id = new_id(params.kind)
        self.created = int(time.time())
        self.obj = "chat.completion" if params.kind == "chat" else "text_completion"
        self.text_offset = 0

    def _head(self, obj):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "mlx-moe"}

    def final(self, text, finish_reason, lp_items, u):
        out = self._head(self.obj)
        if self.p.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": chat_logprobs(lp_items) if self.p.logprobs else None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text,
                      "logprobs": text_logprobs(lp_items) if self.p.logprobs else None,
                      "finish_reason": finish_reason}
        out["choices"] = [choice]
        out["usage"] = u
        return out

    def chunk(self, text=None, finish_reason=None, lp_items=(), first=False):
        out = self._head("chat.completion.chunk" if self.p.kind == "chat" else "text_completion")
        if self.p.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta,
                      "logprobs": chat_logprobs(lp_items) if (self.p.logprobs and lp_items) else None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "",
                      "logprobs": text_logprobs(lp_items, self.text_offset) if (self.p.logprobs and lp_items) else None,
                      "finish_reason": finish_reason}
            self.text_offset += sum(len(t) for t, _, _ in lp_items)
        out["choices"] = [choice]
        if self.p.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self, u):
        out = self._head("chat.completion.chunk" if self.p.kind == "chat" else "text_completion")
        out["choices"] = []
        out["usage"] = u
        return out
