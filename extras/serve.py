"""An OpenAI-compatible HTTP server for chat.py's model, and a page to chat with it: `python chat.py --serve`.

    python chat.py --serve [--host 127.0.0.1] [--port 8000] [--model DIR] [--no-compile] [--temperature 0] ...

    POST /v1/chat/completions   OpenAI's chat completions: `messages` whose content is text or a list of `text` and
                                `image_url` parts (a data: URL holding a base64 image, or a path on this machine),
                                `stream` (server-sent events), temperature, top_p, top_k, max_tokens, stop, seed;
                                the reply's `usage` counts tokens, the image's positions included
    GET  /v1/models             the one model served
    GET  /                      extras/serve_page.html: pick an image, chat, start over

Requests are queued. Each is read, checked and turned into token ids in its own thread (ThreadingHTTPServer); one
lock then lets one generation at a time use the model (it has one KV cache, and under --compile one CUDA graph);
the others wait for it, in no fixed order. The model is set up as chat.py sets it up (chat.Conversation: stop ids,
--compile's fused projections, compiled blocks and graphed decode step, the image preprocessing) and answers through
the same `Conversation.answer`, printed by chat.py's streaming decoder; chat.py's sampling flags are the defaults of
a request, and its --system the system prompt of a conversation that sends none.

The API is stateless: every request carries the whole conversation, which is encoded from its text as data.py's
template builds it (so, unlike chat.py, earlier answers are encoded again from their text, and the prompt is
prefilled from scratch). The image opens its message, as chat.py and XTuner put it ("<image>\\n" + text), and a
conversation holds at most one (LLaVA-1.5 is trained with one). Typed text stays text: `<|eot_id|>` or `<image>` in
a message is encoded as the characters typed.

A bad request is answered with a 4xx and OpenAI's error body, {"error": {"message", "type", "param", "code"}},
naming the field at fault, and the server goes on; a client that leaves mid-answer ends that generation, not the
server. Nothing is downloaded: an image is a data: URL or a path on this machine. That is why the server binds to
127.0.0.1 unless --host says otherwise, and takes only `Content-Type: application/json` posts, which a page from
another site cannot make a browser send without a CORS preflight (never answered here).
"""

import base64
import binascii
import io
import json
import secrets
import sys
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import clip
import data

PAGE = Path(__file__).with_name("serve_page.html")
MAX_BODY = 64 * 2 ** 20  # bytes of one request (a few base64 photos)
ROLES = ("system", "developer", "user", "assistant")  # "developer" is OpenAI's newer name for "system"
# fields that would change the reply in ways this server does not offer, with the values that change nothing
INERT = {"n": (1,), "logprobs": (False,), "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
         "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
         "response_format": ({"type": "text"},)}


class RequestError(ValueError):
    """A request that cannot be answered as sent: a one-line message, the field at fault and the HTTP status."""

    def __init__(self, message, param=None, status=400):
        super().__init__(message)
        self.param, self.status = param, status


