"""model_layer: loading (embedded / local / hub), architecture descriptors, `prepare_model`, `param_checksum`.

The four tiny random models (tests/tiny_models.py) are saved with ``save_pretrained`` and load through the same
``from_pretrained`` call that hub ids use, so the paper architectures are covered without network.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from model_layer.arch import ARCHS, arch_for
from model_layer.checksum import param_checksum
from model_layer.loading import EMBEDDED, PROVENANCE_FILE, ModelLoadError, load_model, prepare_model, resolve_source

TINY = ("gptj", "gpt_neox", "llama", "gemma3")
PER_LAYER = ("block", "mlp", "mlp_in", "mlp_out", "attn", "attn_out")
GLOBAL = ("final_norm", "lm_head", "embed")
MODULE_TYPES = {  # the template must land on the right kind of module, not just any module
    "mlp_in": torch.nn.Linear, "mlp_out": torch.nn.Linear, "attn_out": torch.nn.Linear,
    "lm_head": torch.nn.Linear, "embed": torch.nn.Embedding,
}


@pytest.fixture(scope="module")
def loaded(tiny_model_dirs):
    return {a: load_model(str(tiny_model_dirs[a])) for a in TINY}


def logits(model, tok, text="The capital of France is Paris. How can I keep beads organized?"):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


# --------------------------------------------------------------------------------------------- loading + arch

@pytest.mark.parametrize("arch", TINY)
def test_tiny_arch_loads_and_templates_resolve(arch, loaded):
    model, tok = loaded[arch]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None
    spec = arch_for(model)
    assert spec is ARCHS[arch] and spec.name == arch
    cfg = model.config
    assert spec.n_layers(cfg) == cfg.num_hidden_layers == 4
    assert spec.n_heads(cfg) == cfg.num_attention_heads == 4
    last = spec.n_layers(cfg) - 1
    blocks = []
    for layer in (0, last):
        for field in PER_LAYER:
            name = spec.layer(field, layer)
            assert str(layer) in name.split(".")
            mod = model.get_submodule(name)
            if field in MODULE_TYPES:
                assert isinstance(mod, MODULE_TYPES[field]), (field, type(mod))
        blocks.append(model.get_submodule(spec.layer("block", layer)))
        # mlp_out sits inside that layer's mlp, which sits inside that layer's block
        mlp = model.get_submodule(spec.layer("mlp", layer))
        assert any(m is model.get_submodule(spec.layer("mlp_out", layer)) for m in mlp.modules())
        assert any(m is mlp for m in blocks[-1].modules())
    assert blocks[0] is not blocks[1]
    with pytest.raises(AttributeError):
        model.get_submodule(spec.layer("block", last + 1))
    for field in GLOBAL:
        mod = model.get_submodule(getattr(spec, field))
        if field in MODULE_TYPES:
            assert isinstance(mod, MODULE_TYPES[field])
    # shapes agree with the config: lm_head maps hidden -> vocab, embed is vocab x hidden
    assert model.get_submodule(spec.lm_head).weight.shape == (cfg.vocab_size, cfg.hidden_size)
    assert model.get_submodule(spec.embed).weight.shape == (cfg.vocab_size, cfg.hidden_size)
    assert logits(model, tok).shape[-1] == cfg.vocab_size


def test_arch_for_unsupported_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match=r"model_type 'gpt2'") as exc:
        arch_for(model)
    assert "model_layer/arch.py" in str(exc.value)


def test_arch_for_detects_a_wrong_descriptor(loaded, monkeypatch):
    """A descriptor whose template misses the real module tree fails loudly, naming the module and field."""
    import model_layer.arch as arch_mod

    model, _ = loaded["llama"]
    bad = dataclasses.replace(ARCHS["llama"], mlp_out="model.layers.{}.mlp.w2")
    monkeypatch.setitem(arch_mod.ARCHS, "llama", bad)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.w2.*mlp_out"):
        arch_for(model)


# --------------------------------------------------------------------------------------------- resolve_source

def test_resolve_source_embedded():
    name = next(iter(EMBEDDED))
    if importlib.util.find_spec(EMBEDDED[name]["package"]) is None:
        pytest.skip(f"{EMBEDDED[name]['package']} not installed")
    src = resolve_source(name)
    assert src.kind == "embedded" and src.ref == name
    assert src.gguf_file == EMBEDDED[name]["gguf"]
    assert (Path(src.folder) / src.gguf_file).is_file()


def test_resolve_source_local_and_hub(tiny_model_dirs):
    folder = str(tiny_model_dirs["gptj"])
    src = resolve_source(folder)
    assert (src.kind, Path(src.ref)) == ("local", Path(folder))
    assert resolve_source("EleutherAI/gpt-j-6b") == type(src)("hub", "EleutherAI/gpt-j-6b")


@pytest.mark.parametrize("junk", ["not a model", "a/b/c", "./missing-folder", "/no/such/dir"])
def test_resolve_source_junk_lists_the_options(junk):
    with pytest.raises(ModelLoadError) as exc:
        resolve_source(junk)
    msg = str(exc.value)
    assert repr(junk) in msg
    for option in (*EMBEDDED, "folder", "org/name"):
        assert option in msg


def test_hub_id_offline_says_to_pass_a_local_folder(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(ModelLoadError, match="local folder") as exc:
        load_model("driftbench-tests/no-such-model-xyz")
    assert "driftbench-tests/no-such-model-xyz" in str(exc.value)


def test_bad_dtype_is_a_clear_error(tiny_model_dirs):
    with pytest.raises(ModelLoadError, match="float32"):
        load_model(str(tiny_model_dirs["llama"]), dtype="int4")


# --------------------------------------------------------------------------------------------- prepare_model

def _temp_leftovers(parent: Path, out_name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != out_name)


@pytest.mark.parametrize("arch", TINY)
def test_prepare_model_roundtrip_is_bit_identical(arch, tiny_model_dirs, loaded, tmp_path):
    out = tmp_path / "models" / f"{arch}-fp32"
    prov = prepare_model(str(tiny_model_dirs[arch]), out)
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names or any(n.endswith(".safetensors") for n in names)
    assert not any(n.endswith(".bin") for n in names)
    assert {"config.json", "tokenizer_config.json", PROVENANCE_FILE} <= names
    assert "tokenizer.json" in names
    on_disk = json.loads((out / PROVENANCE_FILE).read_text())
    assert on_disk == prov
    assert prov["source"] == "local" and prov["dtype"] == "float32"
    assert prov["model_type"] == loaded[arch][0].config.model_type
    assert prov["n_params"] == sum(p.numel() for p in loaded[arch][0].parameters())
    assert _temp_leftovers(out.parent, out.name) == []

    model, tok = loaded[arch]
    model2, tok2 = load_model(str(out))
    text = "The capital of France is Paris. How can I keep beads organized?"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert torch.equal(logits(model2, tok2, text), logits(model, tok, text))
    assert param_checksum(model2) == param_checksum(model)


def test_prepare_model_replaces_existing_out_dir_atomically(tiny_model_dirs, tmp_path, monkeypatch):
    src = str(tiny_model_dirs["llama"])
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    prepare_model(src, out)
    assert not (out / "stale.txt").exists()
    assert (out / PROVENANCE_FILE).is_file()
    assert _temp_leftovers(tmp_path, out.name) == []
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # a crash half-way (tokenizer save fails after the weights were written) leaves the old out_dir untouched
    from transformers import PreTrainedTokenizerBase

    def boom(self, *a, **k):
        raise RuntimeError("simulated crash while saving the tokenizer")

    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerBase, "save_pretrained", boom)
        with pytest.raises(RuntimeError, match="simulated crash"):
            prepare_model(src, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _temp_leftovers(tmp_path, out.name) == []

    # a clean rerun over the existing folder gives the same files (deterministic save), no temp dirs left
    prepare_model(src, out)
    assert {p.name for p in out.iterdir()} == set(before)
    assert (out / "model.safetensors").read_bytes() == before["model.safetensors"]
    assert _temp_leftovers(tmp_path, out.name) == []


# --------------------------------------------------------------------------------------------- param_checksum

def test_param_checksum_detects_one_ulp(loaded):
    model, _ = loaded["gpt_neox"]
    c0 = param_checksum(model)
    assert c0 == param_checksum(model)  # deterministic
    w = model.get_submodule(ARCHS["gpt_neox"].layer("mlp_out", 2)).weight
    old = w[3, 5].clone()
    try:
        with torch.no_grad():
            w[3, 5] = torch.nextafter(old, torch.tensor(float("inf")))
        assert w[3, 5] != old and (w[3, 5] - old).abs() < 1e-6
        c1 = param_checksum(model)
        assert c1 != c0
    finally:
        with torch.no_grad():
            w[3, 5] = old
    assert param_checksum(model) == c0


def test_param_checksum_sees_dtype_and_signed_zero(loaded):
    """Equal values in a different dtype, or -0.0 vs 0.0 (equal under ==), still change the fingerprint."""
    model, _ = loaded["gptj"]
    c0 = param_checksum(model)
    b = model.get_submodule(ARCHS["gptj"].layer("mlp_out", 0)).bias
    old = b.detach().clone()
    try:
        with torch.no_grad():
            b[0] = 0.0
        c_pos = param_checksum(model)
        with torch.no_grad():
            b[0] = -0.0
        assert param_checksum(model) != c_pos
    finally:
        with torch.no_grad():
            b.copy_(old)
    assert param_checksum(model) == c0
    copy = torch.nn.Linear(2, 2)
    c_fp32 = param_checksum(copy)
    assert param_checksum(copy.double()) != c_fp32


def test_prepare_model_checks_the_weights_sha256_before_replacing(tiny_model_dirs, tmp_path):
    """params.yaml's sha256 of the converted weights: a match passes, a mismatch is an error naming both hashes and
    leaves the existing folder untouched (a changed conversion is never a silent new baseline)."""
    src, out = str(tiny_model_dirs["llama"]), tmp_path / "prepared"
    prov = prepare_model(src, out)
    want = prov["weights_sha256"]
    assert len(want) == 64 and prepare_model(src, out, expect_sha256={"weights": want})["weights_sha256"] == want
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ModelLoadError, match=f"sha256 {want}, params.yaml expects 0000"):
        prepare_model(src, out, expect_sha256={"weights": "0" * 64})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _temp_leftovers(tmp_path, out.name) == []


def test_tensor_digest_sees_every_bit_on_any_shape():
    """0-dim, odd byte counts, 2-byte dtypes; one flipped bit anywhere changes the digest; equal bits, equal digest."""
    from model_layer.checksum import tensor_digest

    g = torch.Generator().manual_seed(0)
    for t in (torch.tensor(3.5), torch.randn(7, generator=g).to(torch.bfloat16), torch.randn(3, 5, generator=g),
              torch.arange(5, dtype=torch.uint8), torch.randn(2, 3, generator=g)[:, 1]):
        d = tensor_digest(t)
        assert d == tensor_digest(t.clone()) and 0 <= d < 2 ** 64
        raw = t.contiguous().reshape(-1).view(torch.uint8).clone()
        for i in range(raw.numel()):
            for bit in (0, 7):
                flipped = raw.clone()
                flipped[i] ^= 1 << bit
                assert tensor_digest(flipped.view(t.dtype).reshape(t.shape)) != d
    assert tensor_digest(torch.zeros(0)) == 0


def test_model_state_with_a_zero_dim_buffer():
    """A module with a 0-dim buffer (Gemma-3 keeps its embedding scale as one) is checksummed like any other."""
    from model_layer.checksum import model_state

    m = torch.nn.Linear(3, 2)
    m.register_buffer("scale", torch.tensor(2.0))
    before = model_state(m)
    m.scale.add_(2.0 ** -22)  # the last bit of 2.0's mantissa
    assert model_state(m) != before
