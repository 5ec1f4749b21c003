"""Shared locate-then-edit core (reference-spec §4.1): ROME, MEMIT, PMET, AlphaEdit (IntAttn-Edit next).

Each equation lives once here:
- context templates: ``["{}"]`` + sampled prefixes (top-k = 5) from ["The", "Therefore", "Because", "I", "You"];
- subject-last-token positions; key averaging k̄ = mean_j k(x_j ⊕ prompt) at the subject's last token;
- target-vector optimisation: v* = v_init + δ minimising
  NLL(target | x_j ⊕ prompt, δ) + ω·KL(P_δ ‖ P_0)["{subject} is a"] + wd·‖δ‖/‖v_init‖² + Σ extra losses,
  with n iterations and n−1 Adam steps, early stop at total loss < 0.05, δ clamped to clamp·‖v_init‖; one δ per
  hooked site (PMET optimises two jointly, each with its own weight decay and clamp) and PMET's NLL schedule;
- the ROME rank-one update  u = C⁻¹k̄/‖C⁻¹k̄‖,  r = (v* − W k*)/(k*·u),  W ← W + r uᵀ;
- the MEMIT least-squares update  ΔW = R Kᵀ (λC + K Kᵀ)⁻¹  (float64 solve);
- grouped key averaging (MEMIT/PMET: per template group first, then across groups);
- the per-editor caches every locate-then-edit method shares: context templates and second moments C = E[k kᵀ].

Deliberate deviations from the reference (documented so numbers can be compared):
- target tokens are the continuation tokens of ``prompt + " " + target`` after ``prompt`` (the same split the
  lm-eval scorer uses) instead of tokenising ``" " + target`` alone with a model-name switch;
- rewriting rows are built at token level (context ids + target ids[:-1]), so labels sit exactly where the model
  predicts them (the reference re-tokenises the decoded string and assumes it splits the same way);
- only the logits at label and KL positions are computed (``logits_to_keep``): same values, less work;
- C⁻¹k̄ is a float64 linear solve rather than an fp32 inverse;
- the context templates are drawn from a seeded generator (the reference depends on the global RNG state).
"""
from __future__ import annotations

import contextlib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

import torch
import torch.nn.functional as F

from data_pipeline.schema import Case
from editors.base import Artefact, EditHandle, Editor, HparamsError
from model_layer.attention import attention_rows, detached_attention
from model_layer.batching import right_pad
from model_layer.hooks import capture, inject, replay_prefix

TEMPLATE_PREFIXES = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class EditRequest:
    """The edit prompt split around its (single) subject occurrence, so no ``str.format`` brace issues."""
    before: str
    subject: str
    after: str
    target_new: str

    @property
    def prompt(self) -> str:
        return self.before + self.subject + self.after


def make_request(case: Case) -> EditRequest:
    i = case.prompt.find(case.subject)
    if i < 0:
        raise ValueError(f"{case.case_id}: subject {case.subject!r} not in prompt {case.prompt!r}")
    return EditRequest(case.prompt[:i], case.subject, case.prompt[i + len(case.subject):], case.target_new)


def encode(tok, text: str) -> list[int]:
    """Token ids with the tokenizer's default special tokens (BOS where it adds one), like the reference."""
    return tok(text)["input_ids"]


def target_ids(tok, prompt: str, target: str) -> list[int]:
    """Continuation tokens of ``prompt + " " + target`` after ``prompt`` (lm-eval's split; see module doc)."""
    ctx = encode(tok, prompt)
    whole = encode(tok, prompt + " " + target)
    if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
        raise ValueError(f"tokenisation of {prompt!r} + {target!r} does not extend the prompt's tokens")
    return whole[len(ctx):]


def generate_context_templates(model, tok, lengths: Sequence[tuple[int, int]] = ((5, 10), (10, 10)),
                               seed: int = 0, sep: str = ". {}", brace_fill: str = "") -> list[str]:
    """``["{}"]`` + for each (length, n): n texts sampled top-k = 5 from the 5 prefixes (n/5 each), ``length``
    tokens in total including the prefix; braces removed (ROME) or replaced (MEMIT), then ``sep`` appended."""
    out = ["{}"]
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for length, n in lengths:
            per = max(1, n // len(TEMPLATE_PREFIXES))
            for prefix in TEMPLATE_PREFIXES:
                ids = torch.tensor([encode(tok, prefix)] * per, device=dev)
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                                     top_p=1.0, temperature=1.0, max_length=max(length, ids.shape[1] + 1),
                                     min_length=0, pad_token_id=tok.pad_token_id, eos_token_id=None)
                for g in gen:
                    text = tok.decode(g, skip_special_tokens=True)
                    out.append(text.replace("{", brace_fill).replace("}", brace_fill) + sep)
    return out


