"""The canonical `Case`: one counterfactual edit request with every probe the benchmark scores.

Probe families and what is "right"/"wrong" for each (reference-spec §2.3, gotcha 2):

| field          | prompt                    | right target            | wrong target       | metric |
|----------------|---------------------------|-------------------------|--------------------|--------|
| (the edit)     | `prompt`                  | target_new              | target_true        | ES     |
| paraphrase     | CF paraphrase             | its target (target_new) | target_true        | PS     |
| subject_alias  | Wiki alias prompt         | its target (≈target_new)| target_true        | —      |
| reasoning      | Wiki multi-hop prompt     | its target              | target_true        | RES    |
| neighborhood   | CF other-subject prompt   | its target (target_true)| target_new         | NS/DNS |
| relation       | Wiki same-subject/other-r | its target (true answer)| target_new         | RS     |
| piqa           | PIQA goal                 | gold solution           | distractor         | OS/DOS |
| generation     | CF generation prompt      | (sampled; fluency)      |                    | FL     |

Empty probe lists stay empty: they contribute nothing to any metric (reference-spec §8 gotcha 5).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from basis.errors import UserError

SOURCES = ("counterfact", "wikidata")
TARGETED_FAMILIES = ("paraphrase", "subject_alias", "reasoning", "neighborhood", "relation")


class DatasetError(UserError, ValueError):
    """Invalid input data. The message names the record, the field and what to do about it."""


@dataclass(frozen=True)
class Probe:
    prompt: str
    target: str


@dataclass(frozen=True)
class PiqaItem:
    goal: str
    right: str
    wrong: str


@dataclass(frozen=True)
class Case:
    case_id: str
    source: str  # counterfact | wikidata
    subject: str
    prompt: str  # the filled edit prompt; contains `subject` exactly as written
    target_true: str
    target_new: str
    paraphrase: tuple[Probe, ...] = ()
    subject_alias: tuple[Probe, ...] = ()
    reasoning: tuple[Probe, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    relation: tuple[Probe, ...] = ()
    generation: tuple[str, ...] = ()
    piqa: PiqaItem | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)  # provenance (e.g. release index, Wikidata ids)

    @property
    def edit_text(self) -> str:
        """The distracting prefix of DNS/DOS without its trailing space: "{prompt} {target_new}." (spec §2.3)."""
        return f"{self.prompt} {self.target_new}."

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for fam in TARGETED_FAMILIES:
            d[fam] = [[p.prompt, p.target] for p in getattr(self, fam)]
        d["generation"] = list(self.generation)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "case") -> "Case":
        """Parse and validate one case; errors name `where` (record) and the field."""
        where = f"{where} ({d.get('case_id', '?')})" if isinstance(d, dict) else where
        if not isinstance(d, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(d).__name__}")

        def text(key: str) -> str:
            v = d.get(key)
            if not isinstance(v, str) or not v.strip():
                raise DatasetError(f"{where}: field '{key}' must be a non-empty string, got {v!r}")
            return v

        probes: dict[str, tuple[Probe, ...]] = {}
        for fam in TARGETED_FAMILIES:
            raw = d.get(fam, [])
            if not isinstance(raw, list):
                raise DatasetError(f"{where}: field '{fam}' must be a list of [prompt, target] pairs")
            out = []
            for i, pair in enumerate(raw):
                if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                        or not all(isinstance(x, str) and x.strip() for x in pair)):
                    raise DatasetError(f"{where}: field '{fam}[{i}]' must be [prompt, target] non-empty strings, got {pair!r}")
                out.append(Probe(pair[0], pair[1]))
            probes[fam] = tuple(out)
        gen = d.get("generation", [])
        if not isinstance(gen, list) or not all(isinstance(g, str) and g.strip() for g in gen):
            raise DatasetError(f"{where}: field 'generation' must be a list of non-empty strings")
        piqa = d.get("piqa")
        if piqa is not None:
            if not isinstance(piqa, dict) or not all(isinstance(piqa.get(k), str) and piqa[k].strip() for k in ("goal", "right", "wrong")):
                raise DatasetError(f"{where}: field 'piqa' must have non-empty strings goal, right, wrong")
            piqa = PiqaItem(piqa["goal"], piqa["right"], piqa["wrong"])
        source = text("source")
        if source not in SOURCES:
            raise DatasetError(f"{where}: field 'source' must be one of {SOURCES}, got {source!r}")
        case = cls(case_id=text("case_id"), source=source, subject=text("subject"), prompt=text("prompt"),
                   target_true=text("target_true"), target_new=text("target_new"), generation=tuple(gen),
                   piqa=piqa, meta=dict(d.get("meta") or {}), **probes)
        if case.subject not in case.prompt:
            raise DatasetError(f"{where}: field 'prompt' {case.prompt!r} does not contain field 'subject' {case.subject!r}")
        if case.target_new == case.target_true:
            raise DatasetError(f"{where}: fields 'target_new' and 'target_true' are equal ({case.target_new!r}); an edit must change the answer")
        return case
