"""The harness's methods: ours through lowrank_rs's registry, the peers through PEFT's own API, and the baselines.

Each entry is one line of :data:`ENTRIES`: a name, a title, its family, its learning-rate grid and a ``build``
function that turns a freshly loaded classification model into the model to train (plus, for AdaLoRA, the per-step
call its library needs). Every entry trains through the same loop (:func:`lowrank_rs.train`: AdamW, 10% warmup then
cosine, batch 16, clip 1.0), on the same data and seeds, so the rows differ only in the method.

Budgets: "r = 8" rows have LoRA r = 8's parameter count on every linear of the transformer blocks (N modules).
TLoRA's ``A`` is frozen, so "TLoRA 8·N" has LoRA r = 8's rank budget at half its trainable parameters, and
"TLoRA 16·N" about LoRA r = 8's parameters. AdaLoRA starts at r = 12 and prunes to an average of 8 (PEFT's advice
of 1.5×). EVA redistributes its rank budget (ρ = 2) at the same total. PiSSA uses α = r (its paper's scale).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import lowrank_rs as lr

OnStep = Optional[Callable[[int], None]]


@dataclasses.dataclass
class Context:
    """What a build needs: the fresh model, its targets, calibration batches and the run's schedule."""

    model: torch.nn.Module
    seed: int
    targets: List[str]
    heads: List[str]
    n_modules: int
    calibration: List[Dict[str, torch.Tensor]]  # collated batches of the training set's first examples
    total_steps: int
    options: Dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    title: str
    family: str  # "ours", "peer" or "baseline"
    lrs: Tuple[float, ...]
    build: Callable[[Context], Tuple[torch.nn.Module, OnStep]]
    multitask: bool = False  # takes task ids (TA-LoRA) rather than a task prefix in the text
    prompt: bool = False  # a prompt-style method (its own rows in the multi-task tables)
    calibration_examples: int = 64  # training examples a data-aware init may read
    epochs_factor: int = 1  # a schedule-length variant trains this many times the study's epochs
    base: Optional[str] = None  # a variant runs at the rate this method chose (in a study with ``rate_from``)
    init: bool = False  # one of PEFT's (data-aware) initialisations of LoRA: TLoRA's closest peers


LORA_LRS = (3e-4, 1e-3, 3e-3)
TLORA_LRS = (1e-4, 3e-4, 1e-3)
FULL_LRS = (2e-5, 5e-5, 1e-4)
HEAD_LRS = (1e-3, 3e-3, 1e-2)
PROMPT_LRS = (3e-3, 1e-2, 3e-2)


def _freeze_but_heads(model: torch.nn.Module, heads: Sequence[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(h + ".") for h in heads))


# -- baselines -------------------------------------------------------------------------------------------------------


def _full(ctx: Context):
    return ctx.model, None


def _head(ctx: Context):
    _freeze_but_heads(ctx.model, ctx.heads)
    return ctx.model, None


# -- ours ------------------------------------------------------------------------------------------------------------


def _lora(r: int):
    def build(ctx: Context):
        config = lr.LoraConfig(
            target_modules=ctx.targets, r=r, alpha=2 * r, modules_to_save=ctx.heads, init_seed=ctx.seed
        )
        return lr.attach(ctx.model, config), None

    return build


def _dora(ctx: Context):
    config = lr.DoraConfig(target_modules=ctx.targets, r=8, alpha=16, modules_to_save=ctx.heads, init_seed=ctx.seed)
    return lr.attach(ctx.model, config), None


def _tlora(budget_rank: int, **fields: Any):
    # The rows are the paper's TLoRA (the reference's score) unless a variant names another score; the runs on disk
    # were made so before the default became "fisher".
    fields = {"score": "reference", **fields}

    def build(ctx: Context):
        config = lr.TLoraConfig(
            target_modules=ctx.targets, r=8, alpha=16, budget=budget_rank * ctx.n_modules, modules_to_save=ctx.heads,
            init_seed=ctx.seed, num_examples=sum(len(b["input_ids"]) for b in ctx.calibration), **fields,
        )  # fmt: skip
        plan = lr.calibrate(ctx.model, ctx.calibration, config, progress=False)
        return lr.attach(ctx.model, plan), None

    return build


