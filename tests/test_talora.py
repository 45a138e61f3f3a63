"""TA-LoRA (docs/methods.md): the attention output against a plain-torch oracle of the equation for mixed-task batches,
exact identity at init, eager = SDPA, padding invariance, the orthogonality penalty against its closed and general
forms, which parameters get gradient when, the two learning rates, add_task transfer that leaves the other tasks
alone, the training loop's seam (task names in the data, the regulariser, exact resume), adapter files, and every
error path.

Every model is a tiny random-initialised transformers config (2 layers); nothing is downloaded.
"""

import copy
import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import tiny_model  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

import lowrank_rs as lr  # noqa: E402
from lowrank_rs import ConfigError  # noqa: E402
from lowrank_rs.package import read_adapter, write_adapter  # noqa: E402
from lowrank_rs.training import collate  # noqa: E402

VOCAB = 64
FAMILIES = ("llama", "qwen2", "bert")


def base_model(family, seed=0, attn="eager", hidden=32, classify=False):
    common = dict(vocab=VOCAB, hidden=hidden, max_position_embeddings=32, attn_implementation=attn)
    if family == "bert":
        common.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, head=classify)
    return tiny_model(family, seed, **common)


def talora(family, tasks=("a", "b"), layers=None, seed=0, attn="eager", **config):
    model = base_model(family, seed, attn, classify=config.pop("classify", False))
    return lr.attach(model, lr.TaLoraConfig(tasks=list(tasks), layers=layers, prompt_length=5, r=3, init_seed=seed,
                                            **config))  # fmt: skip


@torch.no_grad()
def open_prompts(model, seed=1):
    """Gates and fast weights away from their zero init, so that every term of the branch is live."""
    g = torch.Generator().manual_seed(seed)
    for layer in lr.talora_layers(model).values():
        layer.gate.copy_(torch.randn(layer.gate.shape, generator=g))
        for v in layer.v:
            v.copy_(torch.randn(v.shape, generator=g))


def outputs(model, ids, mask=None):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def tokens(batch, length, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def right_padded(lengths, seed=0):
    ids = tokens(len(lengths), max(lengths), seed)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0
    return ids, mask


# --- config -----------------------------------------------------------------------------------------------------------


def test_config_round_trip_and_defaults():
    config = lr.TaLoraConfig(tasks=["sst-2", "topic_4"], layers=[-1, 0], modules_to_save=["classifier"])
    assert config.tasks == ("sst-2", "topic_4") and config.layers == (-1, 0)
    assert lr.TaLoraConfig.from_json(config.to_json()) == config
    assert config.fast_lr == pytest.approx(10 * config.slow_lr)  # docs/methods.md: fast ≈ 10× slow


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tasks": []}, "at least one task"),
        ({"tasks": "ab"}, "list of task names"),
        ({"tasks": ["a", "a"]}, "lists a task twice"),
        ({"tasks": ["a.b"]}, "letters, digits"),
        ({"tasks": [""]}, "letters, digits"),
        ({"tasks": ["a"], "layers": []}, "non-empty list"),
        ({"tasks": ["a"], "layers": [1, 1]}, "index twice"),
        ({"tasks": ["a"], "layers": [0.5]}, "layers must be an integer"),
        ({"tasks": ["a"], "prompt_length": 0}, "prompt_length must be at least 1"),
        ({"tasks": ["a"], "r": 0}, "r must be at least 1"),
        ({"tasks": ["a"], "orthogonality_weight": -1.0}, "orthogonality_weight"),
        ({"tasks": ["a"], "slow_lr": 0}, "slow_lr must be positive"),
        ({"tasks": ["a"], "fast_lr": float("inf")}, "fast_lr must be finite"),
        ({"tasks": ["a"], "prompt_init_std": 0}, "prompt_init_std"),
        ({"tasks": ["a"], "init_seed": -1}, "init_seed"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        lr.TaLoraConfig(**kwargs)


# --- structure and identity -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_identity_at_init_and_only_adapter_trains(family):
    ids, mask = right_padded([6, 4, 5])
    expected = outputs(base_model(family), ids, mask)
    model = talora(family)
    layers = lr.talora_layers(model)
    assert len(layers) == 1 and lr.adapter_config(model).layers == (1,)  # default: the last half of 2 layers
    (layer,) = layers.values()
    d, heads = 32, 4
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"theta0": (5, d), "B": (5, 3), "gate": (heads,), "u.0": (3,), "u.1": (3,), "v.0": (d,),
                      "v.1": (d,)}  # fmt: skip
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".talora." in n}
    assert lr.trainable_parameters(model) == 5 * d + 5 * 3 + heads + 2 * (3 + d)
    with lr.use_tasks(model, ["a", "b", "a"]):
        assert torch.equal(outputs(model, ids, mask), expected)