@dataclass
class Batch:
    """Right-padded rows. Rows ``[0, n_rewrite)`` are rewriting rows; the last row is the essence-KL row."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_idx: torch.Tensor  # [B] subject-last position per row (where δ is injected)
    query_idx: torch.Tensor  # [n_rewrite] last prompt token (predicts the first target token)
    label_pos: list[list[int]]  # per rewriting row: positions whose logits predict the target tokens
    labels: list[int]
    n_rewrite: int


def subject_rows(tok, req: EditRequest, templates: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Token ids of ``template ⊕ prompt`` per template and the subject's last-token index in each."""
    rows, idx = [], []
    for t in templates:
        head, tail = t.split("{}", 1)
        upto = head + req.before + req.subject
        rows.append(encode(tok, upto + req.after + tail))
        idx.append(len(encode(tok, upto)) - 1)
    return rows, idx


def build_batch(tok, req: EditRequest, templates: Sequence[str], device) -> Batch:
    tgt = target_ids(tok, req.prompt, req.target_new)
    prompt_rows, s_idx = subject_rows(tok, req, templates)
    rows, label_pos, q_idx = [], [], []
    for ids in prompt_rows:
        rows.append(ids + tgt[:-1])
        q_idx.append(len(ids) - 1)
        label_pos.append(list(range(len(ids) - 1, len(ids) - 1 + len(tgt))))
    kl_ids = encode(tok, req.subject + " is a")
    rows.append(kl_ids)
    s_idx.append(len(encode(tok, req.subject)) - 1)
    ids, mask = right_pad(rows, tok.pad_token_id)
    return Batch(ids.to(device), mask.to(device), torch.tensor(s_idx, device=device), torch.tensor(q_idx, device=device),
                 label_pos, tgt, len(prompt_rows))


class ExtraLoss(Protocol):
    """A term added to the target-vector loss. ``needs_attentions``: the loop then passes ``{layer: [N, H, T]}``,
    the attention probabilities of each rewriting row's query position (``batch.query_idx``, the token predicting
    the first target token) in every layer ``>= first_layer`` (model_layer.attention.attention_rows).
    Return None to add nothing at this step."""
    needs_attentions: bool
    first_layer: int

    def __call__(self, step: int, attentions: tuple[torch.Tensor, ...] | None, batch: Batch) -> torch.Tensor | None: ...


POSITIVE = ("v_num_grad_steps", "v_lr", "clamp_norm_factor", "sadr_steps", "stats_tokens", "stats_max_len",
            "nll_loss_factor", "L2", "nullspace_threshold", "mom2_update_weight", "num_steps", "lr", "norm_constraint")
NON_NEGATIVE = ("layer", "v_weight_decay", "kl_factor", "early_stop_loss", "sadr_gamma", "template_seed",
                "weight_decay", "stop_loss")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_type(editor: str, f, value: Any) -> None:
    """``value`` must have the field's type (an int is a float too; a list stands for a tuple)."""
    default = f.default if f.default is not MISSING else {"int": 0, "float": 0.0, "str": ""}.get(str(f.type))
    checks = ((bool, "true or false", lambda v: isinstance(v, bool)), (int, "an integer", _is_int),
              (float, "a number", lambda v: _is_int(v) or isinstance(v, float)), (str, "a string",
              lambda v: isinstance(v, str)), (tuple, "a list", lambda v: isinstance(v, (list, tuple))))
    for typ, want, ok in checks:
        if isinstance(default, typ):
            if not ok(value):
                raise HparamsError(f"{editor} hparams {f.name!r} must be {want}, got {value!r}")
            return


