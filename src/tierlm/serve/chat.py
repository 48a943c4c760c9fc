"""Chat templates: the checkpoint's Jinja template, rendered the way Hugging Face tokenizers do.

The template comes from `chat_template.jinja` in the checkpoint directory, else from
`tokenizer_config.json`'s `chat_template` (a string, or a list of named templates, of which
`default` is used). It is rendered in a sandbox with `trim_blocks` and `lstrip_blocks`, given
`messages`, `add_generation_prompt`, the special tokens of tokenizer_config.json (`bos_token`,
`eos_token`, ...), `raise_exception`, `strftime_now` and a `tojson` filter. The rendered text is
tokenized without adding special tokens (the template writes them), as `apply_chat_template` does.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from ..errors import TierlmError

SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplate:
    def __init__(self, source: str, special: dict[str, str]):
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TierlmError(f"chat template: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise TierlmError(f"the checkpoint's chat template does not parse: {e}") from None
        self.special = special

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        import jinja2
        values = {**self.special, **kwargs, "messages": messages, "add_generation_prompt": add_generation_prompt}
        try:
            return self.template.render(**values)
        except TierlmError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise TierlmError(f"chat template failed on these messages: {type(e).__name__}: {e}") from None

    @classmethod
    def load(cls, checkpoint: str | Path) -> "ChatTemplate | None":
        """The checkpoint's template, or None when it has none."""
        path = Path(checkpoint)
        cfg = {}
        f = path / "tokenizer_config.json"
        if f.is_file():
            try:
                cfg = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TierlmError(f"{f}: not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise TierlmError(f"{f}: not a JSON object")
        source = None
        jinja = path / "chat_template.jinja"
        if jinja.is_file():
            source = jinja.read_text()
        else:
            source = cfg.get("chat_template")
            if isinstance(source, list):
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
        if not isinstance(source, str) or not source:
            return None
        special = {}
        for name in SPECIAL:
            v = cfg.get(name)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                special[name] = v
        return cls(source, special)
