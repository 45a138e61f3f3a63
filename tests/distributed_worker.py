"""The scenarios of ``test_distributed.py``: each builds a tiny model, attaches a method and trains a few steps.

``tests/test_distributed.py`` runs every scenario once under ``torchrun`` (2 processes, gloo on loopback) by launching
this file, and again in its own single process with ``grad_accum`` doubled — the same global batch — as the oracle.
Under torchrun, every rank writes its losses and rank 0 writes the trained parameters (gathered from FSDP2 shards).

Run as ``python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT_DIR [NAME ...]``.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import tiny_model  # noqa: E402

import lowrank_rs as lr  # noqa: E402

VOCAB = 64

# name: (method, family, mode, examples, batch_size, grad_accum per process)
# 9 examples in steps of 4 leave a last step of 1: the second rank runs a weight-0 pass there. 13 examples with
# grad_accum 2 (steps of 8) exercise no_sync and an uneven last step (micro-batches 2, 2, 1 over two ranks).
SCENARIOS = {
    "lora-bert-ddp": ("lora", "bert", "ddp", 9, 2, 1),
    "lora-llama-ddp-accum": ("lora", "llama", "ddp", 13, 2, 2),
    "tlora-llama-ddp": ("tlora", "llama", "ddp", 9, 2, 1),
    "loratrf-bert-ddp": ("loratrf", "bert", "ddp", 9, 2, 1),
    "talora-llama-ddp": ("talora", "llama", "ddp", 9, 2, 1),
    "dora-bert-ddp": ("dora", "bert", "ddp", 9, 2, 1),
    "lora-llama-fsdp": ("lora", "llama", "fsdp", 13, 2, 2),
    "dora-bert-fsdp": ("dora", "bert", "fsdp", 9, 2, 1),
    "tlora-llama-fsdp": ("tlora", "llama", "fsdp", 9, 2, 1),
    "loratrf-bert-fsdp": ("loratrf", "bert", "fsdp", 9, 2, 1),
    # FSDP2 refuses TA-LoRA's orthogonality term (see test_fsdp_refuses_a_regulariser); without it, TA-LoRA trains.
    "talora-llama-fsdp": ("talora", "llama", "fsdp", 9, 2, 1),
}

# Scenarios whose adapter directory is also written (once, by rank 0, after gathering FSDP2 shards).
SAVED = ("lora-bert-ddp", "lora-llama-fsdp", "dora-bert-fsdp")


def examples(family, n, seed=0, tasks=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 9, (1,), generator=g))
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        if family == "llama":
            labels = ids.clone()
            labels[:2] = -100
        else:
            labels = torch.randint(0, 3, (), generator=g)
        example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        if tasks:
            example["task"] = ("a", "b")[i % 2]
        out.append(example)
    return out


def model_for(method, family, seed=0, mode=None):
    options = dict(vocab=VOCAB, max_position_embeddings=32)
    if family == "bert":
        options.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        options.update(attn_implementation="eager")
    model = tiny_model(family, seed, **options).train()
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["query", "value", "dense"]
    head = ["lm_head"] if family == "llama" else ["classifier"]
    if method == "lora":
        return lr.attach(model, lr.LoraConfig(targets, r=4, alpha=8, modules_to_save=head, init_seed=seed))
    if method == "dora":
        return lr.attach(model, lr.DoraConfig(targets, r=4, alpha=8, modules_to_save=head, init_seed=seed))
    if method == "tlora":
        config = lr.TLoraConfig(targets, r=4, alpha=8, modules_to_save=head, num_examples=8, train_a=True)
        calibration = [{k: v.unsqueeze(0) for k, v in e.items()} for e in examples(family, 4, seed=99)]
        plan = lr.calibrate(model, calibration, config, progress=False)
        return lr.attach(model, plan)
    if method == "loratrf":
        return lr.attach(model, lr.TrfConfig(filter_rank=4, init_seed=seed, modules_to_save=head))
    if method == "talora":
        weight = 0.0 if mode == "fsdp" else 1e-3
        config = lr.TaLoraConfig(tasks=["a", "b"], prompt_length=3, r=3, init_seed=seed, modules_to_save=head,
                                 orthogonality_weight=weight)  # fmt: skip
        return lr.attach(model, config)
    raise ValueError(method)


def run(name, world=1, checkpoint_dir=None, resume_from=None):
    """Train scenario ``name``; with ``world == 1`` the single-process oracle (grad_accum × 2)."""
    method, family, mode, n, batch_size, grad_accum = SCENARIOS[name]
    model = model_for(method, family, mode=mode)
    data = examples(family, n, seed=1, tasks=method == "talora")
    config = lr.TrainConfig(
        lr=1e-2,
        # The cosine schedule ends at min_lr_ratio: above 0, so that the last step moves the weights too.
        min_lr_ratio=0.5,
        batch_size=batch_size,
        grad_accum=grad_accum * (2 if world == 1 else 1),
        epochs=1,
        distributed=mode,
        eval_every=2,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=1 if checkpoint_dir else None,
        seed=3,
    )
    result = lr.train(model, data, eval_data=data[:5], config=config, progress=False, resume_from=resume_from)
    return model, result


def trained(model):
    from lowrank_rs.training.distributed import full_tensor

    return {n: full_tensor(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def record(result):
    return {
        "losses": result.losses,
        "tokens": result.tokens,
        "evals": [[e.step, e.loss, e.accuracy] for e in result.evals],
        "steps": result.steps,
    }


def calibration_examples(family, n=6):
    """Single-example batches ``[1, L]``, as ``calibration_batches`` makes them."""
    return [{k: v.unsqueeze(0) for k, v in e.items()} for e in examples(family, n, seed=5)]


def calibrated(family):
    """A TLoRA plan for a fresh tiny model of ``family``: in this process, or sharded under torchrun."""
    model = tiny_model(family, 0, vocab=VOCAB, max_position_embeddings=32)
    targets = (
        ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"] if family == "llama" else ["query", "value", "dense"]
    )
    config = lr.TLoraConfig(targets, r=4, alpha=8, num_examples=5, budget=20)
    return lr.calibrate(model, calibration_examples(family), config, progress=False)


def plan_record(plan):
    return {
        name: {"rank": m.rank, "scale": m.scale, "score": m.score, "a": m.a.tolist(),
               "s": [float(x) for x in m.singular_values]}  # fmt: skip
        for name, m in plan.modules.items()
    }


def main(out, names):
    from safetensors.torch import save_file

    rank = int(os.environ["RANK"])
    for name in names:
        model, result = run(name, world=2)
        params = trained(model)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in params.items()}, os.path.join(out, f"{name}.safetensors"))
        with open(os.path.join(out, f"{name}.rank{rank}.json"), "w") as f:
            json.dump(record(result), f)
        if name in SAVED:
            lr.save_adapter(model, os.path.join(out, f"adapter-{name}"))
    for family in ("llama", "bert"):
        with open(os.path.join(out, f"plan-{family}.rank{rank}.json"), "w") as f:
            json.dump(plan_record(calibrated(family)), f)
    # Errors every rank raises alike instead of hanging in a collective: ranks given different data, and FSDP2 asked to
    # reduce a regulariser's gradient.
    errors = {}
    model = model_for("lora", "bert")
    try:
        lr.train(model, examples("bert", 6 + rank, seed=1), config=lr.TrainConfig(max_steps=1), progress=False)
    except lr.InvalidArgumentError as e:
        errors["different data"] = str(e)
    model = model_for("talora", "llama")
    try:
        config = lr.TrainConfig(max_steps=1, distributed="fsdp")
        lr.train(model, examples("llama", 4, seed=1, tasks=True), config=config, progress=False)
    except lr.InvalidArgumentError as e:
        errors["fsdp regulariser"] = str(e)
    with open(os.path.join(out, f"errors.rank{rank}.json"), "w") as f:
        json.dump(errors, f)
    hf_trainer(out, rank)
    # Resume: a run writing a checkpoint every step, then a fresh model resumed from its first checkpoint; the test
    # compares the two ends and checks that one process refuses the two-process checkpoint.
    for name in ("lora-bert-ddp", "lora-llama-fsdp"):
        where = os.path.join(out, f"checkpoints-{name}")
        run(name, world=2, checkpoint_dir=where)
        model, result = run(name, world=2, checkpoint_dir=where, resume_from=os.path.join(where, "step-00000001"))
        params = trained(model)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in params.items()}, os.path.join(out, f"resumed-{name}.safetensors"))
            with open(os.path.join(out, f"resumed-{name}.json"), "w") as f:
                json.dump(record(result), f)


def hf_trainer(out, rank):
    """An attached model under Hugging Face Trainer + accelerate, which runs DDP itself under torchrun."""
    import transformers
    from safetensors.torch import save_file

    model = model_for("lora", "bert")
    g = torch.Generator().manual_seed(4)
    data = [{"input_ids": torch.randint(1, VOCAB, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(8)]  # fmt: skip
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "hf"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        report_to="none", save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        ddp_backend="gloo",
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=data).train()
    params = {n: p.detach().contiguous().clone() for n, p in model.named_parameters()}
    save_file(params, os.path.join(out, f"hf-trainer.rank{rank}.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(SCENARIOS))
    # Every output is written by now. Interpreter teardown with gloo's (and accelerate's) threads still alive
    # sometimes aborts in C++ ("terminate called without an active exception") on a loaded 2-core machine, failing a
    # run whose results are complete; leave through the process group's own shutdown and skip the teardown.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