def error_body(message, param=None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# ----------------------------------------------------------------------------------------------------------------
# A request -> token ids, pixels and sampling settings


def _field(body, name, kind, default, ok=lambda v: True, expect=""):
    """body[name] checked: of `kind` (a bool is no number here) and `ok`; `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool) or not ok(value):
        raise RequestError(f"{name} must be {expect} (got {json.dumps(value)[:40]})", name)
    return value


def read_image(url, param):
    """A data: URL (base64) or a local path (plain, or a file:// URL) -> RGB PIL image. Never downloads."""
    if url.startswith("data:"):
        head, comma, payload = url.partition(",")
        if not comma or not head.endswith(";base64"):
            raise RequestError(f"{param}: a data: URL must read data:image/...;base64,<data>", param)
        try:
            src = io.BytesIO(base64.b64decode("".join(payload.split()), validate=True))
        except (binascii.Error, ValueError) as e:
            raise RequestError(f"{param}: the data: URL's base64 is broken ({e})", param) from None
    elif url.startswith(("http://", "https://")):
        raise RequestError(f"{param}: this server downloads nothing; send the image as a data: URL or a path on "
                           "the server's machine", param)
    else:
        src = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith("file://") else url
        if not Path(src).is_file():
            raise RequestError(f"{param}: no image file at {src} on the server", param)
    try:
        return clip.load_image(src)
    except clip.ImageError as e:  # PIL's own message names an in-memory file by its object's address: not shown
        why = f"{type(e.__cause__).__name__}" if e.__cause__ else str(e)
        what = "the data: URL's bytes" if isinstance(src, io.BytesIO) else src
        raise RequestError(f"{param}: {what} cannot be read as an image ({why})", param) from None


def _content(content, where, images_allowed):
    """A message's content -> (text, images): text parts joined by newlines, image_url parts read as images."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise RequestError(f"{at}.text must be a string", f"{at}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            if not images_allowed:
                raise RequestError(f"{at}: only user messages hold images", f"{at}.type")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise RequestError(f"{at}.image_url.url is missing: give a data: URL or a path on the server",
                                   f"{at}.image_url")
            images.append(read_image(url, f"{at}.image_url"))
        else:
            raise RequestError(f"{at}.type {kind!r} is not supported (text or image_url)", f"{at}.type")
    return "\n".join(texts), images


def parse_messages(messages):
    """OpenAI messages -> turns [{"system", "text", "images", "answer"}]: user messages, each with the system
    message before it and the assistant message after it; the last one, the question, has no answer."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
    turns, system = [], None
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise RequestError(f"{where}.role must be system, user or assistant (got {role!r})", f"{where}.role")
        text, images = _content(m.get("content"), where, role == "user")
        if role in ("system", "developer"):
            if system is not None:
                raise RequestError(f"{where}: two system messages in a row; join them", where)
            system = text
        elif role == "user":
            if turns and turns[-1]["answer"] is None:
                raise RequestError(f"{where}: two user messages in a row; join them into one", where)
            turns.append({"system": system, "text": text, "images": images, "answer": None})
            system = None
        elif not turns or turns[-1]["answer"] is not None or system is not None:
            raise RequestError(f"{where}: an assistant message must follow a user message", where)
        else:
            turns[-1]["answer"] = text
    if not turns or turns[-1]["answer"] is not None or system is not None:
        raise RequestError("messages must end with a user message (the one to answer)", "messages")
    return turns


def build_prompt(chat, turns):
    """Turns -> (prompt ids, pixels (1, 3, S, S) or None), as chat.py would have prefilled that conversation had
    its answers been these texts: BOS, the system prompt in its turn, the image first in its message."""
    images = [img for t in turns for img in t["images"]]
    if images and chat.model.vision is None:
        raise RequestError("this is a text-only model (no vision tower): send no image", "messages")
    if len(images) > 1:
        raise RequestError(f"the messages hold {len(images)} images; this model takes one per conversation "
                           "(start a new conversation for another image)", "messages")
    ids = []
    for k, t in enumerate(turns):
        image = bool(t["images"])
        system = chat.args.system if k == 0 and t["system"] is None else t["system"]
        ids += data.encode_prompt(chat.tok, chat.template, "<image>\n" + t["text"] if image else t["text"],
                                  system=system, first_turn=k == 0, image_tokens=chat.cfg.get("image_tokens", 576),
                                  images=int(image))  # typed `<image>` text stays text
        if t["answer"] is not None:
            ids += data.encode_reply(chat.tok, chat.template, t["answer"])
    try:
        return ids, chat.pixels(images[0]) if images else None
    except clip.ImageError as e:
        raise RequestError(f"messages: {e}", "messages") from None


def parse_request(chat, body):
    """The JSON body of POST /v1/chat/completions -> a dict of everything the answer needs (RequestError if bad)."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    for name, inert in INERT.items():
        if body.get(name) is not None and body[name] not in inert:
            raise RequestError(f"{name} {json.dumps(body[name])[:40]} is not supported (leave it out)", name)
    a = chat.args
    sampling = {
        "temperature": _field(body, "temperature", (int, float), a.temperature, lambda v: 0 <= v < float("inf"),
                              "a number >= 0"),
        "top_p": _field(body, "top_p", (int, float), a.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]"),
        "top_k": _field(body, "top_k", int, a.top_k, lambda v: v >= 0, "an integer >= 0 (0: no top-k filter)")}
    asked = _field(body, "max_completion_tokens", int, None, lambda v: v >= 1, "an integer >= 1")
    asked = _field(body, "max_tokens", int, asked, lambda v: v >= 1, "an integer >= 1")
    stop = _field(body, "stop", (str, list), [], lambda v: isinstance(v, str) and v or isinstance(v, list) and all(
        isinstance(s, str) and s for s in v), "a non-empty string or a list of them")
    options = _field(body, "stream_options", dict, {}, expect="an object like {\"include_usage\": true}")
    ids, pixels = build_prompt(chat, parse_messages(body.get("messages")))
    room = a.context - len(ids)
    if room < 1:
        raise RequestError(f"the prompt is {len(ids)} tokens (an image counts {chat.cfg.get('image_tokens', 576)}); "
                           f"the context is {a.context} (chat.py --context): shorten the conversation", "messages")
    if asked is not None and asked > room:
        raise RequestError(f"max_tokens {asked} does not fit: the prompt is {len(ids)} tokens of a context of "
                           f"{a.context} (chat.py --context), which leaves {room}", "max_tokens")
    sampling["max_new_tokens"] = asked or min(a.max_new_tokens, room)
    return {"ids": ids, "pixels": pixels, "sampling": sampling, "stop": [stop] if isinstance(stop, str) else stop,
            "seed": _field(body, "seed", int, None, lambda v: -2 ** 63 <= v < 2 ** 63, "a 64-bit integer"),
            "stream": _field(body, "stream", bool, False, expect="true or false"),
            "usage_chunk": _field(options, "include_usage", bool, False, expect="true or false")}


# ----------------------------------------------------------------------------------------------------------------
# The answer's text, cut at a stop string


class _Stop(Exception):
    """Raised from on_token to end a generation: a stop string was written."""


class _Reply:
    """The text of one answer as chat.py's streaming decoder writes it (`write`), cut before the first stop string.
    Text that could still be the start of a stop string is held back; the rest goes to `send` as it comes."""

    def __init__(self, stops, send=None):
        self.stops, self.send, self.text, self.sent = stops, send, "", 0

    def write(self, piece):
        self.text += piece
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.close()
            raise _Stop
        held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._send(len(self.text) - held)

    def flush(self):
        pass

    def close(self):
        self._send(len(self.text))

    def _send(self, upto):
        if upto > self.sent and self.send:
            self.send(self.text[self.sent:upto])
        self.sent = max(self.sent, upto)


# ----------------------------------------------------------------------------------------------------------------
# HTTP


class ChatServer(ThreadingHTTPServer):
    """One model (a chat.Conversation), served one generation at a time; each request in its own thread."""

    daemon_threads = True  # a stuck client never keeps the process from exiting

    def __init__(self, address, chat, streamer, name):
        super().__init__(address, Handler)
        self.chat, self.streamer, self.name = chat, streamer, name
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    server_version = "llava-chat"

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": self.server.name, "object": "model", "created": 0, "owned_by": "local"}]})
        else:
            self._json(404, error_body(f"no such endpoint: GET {path} (GET /, GET /v1/models, POST "
                                       "/v1/chat/completions)", kind="not_found_error"))

    def do_POST(self):
        path = urllib.parse.urlsplit(self.path).path
        if path != "/v1/chat/completions":
            return self._json(404, error_body(f"no such endpoint: POST {path} (POST /v1/chat/completions)",
                                              kind="not_found_error"))
        try:
            request = parse_request(self.server.chat, self._body())
        except RequestError as e:
            return self._json(e.status, error_body(str(e), e.param))
        try:
            self._answer(request)
        except (BrokenPipeError, ConnectionResetError):
            self.log_message("the client left before the answer ended; generation stopped")
        except Exception as e:  # a bug or a device error: said to the client and logged; the server goes on
            traceback.print_exc()
            body = error_body(f"internal error: {type(e).__name__}: {e}", kind="server_error")
            try:
                if request["stream"]:  # the 200 and its headers are sent: the error is the stream's last event
                    self._event(body)
                else:
                    self._json(500, body)
            except OSError:
                pass

    def _body(self):
        size = self.headers.get("Content-Length", "").strip()
        if not size.isdecimal():
            raise RequestError("the request needs a Content-Length header (its size in bytes)", status=411)
        size = int(size)
        if size > MAX_BODY:
            raise RequestError(f"the request is {size:,} bytes; at most {MAX_BODY:,} are read", status=413)
        raw = self.rfile.read(size)  # read before any answer: a socket closed on unread data resets the connection
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise RequestError(f"Content-Type must be application/json (got {kind or 'none'})", status=415)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None

    def _answer(self, r):
        chat, stream = self.server.chat, r["stream"]
        head = {"id": "chatcmpl-" + secrets.token_hex(12), "created": int(time.time()), "model": self.server.name}

        def chunk(delta, finish=None):
            self._event({**head, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        if stream:  # the client hears at once that its answer is coming, even while it waits for the lock
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            chunk({"role": "assistant", "content": ""})
        reply = _Reply(r["stop"], (lambda text: chunk({"content": text})) if stream else None)
        printer = self.server.streamer(chat.tok, reply, chat.stop_ids)  # chat.py's decoder: whole characters only
        new = []

        def on_token(row, t):
            new.append(t)
            printer.push(t)

        finish = "length"
        with self.server.lock:
            pixels = None if r["pixels"] is None else r["pixels"].to(chat.device)
            seed = secrets.randbits(63) if r["seed"] is None else r["seed"]
            try:
                chat.answer(r["ids"], pixels, on_token, seed=seed, **r["sampling"])
                printer.flush()
                reply.close()
            except _Stop:
                finish = "stop"
        if new and new[-1] in chat.stop_ids:
            finish = "stop"
        usage = {"prompt_tokens": len(r["ids"]), "completion_tokens": len(new),
                 "total_tokens": len(r["ids"]) + len(new)}
        if not stream:
            return self._json(200, {**head, "object": "chat.completion", "usage": usage, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": reply.text}, "finish_reason": finish,
                "logprobs": None}]})
        chunk({}, finish)
        if r["usage_chunk"]:
            self._event({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")

    def _event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status, obj):
        self._send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json")

    def _send(self, status, payload, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def run(chat, streamer, host="127.0.0.1", port=8000, name="model"):
    """Serve `chat` (a chat.Conversation; `streamer` is chat.py's streaming decoder class) until Ctrl-C."""
    try:
        server = ChatServer((host, port), chat, streamer, name)
    except OSError as e:
        print(f"chat.py --serve: cannot listen on {host}:{port}: {e.strerror} (choose another --port)",
              file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"serving {name} at http://{host}:{port}/ (API: /v1/chat/completions, /v1/models); one answer at a "
          "time, the other requests wait; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