@contextlib.contextmanager
def only_grad(model: torch.nn.Module, params=()):
    """For the block, no parameter of ``model`` requires grad except ``params``: backward then skips every frozen
    weight's gradient (×1.55 per v* step on SmolLM2) and nothing but ``params`` can change. Every flag is put back
    afterwards, whatever happens. Every editor's optimisation loop runs inside it."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class Hparams:
    """What every editor's hyper-parameter dataclass shares: `from_dict` refuses unknown names, missing required
    ones, wrong types and out-of-range values (POSITIVE, NON_NEGATIVE), each as one line naming the field."""
    editor: ClassVar[str] = "editor"
    required: ClassVar[dict[str, str]] = {}  # field -> what it is, for the error message

    def edit_layers(self) -> tuple[int, ...]:
        """The layers whose weights the editor writes (checked against the model before any run): ``layers``, or
        ``layer``, or none."""
        if hasattr(self, "layers"):
            return tuple(self.layers)
        return (self.layer,) if hasattr(self, "layer") else ()

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in fields(cls)} - cls.derived()
        unknown = set(d) - names - {"sadr"}
        if unknown:
            raise HparamsError(f"unknown {cls.editor} hyper-parameter(s) {sorted(unknown)}; known: {sorted(names)}")
        for name, what in cls.required.items():
            if name not in d:
                raise HparamsError(f"{cls.editor} needs hparams {name!r} ({what})")
        kw = {k: v for k, v in d.items() if k in names}
        for f in fields(cls):
            if f.name in kw:
                _check_type(cls.editor, f, kw[f.name])
        hp = cls(**cls.derive(cls.normalise(kw)))
        for name in POSITIVE:
            if hasattr(hp, name) and not getattr(hp, name) > 0:
                raise HparamsError(f"{cls.editor} hparams {name!r} must be > 0, got {getattr(hp, name)!r}")
        for name in NON_NEGATIVE:
            if hasattr(hp, name) and not getattr(hp, name) >= 0:
                raise HparamsError(f"{cls.editor} hparams {name!r} must be >= 0, got {getattr(hp, name)!r}")
        return hp

    @classmethod
    def normalise(cls, kw: dict[str, Any]) -> dict[str, Any]:
        """Check and convert field values beyond their type (LocateHparams: template_lengths)."""
        return kw

    @classmethod
    def derived(cls) -> set[str]:
        """Fields computed from others (not settable)."""
        return set()

    @classmethod
    def derive(cls, kw: dict[str, Any]) -> dict[str, Any]:
        return kw


@dataclass
class VHparams(Hparams):
    layer: int
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    # PMET's schedule (spec §4.1): while every label is the argmax, the NLL is weighted 0.1·nll_loss_factor at the
    # next step, and the loop stops once the weighted essence KL is <= 0.01 in that state
    nll_loss_factor: float = 1.0
    argmax_schedule: bool = False
    # the paper's ROME-AWD ablation: the v* loop sees attention probabilities as constants (no gradient through
    # *where* attention looks; model_layer.attention.detached_attention); cannot be combined with SADR
    detach_attention: bool = False


@dataclass
class LocateHparams(VHparams):
    """What every locate-then-edit editor shares: target-vector loop, context templates, SADR, statistics."""
    template_lengths: tuple = ((5, 10), (10, 10))
    template_seed: int = 0
    template_brace_fill: str = ""  # "{" and "}" in sampled templates: deleted (ROME) or replaced by a space (MEMIT)
    # SADR (used only when hparams["sadr"] is true): γ = CLI weight × 1e-4 in the reference; steps replace v_num_grad_steps
    sadr_gamma: float = 1e-2
    sadr_steps: int = 80
    sadr_hinge: bool = True
    # second-moment statistics
    stats_dir: str = "stats"
    stats_corpus: str = "../shared/data/wikitext-2-raw/wiki.test.raw"
    stats_tokens: int = 100_000
    stats_max_len: int = 1024
    model_id: str = ""

    editor: ClassVar[str] = "locate-then-edit"

    @classmethod
    def normalise(cls, kw: dict[str, Any]) -> dict[str, Any]:
        if "template_lengths" in kw:
            tl = kw["template_lengths"]
            if not tl or not all(isinstance(x, (list, tuple)) and len(x) == 2 and all(_is_int(y) and y > 0 for y in x)
                                 for x in tl):
                raise HparamsError(f"{cls.editor} hparams 'template_lengths' must be a list of [length, count] pairs "
                                   f"of positive integers, got {tl!r}")
            kw["template_lengths"] = tuple(tuple(x) for x in tl)
        return kw

    def template_groups(self) -> list[int]:
        """Sizes of the template groups: the bare ``"{}"`` then one group per (length, n)."""
        return [1] + [n for _, n in self.template_lengths]


class LocateEditor(Editor):
    """What locate-then-edit editors share: capabilities, hparams checks, second-moment artefacts, caches of
    context templates per (model, settings) and C per layer, and the edit itself in two steps: `targets` (every
    case's v*, optimised together in one batched loop, SADR's term from the framework) then `write` (the editor's
    own weight update, which a subclass implements)."""
    capabilities = frozenset({"sadr", "sequential"})
    undo = "weights"
    hparams_cls: ClassVar[type[LocateHparams]] = LocateHparams
    # where δ enters layer ``hp.layer``: "mlp" (ROME), "block" (MEMIT's z), or several sites optimised jointly
    # (PMET: ("mlp_out", "attn_out")); the first site's v* is the one `write` gets as ``VResult.v_star``
    target_at: ClassVar[str | tuple[str, ...]] = "mlp"

    def check_hparams(self, model, hparams: dict[str, Any]) -> None:
        super().check_hparams(model, hparams)
        if hparams.get("sadr") and self.hparams_cls.from_dict(hparams).detach_attention:
            raise HparamsError(f"{self.name}: detach_attention (the ROME-AWD ablation) cannot run with SADR, whose "
                               "loss needs the attention's gradient; drop one of them")

    def targets(self, model, tok, cases: Sequence[Case], hp: LocateHparams, ctx) -> list["VResult"]:
        """v* of every case on the model as it is now, in one batched loop (optimise_targets)."""
        from model_layer.arch import arch_for

        dev = next(model.parameters()).device
        templates = self.templates(model, tok, hp)
        batches = [build_batch(tok, make_request(c), templates, dev) for c in cases]
        extras = [ctx.extra_losses(first_layer=hp.layer + 1) for _ in cases]  # SADR's term on a +sadr cell
        vhp = replace(hp, v_num_grad_steps=hp.sadr_steps) if ctx.sadr_step_count else hp
        sites = (self.target_at,) if isinstance(self.target_at, str) else self.target_at
        arch = arch_for(model)
        return optimise_targets(model, batches, [arch.layer(s, hp.layer) for s in sites], vhp, extras)

    def write(self, model, tok, cases: list[Case], results: list["VResult"], hp: LocateHparams,
              ctx) -> EditHandle:
        """Apply the weight update that maps each case's key to its v*; returns the handle (diagnostics set).
        ``ctx`` holds the unit's earlier edits (AlphaEdit protects their keys in a stream)."""
        raise NotImplementedError

    def _write_timed(self, model, tok, cases, results, hp, ctx, optimise_s: float, **extra) -> EditHandle:
        import time

        t0 = time.perf_counter()
        handle = self.write(model, tok, cases, results, hp, ctx)
        handle.timings = {"optimise_s": optimise_s, "write_s": time.perf_counter() - t0, **extra,
                          "step_s": [x for r in results for x in r.step_seconds], **handle.timings}
        return handle

    def _targets_timed(self, model, tok, cases, hparams, ctx):
        import time

        self.check_hparams(model, hparams)  # every edited layer exists
        hp = self.hparams_cls.from_dict(hparams)
        t0 = time.perf_counter()
        results = self.targets(model, tok, cases, hp, ctx)
        return hp, results, time.perf_counter() - t0

    def apply(self, model, tok, cases: list[Case], hparams: dict[str, Any], ctx) -> EditHandle:
        hp, results, seconds = self._targets_timed(model, tok, cases, hparams, ctx)
        return self._write_timed(model, tok, cases, results, hp, ctx, seconds)

    def apply_each(self, model, tok, cases: list[Case], hparams: dict[str, Any], ctx):
        hp, results, seconds = self._targets_timed(model, tok, cases, hparams, ctx)
        for case, res in zip(cases, results):
            yield self._write_timed(model, tok, [case], [res], hp, ctx, seconds / len(cases), group=len(cases))

    def statistics_modules(self, model, hp: LocateHparams) -> list[str]:
        """The modules whose input second moment C the editor needs: the down-projection of every edited layer
        (IntAttn-Edit adds the attention output projections)."""
        from model_layer.arch import arch_for

        return [arch_for(model).layer("mlp_out", layer) for layer in hp.edit_layers()]

    def artefacts(self, model, tok, hparams: dict[str, Any]) -> list[Artefact]:
        """The second-moment file of every module of `statistics_modules` (made by `driftbench stats`)."""
        hp = self.hparams_cls.from_dict(hparams)
        return [Artefact("second_moment", str(Path(hp.stats_dir) / self.stats_key(model, m, hp)[0].filename()),
                         "driftbench stats") for m in self.statistics_modules(model, hp)]

    def prepare(self, model, tok, hparams: dict[str, Any], progress: bool = True) -> list[str]:
        """Compute (or find) C for every module of `statistics_modules`; returns what each file holds."""
        from editors.stats import stats_report

        hp, done = self.hparams_cls.from_dict(hparams), []
        for module in self.statistics_modules(model, hp):
            self.covariance(model, tok, module, hp, progress=progress)
            path = Path(hp.stats_dir) / self.stats_key(model, module, hp)[0].filename()
            r = stats_report(path)
            ran_out = f" (the corpus ran out before {r['requested']:,})" if r["exhausted"] else ""
            done.append(f"{path.name}: {r['count']:,} tokens{ran_out}, dim {r['dim']}, eigenvalues "
                        f"{r['eig_min']:.3g}..{r['eig_max']:.3g}, {r['n_eig_below_1e-6']} below 1e-6 of the largest")
        return done

    def __init__(self) -> None:
        self._templates: dict[tuple, list[str]] = {}
        self._cov: dict[Any, Any] = {}

    def templates(self, model, tok, hp: LocateHparams) -> list[str]:
        key = (id(model), hp.template_lengths, hp.template_seed, hp.template_brace_fill)
        if key not in self._templates:
            self._templates[key] = generate_context_templates(model, tok, hp.template_lengths, hp.template_seed,
                                                              brace_fill=hp.template_brace_fill)
        return self._templates[key]

    @staticmethod
    def stats_key(model, module: str, hp: LocateHparams):
        """The content key of C for ``module`` and a function giving its corpus texts.

        ``stats_corpus`` is a WikiText raw file (cut into ``stats_max_len`` windows), or ``hub:wikipedia`` /
        ``hub:wikitext-103`` (paper profile; samples truncated as the reference does; needs the `datasets` hub)."""
        from editors.stats import StatsKey, corpus_sha256, hub_corpus, wikitext_articles

        if hp.stats_corpus.startswith("hub:"):
            name = hp.stats_corpus[4:]
            corpus_id, texts, split = hp.stats_corpus, (lambda: hub_corpus(name)), "truncate"
        else:
            if not Path(hp.stats_corpus).is_file():
                raise FileNotFoundError(f"stats corpus {hp.stats_corpus} not found: set the data mirror "
                                        "(DRIFTBENCH_DATA_MIRROR) or hparams 'stats_corpus'")
            corpus_id, texts, split = (corpus_sha256(hp.stats_corpus), (lambda: wikitext_articles(hp.stats_corpus)),
                                       "windows")
        key = StatsKey(model_id=hp.model_id or str(getattr(model, "name_or_path", "")), module=module,
                       corpus_sha256=corpus_id, max_tokens=hp.stats_tokens, max_len=hp.stats_max_len, split=split)
        return key, texts

    def covariance(self, model, tok, module: str, hp: LocateHparams, progress: bool = False):
        """C for ``module`` from ``hp.stats_dir`` (a DVC output), computed, checked and saved there if missing; kept
        on the model's device, so a GPU receives each layer's C once, not once per edit."""
        from editors.stats import load_or_compute

        key, texts = self.stats_key(model, module, hp)
        dev = next(model.parameters()).device
        if (key, dev) not in self._cov:
            self._cov[(key, dev)] = load_or_compute(hp.stats_dir, key, model, tok, texts, progress=progress).to(dev)
        return self._cov[(key, dev)]


