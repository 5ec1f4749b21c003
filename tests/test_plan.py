"""The cost model (`driftbench plan`): token passes counted from a case by hand, the edit's passes per editor family,
the time formula, and the table's total."""
from __future__ import annotations

import pytest

from data_pipeline.schema import Case, Probe
from evaluators.plan import DEVICES, CaseWork, ModelFacts, case_work, edit_passes, format_plan, plan_cell


def words(text: str) -> int:
    return len(text.split())


def test_case_work_counts_every_scored_pair_the_fluency_texts_and_the_ppl_window():
    case = Case(case_id="cf-1", source="counterfact", subject="A B", prompt="A B plays", target_true="jazz",
                target_new="rock music", neighborhood=(Probe("C plays", "jazz"),), generation=("A B is", "A B was a"))
    w = case_work(case, words)
    # rewrite: 2·3 + 2 + 1 ... each pair: 2·|ctx| + |" right"| + |" wrong"|
    rewrite = 2 * 3 + 2 + 1
    neighborhood = 2 * 2 + 1 + 2  # right "jazz", wrong target_new "rock music"
    distracted = 2 * (2 + 5) + 1 + 2  # the context prefixed with "A B plays rock music." (5 words)
    assert w.probe == rewrite + neighborhood + distracted + 100
    assert w.edit_row == 3 + 2 and w.gen_tokens == 200 and w.decode == 100 - 3


def test_edit_passes_follow_each_family():
    facts_layers = 10
    # ROME-family: steps × template rows × 3 × the share of layers above the edit layer
    hp = {"layer": 5, "v_num_grad_steps": 4, "sadr_steps": 8, "template_lengths": [[2, 1]]}
    rows = 6 + (6 + 2) + (6 // 2 + 3)
    assert edit_passes("rome", hp, False, 6, facts_layers) == (3 * 4 * rows * 0.5, 0.0)
    assert edit_passes("rome", hp, True, 6, facts_layers)[0] == 2 * edit_passes("rome", hp, False, 6, facts_layers)[0]
    assert edit_passes("ft", {"layer": 0, "num_steps": 2}, False, 6, facts_layers) == (2 * 6 * 3.0, 0.0)
    edit, train = edit_passes("mend", {"layers": [8, 9], "train_steps": 10}, False, 6, facts_layers)
    assert edit == 6 * (1 + 2 * 0.2) and train == 10 * (edit + 2 * 6 * 1.4 + 6)
    assert edit_passes("none", {}, False, 6, facts_layers) == (0.0, 0.0)


def test_plan_cell_time_is_flops_over_throughput_plus_decode_reads():
    facts = ModelFacts(1e9, 10, 8, 16)
    dev = DEVICES["a100"]
    work = CaseWork(edit_row=6, probe=100, decode=50, gen_tokens=500)
    cost = plan_cell("m", facts, "bfloat16", "ft", {"layer": 0, "num_steps": 2}, [work, work], dev)
    passes = 2 * 6 * 3 + 100 + 500
    want = 2e9 * passes / (dev.flops * dev.efficiency) + 50 * 2e9 / (dev.bandwidth * dev.decode_efficiency)
    assert cost.seconds_per_edit == pytest.approx(want) and cost.gpu_hours == pytest.approx(2 * want / 3600)
    assert cost.tflop_per_edit == pytest.approx(2e9 * passes / 1e12) and cost.memory_gb == pytest.approx(2.0)
    table = format_plan([cost, cost], dev, gpus=4)
    assert "assumed efficiencies" in table and f"{4 * want / 3600:.0f} device-hours" in table
