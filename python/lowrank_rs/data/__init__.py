"""Data for the fine-tuning job: the built-in demo task and the user's JSONL files, tokenised for :func:`lr.train`.

JSONL files hold one JSON object per line, in one of two shapes (chosen by the fields of the first row):

- **classification**: ``{"text": ..., "label": ...}`` — ``label`` a string (label names are the sorted distinct
  values) or an integer (label names are the sorted distinct integers present, so ids need not be 0..K-1); at least
  two distinct labels;
- **causal-LM SFT**: ``{"prompt": ..., "response": ...}`` — the loss counts the response tokens only.

Either shape may carry ``"task": name`` (multi-task data for TA-LoRA). Tokenised examples are dicts of 1-D tensors
(``input_ids``, ``attention_mask``, ``labels``, and ``task_ids`` when a task is set), which :func:`lr.train` batches
and pads itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import DataError, EmptyInputError, InvalidArgumentError

__all__ = ["DataError", "Dataset", "load_jsonl", "split", "tokenize"]

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Rows of one kind, as read from a file or built in.

    - ``kind``: ``"classification"`` or ``"sft"``;
    - ``rows``: dicts with ``text`` / ``label`` (an int index into ``labels``) or ``prompt`` / ``response``, and
      optionally ``task``;
    - ``labels``: the label names (classification only);
    - ``name``: where the data came from, for tables and logs.
    """

    kind: str
    rows: Tuple[Dict[str, Any], ...]
    labels: Tuple[str, ...] = ()
    name: str = "data"

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tasks(self) -> Tuple[str, ...]:
        """Task names in order of first appearance; empty for single-task data."""
        seen: Dict[str, None] = {}
        for row in self.rows:
            if "task" in row:
                seen.setdefault(row["task"], None)
        return tuple(seen)

    def subset(self, rows: Sequence[Dict[str, Any]], name: Optional[str] = None) -> Dataset:
        return dataclasses.replace(self, rows=tuple(rows), name=name or self.name)


def from_pairs(pairs: Sequence[Tuple[str, int]], labels: Sequence[str], name: str) -> Dataset:
    """A classification dataset from ``(text, label index)`` pairs."""
    return Dataset("classification", tuple({"text": t, "label": y} for t, y in pairs), tuple(labels), name)


