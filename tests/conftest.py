import os

import numpy as np
import pytest

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None


def pytest_collection_modifyitems(config, items):
    slow = os.environ.get("LOWRANK_SLOW") == "1"
    cuda = torch is not None and torch.cuda.is_available()
    for item in items:
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow test: set LOWRANK_SLOW=1 to run"))
        if "gpu" in item.keywords and not cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# -- the tiny models every test module builds ---------------------------------------------------------------------

FAMILIES = ("llama", "qwen2", "bert", "deberta")


def tiny_model(family, seed=0, *, vocab=96, hidden=32, layers=2, dtype=None, head=True, **extra):
    """A random-initialised transformers model of ``family`` (LLaMA and Qwen2 causal LMs with grouped-query
    attention; BERT and DeBERTa-v2 sequence classifiers with 3 labels), seeded, in eval mode. ``head=False`` gives
    the bare encoder or decoder. ``extra`` goes into the transformers config (e.g. DeBERTa's relative attention)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4
    )
    common.update(extra)
    t = transformers
    if family == "llama":
        model = (t.LlamaForCausalLM if head else t.LlamaModel)(t.LlamaConfig(num_key_value_heads=2, **common))
    elif family == "qwen2":
        model = (t.Qwen2ForCausalLM if head else t.Qwen2Model)(t.Qwen2Config(num_key_value_heads=2, **common))
    elif family == "bert":
        model = (t.BertForSequenceClassification if head else t.BertModel)(t.BertConfig(num_labels=3, **common))
    elif family == "deberta":
        cfg = t.DebertaV2Config(num_labels=3, **common)
        model = (t.DebertaV2ForSequenceClassification if head else t.DebertaV2Model)(cfg)
    else:
        raise ValueError(f"unknown tiny model family {family!r}; known: {FAMILIES}")
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


@pytest.fixture
def tiny():
    """The :func:`tiny_model` factory, for tests that take it as a fixture."""
    return tiny_model
