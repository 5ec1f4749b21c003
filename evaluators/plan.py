"""The cost model behind `driftbench plan`: how much a profile's grid costs before anyone runs it.

Per case and cell, the work is counted in token passes from the dataset itself and the cell's hyper-parameters:

- the edit: optimisation steps × rows × tokens per row × (forward + backward, the backward counted as two forwards
  of the layers above the lowest trained one; the locate-then-edit loop replays only the blocks above its δ) —
  ROME-family editors run their context-template rows (+ the essence row), FT-L the edit row, WISE its template rows
  and an unrelated row, MEND one forward/backward (its training is a one-time cost per checkpoint: ``train_steps`` ×
  the edit's passes, two edited forwards and a backward, and the unedited locality forward); SADR cells and
  ``+steps`` controls count ``sadr_steps``;
- the evaluation: every scored probe pair (context + right, context + wrong; lm-eval PIQA included) once forward,
  the ME-PPL window (100 tokens), and the fluency texts: ``generation`` prompts decoded to 100 tokens with a KV
  cache — decoding is bound by reading the weights once per step, not by FLOPs.

Time = 2·N·(token passes) / (peak · efficiency) + decode steps · (weight bytes) / (bandwidth · efficiency). The
efficiencies of this machine's CPU are measured (README "Performance": the v* step runs at 81% of the fp32 ceiling,
decode streams 4.8 GB/s); a GPU's are assumptions, printed as such, until a GPU run calibrates them. Token counts use
the embedded model's tokenizer when it is prepared (`models/<name>`), else 4 characters per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from data_pipeline.schema import Case
from evaluators.probes import build_probes

GEN_TOKENS = 100  # fluency texts: 100 tokens including the prompt (evaluators.generation.MAX_OUT_LEN)
PPL_TOKENS = 100


@dataclass(frozen=True)
class Device:
    name: str
    flops: float  # peak FLOP/s in the run dtype
    bandwidth: float  # memory bandwidth, bytes/s
    memory_gb: float
    efficiency: float  # achieved fraction of ``flops`` on editing/scoring batches
    decode_efficiency: float  # achieved fraction of ``bandwidth`` while decoding
    measured: bool  # efficiencies measured here (else assumed)


DEVICES = {
    # this machine: AMD EPYC, 2 cores, fp32 matmul ceiling 128 GFLOP/s; the v* step at 103 GFLOP/s (81%); decode at
    # 4.8 GB/s effective (README "Performance (measured)")
    "cpu": Device("2-core CPU (this machine, fp32)", 128e9, 4.8e9, 24, 0.81, 1.0, True),
    "a100": Device("A100-80GB (bf16)", 312e12, 2.04e12, 80, 0.30, 0.70, False),
    "h100": Device("H100-SXM (bf16)", 989e12, 3.35e12, 80, 0.30, 0.70, False),
    "h200": Device("H200 (bf16)", 989e12, 4.8e12, 141, 0.30, 0.70, False),
}


@dataclass(frozen=True)
class ModelFacts:
    params: float  # parameter count
    layers: int
    d_model: int
    d_ffn: int


# published configurations of the profiles' models (no hub access needed to plan)
MODEL_FACTS = {
    "smollm2-135m": ModelFacts(134.5e6, 30, 576, 1536),
    "gpt-j-6b": ModelFacts(6.05e9, 28, 4096, 16384),
    "llama3-8b": ModelFacts(8.03e9, 32, 4096, 14336),
    "gpt-neox-20b": ModelFacts(20.6e9, 44, 6144, 24576),
    "llama2-13b": ModelFacts(13.0e9, 40, 5120, 13824),
    "tinyllama-1.1b": ModelFacts(1.10e9, 22, 2048, 5632),
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def char_tokens(text: str) -> int:
    return max(1, round(len(text) / 4))


@dataclass
class CaseWork:
    """Token passes of one case: ``edit_rows`` (tokens of the edit row, the unit of the edit's optimisation),
    ``probe`` (forward tokens of the scored probes), ``decode`` (decode steps of the fluency texts, one batch per
    case) and ``gen_tokens`` (their tokens)."""
    edit_row: int
    probe: int
    decode: int
    gen_tokens: int


def case_work(case: Case, count: Callable[[str], int] = char_tokens) -> CaseWork:
    probe = 0
    for ps in build_probes(case).values():
        for ctx, right, wrong in zip(ps.contexts, ps.right, ps.wrong):
            probe += 2 * count(ctx) + count(" " + right) + count(" " + wrong)
    gens = list(case.generation)
    shortest = min((count(g) for g in gens), default=GEN_TOKENS)
    return CaseWork(count(case.prompt) + count(" " + case.target_new), probe + PPL_TOKENS,
                    GEN_TOKENS - shortest if gens else 0, GEN_TOKENS * len(gens))


def edit_passes(editor: str, hp: dict[str, Any], sadr_steps: bool, row: int, n_layers: int) -> tuple[float, float]:
    """(token passes of one edit, one-time token passes of its training) for ``editor`` with ``hp`` on a model of
    ``n_layers``. A backward pass costs two forwards of the layers above the lowest trained one; the locate-then-edit
    loop also replays only the blocks above its δ (the ones below are cached: editors.core.optimise_targets)."""
    if editor == "none":
        return 0.0, 0.0

    def above(layer: int) -> float:
        return max(0.0, (n_layers - layer) / n_layers)

    if editor == "mend":
        low = min(hp.get("layers", [n_layers - 1]))
        edit = row * (1 + 2 * above(low))
        return edit, hp.get("train_steps", 1000) * (edit + 2 * row * (1 + 2 * above(low)) + row)
    if editor == "ft":
        steps = hp.get("sadr_steps", 80) if sadr_steps else hp.get("num_steps", 25)
        return steps * row * (1 + 2 * above(hp.get("layer", 0))), 0.0
    if editor == "wise":
        steps = hp.get("sadr_steps", 70) if sadr_steps else hp.get("n_iter", 70)
        lengths = hp.get("template_lengths", [[5, 5], [10, 5]])
        rows = [row] + [row + length for length, n in lengths for _ in range(n)]
        return steps * (sum(rows) * (1 + 2 * above(hp.get("layer", 0))) + hp.get("loc_tokens", 24)), 0.0
    # the locate-then-edit family: the template rows and the essence row, at the v* loop's step count
    steps = hp.get("sadr_steps", 80) if sadr_steps else hp.get("v_num_grad_steps", 20)
    lengths = hp.get("template_lengths", [[5, 10], [10, 10]])
    rows = [row] + [row + length for length, n in lengths for _ in range(n)] + [row // 2 + 3]
    layer = hp.get("layer", max(hp.get("layers", [0])))
    return 3.0 * steps * sum(rows) * above(layer), 0.0


def weight_bytes(facts: ModelFacts, dtype: str) -> float:
    return facts.params * DTYPE_BYTES.get(dtype, 4)


def extra_memory_gb(editor: str, facts: ModelFacts, hp: dict[str, Any]) -> float:
    """Memory beyond the model's weights: AlphaEdit's projection and cache (fp32 d_ffn² per layer, both resident),
    MEND's hyper-network in training (fp32 Adam, 16 bytes per parameter), WISE's side memory copies."""
    if editor == "alphaedit":
        return 2 * 4 * facts.d_ffn ** 2 * len(hp.get("layers", [0])) / 1e9
    if editor == "mend":
        d = facts.d_model + facts.d_ffn
        r = min(hp.get("rank", 1920), d)
        per_shape = (hp.get("n_hidden", 1) + 1) * (2 * d * r + d * (1 + 2 * len(hp.get("layers", [0]))))
        return 16 * 2 * per_shape / 1e9
    if editor == "wise":
        return 3 * 4 * facts.d_model * facts.d_ffn / 1e9  # the side memory, a stored shard and a merged memory
    return 0.0


@dataclass
class CellCost:
    model: str
    cell: str
    edits: int
    tflop_per_edit: float
    seconds_per_edit: float
    gpu_hours: float
    one_time_hours: float
    memory_gb: float


def plan_cell(model: str, facts: ModelFacts, dtype: str, name: str, hp: dict[str, Any], works: list[CaseWork],
              device: Device) -> CellCost:
    """The cost of cell ``name`` over ``works`` (one per case) on ``device``."""
    from basis.cells import parse_cell

    cell = parse_cell(name)
    n2 = 2 * facts.params
    fwd = device.flops * device.efficiency
    decode_s = weight_bytes(facts, dtype) / (device.bandwidth * device.decode_efficiency)
    total, train, flop = 0.0, 0.0, 0.0
    for w in works:
        edit, train = edit_passes(cell.editor, hp, cell.sadr or cell.steps, w.edit_row, facts.layers)
        if cell.editor == "none":  # the unedited rows are the pre-edit stage's (run once per model)
            edit = 0.0
        passes = edit + w.probe + w.gen_tokens
        flop += n2 * passes
        total += n2 * passes / fwd + w.decode * decode_s
    n = max(1, len(works))
    mem = weight_bytes(facts, dtype) / 1e9 + extra_memory_gb(cell.editor, facts, hp)
    return CellCost(model, name, len(works), flop / n / 1e12,
                    total / n, total / 3600, n2 * train / fwd / 3600, mem)


def format_plan(costs: list[CellCost], device: Device, gpus: int) -> str:
    """The plan as a markdown table, with the total and the wall time on ``gpus`` devices."""
    what = "measured efficiencies" if device.measured else "assumed efficiencies (no GPU run has calibrated them)"
    lines = [f"device: {device.name}, {what}: {device.efficiency:.0%} of peak FLOP/s, "
             f"{device.decode_efficiency:.0%} of bandwidth while decoding", "",
             "| model | cell | edits | TFLOP/edit | s/edit | device-hours | one-time h | memory GB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for c in costs:
        fits = "" if c.memory_gb <= device.memory_gb else " (exceeds one device)"
        label = "none (the pre-edit stage)" if c.cell == "none" else c.cell
        lines.append(f"| {c.model} | {label} | {c.edits} | {c.tflop_per_edit:.2f} | {c.seconds_per_edit:.1f} | "
                     f"{c.gpu_hours:.1f} | {c.one_time_hours:.1f} | {c.memory_gb:.1f}{fits} |")
    hours = sum(c.gpu_hours + c.one_time_hours for c in costs)
    lines += ["", f"total: {hours:.0f} device-hours = {hours / gpus:.1f} h wall on {gpus} device(s) "
                  f"({hours / gpus / 24:.2f} days); the paper reports 1-2 days on 8 A100s for its part of the grid "
                  "(ROME and MEMIT ±SADR) = 192-384 A100-hours"]
    return "\n".join(lines)