def load_jsonl(path: Union[str, os.PathLike[str]], labels: Optional[Sequence[str]] = None) -> Dataset:
    """Read a JSONL file of classification or SFT rows (see the module docs).

    ``labels`` fixes the label names and their order (use the training file's for an eval file); by default they
    are the sorted distinct labels present (integers sorted as numbers). Every problem names the line.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isfile(path):
        # A FIFO or a device (a symlink to /dev/zero) would block or be read until memory runs out.
        raise DataError(f"data file {path!r} is not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except OSError as e:
        raise DataError(f"cannot read data file {path!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path!r} is not UTF-8 text (byte {e.start}): JSONL files are text") from None
    raw: List[Tuple[int, Dict[str, Any]]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        except (ValueError, RecursionError) as e:
            # An integer of more digits than Python converts, or nesting deeper than the parser recurses.
            raise DataError(f"{path}:{number}: unreadable JSON ({type(e).__name__}: {e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: a JSON {type(row).__name__}; each line must be one JSON object")
        raw.append((number, row))
    if not raw:
        raise EmptyInputError(f"data file {path!r} has no rows")
    first = raw[0][1]
    if "text" in first and "label" in first:
        kind, fields = "classification", ("text", "label")
    elif "prompt" in first and "response" in first:
        kind, fields = "sft", ("prompt", "response")
    else:
        raise DataError(
            f"{path}:{raw[0][0]}: fields {sorted(first)}; expected text and label (classification) or prompt and "
            "response (causal-LM SFT)"
        )
    rows: List[Dict[str, Any]] = []
    for number, row in raw:
        missing = [field for field in fields if field not in row]
        if missing:
            raise DataError(f"{path}:{number}: missing field {missing[0]!r} ({kind} rows need {' and '.join(fields)})")
        out: Dict[str, Any] = {}
        for field in fields:
            if field == "label":
                if isinstance(row[field], bool) or not isinstance(row[field], (str, int)):
                    raise DataError(f"{path}:{number}: label must be a string or an integer, not {row[field]!r}")
            elif not isinstance(row[field], str) or not row[field]:
                raise DataError(f"{path}:{number}: {field!r} must be a non-empty string")
            out[field] = row[field]
        if "task" in row:
            if not isinstance(row["task"], str) or not row["task"]:
                raise DataError(f"{path}:{number}: task must be a non-empty string, not {row['task']!r}")
            out["task"] = row["task"]
        rows.append(out)
    name = os.path.basename(path)
    if kind == "sft":
        return Dataset("sft", tuple(rows), (), name)
    names = _label_names(rows, labels)
    if labels is None and len(names) < 2:
        # One class would make a one-output head, which transformers trains as regression (MSE) and which scores
        # "100% accuracy": there is nothing to classify.
        raise DataError(f"{path}: every row has label {names[0]!r}; classification needs at least two distinct labels")
    return Dataset("classification", tuple(_index_labels(rows, names, path)), tuple(names), name)


def _label_names(rows: Sequence[Dict[str, Any]], labels: Optional[Sequence[str]]) -> List[str]:
    if labels is not None:
        return [str(label) for label in labels]
    # The names are the values present, never range(max + 1): one outlier id must not size the head.
    values = {row["label"] for row in rows}
    if all(isinstance(v, int) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def _index_labels(rows: List[Dict[str, Any]], names: List[str], path: str) -> List[Dict[str, Any]]:
    index = {name: i for i, name in enumerate(names)}
    out = []
    for row in rows:
        value = row["label"]
        i = index.get(str(value), -1)
        if i < 0:
            raise DataError(f"{path}: label {value!r} is not one of the {len(names)} labels {names}")
        out.append({**row, "label": i})
    return out


def split(data: Dataset, test_fraction: float = 0.1) -> Tuple[Dataset, Dataset]:
    """A deterministic train/test split by a hash of each row's text, so a row stays on its side across runs."""
    if not 0.0 < test_fraction < 1.0:
        raise InvalidArgumentError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    train: List[Dict[str, Any]] = []
    test: List[Dict[str, Any]] = []
    for row in data.rows:
        key = json.dumps(row, sort_keys=True).encode()
        bucket = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") / 2.0**64
        (test if bucket < test_fraction else train).append(row)
    if not train or not test:
        raise EmptyInputError(
            f"{data.name}: {len(data)} rows are too few to split into train and test; pass a separate eval file"
        )
    return data.subset(train, f"{data.name} (train)"), data.subset(test, f"{data.name} (test)")


def tokenize(
    data: Dataset, tokenizer: Any, max_length: int = 128, tasks: Optional[Sequence[str]] = None
) -> List[Dict[str, torch.Tensor]]:
    """Examples for :func:`lr.train` / :func:`lr.calibrate`: dicts of 1-D tensors, truncated to ``max_length``.

    Classification examples carry the class index as a 0-d ``labels``; SFT examples are ``prompt + response + eos``
    with ``labels`` -100 on the prompt (and the response truncated first when too long). With ``tasks``, each
    example also gets ``task_ids``, its task's index in ``tasks``.
    """
    if max_length < 2:
        raise InvalidArgumentError(f"max_length must be at least 2 tokens, got {max_length}")
    task_index = {name: i for i, name in enumerate(tasks)} if tasks is not None else None
    examples: List[Dict[str, torch.Tensor]] = []
    if data.kind == "classification":
        texts = [row["text"] for row in data.rows]
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        for i, row in enumerate(data.rows):
            ids = torch.tensor(encoded["input_ids"][i], dtype=torch.long)
            examples.append(
                {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(row["label"])}
            )
    elif data.kind == "sft":
        eos = tokenizer.eos_token_id
        for row in data.rows:
            prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
            response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
            if eos is not None:
                response = [*response, eos]
            prompt = prompt[: max_length - 1]
            response = response[: max_length - len(prompt)]
            ids = torch.tensor(prompt + response, dtype=torch.long)
            labels = torch.tensor([IGNORE_INDEX] * len(prompt) + response, dtype=torch.long)
            examples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    else:
        raise DataError(f"unknown data kind {data.kind!r}")
    if task_index is not None:
        for example, row in zip(examples, data.rows):
            name = row.get("task")
            if name not in task_index:
                raise DataError(f"a row of {data.name} has task {name!r}, which is not one of {list(task_index)}")
            example["task_ids"] = torch.tensor(task_index[name])
    return examples
