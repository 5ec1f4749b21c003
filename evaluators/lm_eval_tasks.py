"""PIQA OS/DOS as declarative lm-eval tasks (``evaluators/tasks/piqa_{os,dos}.yaml``, tag ``driftbench_piqa``).

These give the harness-standard view of OS/DOS (protocol ``lm-eval``: ``acc`` on summed log-probs, ``acc_norm`` on
log-probs divided by the choice's characters) next to the paper's per-token-mean OS/DOS that
`evaluators.scoring.ProbeScorer` feeds (reference-spec §2.3; design.md §5). Both tasks read the dataset stage's
``piqa.jsonl`` (``{"case_id", "goal", "right", "wrong", "edit_text"}`` per line).

From the command line (run in the repository root, where the YAMLs' relative ``data_files`` resolve)::

    lm_eval --model hf --model_args pretrained=models/smollm2-135m --include_path evaluators/tasks \
            --tasks driftbench_piqa

In process, `run_piqa` evaluates an already-loaded (possibly edited) model through ``lm_eval.evaluator.evaluate``.
lm-eval's request cache is never used: its key ignores the weights, so it would return stale scores after an edit.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PIQA_TASKS = ("piqa_os", "piqa_dos")
PIQA_TAG = "driftbench_piqa"
METRICS = ("acc", "acc_norm")


def task_manager():
    """A TaskManager that indexes only driftbench's tasks (the default index costs ~9 s per construction)."""
    import lm_eval.tasks  # explicit import: `import lm_eval` alone does not load the submodule (design.md §5)

    return lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def piqa_task_configs(data_file: str | os.PathLike) -> list[dict[str, Any]]:
    """The two task YAMLs as config dicts, with ``dataset_kwargs.data_files.test`` set to ``data_file`` (absolute).

    lm-eval builds a dict spec as a complete task config (it is not merged with the indexed YAML of the same
    name), so the YAML is read here and only the data file is replaced; the task names stay ``piqa_os`` /
    ``piqa_dos``. The YAMLs use plain YAML (no ``!function`` tags), so ``yaml.safe_load`` reads them fully.
    """
    path = Path(data_file).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"PIQA file {path} not found: build it with the dataset stage (`dvc repro dataset`)")
    configs = []
    for name in PIQA_TASKS:
        cfg = yaml.safe_load((TASKS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}), "data_files": {"test": str(path)}}
        configs.append(cfg)
    return configs


def _as_lm(model, tok, batch_size: int):
    """Wrap a HF model once in HFLM (BOS exactly when the tokenizer adds it, as in ProbeScorer); pass LMs through."""
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        return model
    import lm_eval.models.huggingface  # noqa: F401
    from lm_eval.models.huggingface import HFLM

    from evaluators.scoring import tokenizer_adds_bos

    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, add_bos_token=tokenizer_adds_bos(tok))


def run_piqa(model, tok, data_file: str | os.PathLike, limit: int | None = None, batch_size: int = 16,
             per_item: bool = False, tm=None) -> dict[str, dict[str, Any]]:
    """Evaluate ``piqa_os`` and ``piqa_dos`` on an in-memory model with lm-eval (``lm_eval.evaluator.evaluate``).

    ``model`` is a loaded ``PreTrainedModel`` (wrapped here in HFLM) or an already-built lm-eval ``LM`` (e.g.
    ``ProbeScorer.lm``, which sees in-place edits without re-wrapping; ``tok`` is then unused). The data file is
    passed by building both tasks from their YAML dicts with ``dataset_kwargs.data_files`` replaced
    (`piqa_task_configs`). ``limit`` keeps the first N items.

    Returns ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}``; with ``per_item`` each task
    also gets ``"items"``: ``[{"case_id", "acc", "acc_norm", "loglikelihoods": [right, wrong]}]`` in file order.
    """
    import lm_eval.evaluator

    lm = _as_lm(model, tok, batch_size)
    tm = tm or task_manager()
    task_dict = tm.load(piqa_task_configs(data_file))
    # cache_requests only caches request *construction*; the LM is never wrapped in CachingLM here.
    # bootstrap_iters > 0 only enables stderr: acc/acc_norm are means, whose stderr is closed-form.
    res = lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, limit=limit, cache_requests=False,
                                     log_samples=per_item, bootstrap_iters=1000)
    out: dict[str, dict[str, Any]] = {}
    for name in PIQA_TASKS:
        r = res["results"][name]
        row: dict[str, Any] = {}
        for m in METRICS:
            row[m] = float(r[f"{m},none"])
            se = r.get(f"{m}_stderr,none")
            row[f"{m}_stderr"] = float(se) if isinstance(se, (int, float)) else float("nan")
        row["n"] = int(res["n-samples"][name]["effective"])
        if per_item:
            row["items"] = [{"case_id": s["doc"]["case_id"], "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"]),
                             "loglikelihoods": [float(lp) for lp, _greedy in s["filtered_resps"]]}
                            for s in sorted(res["samples"][name], key=lambda s: s["doc_id"])]
        out[name] = row
    return out


ME_PPL_TASK = "me_ppl"


def me_ppl_task_config(corpus_file: str | os.PathLike) -> dict[str, Any]:
    """``tasks/me_ppl.yaml`` as a config dict with its data file replaced by ``corpus_file`` (absolute)."""
    path = Path(corpus_file).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"ME-PPL corpus {path} not found: set the data mirror (DRIFTBENCH_DATA_MIRROR)")
    cfg = yaml.safe_load((TASKS_DIR / f"{ME_PPL_TASK}.yaml").read_text(encoding="utf-8"))
    cfg["dataset_kwargs"] = {**(cfg.get("dataset_kwargs") or {}), "data_files": {"test": str(path)}}
    return cfg


def run_me_ppl(model, tok, corpus_file: str | os.PathLike, batch_size: int = 16, tm=None) -> dict[str, float]:
    """lm-eval's ``me_ppl`` task on an in-memory model (or LM): ``{"word_perplexity", "byte_perplexity",
    "bits_per_byte", "n"}``."""
    import lm_eval.evaluator

    lm = _as_lm(model, tok, batch_size)
    task_dict = (tm or task_manager()).load([me_ppl_task_config(corpus_file)])
    res = lm_eval.evaluator.evaluate(lm=lm, task_dict=task_dict, cache_requests=False, bootstrap_iters=0)
    r = res["results"][ME_PPL_TASK]
    out = {m: float(r[f"{m},none"]) for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")}
    out["n"] = int(res["n-samples"][ME_PPL_TASK]["effective"])
    return out
