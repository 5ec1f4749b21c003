"""Architecture descriptors: where the modules an editor or probe needs live, per model family.

Templates take the layer index through ``{}`` (the convention of the ROME/MEMIT code; reference-spec §4.6).
``mlp_in`` is the MLP's input projection (gate/up side), ``mlp_out`` the down-projection whose *input* is the
ROME/MEMIT key and whose output is the written value; ``attn_out`` is the attention output projection
(PMET / IntAttn-Edit); ``mlp`` is the whole MLP (ROME's δ hook) and ``block`` the transformer block (MEMIT's).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ArchSpec:
    name: str
    block: str
    mlp: str
    mlp_in: str
    mlp_out: str
    attn: str
    attn_out: str
    final_norm: str
    lm_head: str
    embed: str
    # the MLP's output is added to the residual stream as is (no norm after it): a vector added to the MLP output
    # equals the same vector added to the block output, so loops may cache the blocks below (core.optimise_target)
    mlp_adds_to_residual: bool = True
    n_layers_attr: tuple[str, ...] = ("num_hidden_layers", "n_layer")
    n_heads_attr: tuple[str, ...] = ("num_attention_heads", "n_head")

    def layer(self, template: str, layer: int) -> str:
        return getattr(self, template).format(layer)

    def n_layers(self, config) -> int:
        return _first_attr(config, self.n_layers_attr)

    def n_heads(self, config) -> int:
        return _first_attr(config, self.n_heads_attr)


def _first_attr(config, names):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return int(v)
    raise AttributeError(f"config has none of {names}")


_LLAMA_LIKE = dict(
    block="model.layers.{}", mlp="model.layers.{}.mlp", mlp_in="model.layers.{}.mlp.up_proj",
    mlp_out="model.layers.{}.mlp.down_proj", attn="model.layers.{}.self_attn",
    attn_out="model.layers.{}.self_attn.o_proj", final_norm="model.norm", lm_head="lm_head",
    embed="model.embed_tokens",
)

ARCHS: dict[str, ArchSpec] = {
    "gptj": ArchSpec(
        name="gptj", block="transformer.h.{}", mlp="transformer.h.{}.mlp", mlp_in="transformer.h.{}.mlp.fc_in",
        mlp_out="transformer.h.{}.mlp.fc_out", attn="transformer.h.{}.attn",
        attn_out="transformer.h.{}.attn.out_proj", final_norm="transformer.ln_f", lm_head="lm_head",
        embed="transformer.wte"),
    "gpt_neox": ArchSpec(
        name="gpt_neox", block="gpt_neox.layers.{}", mlp="gpt_neox.layers.{}.mlp",
        mlp_in="gpt_neox.layers.{}.mlp.dense_h_to_4h", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention", attn_out="gpt_neox.layers.{}.attention.dense",
        final_norm="gpt_neox.final_layer_norm", lm_head="lm_head", embed="gpt_neox.embed_in"),
    # Llama-2/3, TinyLlama and SmolLM2 share the Llama module layout.
    "llama": ArchSpec(name="llama", **_LLAMA_LIKE),
    # Gemma-3 text models (Gemma3ForCausalLM, model_type "gemma3_text") use the same names. Note: Gemma applies a
    # post-feed-forward RMSNorm to the MLP output before the residual add, which rescales a δ injected at `mlp`;
    # locate-then-edit methods therefore need more optimisation steps there (measured on tiny models).
    "gemma3": ArchSpec(name="gemma3", mlp_adds_to_residual=False, **_LLAMA_LIKE),
}
_MODEL_TYPE_TO_ARCH = {"gptj": "gptj", "gpt_neox": "gpt_neox", "llama": "llama", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def arch_for(model: torch.nn.Module) -> ArchSpec:
    """The descriptor for a loaded model, checked against its real module tree (clear error if anything is off)."""
    mt = getattr(model.config, "model_type", None)
    if mt not in _MODEL_TYPE_TO_ARCH:
        raise ValueError(f"model_type {mt!r} has no architecture descriptor; supported: {sorted(_MODEL_TYPE_TO_ARCH)}. "
                         "Add an ArchSpec to model_layer/arch.py.")
    spec = ARCHS[_MODEL_TYPE_TO_ARCH[mt]]
    names = dict(model.named_modules())
    for field in ("block", "mlp", "mlp_in", "mlp_out", "attn", "attn_out"):
        for layer in (0, spec.n_layers(model.config) - 1):
            if spec.layer(field, layer) not in names:
                raise ValueError(f"{spec.name}: module {spec.layer(field, layer)!r} ({field}) not found in the model")
    for field in ("final_norm", "lm_head", "embed"):
        if getattr(spec, field) not in names:
            raise ValueError(f"{spec.name}: module {getattr(spec, field)!r} ({field}) not found in the model")
    return spec


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name)
