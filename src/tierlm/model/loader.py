"""Load a Hugging Face checkpoint directory into a tierlm model.

Reads config.json, single or sharded safetensors (with model.safetensors.index.json),
maps official DeepSeek tensor names, dequantises FP8 block-scaled weights
(`weight_scale_inv`) and MXFP4 weights (gpt-oss `*_blocks` + `*_scales`), reads the language model
out of multimodal wrappers (`language_model.*` tensors; the vision tower is left aside with one
warning saying how much), and checks
every tensor: a missing, unexpected or mis-shaped tensor, a truncated file or a config
that does not match the tensors is an error that names it. Never unpickles anything.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Callable

import torch
from rich.progress import Progress
from safetensors import SafetensorError, safe_open

from ..dtypes import torch_dtype
from ..errors import TierlmError, read_text
from ..spec import load_config_file, parse_config
from ..spec.model import ModelSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


class CheckpointError(TierlmError):
    """A checkpoint's files or tensors do not match its config."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _shard(path: Path, index: Path, name: object) -> Path:
    """The shard `name` of an index, refused unless it is a plain relative name that stays inside
    the checkpoint directory, also once symlinks are resolved (a Hugging Face cache snapshot's
    links into its repository's blobs/ folder are allowed): nothing outside is ever read."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{index}: weight_map values must be file names, got {name!r}")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or rel.drive:
        raise CheckpointError(f"{index} names shard {name!r} outside the checkpoint directory; refused")
    root = path.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":                  # <hub cache>/models--org--name/snapshots/<rev>
        allowed.append(root.parent.parent / "blobs")
    f = path / rel
    try:
        real = f.resolve()
    except (OSError, RuntimeError) as e:                 # symlink loop
        raise CheckpointError(f"{index} names shard {name!r}, which cannot be resolved ({e})") from None
    if not any(real == a or a in real.parents for a in allowed):
        raise CheckpointError(f"{index} names shard {name!r}, which resolves to {real}, outside the checkpoint "
                              "directory; refused")
    return f


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(read_text(index, CheckpointError))["weight_map"]
            names = set(weight_map.values())
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        except RecursionError:
            raise CheckpointError(f"{index}: JSON nested too deeply") from None
        files = sorted({_shard(path, index, n) for n in sorted(names, key=str)})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names {f.name}, which is missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
        if pickles:
            raise CheckpointError(f"no *.safetensors files in {path}, only {pickles[0]}"
                                  + (f" (and {len(pickles) - 1} more)" if len(pickles) > 1 else "")
                                  + ": pickle checkpoints (.bin/.pt/.pth) are not read, since unpickling can run "
                                  "code; convert it to safetensors (transformers: save_pretrained(dir, "
                                  "safe_serialization=True))")
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


ST_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
            "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
            "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
ST_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}    # others: 1 byte


def unwrap_name(key: str) -> str | None:
    """A multimodal wrapper's tensor name -> the language model's; None for the rest (vision tower,
    projector). Wrappers keep the language model under a `language_model` prefix, in one of two layouts:
    `language_model.model.*` + `language_model.lm_head.*` (what transformers 5.23 still writes for
    Gemma3ForConditionalGeneration, and Kimi-K2.5's files) or `model.language_model.*` + `lm_head.*`
    (transformers 5.x module names)."""
    if key.startswith("language_model."):
        rest = key[len("language_model."):]
        return rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("lm_head."):
        return key
    return None


def wrapper_rename(files: list[Path], rename: Callable[[str], str] | None = None):
    """(rename, note): for a multimodal wrapper checkpoint (a tensor under a `language_model` prefix),
    `unwrap_name` followed by the family's `rename`, and a note saying how many tensors (and bytes)
    are left aside; for any other checkpoint, (`rename`, None). Reads the files' headers only."""
    def headers(f: Path, sizes: bool):
        try:
            with safe_open(str(f), framework="pt") as sf:
                if not sizes:
                    return list(sf.keys())
                out = []                           # (name, bytes) of the tensors left aside
                for k in sf.keys():
                    if unwrap_name(k) is None:
                        sl = sf.get_slice(k)
                        out.append((k, math.prod(sl.get_shape()) * ST_BYTES.get(sl.get_dtype(), 1)))
                return out
        except SafetensorError as e:
            raise CheckpointError(f"{f.name}: corrupted or truncated safetensors file ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{f.name}: cannot read ({e.strerror or e})") from None

    prefixes = ("language_model.", "model.language_model.")
    if not any(k.startswith(prefixes) for f in files for k in headers(f, False)):
        return rename, None
    aside: dict[str, tuple[int, int]] = {}        # first name component -> (tensors, bytes)
    for f in files:
        for key, size in headers(f, True):
            group = ".".join(key.split(".")[:2 if key.startswith("model.") else 1])
            n, b = aside.get(group, (0, 0))
            aside[group] = (n + 1, b + size)

    def unwrap(key: str) -> str | None:
        name = unwrap_name(key)
        return name if name is None or rename is None else rename(name)
    note = None
    if aside:
        from ..units import fmt_bytes
        n, b = sum(v[0] for v in aside.values()), sum(v[1] for v in aside.values())
        note = (f"multimodal checkpoint: {n} tensors ({fmt_bytes(b)}) outside the language model "
                f"({', '.join(k + '.*' for k in sorted(aside))}: the vision tower and projector) are not loaded; "
                "tierlm serves the text model")
    return unwrap, note


def read_tensors(files: list[Path], rename: Callable[[str], str | None] | None = None,
                 progress: bool = True, skip: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, by (renamed) name, on CPU; names `skip` accepts are not
    read at all (a meta tensor of their shape and dtype stands in: experts kept on disk)."""
    out: dict[str, torch.Tensor] = {}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("loading tensors", total=len(files))
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for key in sf.keys():
                        name = rename(key) if rename else key
                        if name is None:               # a multimodal wrapper's vision tower (wrapper_rename)
                            continue
                        if name in out:
                            raise CheckpointError(f"tensor {name} appears twice in the checkpoint")
                        if skip is not None and skip(name):
                            sl = sf.get_slice(key)
                            out[name] = torch.empty(sl.get_shape(), dtype=ST_TORCH.get(sl.get_dtype(), torch.float32),
                                                    device="meta")
                        else:
                            out[name] = sf.get_tensor(key)
            except SafetensorError as e:
                raise CheckpointError(f"{f.name}: corrupted or truncated safetensors file ({e})") from None
            except OSError as e:
                raise CheckpointError(f"{f.name}: cannot read ({e.strerror or e})") from None
            bar.advance(task)
    return out


def dequantize_fp8(tensors: dict[str, torch.Tensor], block: tuple[int, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace each `X.weight` (fp8) + `X.weight_scale_inv` (one scale per block) by a dense weight."""
    out = {}
    for name, t in tensors.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = tensors.get(name + "_scale_inv") if name.endswith(".weight") else None
        if scale is not None:
            rows, cols = t.shape
            b0, b1 = block
            want = (-(-rows // b0), -(-cols // b1))
            if tuple(scale.shape) != want:
                raise CheckpointError(f"{name}_scale_inv has shape {tuple(scale.shape)}, expected {want} "
                                      f"for a {rows}x{cols} weight with {b0}x{b1} blocks")
            s = scale.float().repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
            out[name] = (t.float() * s).to(dtype)
        else:
            out[name] = t
    orphans = [n for n in tensors if n.endswith(".weight_scale_inv") and n[: -len("_scale_inv")] not in tensors]
    if orphans:
        raise CheckpointError(f"scale without weight: {orphans[0]}")
    return out


# FP4 (e2m1) values of the 16 codes: bit 3 is the sign, bits 0-2 index the magnitude.
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace each `X_blocks` + `X_scales` pair (OCP MX FP4, as in the gpt-oss checkpoints) by `X`.

    X_blocks: uint8 [..., out, G, 16], two FP4 codes per byte, the low nibble first; X_scales:
    uint8 [..., out, G], one e8m0 exponent (2^(s-127)) per group of 32 values along `in`. The
    dense weight is [..., out, G*32] and is returned transposed, [..., in, out], the layout of
    transformers' fused expert tensors (gate_up_proj [E, hidden, 2I], down_proj [E, I, hidden]).
    """
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in tensors:
            continue
        if not name.endswith("_blocks"):
            out[name] = t
            continue
        base = name[: -len("_blocks")]
        scales = tensors.get(base + "_scales")
        if scales is None:
            out[name] = t
            continue
        if t.dtype != torch.uint8 or t.ndim < 3 or t.shape[-1] != 16 or tuple(scales.shape) != tuple(t.shape[:-1]):
            raise CheckpointError(f"{name} {tuple(t.shape)} ({t.dtype}) and {base}_scales {tuple(scales.shape)} are not "
                                  f"MXFP4 blocks [..., out, G, 16] uint8 with scales [..., out, G]")
        if base in tensors:
            raise CheckpointError(f"{base} appears both dense and as MXFP4 blocks")
        lut = torch.tensor(FP4_E2M1, dtype=torch.float32)
        codes = torch.stack([t & 0x0F, t >> 4], dim=-1).long()              # [..., out, G, 16, 2]
        values = lut[codes].flatten(-2)                                    # [..., out, G, 32]
        values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
        out[base] = values.flatten(-2).transpose(-1, -2).contiguous().to(dtype)
    return out


def load(path: str | Path, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
         strict: bool = True, progress: bool = True, skip: Callable[[str], bool] | None = None) -> torch.nn.Module:
    """Load a checkpoint directory; returns a module with forward(input_ids) -> logits.

    dtype: None keeps the checkpoint's floating dtype (FP8 and MXFP4 weights become the config's
    torch_dtype); otherwise every floating tensor is cast to it. strict=False tolerates
    unexpected tensors (never missing or mis-shaped ones). skip: names never read, left as
    meta parameters for `tierlm.tiers.experts` to map from the files on demand.
    """
    from . import families
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint directory")
    spec: ModelSpec = parse_config(load_config_file(path), str(path))
    family = families.get(spec.family)
    if dtype is not None:
        dtype = torch_dtype(dtype, "dtype")            # any spelling: bf16, bfloat16, torch.bfloat16, BF16
    base = DTYPES.get(spec.quant.base, torch.bfloat16)
    files = checkpoint_files(path)
    rename, note = wrapper_rename(files, getattr(family, "rename", None))
    if note is not None:
        warnings.warn(f"{path}: {note}", UserWarning, stacklevel=2)
    tensors = read_tensors(files, rename, progress, skip)
    if any(n.endswith(".weight_scale_inv") for n in tensors):
        tensors = dequantize_fp8(tensors, spec.quant.block, dtype or base)
    if any(n.endswith("_blocks") and n[: -len("_blocks")] + "_scales" in tensors for n in tensors):
        tensors = dequantize_mxfp4(tensors, dtype or base)
    with torch.device("meta"):
        model = family.build(spec, tensors.keys())
    expected = model.state_dict()
    missing = [n for n in expected if n not in tensors]
    unexpected = [n for n in tensors if n not in expected]
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + " — does config.json match this checkpoint?")
    if unexpected and strict:
        raise CheckpointError(f"unexpected tensor {unexpected[0]}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                              + "; pass strict=False to ignore")
    state = {}
    for name, ref in expected.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)}, the config implies {tuple(ref.shape)}")
        if t.is_floating_point():
            t = t.to(dtype if dtype is not None else (ref.dtype if ref.dtype == torch.float32 and t.dtype == torch.float32 else t.dtype))
        elif ref.is_floating_point():
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected a floating tensor")
        state[name] = t
    model.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        if skip is None:
            model.to(device)
        else:                                      # meta stand-ins stay meta
            model._apply(lambda t: t if t.device.type == "meta" else t.to(device))
    return model.eval()
