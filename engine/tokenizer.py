"""Tokenizers: byte-level (the default, vocabulary = the 256 byte values) or a `tokenizers` tokenizer.json; and the
chat template a model directory may carry (chat_template.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def decode_bytes(self, ids: list[int]) -> bytes: ...


class ByteTokenizer:
    """UTF-8 bytes are the tokens. decode() replaces bytes that do not form valid UTF-8."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer.json, with no special tokens added on encode."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        self._tok = _Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def token_id(self, token: str) -> int | None:
        """The id of a token of the vocabulary (a special token, say), or None."""
        return self._tok.token_to_id(token)


def load_tokenizer(kind: str, model_dir: str | Path | None) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if model_dir is None:
        raise ValueError("a 'tokenizers' model needs a model directory holding tokenizer.json")
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"config says tokenizer 'tokenizers' but {path} does not exist")
    return HFTokenizer(path)


@dataclass(frozen=True)
class ChatTemplate:
    """How a chat's messages become a prompt: each message as `message` with {role} and {content} filled in, then
    `reply` (the assistant's turn begins); the reply ends at any of `stop` (where the next turn's marker begins)."""
    message: str = "<|{role}|>\n{content}\n"
    reply: str = "<|assistant|>\n"
    stop: tuple[str, ...] = ("<|",)

    def render(self, messages: list[tuple[str, str]]) -> str:
        """(role, content) pairs -> the prompt."""
        return "".join(self.message.format(role=role, content=content) for role, content in messages) + self.reply

    @classmethod
    def load(cls, model_dir: str | Path | None) -> ChatTemplate:
        """The model directory's chat_template.json ({"message", "reply", "stop"}, each optional), or the default."""
        path = Path(model_dir) / "chat_template.json" if model_dir is not None else None
        if path is None or not path.exists():
            return cls()
        spec = json.loads(path.read_text())
        unknown = set(spec) - {"message", "reply", "stop"}
        if unknown:
            raise ValueError(f"{path}: unknown fields {sorted(unknown)} (a template has message, reply and stop)")
        stop = spec.get("stop", list(cls.stop))
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
            raise ValueError(f"{path}: stop must be a list of non-empty strings, got {stop!r}")
        if not all(isinstance(spec.get(k, ""), str) for k in ("message", "reply")):
            raise ValueError(f"{path}: message and reply must be strings")
        template = cls(**{**spec, "stop": tuple(stop)})
        try:  # a template with other {fields} fails here, at load, not in a request
            template.render([("user", "check")])
        except (KeyError, IndexError) as e:
            raise ValueError(f"{path}: the template names {{{e.args[0]}}}; it may use {{role}} and {{content}}") from e
        except ValueError as e:  # a brace left open, say
            raise ValueError(f"{path}: the template does not format: {e}") from e
        return template


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character.

    Decodes only a short window (the tokens since the last emitted piece plus a few before them, for
    context), so each push costs O(window), and it does not assume that decoding is prefix-stable
    (Metaspace or WordPiece decoders change leading spaces depending on what precedes a token).
    """

    CONTEXT = 4  # tokens decoded before the unread ones
    HOLD = 4  # tokens held back at most for a character still incomplete (UTF-8: 4 bytes); then they are invalid

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoded window
        self.read = 0  # tokens whose text has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        incomplete = text.endswith("\ufffd") and len(self.ids) - self.read < self.HOLD
        if len(text) <= len(before) or incomplete:
            return ""
        self.prefix, self.read = max(0, len(self.ids) - self.CONTEXT), len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


class StopStrings:
    """Streams text while never emitting the start of a stop string that may still complete."""

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.decoder = StreamDecoder(tokenizer)
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""
        self.matched: str | None = None

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string completed)."""
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        self.pending += self.decoder.flush()
        return self._release(final=True)[0]

    def _release(self, final: bool) -> tuple[str, bool]:
        hits = [(i, s) for i, s in ((self.pending.find(s), s) for s in self.stops) if i >= 0]
        if hits:
            cut, self.matched = min(hits)
            text, self.pending = self.pending[:cut], ""
            return text, True
        cut = len(self.pending) if final else max(0, len(self.pending) - self.hold)
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False
