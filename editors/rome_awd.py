"""ROME-AWD — the paper's ablation of ROME with *attention-weight optimisation disabled* (Appendix, Table 5).

ROME exactly as `editors/rome.py`, except that while v* is optimised the attention probabilities of every layer are
constants (`model_layer.attention.detached_attention`): the gradient reaches δ only through what attention *reads*
at the subject, never through *where* it looks. The edit can still move attention after it is written (the new MLP
output changes the keys); the ablation removes the optimiser's incentive to do so. Cannot run with SADR, whose loss
needs that gradient (`LocateEditor.check_hparams` refuses the pair). The paper compares ROME and ROME-AWD on easy and
hard edits; `driftbench ablation` makes that table from this cell's rows (`evaluators/analysis.easy_hard`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from editors.rome import Rome, RomeHparams


@dataclass
class RomeAWDHparams(RomeHparams):
    detach_attention: bool = True

    editor: ClassVar[str] = "ROME-AWD"


class RomeAWD(Rome):
    name = "rome_awd"
    hparams_cls = RomeAWDHparams
