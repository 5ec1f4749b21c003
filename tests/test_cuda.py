"""The CUDA path on tiny models (marked `cuda`; skipped where no GPU exists — the device check runs them): tracing,
second moments, ROME ± SADR, MEND-free cells through the harness and the on-device restore check, each against the
same computation on the CPU."""
from __future__ import annotations

import pytest
import torch

from model_layer.loading import load_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]


@pytest.fixture()
def pair(tiny_model_dirs):
    """The tiny Llama on the CPU and a copy on the GPU."""
    cpu, tok = load_model(str(tiny_model_dirs["llama"]))
    gpu, _ = load_model(str(tiny_model_dirs["llama"]))
    return cpu, gpu.to("cuda"), tok


def test_second_moments_accumulate_on_the_device_and_match_the_cpu(pair, mirror):
    from editors.stats import second_moment, wikitext_articles

    cpu, gpu, tok = pair
    texts = wikitext_articles(mirror / "wikitext-2-raw" / "wiki.test.raw")
    a = second_moment(cpu, tok, "model.layers.1.mlp.down_proj", texts, 2000, 64, progress=False)
    b = second_moment(gpu, tok, "model.layers.1.mlp.down_proj", texts, 2000, 64, progress=False)
    assert a.count == b.count and b.mom2.device.type == "cpu"
    assert torch.allclose(a.mom2, b.mom2, rtol=1e-4, atol=1e-6)


def test_tracing_builds_its_inputs_on_the_device(pair):
    from editors.tracing import trace

    cpu, gpu, tok = pair
    facts = [("Danielle Darrieux was born in", "Danielle Darrieux", 5)]
    a = trace(cpu, tok, facts, samples=2, window=2, progress=False)
    b = trace(gpu, tok, facts, samples=2, window=2, progress=False)
    assert a.chosen_layer == b.chosen_layer
    assert max(abs(x - y) for x, y in zip(a.indirect_effect, b.indirect_effect)) < 1e-4


def test_rome_sadr_on_the_device_edits_restores_and_keeps_c_there(pair, mirror, tmp_path):
    from editors.rome import Rome
    from model_layer.checksum import model_state
    from test_rome_sadr import TINY_CASE, tiny_hparams

    cpu, gpu, tok = pair
    before = model_state(gpu)
    editor = Rome()
    hp = tiny_hparams(mirror, tmp_path, sadr=True, sadr_steps=5, v_num_grad_steps=5)
    handle = editor.edit(gpu, tok, TINY_CASE, hp)
    assert all(v.device.type == "cuda" for k, v in editor._cov.items() if isinstance(v, torch.Tensor))
    handle.restore()
    assert model_state(gpu) == before
    ref = editor.edit(cpu, tok, TINY_CASE, hp)  # the same edit on the CPU: the same weight update, to fp32 noise
    name = next(iter(ref.originals))
    w_cpu = cpu.get_submodule(name.rsplit(".", 1)[0]).weight.detach()
    handle = editor.edit(gpu, tok, TINY_CASE, hp)
    w_gpu = gpu.get_submodule(name.rsplit(".", 1)[0]).weight.detach().cpu()
    assert (w_cpu - w_gpu).abs().max().item() < 1e-3 * w_cpu.abs().max().item()
    handle.restore()
    ref.restore()


def test_a_cell_through_the_harness_on_the_device(pair, tmp_path):
    from evaluators.harness import CellSpec, run_cell, run_pre
    from test_more_editors import ft_hparams
    from test_rome_sadr import CASES

    _, gpu, tok = pair
    run_pre(gpu, tok, "tiny", "test", CASES, tmp_path / "pre.jsonl", progress=False)
    rows = run_cell(gpu, tok, CellSpec("test", "tiny", "ft", True, ft_hparams(num_steps=3, sadr_steps=3)), "test",
                    CASES, tmp_path / "pre.jsonl", tmp_path / "cell.jsonl", progress=False)
    assert [r["case_id"] for r in rows] == [c.case_id for c in CASES]
    assert all(r["env"]["device"] == "cuda" and "cpu_threads" not in r["env"] for r in rows)
