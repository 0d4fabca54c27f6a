"""Chat prompts: a conversation (list of {"role", "content"} messages) -> the prompt text a model continues.

A tokenizer with a chat template (tokenizer_config.json "chat_template", a Jinja2 template as in transformers)
is rendered with that template. Phi-1/1.5/2 are base models without one; their model card's QA format is
"Instruct: <question>\\nOutput:", so a conversation becomes those turns concatenated:

    <system text>\\n            (if any)
    Instruct: <user 1>\\n
    Output: <assistant 1>\\n
    Instruct: <user 2>\\n
    Output:

and generation stops where the model starts the next "Instruct:" turn itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

ROLES = ("system", "user", "assistant")
INSTRUCT_STOPS = ["\nInstruct:", "Instruct:"]


def _content(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI "content parts": keep the text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return content or ""


def render_template(template: str, messages: list[Mapping[str, Any]], tokenizer: Any,
                    add_generation_prompt: bool = True) -> str:
    """Render a transformers-style Jinja2 chat template (sandboxed, as transformers does)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    eos = getattr(tokenizer, "eos_token", "") or ""
    return env.from_string(template).render(messages=[dict(m) for m in messages],
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token=getattr(tokenizer, "bos_token", eos) or "", eos_token=eos)


def instruct_prompt(messages: Iterable[Mapping[str, Any]]) -> str:
    """Phi's base-model QA format for a conversation, ending with "Output:" for the model to continue."""
    parts = []
    for m in messages:
        role, text = m.get("role"), _content(m).strip()
        if role == "system":
            parts.append(text + "\n")
        elif role == "user":
            parts.append(f"Instruct: {text}\n")
        else:
            parts.append(f"Output: {text}\n")
    return "".join(parts) + "Output:"


def format_chat(tokenizer: Any, messages: list[Mapping[str, Any]]) -> tuple[str, list[str]]:
    """(prompt text, stop strings) for a conversation: the tokenizer's chat template when it has one, else
    Phi's "Instruct: ...\\nOutput:" format. Raises ValueError for a malformed conversation."""
    if not messages:
        raise ValueError("messages: the conversation is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
    template = getattr(tokenizer, "chat_template", None)
    if template:
        from jinja2.exceptions import TemplateError

        try:
            return render_template(template, messages, tokenizer), []
        except TemplateError as e:
            raise ValueError(f"messages: the chat template rejected the conversation: {e}") from None
    return instruct_prompt(messages), list(INSTRUCT_STOPS)


# ---- the terminal chat -----------------------------------------------------------------------------------------
HELP = "commands: /reset clears the conversation, /exit quits (so does Ctrl-D)"


class ChatSession:
    """A conversation with a model: the history of messages and one reply per user turn."""

    def __init__(self, engine: Any, *, system: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0, top_p: float | None = None, seed: int | None = None) -> None:
        self.engine, self.system = engine, system
        self.max_tokens, self.temperature, self.top_p, self.seed = max_tokens, temperature, top_p, seed
        self.history: list[dict[str, str]] = []

    def reset(self) -> None:
        self.history = []

    def messages(self, user: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]

    def prompt_ids(self, user: str) -> tuple[list[int], list[str]]:
        """Token ids of the conversation plus `user`, and stop strings. The oldest turns are dropped while it
        would not leave `max_tokens` of room in the model's context."""
        tok = self.engine.tokenizer
        while True:
            text, stops = format_chat(tok, self.messages(user))
            ids = tok.encode(text)
            if len(ids) + self.max_tokens < self.engine.context or not self.history:
                break
            self.history = self.history[2:]  # forget the oldest exchange
        budget = self.engine.context - self.max_tokens - 1
        return (ids[-budget:] if budget > 0 else ids[-1:]), stops

    def reply(self, user: str, on_text: Any = None) -> str:
        """Answer `user` (streaming text pieces to on_text(str) as they are final) and remember the exchange."""
        from phiforge.lm.sampling import Sampling
        from phiforge.serve.engine import Request

        ids, stops = self.prompt_ids(user)
        room = max(1, min(self.max_tokens, self.engine.context - len(ids)))
        req = Request(ids, Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                                    max_new_tokens=room, stop=stops))
        lead = [not getattr(self.engine.tokenizer, "chat_template", None)]  # "Output:" is followed by a space

        def emit(row: int, text: str, info: Any) -> None:
            if lead[0]:
                text = text.lstrip()
                lead[0] = not text
            if text and on_text is not None:
                on_text(text)

        (res,) = self.engine.run([req], emit)
        answer = res.text.strip()
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer


def chat_loop(session: ChatSession, stdin: Any, stdout: Any, prompt: str = ">>> ") -> int:
    """Read user turns from `stdin` until /exit or end of input; stream each reply to `stdout`."""

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    write(HELP + "\n")
    while True:
        write(prompt)
        line = stdin.readline()
        if not line:  # end of input
            write("\n")
            return 0
        user = line.rstrip("\n")
        cmd = user.strip()
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            session.reset()
            write("[conversation cleared]\n")
            continue
        if cmd in ("/help", "/?"):
            write(HELP + "\n")
            continue
        if not cmd:
            continue
        session.reply(user, write)
        write("\n")