def _tlora_free_a(budget_rank: int):
    # Item 7's option: A starts from the calibration's subspace, frozen through the warm-up (10% of the steps), then
    # trains like LoRA's; the trainable parameters are LoRA r = 8's at budget 8·N.
    def build(ctx: Context):
        return _tlora(budget_rank, train_a_after=max(1, ctx.total_steps // 10))(ctx)

    return build


def _loratrf(ctx: Context):
    config = lr.TrfConfig(r=8, alpha=16, modules_to_save=ctx.heads, init_seed=ctx.seed, task_vector_init="mean")
    return lr.attach(ctx.model, config, batches=ctx.calibration), None


def _talora_variant(**fields: Any):
    def build(ctx: Context):
        return _talora(ctx, **fields)

    return build


def _talora(ctx: Context, fast_ratio: float = 10.0, **fields: Any):
    # One learning rate names both of TA-LoRA's: the slow rate (shared θ0, B, gates) and the fast rate (each task's
    # u, v) keep the default ratio of 10 (a variant changes it), and the sweep scales both; TrainConfig.lr then
    # drives only the head.
    slow = ctx.options["lr"]
    config = lr.TaLoraConfig(
        tasks=list(ctx.options["tasks"]), modules_to_save=ctx.heads, init_seed=ctx.seed, slow_lr=slow,
        fast_lr=slow * fast_ratio, **fields,
    )  # fmt: skip
    return lr.attach(ctx.model, config), None


# -- peers (PEFT) ----------------------------------------------------------------------------------------------------


def _peft_lora(init: Any = True, r: int = 8, alpha: Optional[int] = None, **extra: Any):
    def build(ctx: Context):
        import peft

        config = peft.LoraConfig(
            task_type="SEQ_CLS", target_modules=ctx.targets, r=r, lora_alpha=alpha or 2 * r,
            modules_to_save=ctx.heads, init_lora_weights=init, **extra,
        )  # fmt: skip
        torch.manual_seed(ctx.seed)
        return peft.get_peft_model(ctx.model, config), None

    return build


def _inputs(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def _eva(ctx: Context):
    import peft

    config = peft.LoraConfig(
        task_type="SEQ_CLS", target_modules=ctx.targets, r=8, lora_alpha=16, modules_to_save=ctx.heads,
        init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0, use_label_mask=False),
    )  # fmt: skip
    torch.manual_seed(ctx.seed)
    model = peft.get_peft_model(ctx.model, config, low_cpu_mem_usage=True)
    batches = [_inputs(b) for b in ctx.calibration]
    peft.initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    return model, None


def _corda(ctx: Context):
    import peft
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    config = peft.LoraConfig(
        task_type="SEQ_CLS", target_modules=ctx.targets, r=8, lora_alpha=16, modules_to_save=ctx.heads,
        init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"),
    )  # fmt: skip

    def run_model() -> None:
        # CorDA's hooks take one unpadded example per forward (they squeeze the batch axis).
        with torch.no_grad():
            for batch in ctx.calibration:
                for i in range(len(batch["input_ids"])):
                    keep = batch["attention_mask"][i].bool()
                    ctx.model(**{k: v[i : i + 1, keep] for k, v in _inputs(batch).items()})

    torch.manual_seed(ctx.seed)
    preprocess_corda(ctx.model, config, run_model=run_model)
    return peft.get_peft_model(ctx.model, config), None


def _loraga(ctx: Context):
    import peft
    from peft.tuners.lora.loraga import preprocess_loraga

    config = peft.LoraConfig(
        task_type="SEQ_CLS", target_modules=ctx.targets, r=8, lora_alpha=16, modules_to_save=ctx.heads,
        init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig(),
    )  # fmt: skip

    def train_step() -> None:
        for batch in ctx.calibration:
            ctx.model(**batch).loss.backward()

    torch.manual_seed(ctx.seed)
    preprocess_loraga(ctx.model, config, train_step=train_step)
    ctx.model.zero_grad(set_to_none=True)
    return peft.get_peft_model(ctx.model, config), None


def _adalora(ctx: Context):
    import peft

    total = ctx.total_steps
    config = peft.AdaLoraConfig(
        task_type="SEQ_CLS", target_modules=ctx.targets, init_r=12, target_r=8, lora_alpha=16,
        modules_to_save=ctx.heads, tinit=max(1, total // 10), tfinal=max(1, total // 5), total_step=total,
    )  # fmt: skip
    torch.manual_seed(ctx.seed)
    model = peft.get_peft_model(ctx.model, config)

    def on_step(step: int) -> None:
        model.base_model.update_and_allocate(step)

    return model, on_step


def _peft_prompt(kind: str, tokens: int):
    """PEFT's prompt tuning (``kind`` "PromptTuningConfig") or prefix tuning ("PrefixTuningConfig")."""

    def build(ctx: Context):
        import peft

        config = getattr(peft, kind)(task_type="SEQ_CLS", num_virtual_tokens=tokens)
        torch.manual_seed(ctx.seed)
        return peft.get_peft_model(ctx.model, config), None

    return build


def _multitask_prompt_tuning(tokens: int):
    def build(ctx: Context):
        import peft

        # One slot per task of the study plus the held-out one, so few-shot transfer has its own task prompt.
        config = peft.MultitaskPromptTuningConfig(
            task_type="SEQ_CLS", num_virtual_tokens=tokens, num_tasks=len(ctx.options["tasks"]) + 1, num_ranks=1
        )
        torch.manual_seed(ctx.seed)
        return peft.get_peft_model(ctx.model, config), None

    return build


ENTRIES: Dict[str, Entry] = {
    e.name: e
    for e in [
        Entry("head", "head only", "baseline", HEAD_LRS, _head),
        Entry("full", "full fine-tuning", "baseline", FULL_LRS, _full),
        Entry("lora", "LoRA r = 8", "ours", LORA_LRS, _lora(8)),
        Entry("lora4", "LoRA r = 4", "ours", LORA_LRS, _lora(4)),
        Entry("tlora8", "TLoRA 8·N (half LoRA r = 8's params)", "ours", TLORA_LRS, _tlora(8)),
        Entry("tlora16", "TLoRA 16·N (≈ LoRA r = 8's params)", "ours", TLORA_LRS, _tlora(16)),
        Entry("tlora-a", "TLoRA 8·N, A trained after warm-up", "ours", TLORA_LRS, _tlora_free_a(8)),
        Entry("loratrf", "LoRATRF r = 8", "ours", LORA_LRS, _loratrf),
        Entry("dora", "DoRA r = 8", "ours", LORA_LRS, _dora),
        Entry("peft-lora", "PEFT LoRA r = 8", "peer", LORA_LRS, _peft_lora()),
        Entry("pissa", "PEFT PiSSA r = 8", "peer", LORA_LRS, _peft_lora("pissa_niter_4", alpha=8), init=True),
        Entry("eva", "PEFT EVA r = 8", "peer", LORA_LRS, _eva, init=True),
        Entry("corda", "PEFT CorDA r = 8 (IPM)", "peer", LORA_LRS, _corda, init=True),
        Entry("loraga", "PEFT LoRA-GA r = 8", "peer", LORA_LRS, _loraga, init=True),
        Entry("adalora", "PEFT AdaLoRA 12 → 8", "peer", LORA_LRS, _adalora),
        # Multi-task rows (trained on the union of the source tasks).
        Entry("talora", "TA-LoRA", "ours", (1.5e-3, 5e-3, 1.5e-2), _talora, multitask=True, prompt=True),
        Entry("prompt", "PEFT prompt tuning (50 tokens)", "peer", PROMPT_LRS, _peft_prompt("PromptTuningConfig", 50),
              prompt=True),  # fmt: skip
        # PEFT's prefix tuning needs a backbone whose forward takes past_key_values; transformers 5's BertModel does
        # not, so on all-MiniLM-L6-v2 it refuses to run (kept for decoder models; not in the default grid).
        Entry("prefix", "PEFT prefix tuning (5 tokens)", "peer", PROMPT_LRS, _peft_prompt("PrefixTuningConfig", 5),
              prompt=True),  # fmt: skip
        Entry("mpt", "PEFT multitask prompt tuning (50 tokens)", "peer", PROMPT_LRS, _multitask_prompt_tuning(50),
              multitask=True, prompt=True),  # fmt: skip
        Entry("shared-lora", "one shared LoRA r = 8", "ours", LORA_LRS, _lora(8)),
    ]
}

# TA-LoRA's investigation (issue 13, item 5): one change each from the default (L_p = 10, r = 4, λ = 1e-3), run at
# the rate TA-LoRA chose in the multi-task study.
for _name, _what, _fields in [
    ("talora-L20", "L_p = 20", {"prompt_length": 20}),
    ("talora-L5", "L_p = 5", {"prompt_length": 5}),
    ("talora-r8", "r = 8", {"r": 8}),
    ("talora-r1", "r = 1", {"r": 1}),
    ("talora-orth0", "λ = 0 (no orthogonality term)", {"orthogonality_weight": 0.0}),
    ("talora-orth1e-1", "λ = 0.1", {"orthogonality_weight": 0.1}),
    ("talora-fast3", "fast rate 3× the slow (default 10×)", {"fast_ratio": 3.0}),
    ("talora-fast30", "fast rate 30× the slow", {"fast_ratio": 30.0}),
]:
    ENTRIES[_name] = Entry(_name, f"TA-LoRA, {_what}", "ours", (5e-3,), _talora_variant(**_fields), multitask=True,
                           prompt=True, base="talora")  # fmt: skip
# Schedule length: twice the study's epochs, each at the rate its method chose at the default length.
for _name in ("talora", "prompt", "shared-lora"):
    ENTRIES[f"{_name}-x2"] = dataclasses.replace(ENTRIES[_name], name=f"{_name}-x2", epochs_factor=2, base=_name,
                                                 title=ENTRIES[_name].title + ", twice the epochs")  # fmt: skip
    # Four times, at the rate the twice-the-epochs schedule chose (is 6 epochs enough?).
    ENTRIES[f"{_name}-x4"] = dataclasses.replace(ENTRIES[_name], name=f"{_name}-x4", epochs_factor=4,
                                                 base=f"{_name}-x2",
                                                 title=ENTRIES[_name].title + ", four times the epochs")  # fmt: skip
# Eight times (24 epochs), TA-LoRA only (the cheapest of the three): does 12 leave anything on the table?
ENTRIES["talora-x8"] = dataclasses.replace(ENTRIES["talora"], name="talora-x8", epochs_factor=8, base="talora-x2",
                                           title=ENTRIES["talora"].title + ", eight times the epochs")  # fmt: skip

# TLoRA's own choices (issue 13, item 6), each one change from "tlora8" (64 examples, reference scaling, sequence
# centring, the reference's score), run at tlora8's chosen rate.
_TLORA_CHOICES = [
    ("tlora8-n16", "16 calibration examples", {}, 16),
    ("tlora8-n256", "256 calibration examples", {}, 256),
    ("tlora8-per-rank", "scaling per_rank", {"scaling": "per_rank"}, 64),
    ("tlora8-global", "centre global", {"center": "global"}, 64),
    ("tlora8-none", "centre none", {"center": "none"}, 64),
    ("tlora8-grad", "score \\|G\\|", {"score": "grad"}, 64),  # escaped: the title lands in a Markdown table
    ("tlora8-fisher", "score G² (Fisher)", {"score": "fisher"}, 64),
]
for _name, _what, _fields, _n in _TLORA_CHOICES:
    ENTRIES[_name] = Entry(_name, f"TLoRA 8·N, {_what}", "ours", TLORA_LRS, _tlora(8, **_fields),
                           calibration_examples=_n, base="tlora8")  # fmt: skip

