"""Training text that ships with every Python: the standard library's own source, and a
byte-level BPE tokenizer trained on it with the `tokenizers` package.

Files are read in sorted order and split by file (every `HELD_OUT_EVERY`-th file is held
out), so the corpus, the tokenizer and the batches depend only on the Python version and
the seed, never on the machine.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TierlmError

SPECIAL = ("<|bos|>", "<|eos|>")          # ids 0 and 1, as the demo config's bos/eos_token_id
SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
HELD_OUT_EVERY = 20


def stdlib_files(limit_bytes: int, root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the standard library's .py files, sorted, up to limit_bytes."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise TierlmError(f"no Python standard library source at {root}")
    out, total = [], 0
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append((rel.as_posix(), text))
        total += len(text)
        if total >= limit_bytes:
            break
    if not out:
        raise TierlmError(f"no readable .py files under {root}")
    return out


def split(files: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts), split by file."""
    train = [t for i, (_, t) in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    held = [t for i, (_, t) in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style: every byte is a base token, so any text encodes).
    Newlines are always tokens of their own: merged with the next line's indentation, a
    prompt ending in "\n" would end on a token the model never saw before an indented line."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def encode(tok, texts: list[str]) -> torch.Tensor:
    """One long id stream: each file's tokens followed by <|eos|>."""
    eos = tok.token_to_id(SPECIAL[1])
    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Batches:
    """Random windows of `seq + 1 + extra` tokens from a stream (inputs and shifted targets;
    `extra` more for multi-token-prediction targets), reproducible from the seed."""
    stream: torch.Tensor
    batch: int
    seq: int
    extra: int = 1
    seed: int = 0

    def __post_init__(self):
        self.span = self.seq + 1 + self.extra
        if self.stream.numel() <= self.span:
            raise TierlmError(f"corpus of {self.stream.numel()} tokens is shorter than one window of {self.span}")
        self.gen = torch.Generator().manual_seed(self.seed)

    def next(self) -> torch.Tensor:
        """[batch, seq + 1 + extra] token ids."""
        starts = torch.randint(0, self.stream.numel() - self.span, (self.batch,), generator=self.gen)
        return torch.stack([self.stream[s:s + self.span] for s in starts.tolist()])