# --- the equation -----------------------------------------------------------------------------------------------------


def _rope(x, theta):
    """Rotary embedding, rotate-half convention, positions 0..s-1: ``x`` is [b, H, s, d_h]."""
    d_h, s = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, d_h, 2, dtype=torch.float64) / d_h)
    freqs = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    rotated = torch.cat([-x[..., d_h // 2 :], x[..., : d_h // 2]], -1)
    return x * cos + rotated * sin


def _linear(x, layer):
    return x @ layer.weight.double().T + (layer.bias.double() if layer.bias is not None else 0)


def oracle(family, attention, layer, hidden, mask, task_ids):
    """The attention output ``O`` of docs/methods.md, in float64, with nothing from the model but its weights."""
    if family == "bert":
        q_lin, k_lin, v_lin = attention.self.query, attention.self.key, attention.self.value
    else:
        q_lin, k_lin, v_lin = attention.q_proj, attention.k_proj, attention.v_proj
    b, s, _ = hidden.shape
    heads, kv_heads, d_h = layer.num_heads, layer.num_kv_heads, layer.head_dim
    h = hidden.double()
    q = _linear(h, q_lin).view(b, s, heads, d_h).transpose(1, 2)
    k = _linear(h, k_lin).view(b, s, kv_heads, d_h).transpose(1, 2)
    v = _linear(h, v_lin).view(b, s, kv_heads, d_h).transpose(1, 2)
    if family != "bert":
        theta = attention.config.rope_parameters["rope_theta"]
        q, k = _rope(q, theta), _rope(k, theta)
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    allowed = mask.bool()[:, None, None, :].expand(b, 1, s, s)
    if family != "bert":
        allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d_h)
    first = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ v

    second = torch.empty_like(first)
    tasks = list(layer.task_names)
    for row, task in enumerate(task_ids):
        name = tasks[task]
        a_i = torch.outer(*(w.double() for w in layer.task_parameters(name)))  # [r, d]
        prompt = layer.theta0.double() + layer.B.double() @ a_i  # P_i = θ0 + B A_i, [L_p, d]
        kp = _linear(prompt, k_lin).view(-1, kv_heads, d_h).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        vp = _linear(prompt, v_lin).view(-1, kv_heads, d_h).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
        probs = torch.softmax(q[row] @ kp.transpose(-1, -2) / math.sqrt(d_h), -1)  # no mask, no rotary on K_p
        second[row] = torch.tanh(layer.gate.double())[:, None, None] * (probs @ vp)
    return (first + second).transpose(1, 2).reshape(b, s, heads * d_h)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_output_equals_the_equation_for_mixed_task_batches(family, attn):
    model = talora(family, tasks=("a", "b", "c"), layers=[0, 1], attn=attn)
    open_prompts(model)
    ids, mask = right_padded([7, 5, 6, 3])
    task_ids = [2, 0, 1, 0]
    seen = {}
    for name in lr.talora_layers(model):
        attention = model.get_submodule(name.rsplit(".", 1)[0])
        out_proj = attention.output.dense if family == "bert" else attention.o_proj

        def keep_input(module, args, kwargs, name=name):
            seen[name, "hidden"] = kwargs.get("hidden_states", args[0] if args else None)

        def keep_output(module, args, output, name=name):
            seen[name, "out"] = output

        attention.register_forward_pre_hook(keep_input, with_kwargs=True)
        out_proj.register_forward_hook(keep_output)
    with torch.no_grad(), lr.use_tasks(model, torch.tensor(task_ids)):
        outputs(model, ids, mask)
    valid = mask.bool()
    for name, layer in lr.talora_layers(model).items():
        attention = model.get_submodule(name.rsplit(".", 1)[0])
        out_proj = attention.output.dense if family == "bert" else attention.o_proj
        expected = _linear(oracle(family, attention, layer, seen[name, "hidden"], mask, task_ids), out_proj)
        torch.testing.assert_close(seen[name, "out"][valid].double(), expected[valid], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_and_sdpa_agree(family):
    ids, mask = right_padded([6, 3, 5])
    results = []
    for attn in ("eager", "sdpa"):
        model = talora(family, layers=[0, 1], attn=attn)
        open_prompts(model)
        with torch.no_grad(), lr.use_tasks(model, ["b", "a", "b"]):
            results.append(outputs(model, ids, mask)[mask.bool()])
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_and_batch_mates_do_not_change_an_example(family):
    model = talora(family, layers=[0, 1])
    open_prompts(model)
    lengths, task_ids = [6, 3, 5], ["a", "b", "b"]
    ids, mask = right_padded(lengths)
    with torch.no_grad(), lr.use_tasks(model, task_ids):
        batched = outputs(model, ids, mask)
    for row, n in enumerate(lengths):
        with torch.no_grad(), lr.use_tasks(model, task_ids[row]):  # one name: the whole (one-example) batch
            alone = outputs(model, ids[row : row + 1, :n], mask[row : row + 1, :n])
        torch.testing.assert_close(batched[row, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_tasks_differ_and_a_single_id_covers_the_batch():
    model = talora("llama", tasks=("train", "keys"))  # names that are also attributes of torch's containers
    open_prompts(model)
    ids = tokens(2, 5)
    with torch.no_grad():
        with lr.use_tasks(model, "keys"):
            both_b = outputs(model, ids)
        with lr.use_tasks(model, torch.tensor(1)):
            assert torch.equal(outputs(model, ids), both_b)
        with lr.use_tasks(model, [0, 1]):
            mixed = outputs(model, ids)
    assert torch.equal(mixed[1], both_b[1]) and not torch.allclose(mixed[0], both_b[0])


def test_cached_decoding_matches_the_full_forward():
    model = talora("llama", layers=[0, 1])
    open_prompts(model)
    ids = tokens(2, 6)
    with torch.no_grad(), lr.use_tasks(model, ["a", "b"]):
        full = model(input_ids=ids).logits[:, -1]
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], cache=prefix.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_export_traces_task_ids_as_an_input():
    # A later ONNX export selects each task's prompt by a task_id input: nothing in the forward may depend on the ids'
    # values in Python.
    model = talora("llama", layers=[0, 1], attn="sdpa")
    open_prompts(model)

    class WithTasks(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, task_ids):
            with lr.use_tasks(self.inner, task_ids):
                return self.inner(input_ids=input_ids, use_cache=False).logits

    wrapper = WithTasks(model).eval()
    ids = tokens(2, 6)
    program = torch.export.export(wrapper, (ids, torch.tensor([0, 1])), strict=False)
    with torch.no_grad():
        for task_ids in ([1, 0], [1, 1]):
            task_ids = torch.tensor(task_ids)
            torch.testing.assert_close(program.module()(ids, task_ids), wrapper(ids, task_ids), atol=1e-6, rtol=1e-6)


def test_nested_use_tasks_restores_and_deepcopy_is_independent():
    model = talora("bert")
    open_prompts(model)
    (layer,) = lr.talora_layers(model).values()
    with lr.use_tasks(model, ["a", "b"]):
        with lr.use_tasks(model, "b"):
            assert layer.task_ids.tolist() == 1
        assert layer.task_ids.tolist() == [0, 1]
    assert layer.task_ids is None
    twin = copy.deepcopy(model)
    ids = tokens(2, 4)
    with torch.no_grad(), lr.use_tasks(model, [0, 1]), lr.use_tasks(twin, [0, 1]):
        assert torch.equal(outputs(model, ids), outputs(twin, ids))
        next(iter(lr.talora_layers(twin).values())).gate.add_(1.0)
        assert not torch.allclose(outputs(model, ids), outputs(twin, ids))


# --- orthogonality ----------------------------------------------------------------------------------------------------


def test_orthogonality_penalty_closed_and_general_forms():
    model = talora("llama", tasks=("a", "b", "c"), layers=[0, 1])
    open_prompts(model)
    general = closed = 0.0
    for layer in lr.talora_layers(model).values():
        u = {t: layer.task_parameters(t)[0].detach().double() for t in layer.task_names}
        v = {t: layer.task_parameters(t)[1].detach().double() for t in layer.task_names}
        for i in layer.task_names:
            for j in layer.task_names:
                if i != j:
                    a_i, a_j = torch.outer(u[i], v[i]), torch.outer(u[j], v[j])  # A = u vᵀ: [r, d]
                    general += float((a_i.T @ a_j).square().sum())
                    closed += float((u[i] @ u[j]) ** 2 * (v[i] @ v[i]) * (v[j] @ v[j]))
    penalty = lr.orthogonality_penalty(model)
    assert penalty.dtype == torch.float32 and penalty.requires_grad
    assert float(penalty.detach()) == pytest.approx(general, rel=1e-5) and general == pytest.approx(closed, rel=1e-9)
    assert float(lr.orthogonality_penalty(talora("llama", tasks=("only",))).detach()) == 0.0
    assert float(lr.orthogonality_penalty(talora("llama")).detach()) == 0.0  # v = 0 at init: no penalty, no gradient


# --- gradients and learning rates -------------------------------------------------------------------------------------


def _grads(model):
    (layer,) = lr.talora_layers(model).values()
    return {n: (None if p.grad is None else float(p.grad.abs().sum())) for n, p in layer.named_parameters()}


def _lm_loss(model, ids, task_ids):
    model.zero_grad(set_to_none=True)
    with lr.use_tasks(model, task_ids):
        model(input_ids=ids, labels=ids).loss.backward()
    return _grads(model)


def test_which_parameters_get_gradient_when():
    model = talora("llama", tasks=("a", "b", "c"))
    ids = tokens(2, 6)
    # At init tanh(g) = 0 multiplies the whole branch: only the gates learn.
    grads = _lm_loss(model, ids, ["a", "b"])
    assert grads.pop("gate") > 0 and all(g == 0 for g in grads.values())
    # Gates open, v = 0: A_i = u_i v_iᵀ = 0, so u and B see no gradient yet; θ0 and the batch's v_i do.
    with torch.no_grad():
        next(iter(lr.talora_layers(model).values())).gate.fill_(0.5)
    grads = _lm_loss(model, ids, ["a", "b"])
    assert {n for n, g in grads.items() if g > 0} == {"gate", "theta0", "v.0", "v.1"}
    # Everything moves once v ≠ 0 — except the fast weights of a task that is not in the batch.
    open_prompts(model)
    grads = _lm_loss(model, ids, ["a", "b"])
    assert {n for n, g in grads.items() if g > 0} == {"gate", "theta0", "B", "u.0", "v.0", "u.1", "v.1"}
    assert grads["u.2"] == grads["v.2"] == 0
    assert all(p.grad is None for n, p in model.named_parameters() if ".talora." not in n)


class _Watch:
    """Which parameters the optimizer is about to move (non-zero gradient) at each step, and each group's lr."""

    def __init__(self, model):
        self.names = {id(p): n for n, p in model.named_parameters()}

    def __enter__(self):
        self.moving, self.groups = [], []
        self.handle = register_optimizer_step_pre_hook(self._hook)
        return self

    def _hook(self, optimizer, args, kwargs):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.moving.append({self.names[id(p)].rsplit(".talora.", 1)[-1] for p in params if p.grad is not None and
                            p.grad.abs().sum() > 0})  # fmt: skip
        self.groups.append([(g.get("name"), g["lr"], [self.names[id(p)] for p in g["params"]]) for g in
                            optimizer.param_groups])  # fmt: skip

    def __exit__(self, *exc):
        self.handle.remove()


def lm_examples(n, tasks, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (int(torch.randint(4, 8, (1,), generator=g)),), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "task": tasks[i % len(tasks)]})
    return out


def test_training_opens_the_gate_first_then_the_rest():
    model = talora("llama")
    config = lr.TrainConfig(max_steps=3, batch_size=4, shuffle=False, max_grad_norm=None)
    with _Watch(model) as watch:
        lr.train(model, lm_examples(4, ["a", "b"]), config=config, progress=False)
    assert watch.moving[0] == {"gate"}
    assert watch.moving[1] == {"gate", "theta0", "v.0", "v.1"}
    assert watch.moving[2] == {"gate", "theta0", "B", "u.0", "u.1", "v.0", "v.1"}


def test_two_learning_rates_and_the_default_one_for_saved_modules():
    model = talora("bert", classify=True, modules_to_save=["classifier"], slow_lr=1e-3, fast_lr=3e-2)
    open_prompts(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [{"input_ids": tokens(1, 5, seed=i)[0], "labels": i % 3, "task": "ab"[i % 2]} for i in range(6)]
    config = lr.TrainConfig(lr=2e-4, max_steps=1, warmup_steps=1, batch_size=6, max_grad_norm=None, eps=1e-16)
    with _Watch(model) as watch:
        lr.train(model, data, config=config, progress=False)
    groups = {(name, lr_): names for name, lr_, names in watch.groups[0]}
    assert {(name, lr_) for name, lr_ in groups} == {(None, 2e-4), ("talora.slow", 1e-3), ("talora.fast", 3e-2)}
    assert all(n.startswith("classifier.") for key, names in groups.items() if key[0] is None for n in names)
    # AdamW's first step moves every element with a gradient well above eps by lr · g / (|g| + eps) ≈ ±lr (eps is
    # tiny here: the prompt's gradients through a random classifier are of order 1e-7).
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = n.rsplit(".talora.", 1)[-1].split(".")[0] if ".talora." in n else "head"
        expected = {"theta0": 1e-3, "B": 1e-3, "gate": 1e-3, "u": 3e-2, "v": 3e-2, "head": 2e-4}[kind]
        assert float((p.detach() - before[n]).abs().max()) == pytest.approx(expected, rel=1e-3), n


def test_the_loss_includes_the_penalty_once_per_step():
    model = talora("llama", orthogonality_weight=0.5)
    open_prompts(model)
    data = lm_examples(4, ["a", "b"])
    # Two micro-batches of two, in order: the step's loss is the mean of their losses, plus λ · penalty once.
    with torch.no_grad():
        micro = []
        for part in (data[:2], data[2:]):
            batch = collate([{k: v for k, v in e.items() if k != "task"} for e in part])
            with lr.use_tasks(model, [e["task"] for e in part]):
                micro.append(float(model(**batch).loss))
        penalty = float(lr.orthogonality_penalty(model))
    assert penalty > 0
    config = lr.TrainConfig(max_steps=1, batch_size=2, grad_accum=2, shuffle=False)
    result = lr.train(model, data, config=config, progress=False)
    assert result.losses[0] == pytest.approx(sum(micro) / 2 + 0.5 * penalty, rel=1e-6)


def test_resume_is_exact_and_the_checkpoint_holds_both_groups(tmp_path):
    data = lm_examples(6, ["a", "b"]) + [{"input_ids": torch.tensor([3, 4, 5]), "labels": torch.tensor([3, 4, 5]),
                                           "task_ids": 1}]  # fmt: skip
    config = lr.TrainConfig(max_steps=4, batch_size=3, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=2)
    straight = talora("llama")
    open_prompts(straight)
    full = lr.train(straight, data, config=config, progress=False)
    resumed = talora("llama")
    open_prompts(resumed)
    again = lr.train(resumed, data, config=config, resume_from=tmp_path / "ck" / "step-00000002", progress=False)
    assert again.losses == full.losses
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    with open(tmp_path / "ck" / "step-00000004" / "trainer_state.json") as f:
        groups = json.load(f)["optimizer"]["param_groups"]
    assert {g.get("name"): g["initial_lr"] for g in groups} == {"talora.slow": 5e-3, "talora.fast": 5e-2}


def test_gradient_checkpointing_recomputes_with_the_same_tasks():
    # The recomputed forward runs during backward; lr.train keeps the batch's tasks set until backward is done.
    data = lm_examples(4, ["a", "b"])
    runs = []
    for checkpointing in (False, True):
        model = talora("llama", layers=[0, 1])
        open_prompts(model)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        result = lr.train(model, data, config=lr.TrainConfig(max_steps=2, batch_size=2), progress=False)
        runs.append((result.losses, [p.detach() for p in model.parameters() if p.requires_grad]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1], runs[1][1]))


def test_evaluate_takes_task_names_too():
    model = talora("bert", classify=True, modules_to_save=["classifier"])
    data = [{"input_ids": tokens(1, 5, seed=i)[0], "labels": i % 3, "task": "ab"[i % 2]} for i in range(4)]
    result = lr.evaluate(model, data, batch_size=3)
    assert result.examples == 4 and result.accuracy is not None


# --- a new task -------------------------------------------------------------------------------------------------------


def test_add_task_starts_from_the_mean_and_training_it_changes_only_it():
    model = talora("bert", classify=True, modules_to_save=["classifier"])
    open_prompts(model)
    lr.add_task(model, "c")
    assert lr.task_names(model) == ("a", "b", "c") and lr.adapter_config(model).tasks == ("a", "b", "c")
    for layer in lr.talora_layers(model).values():
        (ua, va), (ub, vb), (uc, vc) = (layer.task_parameters(t) for t in "abc")
        assert torch.equal(uc, (ua + ub) / 2) and torch.equal(vc, (va + vb) / 2)
    trainable = {n.rsplit(".talora.", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"u.2", "v.2"}

    ids = tokens(3, 5, seed=9)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        before = {t: outputs(_with(model, t), ids) for t in "abc"}
    data = [{"input_ids": tokens(1, 5, seed=20 + i)[0], "labels": i % 3, "task": "c"} for i in range(8)]
    lr.train(model, data, config=lr.TrainConfig(max_steps=3, batch_size=4), progress=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, state[n])}
    assert {n.rsplit(".talora.", 1)[-1] for n in changed} == {"u.2", "v.2"}
    with torch.no_grad():
        assert torch.equal(outputs(_with(model, "a"), ids), before["a"])
        assert torch.equal(outputs(_with(model, "b"), ids), before["b"])
        assert not torch.allclose(outputs(_with(model, "c"), ids), before["c"])


class _with:
    """Calls the model under one task for the whole batch (a tiny helper for the test above)."""

    def __init__(self, model, task):
        self.model, self.task = model, task

    def __call__(self, **kwargs):
        with lr.use_tasks(self.model, self.task):
            return self.model(**kwargs)


def test_add_task_options():
    model = talora("llama", modules_to_save=["lm_head"])
    lr.add_task(model, "fresh", init="random", train_shared=True, train_saved=True)
    (layer,) = lr.talora_layers(model).values()
    u, v = layer.task_parameters("fresh")
    assert torch.equal(v, torch.zeros(32)) and u.abs().sum() > 0
    trainable = {n.rsplit(".talora.", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"theta0", "B", "gate", "u.2", "v.2", "lm_head.weight"}
    # A task's random init depends on the seed, its layer and its name only.
    twin = talora("llama", tasks=("a", "b", "fresh"))
    assert torch.equal(next(iter(lr.talora_layers(twin).values())).task_parameters("fresh")[0], u)


# --- files ------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_and_single_task_export(tmp_path):
    model = talora("bert", tasks=("a", "b", "c"), layers=[0, 1], classify=True, modules_to_save=["classifier"])
    open_prompts(model)
    ids = tokens(3, 5)
    with torch.no_grad(), lr.use_tasks(model, ["a", "b", "c"]):
        expected = outputs(model, ids)
    lr.save_adapter(model, tmp_path / "all")
    tensors, config = read_adapter(tmp_path / "all")
    assert config["peft_type"] == "LOWRANK_RS_TA_LORA" and config["lowrank_rs"]["config"]["tasks"] == ["a", "b", "c"]
    assert "base_model.model.bert.encoder.layer.0.attention.talora.u.b" in tensors
    assert "base_model.model.classifier.weight" in tensors
    assert set(tensors) == {k for k in lr.adapter_state(model)}

    loaded = lr.load_adapter(base_model("bert", classify=True), tmp_path / "all")
    assert lr.adapter_config(loaded) == lr.adapter_config(model)
    with torch.no_grad(), lr.use_tasks(loaded, ["a", "b", "c"]):
        assert torch.equal(outputs(loaded, ids), expected)

    lr.save_adapter(model, tmp_path / "b", tasks=["b"])
    tensors, config = read_adapter(tmp_path / "b")
    assert not any(".u.a" in k or ".v.c" in k for k in tensors)
    single = lr.load_adapter(base_model("bert", classify=True), tmp_path / "b")
    assert lr.task_names(single) == ("b",)
    with torch.no_grad(), lr.use_tasks(single, "b"):
        # Not bit for bit: one task's prompt products have other shapes than three tasks', so they round apart.
        torch.testing.assert_close(outputs(single, ids)[1], expected[1], rtol=1e-6, atol=1e-7)

    # Into a model attached with the same tasks: the weights are replaced.
    again = talora("bert", tasks=("a", "b", "c"), layers=[0, 1], seed=3, classify=True, modules_to_save=["classifier"])
    lr.load_adapter(again, tmp_path / "all")
    mine = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in again.named_parameters() if p.requires_grad}
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)


def test_file_and_state_errors(tmp_path):
    model = talora("llama")
    lr.save_adapter(model, tmp_path / "ta")
    with pytest.raises(lr.AdapterStateError, match="cannot be merged"):
        lr.merge(model)
    with pytest.raises(lr.AdapterStateError, match="cannot be merged"):
        lr.unmerge(model)
    with pytest.raises(lr.LowRankError, match="vLLM"):
        lr.save_adapter(model, tmp_path / "x", vllm=True)
    with pytest.raises(lr.TaskError, match="'z'"):
        lr.save_adapter(model, tmp_path / "x", tasks=["z"])
    with pytest.raises(lr.TaskError, match="at least one"):
        lr.save_adapter(model, tmp_path / "x", tasks=[])
    with pytest.raises(ConfigError, match="list of task names"):
        lr.save_adapter(model, tmp_path / "x", tasks="a")
    assert not (tmp_path / "x").exists()
    with pytest.raises(lr.TaskError, match=r"holds tasks \['a', 'b'\]"):
        lr.load_adapter(talora("llama", tasks=("a", "c")), tmp_path / "ta")
    with pytest.raises(lr.ShapeError, match="prompt_length"):
        lr.load_adapter(lr.attach(base_model("llama"), lr.TaLoraConfig(tasks=["a", "b"])), tmp_path / "ta")
    with pytest.raises(lr.TargetError, match="another model: hidden_size 32 there, 48 here"):
        lr.load_adapter(base_model("llama", hidden=48), tmp_path / "ta")
    with pytest.raises(lr.TargetError, match="model_type 'llama' there, 'qwen2' here"):
        lr.load_adapter(base_model("qwen2"), tmp_path / "ta")

    lora = lr.attach(base_model("llama"), lr.LoraConfig(["q_proj"], r=2))
    with pytest.raises(lr.AdapterStateError, match="LoRA adapter attached"):
        lr.load_adapter(lora, tmp_path / "ta")
    with pytest.raises(lr.LowRankError, match="tasks= chooses"):
        lr.save_adapter(lora, tmp_path / "x", tasks=["a"])
    lr.save_adapter(lora, tmp_path / "lora")
    with pytest.raises(lr.AdapterStateError, match="'LORA' adapter"):
        lr.load_adapter(model, tmp_path / "lora")

    # PEFT has no TA-LoRA; it refuses the file by its peft_type instead of half-loading it.
    peft = pytest.importorskip("peft")
    with pytest.raises(KeyError, match="LOWRANK_RS_TA_LORA"):
        peft.PeftConfig.from_pretrained(str(tmp_path / "ta"))

    # A damaged file: a missing tensor, a wrong shape, a stray tensor; the model stays untouched.
    tensors, config = read_adapter(tmp_path / "ta", framework="torch")
    key = next(k for k in tensors if k.endswith(".u.b"))
    for change, error, message in (
        (lambda t: t.pop(key), lr.AdapterFormatError, "lacks tensor"),
        (lambda t: t.__setitem__(key, torch.zeros(5)), lr.ShapeError, "has shape"),
        (lambda t: t.__setitem__("base_model.model.stray.weight", torch.zeros(1)), lr.AdapterFormatError, "stray"),
    ):
        broken = dict(tensors)
        change(broken)
        write_adapter(tmp_path / "broken", broken, config)
        fresh = base_model("llama")
        with pytest.raises(error, match=message):
            lr.load_adapter(fresh, tmp_path / "broken")
        assert not lr.talora_layers(fresh)
    bad = copy.deepcopy(config)
    del bad["lowrank_rs"]["config"]
    write_adapter(tmp_path / "bad", tensors, bad)
    with pytest.raises(lr.AdapterFormatError, match="malformed"):
        lr.load_adapter(base_model("llama"), tmp_path / "bad")


# --- errors -----------------------------------------------------------------------------------------------------------


def test_task_id_errors():
    assert issubclass(lr.TaskError, lr.LowRankError) and issubclass(lr.TaskError, ValueError)
    model = talora("llama")
    ids = tokens(3, 4)
    with pytest.raises(lr.TaskError, match="use_tasks"):
        model(input_ids=ids)
    cases = [
        (["a", "zz", "b"], r"task_ids\[1\]: 'zz' is not one of the model's tasks \['a', 'b'\]"),
        (torch.tensor([0, 2, 1]), "task id 2 does not exist"),
        ([0, -1, 1], "task id -1 does not exist"),
        (torch.tensor([0.0, 1.0, 0.0]), "integer tensor"),
        (torch.zeros(3, 1, dtype=torch.long), r"\[batch\] tensor"),
        ([], "empty"),
        ({"a": 1}, "must be a LongTensor"),
        ([1.5, 0, 0], r"task_ids\[0\] must be a task name or index"),
    ]
    for value, message in cases:
        with pytest.raises(lr.TaskError, match=message):
            with lr.use_tasks(model, value):
                pass
    with pytest.raises(lr.TaskError, match="given for 2 examples, but the batch has 3"):
        with lr.use_tasks(model, ["a", "b"]):
            model(input_ids=ids)
    with pytest.raises(lr.AdapterStateError, match="no TA-LoRA adapter"):
        with lr.use_tasks(base_model("llama"), "a"):
            pass


def test_attach_and_add_task_errors():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB))
    with pytest.raises(lr.TargetError, match="supports the model types"):
        lr.attach(gpt2, lr.TaLoraConfig(tasks=["a"]))
    with pytest.raises(lr.TargetError, match=r"layers \[2\] do not exist: the model has 2 layers"):
        lr.attach(base_model("llama"), lr.TaLoraConfig(tasks=["a"], layers=[0, 2]))
    with pytest.raises(ConfigError, match="same layer twice"):
        lr.attach(base_model("llama"), lr.TaLoraConfig(tasks=["a"], layers=[1, -1]))
    with pytest.raises(lr.TargetError, match="modules_to_save entry 'nothing'"):
        lr.attach(base_model("llama"), lr.TaLoraConfig(tasks=["a"], modules_to_save=["nothing"]))
    with pytest.raises(lr.LowRankError, match="a TaLoraConfig takes none"):
        lr.attach(base_model("llama"), lr.TaLoraConfig(tasks=["a"]), ranks={"model.layers.0.self_attn.q_proj": 2})
    model = talora("llama")
    with pytest.raises(lr.AdapterStateError, match="already has an adapter"):
        lr.attach(model, lr.TaLoraConfig(tasks=["a"]))
    with pytest.raises(lr.AdapterStateError, match="already has"):
        lr.attach(model, lr.LoraConfig(["q_proj"]))
    with pytest.raises(lr.AdapterStateError, match="already has an adapter"):
        lr.attach(lr.attach(base_model("llama"), lr.LoraConfig(["q_proj"])), lr.TaLoraConfig(tasks=["a"]))
    with pytest.raises(lr.TaskError, match="exists already"):
        lr.add_task(model, "a")
    with pytest.raises(ConfigError, match="letters, digits"):
        lr.add_task(model, "a.b")
    with pytest.raises(lr.TaskError, match="init must be"):
        lr.add_task(model, "c", init="zeros")
    with pytest.raises(lr.LowRankError, match="train_shared must be true or false"):
        lr.add_task(model, "c", train_shared="yes")
    with pytest.raises(lr.AdapterStateError, match="no TA-LoRA adapter"):
        lr.add_task(base_model("llama"), "c")
    assert lr.task_names(model) == ("a", "b")


def test_training_data_errors():
    model = talora("llama")
    config = lr.TrainConfig(max_steps=1, batch_size=2)
    ex = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3])}
    for example, message in (
        (ex, r"train_data\[0\] has no task"),
        ({**ex, "task": "a", "task_ids": 0}, "both 'task' and 'task_ids'"),
        ({**ex, "task": "q"}, r"train_data\[0\]: task: 'q' is not one of the model's tasks"),
        ({**ex, "task_ids": 7}, "task id 7 does not exist"),
    ):
        with pytest.raises(lr.TaskError, match=message):
            lr.train(model, [example, example], config=config, progress=False)