@dataclass
class VResult:
    v_star: torch.Tensor
    v_init: torch.Tensor
    steps: int
    losses: list[dict[str, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)  # what the extra losses report (SADR's selected heads)
    # the other hooked sites of a joint optimisation (PMET's attention output): module -> (v_init, v*)
    others: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def optimise_target(model, batch: Batch, hook_module: str | Sequence[str], hp: VHparams,
                    extra_losses: Sequence[ExtraLoss] = (), all_logits: bool = False,
                    prefix_cache: bool = True) -> VResult:
    """The target-vector loop of ROME/MEMIT/PMET (spec §4.1 step 5) for one edit; see `optimise_targets`."""
    return optimise_targets(model, [batch], hook_module, hp, [extra_losses], all_logits, prefix_cache)[0]


def site_layer(model, module_name: str) -> tuple[int, str]:
    """(layer, kind) of a module where δ may enter: a block, an MLP, a down-projection or an attention output."""
    from model_layer.arch import arch_for

    arch = arch_for(model)
    for i in range(arch.n_layers(model.config)):
        for kind in ("block", "mlp", "mlp_out", "attn_out"):
            if arch.layer(kind, i) == module_name:
                return i, kind
    raise ValueError(f"{module_name!r} is not a block, MLP, down-projection or attention output of the model")


def stack_batches(batches: Sequence[Batch]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """input_ids and attention_mask of every batch's rows, right-padded to the longest, and each batch's first row."""
    width = max(b.input_ids.shape[1] for b in batches)
    ids = torch.cat([F.pad(b.input_ids, (0, width - b.input_ids.shape[1])) for b in batches])
    mask = torch.cat([F.pad(b.attention_mask, (0, width - b.attention_mask.shape[1])) for b in batches])
    offsets = [0]
    for b in batches[:-1]:
        offsets.append(offsets[-1] + b.input_ids.shape[0])
    return ids, mask, offsets


def optimise_targets(model, batches: Sequence[Batch], hook_module: str | Sequence[str], hp: VHparams,
                     extra_losses: Sequence[Sequence[ExtraLoss]] | None = None, all_logits: bool = False,
                     prefix_cache: bool = True) -> list[VResult]:
    """The target-vector loop for k independent edits at once (k = len(batches)): every case's rows stacked in one
    forward/backward, case i's δ_i added only in its own rows, its own loss (NLL + KL + weight decay + its extra
    losses), its own Adam state, clamp and early stop (a stopped case's δ is frozen while the others go on). Rows
    never interact, so each v*_i equals its one-case run up to float rounding (tests/test_batched_edits.py); k = 1
    is the one-case loop.

    ``hook_module`` is layer L's MLP or block, or several modules of layer L (PMET: its down-projection and
    attention output), each with its own δ, weight decay wd·‖δ_s‖/‖v_init,s‖² and clamp, one Adam step for all.
    With ``prefix_cache``, the blocks below the change run once, at step 0 (δ = 0), and later steps replay their
    cached output (model_layer.hooks.replay_prefix): for an MLP whose output enters the residual stream as is, or a
    block, blocks 0..L and δ added to block L's output (equal up to float rounding); for sites inside block L,
    blocks 0..L−1. ``all_logits`` computes the logits at every position, as the reference does (same values).
    Both switches exist for bench/bench_vstep.py. ``hp.argmax_schedule`` adds PMET's NLL schedule (VHparams)."""
    import time

    from model_layer.arch import arch_for

    k = len(batches)
    extra_losses = [list(e) for e in (extra_losses or [()] * k)]
    if len(extra_losses) != k:
        raise ValueError(f"{len(extra_losses)} lists of extra losses for {k} batches")
    dev = batches[0].input_ids.device
    names = [hook_module] if isinstance(hook_module, str) else list(hook_module)
    modules = [model.get_submodule(n) for n in names]
    arch = arch_for(model)
    where = [site_layer(model, n) for n in names]
    layer = where[0][0]
    if any(w[0] != layer for w in where) or len(set(names)) != len(names):
        raise ValueError(f"δ sites {names} must be distinct modules of one layer")
    # blocks 0..L replayed with δ added to block L's output (one site: the block, or an MLP adding to the residual),
    # else blocks 0..L−1 replayed and block L run with δ at its sites
    through_block = len(names) == 1 and (where[0][1] == "block" or (where[0][1] == "mlp" and arch.mlp_adds_to_residual))
    top = layer if through_block else layer - 1
    blocks = [model.get_submodule(arch.layer("block", i)) for i in range(top + 1)]
    every_extra = [e for es in extra_losses for e in es]
    # not when an extra loss reads attention rows of the replayed blocks
    prefix_cache = (prefix_cache and top >= 0
                    and all(e.first_layer > top for e in every_extra if e.needs_attentions))
    cached: list[torch.Tensor] = []

    input_ids, attention_mask, offsets = stack_batches(batches)
    n_rows = [b.input_ids.shape[0] for b in batches]
    row_case = torch.tensor([i for i, n in enumerate(n_rows) for _ in range(n)], device=dev)
    rows = torch.arange(input_ids.shape[0], device=dev)
    subject_idx = torch.cat([b.subject_idx for b in batches])
    kl_rows = [o + n - 1 for o, n in zip(offsets, n_rows)]
    # logits only where needed: label positions of every rewriting row + each KL row's subject position
    keep = sorted({p for b in batches for ps in b.label_pos for p in ps}
                  | {int(subject_idx[r]) for r in kl_rows})
    col = {p: j for j, p in enumerate(keep)}
    keep_t = torch.tensor(keep, device=dev)
    lab = []  # per case: (rows, cols, ids) of its label log-probs
    for o, b in zip(offsets, batches):
        lab.append((torch.tensor([o + r for r, ps in enumerate(b.label_pos) for _ in ps], device=dev),
                    torch.tensor([col[p] for ps in b.label_pos for p in ps], device=dev),
                    torch.tensor([t for ps in b.label_pos for t in b.labels[: len(ps)]], device=dev)))
    kl_cols = [col[int(subject_idx[r])] for r in kl_rows]

    d_model = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    n_sites = len(names)
    # deltas[i][s]: case i's δ at site s (one Adam over a case's δs, as PMET's single optimiser over both)
    deltas = [[torch.zeros(d_model, dtype=torch.float32, device=dev, requires_grad=True) for _ in names]
              for _ in batches]
    opts = [torch.optim.Adam(ds, lr=hp.v_lr) for ds in deltas]
    v_init: list[list[torch.Tensor]] = [[] for _ in names]  # per site, per case

    def first(site):
        def read(hs):  # the site's unchanged output at the subject's last token of each case's first row
            v_init[site].extend(hs[o, subject_idx[o]].detach().float().clone() for o in offsets)
        return read

    def delta_rows(site):
        return lambda: torch.stack([ds[site] for ds in deltas])[row_case]  # [rows, d]: case i's δ in its rows

    need_attn = bool(every_extra) and any(e.needs_attentions for e in every_extra)
    q_off = [sum(b.n_rewrite for b in batches[:i]) for i in range(k)]
    if need_attn:  # rows of the rewriting prompts' query positions, beside the model's own forward
        q_rows = torch.tensor([o + j for o, b in zip(offsets, batches) for j in range(b.n_rewrite)], device=dev)
        attn_ctx = attention_rows(model, q_rows, torch.cat([b.query_idx for b in batches]),
                                  min(e.first_layer for e in every_extra if e.needs_attentions))
    elif hp.detach_attention:
        attn_ctx = detached_attention(model)
    else:
        attn_ctx = contextlib.nullcontext({})
    losses: list[list[dict[str, float]]] = [[] for _ in batches]
    step_s: list[float] = []
    done: dict[int, int] = {}  # case -> steps it ran
    kl_init: list[torch.Tensor] = []
    nll_factor = [hp.nll_loss_factor] * k
    with only_grad(model):  # gradients flow only to δ
        with attn_ctx as attn:
            for it in range(hp.v_num_grad_steps):
                t0 = time.perf_counter()
                for o in opts:
                    o.zero_grad()
                with contextlib.ExitStack() as stack:
                    if cached:  # the blocks below replayed
                        stack.enter_context(replay_prefix(blocks, cached[0]))
                    if cached and through_block:  # δ added to block L's output
                        stack.enter_context(inject(blocks[-1], rows, subject_idx, delta_rows(0)))
                    else:
                        for s_, m_ in enumerate(modules):
                            stack.enter_context(inject(m_, rows, subject_idx, delta_rows(s_),
                                                       on_first=None if cached else first(s_)))
                        if prefix_cache and not cached:
                            cap = stack.enter_context(capture(blocks[-1]))
                    out = model(input_ids=input_ids, attention_mask=attention_mask,
                                logits_to_keep=0 if all_logits else keep_t, use_cache=False)
                if prefix_cache and not cached:
                    if cap["tuple"]:  # replay returns bare hidden states: only for blocks that do the same
                        prefix_cache = False
                    else:
                        cached.append(cap["out"])  # block L's output at δ = 0 (step 0)
                logp = F.log_softmax((out.logits[:, keep_t] if all_logits else out.logits).float(), dim=-1)
                if not kl_init:
                    kl_init.extend(logp[r, c].detach().clone().unsqueeze(0) for r, c in zip(kl_rows, kl_cols))
                total = None
                for i, b in enumerate(batches):
                    if i in done:
                        continue
                    lr_, lc, li = lab[i]
                    nll = -nll_factor[i] * logp[lr_, lc, li].sum() / (len(b.labels) * b.n_rewrite)
                    kl = hp.kl_factor * F.kl_div(kl_init[i], logp[kl_rows[i], kl_cols[i]].unsqueeze(0),
                                                 log_target=True, reduction="batchmean")
                    wd = hp.v_weight_decay * sum(d.norm() / v_init[s_][i].norm() ** 2 for s_, d in enumerate(deltas[i]))
                    loss = nll + kl + wd
                    parts = {"nll": nll.item(), "kl": kl.item(), "wd": wd.item()}
                    for extra in extra_losses[i]:
                        own = ({layer_: a[q_off[i]: q_off[i] + b.n_rewrite] for layer_, a in attn.items()}
                               if extra.needs_attentions else None)
                        term = extra(it, own, b)
                        if term is not None:
                            loss = loss + term
                            parts[type(extra).__name__] = term.item()
                    parts["total"] = loss.item()
                    losses[i].append(parts)
                    stop = loss.item() < hp.early_stop_loss
                    if hp.argmax_schedule and not stop:  # PMET: every label is the argmax → relax the NLL
                        argmax = bool((logp[lr_, lc].argmax(-1) == li).all())
                        nll_factor[i] = hp.nll_loss_factor * (0.1 if argmax else 1.0)
                        stop = argmax and kl.item() <= 0.01
                    if stop or it == hp.v_num_grad_steps - 1:
                        done[i] = it + 1  # no update at the step that stops it (the one-case loop's break)
                    else:
                        total = loss if total is None else total + loss
                if total is None:  # every case has stopped
                    step_s.append(time.perf_counter() - t0)
                    break
                total.backward()  # rows never interact: ∂total/∂δ_i = ∂loss_i/∂δ_i
                for i, (ds, o) in enumerate(zip(deltas, opts)):
                    if i in done:
                        continue
                    o.step()
                    with torch.no_grad():
                        for s_, d in enumerate(ds):
                            max_norm = hp.clamp_norm_factor * v_init[s_][i].norm()
                            if d.norm() > max_norm:
                                d.mul_(max_norm / d.norm())
                step_s.append(time.perf_counter() - t0)
    return [VResult(v_star=(v_init[0][i] + deltas[i][0]).detach(), v_init=v_init[0][i], steps=done[i],
                    losses=losses[i], step_seconds=step_s[: done[i]],
                    notes={key: v for e in extra_losses[i] for key, v in getattr(e, "notes", dict)().items()},
                    others={names[s_]: (v_init[s_][i], (v_init[s_][i] + deltas[i][s_]).detach())
                            for s_ in range(1, n_sites)})
            for i in range(k)]


@torch.no_grad()
def module_io_at(model, module_name: str, rows: list[list[int]], idx: Sequence[int], pad_id: int):
    """Inputs and outputs of ``module_name`` at token ``idx[i]`` of row ``i`` → ([R, d_in], [R, d_out]) fp32."""
    dev = next(model.parameters()).device
    ids, mask = right_pad(rows, pad_id)
    with capture(model.get_submodule(module_name)) as cap:  # a block may get its input as a keyword: "in" None
        model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    r = torch.arange(len(rows), device=dev)
    i = torch.tensor(list(idx), device=dev)
    return (None if cap["in"] is None else cap["in"][r, i].float()), cap["out"][r, i].float()


def grouped_mean(keys: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Mean per consecutive group of rows, then the mean of those means (MEMIT/PMET key averaging, spec §4.3):
    with groups [bare] + [5 templates] the bare prompt weighs 1/2 and each template 1/10."""
    if sum(sizes) != keys.shape[0]:
        raise ValueError(f"group sizes {list(sizes)} do not add up to {keys.shape[0]} keys")
    return torch.stack([g.mean(0) for g in torch.split(keys, list(sizes))]).mean(0)


def rank_one_direction(c: torch.Tensor, k_mean: torch.Tensor) -> torch.Tensor:
    """ROME's left vector u = C⁻¹k̄ / ‖C⁻¹k̄‖ (spec §4.2), solved in float64."""
    u = torch.linalg.solve(c.double(), k_mean.double()).float()
    return u / u.norm()


def rank_one_update(weight: torch.nn.Parameter, u: torch.Tensor, v_star: torch.Tensor, k_star: torch.Tensor,
                    out_star: torch.Tensor) -> torch.Tensor:
    """W ← W + r uᵀ with r = (v* − out*)/(k*·u), so the module maps k* exactly to v* (nn.Linear layout [out, in])."""
    r = (v_star - out_star) / torch.dot(k_star, u)
    delta_w = torch.outer(r, u)
    with torch.no_grad():
        weight.add_(delta_w.to(weight.dtype))
    return delta_w


def least_squares_update(c: torch.Tensor, k: torch.Tensor, resid: torch.Tensor, lam: float) -> torch.Tensor:
    """MEMIT's ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ in float64 (spec §4.3). One edit: ``k`` [d_in] and ``resid`` [d_out]; a batch
    of n edits: ``k`` [n, d_in] and ``resid`` [n, d_out] (K and R hold them as columns). Returns ΔW in nn.Linear
    layout [d_out, d_in], fp32."""
    k64 = k.double().reshape(-1, 1) if k.dim() == 1 else k.double().T.contiguous()  # K [d_in, n]
    adj_k = torch.linalg.solve(lam * c.double() + k64 @ k64.T, k64)  # (λC + KKᵀ)⁻¹ K, symmetric system
    r64 = resid.double().reshape(-1, 1) if resid.dim() == 1 else resid.double().T.contiguous()  # R [d_out, n]
    return (r64 @ adj_k.T).float()
