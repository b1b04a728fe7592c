"""titans-chat: an interactive chat bound to a memory session.

    titans-chat [--url URL] [--api-key KEY] [--session ID] [--max-tokens N] [--temperature T]

Each turn sends only the new message: the session's memory holds the conversation. Commands:
    /reset            forget everything (the memory returns to the model's initial state)
    /fork             continue in a copy of this session (the original stays as it is)
    /export FILE      save the session's memory to FILE
    /surprise on|off  show the mean surprise of each reply (how new the text was to the memory)
    /session          show the session;   /help  this list;   /quit  leave
"""

from __future__ import annotations

import argparse
import os
import sys

from ._core import TitansError, chunk_text
from .client import DEFAULT_URL, Client

PROMPT, REPLY = "you> ", "titans> "
HELP = __doc__.split("Commands:\n", 1)[1].rstrip()


def run_command(client: Client, line: str, state: dict, out) -> bool:
    """Handle one /command; returns False to quit."""
    cmd, _, arg = line.strip().partition(" ")
    sid = state["session"]
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/help":
        print(HELP, file=out)
    elif cmd == "/reset":
        s = client.reset_session(sid)
        print(f"[memory reset: version {s.version}]", file=out)
    elif cmd == "/fork":
        s = client.fork_session(sid)
        state["session"] = s.id
        print(f"[forked {sid} -> {s.id}; now in the fork]", file=out)
    elif cmd == "/export":
        if not arg:
            print("[usage: /export FILE]", file=out)
        else:
            size = client.export_session(sid, arg.strip())
            print(f"[exported {size} bytes to {arg.strip()}]", file=out)
    elif cmd == "/surprise":
        state["surprise"] = arg.strip() == "on"
        print(f"[surprise {'on' if state['surprise'] else 'off'}]", file=out)
    elif cmd == "/session":
        s = client.get_session(sid)
        print(f"[session {s.id}: version {s.version}, {s.tokens_seen} tokens seen]", file=out)
    else:
        print(f"[unknown command {cmd}; /help lists them]", file=out)
    return True


def chat_turn(client: Client, text: str, state: dict, out, max_tokens: int, **options) -> None:
    """The reply streamed under its label, then a note if it was cut at max_tokens."""
    surprise: list[float] = []
    finish = None
    print(REPLY, end="", file=out, flush=True)
    for chunk in client.stream_chat([{"role": "user", "content": text}], session_id=state["session"],
                                    return_surprise=state["surprise"], max_tokens=max_tokens, **options):
        print(chunk_text(chunk), end="", file=out, flush=True)
        if chunk.get("choices"):
            surprise += chunk["choices"][0].get("surprise") or []
            finish = chunk["choices"][0].get("finish_reason") or finish
    print(file=out)
    if finish == "length":
        print(f"[cut at {max_tokens} tokens: --max-tokens sets the limit]", file=out)
    if state["surprise"] and surprise:
        print(f"[mean surprise {sum(surprise) / len(surprise):.3f} over {len(surprise)} tokens]", file=out)


def main(argv: list[str] | None = None, stdin=None, out=None) -> int:
    parser = argparse.ArgumentParser(prog="titans-chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("TITANS_URL", DEFAULT_URL))
    parser.add_argument("--api-key", default=os.environ.get("TITANS_API_KEY"))
    parser.add_argument("--session", help="continue this session (default: a new one)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout
    with Client(args.url, args.api_key) as client:
        try:
            sid = args.session or client.create_session(name="titans-chat").id
        except TitansError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        state = {"session": sid, "surprise": False}
        print(f"[session {sid}; /help lists the commands, /quit leaves]", file=out)
        interactive = stdin.isatty()
        while True:
            if interactive:
                print(PROMPT, end="", file=out, flush=True)
            line = stdin.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                if line.startswith("/"):
                    if not run_command(client, line, state, out):
                        break
                else:
                    chat_turn(client, line, state, out, max_tokens=args.max_tokens, temperature=args.temperature)
            except TitansError as e:
                print(f"[error {e.status}: {e}]", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
