"""Every Python code block of the README runs as written, with only the data supplied (the
``<!-- snippet-data: NAME -->`` line before a block names what it reads: ``loader`` of digit
batches and ``x, y``; token batches and ``vocab``; graph batches), the way a newcomer pastes
them one after another, and trains without NaN and without a warning about itself."""
from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- snippet-data: (\w+) -->\n```python\n(.*?)```", re.S)


def _blocks() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for data, code in BLOCK.findall((ROOT / "README.md").read_text()):
        out.setdefault(data, []).append(code)
    return out


def test_every_python_block_is_tested():
    text = (ROOT / "README.md").read_text()
    assert text.count("```python") == sum(len(v) for v in _blocks().values())


def _digits(digits):
    loader = digits.batches(32, 25, seed=2)
    x, y = loader[0]
    return {"loader": loader, "x": x, "y": y}, (digits.x_test, digits.y_test)


def _tokens():
    """Sequences where the next token is the previous one plus one (mod vocab), with noise."""
    gen = torch.Generator().manual_seed(0)
    vocab, n, t = 17, 16, 12

    def batch():
        start = torch.randint(0, vocab, (n, 1), generator=gen)
        seq = (start + torch.arange(t + 1)) % vocab
        flip = torch.rand(n, t + 1, generator=gen) < 0.05
        seq = torch.where(flip, torch.randint(0, vocab, (n, t + 1), generator=gen), seq)
        return seq[:, :-1], seq[:, 1:]
    loader = [batch() for _ in range(40)]
    return {"loader": loader, "vocab": vocab}, batch()


def _graphs():
    sys.path.insert(0, str(ROOT / "python"))
    from gnn_graphs import collate, make_dataset

    gen = torch.Generator().manual_seed(0)
    data = make_dataset(400, seed=0)
    loader = [collate(data[i:i + 20], gen) for i in range(0, 360, 20)]
    return {"loader": loader}, collate(data[360:], gen)


def _loss(namespace, held_out) -> float:
    model = namespace["model"]
    with torch.no_grad():
        if isinstance(held_out, tuple):
            return float(F.cross_entropy(model(held_out[0]), held_out[1]))
        return float(F.cross_entropy(model(held_out), held_out.y))


CLASSES = {"digits": 10, "tokens": 17, "graphs": 3}


@pytest.mark.parametrize("data", ["digits", "tokens", "graphs"])
def test_snippets_run_and_train(data, digits, single_thread):
    """Each block leaves finite parameters and a finite held-out loss; after the blocks the
    held-out loss is well below chance (log of the number of classes)."""
    torch.manual_seed(0)
    namespace, held_out = {"digits": lambda: _digits(digits), "tokens": _tokens,
                           "graphs": _graphs}[data]()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i, code in enumerate(_blocks()[data]):
            exec(compile(code, f"README.md ({data} block {i})", "exec"), namespace)
            assert all(torch.isfinite(p).all() for p in namespace["model"].parameters()), i
            loss = _loss(namespace, held_out)
            assert loss == loss and loss < float("inf"), (data, i, loss)
    ours = [str(w.message) for w in record if str(w.message).startswith(
        ("KFAC", "BDKFAC", "AdaptiveKFAC", "SINGD", "TwoLevel", "PreconditionedOptimizer",
         "kronecker"))]
    assert not ours, ours
    chance = math.log(CLASSES[data])
    assert loss < 0.7 * chance, (data, loss, chance)


def test_language_model_snippet_starts_near_chance():
    """The tied embedding is initialised so that the first loss is of the order of log(vocab)
    (PyTorch's default N(0, 1) embedding made it about 55)."""
    namespace, (inputs, targets) = _tokens()
    code = _blocks()["tokens"][0].split("model = LM(vocab)")[0]
    exec(compile(code, "README.md (tokens, the model)", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["LM"](namespace["vocab"])
    with torch.no_grad():
        loss = float(F.cross_entropy(model(inputs), targets))
    assert loss < 1.5 * math.log(namespace["vocab"]), loss
