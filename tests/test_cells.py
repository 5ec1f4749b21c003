"""The cell-id grammar (basis/cells.py), the one parser every room uses."""
from __future__ import annotations

import pytest

from basis.cells import BATCH, SEQUENTIAL, SINGLE, CellNameError, Mode, parse_cell, parse_cell_id


@pytest.mark.parametrize("name, editor, sadr, kind, size, timing, seed", [
    ("rome", "rome", False, SINGLE, 1, "each", None),
    ("memit+sadr.seq16", "memit", True, SEQUENTIAL, 16, "final", None),
    ("memit.seq16-each.s2", "memit", False, SEQUENTIAL, 16, "each", 2),
    ("memit+sadr.batch8.s1", "memit", True, BATCH, 8, "final", 1),
    ("my-edit_2+sadr", "my-edit_2", True, SINGLE, 1, "each", None),
])
def test_names_parse_and_print_back(name, editor, sadr, kind, size, timing, seed):
    c = parse_cell(name)
    assert (c.editor, c.sadr, c.mode.kind, c.mode.size, c.mode.timing, c.seed) == (editor, sadr, kind, size, timing,
                                                                                   seed)
    assert str(c) == name


@pytest.mark.parametrize("bad", ["", "rome+sadr+sadr", "../rome", "rome.seq0", "rome.seq", "rome.s", "rome sadr",
                                 "rome.batch4-each", "none+sadr", "none.seq4", "rome.s1.seq4", "rome\n", "rome.s01",
                                 "memit.seq016", "rome+steps+sadr", "rome+sadr+steps", "none+steps", 3, None])
def test_bad_names_are_one_line_errors(bad):
    with pytest.raises(CellNameError, match="cell"):
        parse_cell(bad)


def test_protocol_tags_say_the_evaluation_timing():
    assert Mode().protocol_tag == ""
    assert parse_cell("memit.seq16").mode.protocol_tag == "seq16-final"
    assert parse_cell("memit.seq16-each").mode.protocol_tag == "seq16-each"
    assert "after all 16 edits" in parse_cell("memit.seq16").mode.label


def test_full_ids_keep_slashes_of_hub_models():
    cid = parse_cell_id("paper/meta-llama/Meta-Llama-3-8B/memit+sadr.seq100")
    assert (cid.profile, cid.model, str(cid.name)) == ("paper", "meta-llama/Meta-Llama-3-8B", "memit+sadr.seq100")
    with pytest.raises(CellNameError):
        parse_cell_id("paper/rome")


def test_the_steps_matched_control_is_its_own_variant():
    c = parse_cell("rome+steps.s1")
    assert (c.editor, c.sadr, c.steps, c.seed) == ("rome", False, True, 1)
    assert (c.variant, c.config, str(c)) == ("rome+steps", "rome+steps", "rome+steps.s1")
    assert str(parse_cell("memit+steps.seq16")) == "memit+steps.seq16"
    assert not parse_cell("rome+sadr").steps and parse_cell("rome").variant == "rome"
