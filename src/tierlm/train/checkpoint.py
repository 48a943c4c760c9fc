"""Save a trained module as a Hugging Face checkpoint directory that `tierlm.LLM`,
`tierlm plan` and transformers all read: config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json. Written to a temporary sibling directory and
renamed into place, so an interrupted save never leaves a half checkpoint behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import TierlmError
from .data import SPECIAL


def save_checkpoint(out: Path, model: nn.Module, config: dict, tokenizer, extra: dict[str, dict] | None = None,
                    dtype: torch.dtype = torch.float32, chat_template: str | None = None) -> Path:
    """Write the checkpoint to `out` (replacing what is there); `extra` adds JSON files, and
    `chat_template` a `chat_template.jinja` (as transformers saves one)."""
    from safetensors.torch import save_file
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        state = {n: (t.detach().to(dtype) if t.is_floating_point() else t.detach()).contiguous().cpu()
                 for n, t in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        bos, eos = (tokenizer.token_to_id(s) for s in SPECIAL)
        files = {"config.json": {**config, "dtype": str(dtype).removeprefix("torch.")},
                 "generation_config.json": {"bos_token_id": bos, "eos_token_id": eos},
                 "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL[0],
                                           "eos_token": SPECIAL[1], "model_max_length": config["max_position_embeddings"],
                                           "clean_up_tokenization_spaces": False},
                 **(extra or {})}
        for name, body in files.items():
            (tmp / name).write_text(json.dumps(body, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        if chat_template is not None:
            (tmp / "chat_template.jinja").write_text(chat_template)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise TierlmError(f"cannot save the checkpoint to {out}: {e.strerror or e}") from None
    return out
