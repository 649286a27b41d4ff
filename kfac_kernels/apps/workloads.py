"""Training workloads of ``kfac-train``: data that needs no download, a model, a loss and metrics.

=============  ================================================================  ==============
name           data and model                                                     K-FAC sees
=============  ================================================================  ==============
digits         scikit-learn's bundled 8x8 digits, a small CNN (:class:`DigitsCNN`)   conv + linear
digits-vit     the same digits, a ViT-tiny on 2x2 patches (:class:`DigitsViT`)       conv + linear
char-lm        characters of the Python standard library's docstrings, a small      linear (expand
               causal transformer (attention built from ``nn.Linear``)               over positions)
deep-linear    Tselepidis et al.'s planted targets: Gaussian inputs, binary targets of a      linear
               random linear map; a deep linear MLP with batch norm (MSE)
digits-        the digits' pixels in [0, 1], a deep tanh autoencoder                linear
autoencoder    64-256-128-64-16-64-128-256-64 with logistic outputs (binary
               cross-entropy), the shape of Martens & Grosse (2015)'s benchmark
digits-bn      the digits, :class:`DigitsCNN` with BatchNorm after every hidden      conv + linear
               layer                                                                 + batch norm
graphs         synthetic graph classification (random graphs of 3 families with     linear (rows are
               varying node counts), a message-passing GNN with mean readout         nodes)
=============  ================================================================  ==============

Every workload is deterministic given its split seed; models are initialised from ``--seed``
only, and mini-batches come from a seeded generator, so optimizers compare like with like.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import load_digits_split
from .models import build_digits_cnn


@dataclass
class Split:
    """Train and test data of a workload. ``x`` is a tensor, or for graphs a dict of tensors
    indexed by graph (see :class:`GraphSet`)."""

    x_train: object
    y_train: torch.Tensor
    x_test: object
    y_test: torch.Tensor
    extra: dict = field(default_factory=dict)

    @property
    def train_size(self) -> int:
        return int(self.y_train.shape[0])


@dataclass
class Workload:
    name: str
    description: str
    load: Callable[..., Split]
    build_model: Callable[..., nn.Module]
    loss_average: str                           # what K-FAC is told about the loss
    target: tuple[str, float]                   # default target metric and value
    metric_name: str = "accuracy"
    loss_fn: Callable | None = None             # (outputs, targets) -> mean loss
    take: Callable | None = None                # (x, idx) -> model inputs
    loss_module: Callable[[], nn.Module] = nn.CrossEntropyLoss   # the loss as an nn.Module

    def loss_pair(self, outputs: torch.Tensor, targets: torch.Tensor):
        """``(outputs, targets)`` as :attr:`loss_module` takes them (per-position logits of a
        sequence model flattened to rows) for :class:`kfac_kernels.AdaptiveKFAC`."""
        if self.loss_fn is None and outputs.dim() > 2:
            return outputs.flatten(0, -2), targets.flatten()
        return outputs, targets.to(outputs.dtype) if self.loss_fn is not None else targets

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(outputs.float(), targets)
        return F.cross_entropy(outputs.float().flatten(0, -2), targets.flatten())

    def inputs(self, x, idx: torch.Tensor):
        return self.take(x, idx) if self.take is not None else x[idx]

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
        if self.metric_name == "reconstruction":
            # pixels within 0.1 of the target: a readable side metric of an autoencoder
            close = ((torch.sigmoid(outputs) - targets).abs() < 0.1)
            return int(close.sum()), int(targets.numel())
        if self.metric_name == "accuracy":
            pred = outputs.argmax(-1)
            return int((pred == targets).sum()), int(targets.numel())
        # binary targets: a coordinate is right when the sign of the output matches
        pred = (outputs > 0.5).to(targets.dtype)
        return int((pred == targets).sum()), int(targets.numel())


# --- digits ------------------------------------------------------------------------------------

def _load_digits(dtype, device) -> Split:
    d = load_digits_split(0, dtype=dtype, device=device)
    return Split(d.x_train, d.y_train, d.x_test, d.y_test)


class PatchAttention(nn.Module):
    """Bidirectional multi-head self-attention over patch tokens, from ``nn.Linear`` layers."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, w = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, t, w))


class ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = PatchAttention(width, heads)
        self.fc1, self.fc2 = nn.Linear(width, mlp), nn.Linear(mlp, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsViT(nn.Module):
    """ViT-tiny for 8x8 digits: 2x2 patches (16 tokens) embedded by a strided convolution,
    learned position embeddings, pre-norm blocks, mean-pooled tokens into a linear head."""

    def __init__(self, width: int = 64, depth: int = 3, heads: int = 4, mlp: int = 128,
                 patch: int = 2, size: int = 8, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(1, width, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn((size // patch) ** 2, width))
        self.blocks = nn.ModuleList(ViTBlock(width, heads, mlp) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


# --- digits-autoencoder, digits-bn -------------------------------------------------------------

def _load_digits_pixels(dtype, device) -> Split:
    """The digits' pixels scaled to ``[0, 1]`` (not standardised: they are the targets of a
    logistic output), flattened to 64 features; inputs and targets are the same tensor."""
    d = load_digits_split(0, dtype=torch.float64, device="cpu")
    x_train = (d.x_train * d.std + d.mean).clamp(0, 1).flatten(1).to(device=device, dtype=dtype)
    x_test = (d.x_test * d.std + d.mean).clamp(0, 1).flatten(1).to(device=device, dtype=dtype)
    return Split(x_train, x_train, x_test, x_test)


def digits_autoencoder(widths: tuple[int, ...] = (64, 256, 128, 64, 16, 64, 128, 256, 64)
                       ) -> nn.Sequential:
    """A deep autoencoder with tanh hidden units and a linear last layer (the logits of a
    logistic output): the shape of the classic K-FAC benchmark (Martens & Grosse (2015), Sec.
    13), sized for 8x8 images."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def _bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per pixel (``nn.BCEWithLogitsLoss()``)."""
    return F.binary_cross_entropy_with_logits(out, y.to(out.dtype))


def digits_bn_cnn(num_classes: int = 10) -> nn.Sequential:
    """:class:`~kfac_kernels.apps.models.DigitsCNN` with ``BatchNorm2d``/``BatchNorm1d`` after
    each hidden layer (before the ReLU)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.BatchNorm1d(64), nn.ReLU(inplace=True),
        nn.Linear(64, num_classes))


# --- char-lm -----------------------------------------------------------------------------------

CHAR_LM_MODULES = ("collections", "functools", "itertools", "json", "argparse", "textwrap",
                   "string", "pathlib", "typing", "dataclasses", "enum", "heapq", "bisect",
                   "contextlib", "statistics", "fractions", "shlex", "csv", "difflib", "calendar")


def stdlib_docstring_corpus(max_chars: int = 400_000) -> str:
    """Docstrings of a fixed list of standard-library modules and their public members, in a
    fixed order: text that ships with every Python."""
    import importlib
    import inspect

    parts = []
    for name in CHAR_LM_MODULES:
        mod = importlib.import_module(name)
        if mod.__doc__:
            parts.append(mod.__doc__)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and getattr(getattr(mod, attr, None), "__module__", None) == name:
                parts.append(doc)
    text = "\n\n".join(parts)
    text = "".join(c if (32 <= ord(c) < 127 or c == "\n") else "?" for c in text)
    return text[:max_chars]


def _load_char_lm(dtype, device, seq_len: int = 64) -> Split:
    text = stdlib_docstring_corpus()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.int64)
    n = (ids.numel() - 1) // seq_len
    x = ids[:n * seq_len].reshape(n, seq_len)
    y = ids[1:n * seq_len + 1].reshape(n, seq_len)
    cut = int(n * 0.9)  # the last 10% of the text is the test set
    return Split(x[:cut].to(device), y[:cut].to(device), x[cut:].to(device), y[cut:].to(device),
                 extra={"vocab": vocab})


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with its projections as ``nn.Linear`` (so K-FAC sees
    them; the sequence positions are their weight-sharing dim)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x):
        n, t, c = x.shape
        split = lambda z: z.reshape(n, t, self.heads, c // self.heads).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(n, t, c))


class TransformerBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    """A small causal character-level transformer LM."""

    def __init__(self, vocab: int, width: int = 64, depth: int = 2, heads: int = 4,
                 max_len: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(max_len, width))
        self.blocks = nn.Sequential(*(TransformerBlock(width, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids):
        h = self.embed(ids) + self.pos[:ids.shape[1]]
        return self.head(self.norm(self.blocks(h)))


def _build_char_lm(seed, dtype, device, split: Split) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CharTransformer(len(split.extra["vocab"]))
    return model.to(device=device, dtype=dtype)


# --- deep-linear (Tselepidis et al. (2020), App. B.1) ------------------------------------------

def planted_data(n: int, width: int, seed: int, classes: bool = False,
                 outputs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian ``width``-d inputs and the targets of a random linear teacher with ``outputs``
    outputs (default ``width``): binary targets ``teacher(x) > 0`` (``(n, outputs)``), or with
    ``classes`` one of ``outputs`` classes (its largest output)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=gen)
    teacher = torch.randn(outputs or width, width, generator=gen) / width ** 0.5
    scores = x @ teacher.T
    return x, (scores.argmax(1) if classes else (scores > 0).float())


def deep_linear_mlp(depth: int, width: int, seed: int, outputs: int | None = None,
                    bias: bool = True) -> nn.Sequential:
    """``depth`` blocks of ``Linear(width, width)`` and ``BatchNorm1d(width)``, then a
    ``Linear(width, outputs)`` (default ``width`` outputs); ``bias=False`` drops the Linear
    layers' biases."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width, bias=bias), nn.BatchNorm1d(width)]
        layers.append(nn.Linear(width, outputs or width, bias=bias))
        return nn.Sequential(*layers)


def _load_deep_linear(dtype, device) -> Split:
    x, y = planted_data(8192 + 2048, 10, seed=0)
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    return Split(x[:8192], y[:8192], x[8192:], y[8192:])


# --- graphs ------------------------------------------------------------------------------------

class GraphSet:
    """Graphs stored flat: node features ``(total_nodes, F)``, ``edges (2, total_edges)`` with
    global node ids, ``node_ptr``/``edge_ptr`` offsets per graph. Indexing by a tensor of graph
    ids gives a batch (a dict the GNN takes) with renumbered nodes and a ``graph`` index per
    node."""

    def __init__(self, feats, edges, node_ptr, edge_ptr):
        self.feats, self.edges, self.node_ptr, self.edge_ptr = feats, edges, node_ptr, edge_ptr

    def __getitem__(self, idx: torch.Tensor) -> dict:
        feats, edges, graph = [], [], []
        offset = 0
        for k, g in enumerate(idx.tolist()):
            n0, n1 = int(self.node_ptr[g]), int(self.node_ptr[g + 1])
            e0, e1 = int(self.edge_ptr[g]), int(self.edge_ptr[g + 1])
            feats.append(self.feats[n0:n1])
            edges.append(self.edges[:, e0:e1] - n0 + offset)
            graph.append(torch.full((n1 - n0,), k, dtype=torch.int64, device=self.feats.device))
            offset += n1 - n0
        return {"x": torch.cat(feats), "edges": torch.cat(edges, dim=1),
                "graph": torch.cat(graph), "num_graphs": len(idx)}


def synthetic_graphs(count: int, seed: int) -> tuple[GraphSet, torch.Tensor]:
    """Three families, 8-24 nodes each: rings with chords, two-community graphs, and stars of
    paths; node features are noisy degree and random channels. The label is the family."""
    gen = torch.Generator().manual_seed(seed)
    feats, edges, node_ptr, edge_ptr, labels = [], [], [0], [0], []
    for _ in range(count):
        label = int(torch.randint(0, 3, (1,), generator=gen))
        n = int(torch.randint(8, 25, (1,), generator=gen))
        pairs = set()
        if label == 0:
            for i in range(n):
                pairs.add((i, (i + 1) % n))
            for _ in range(n // 4):
                a, b = torch.randint(0, n, (2,), generator=gen).tolist()
                pairs.add((a, b))
        elif label == 1:
            half = n // 2
            for _ in range(2 * n):
                a, b = torch.randint(0, half, (2,), generator=gen).tolist()
                pairs.add((a, b))
                a, b = torch.randint(half, n, (2,), generator=gen).tolist()
                pairs.add((a, b))
            pairs.add((0, n - 1))
        else:
            for i in range(1, n):
                parent = 0 if i % 3 == 1 else i - 1
                pairs.add((parent, i))
        und = sorted({(a, b) for a, b in pairs if a != b} | {(b, a) for a, b in pairs if a != b})
        e = torch.tensor(und, dtype=torch.int64).T + node_ptr[-1]
        deg = torch.bincount(e[0] - node_ptr[-1], minlength=n).float()
        f = torch.cat([deg[:, None] / 4 + 0.1 * torch.randn(n, 1, generator=gen),
                       torch.randn(n, 3, generator=gen)], dim=1)
        feats.append(f)
        edges.append(e)
        node_ptr.append(node_ptr[-1] + n)
        edge_ptr.append(edge_ptr[-1] + e.shape[1])
        labels.append(label)
    return (GraphSet(torch.cat(feats), torch.cat(edges, dim=1), torch.tensor(node_ptr),
                     torch.tensor(edge_ptr)), torch.tensor(labels))


def _load_graphs(dtype, device) -> Split:
    def place(graphs: GraphSet) -> GraphSet:
        graphs.feats = graphs.feats.to(device=device, dtype=dtype)
        graphs.edges = graphs.edges.to(device)
        return graphs

    train, y_train = synthetic_graphs(1000, seed=0)
    test, y_test = synthetic_graphs(200, seed=1)
    return Split(place(train), y_train.to(device), place(test), y_test.to(device))


class GNN(nn.Module):
    """Message passing with mean aggregation, ``h <- relu(self(h) + neigh(mean_neighbours(h)))``,
    then a mean readout per graph and a linear classifier."""

    def __init__(self, features: int = 4, width: int = 32, layers: int = 3, classes: int = 3):
        super().__init__()
        self.embed = nn.Linear(features, width)
        self.self_maps = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.neigh_maps = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))
        self.head = nn.Linear(width, classes)

    def forward(self, batch: dict):
        h = torch.relu(self.embed(batch["x"]))
        src, dst = batch["edges"]
        deg = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device).index_add_(
            0, dst, torch.ones_like(dst, dtype=h.dtype)).clamp_min(1)
        for self_map, neigh_map in zip(self.self_maps, self.neigh_maps):
            agg = torch.zeros_like(h).index_add_(0, dst, h[src]) / deg[:, None]
            h = torch.relu(self_map(h) + neigh_map(agg))
        counts = torch.zeros(batch["num_graphs"], dtype=h.dtype, device=h.device).index_add_(
            0, batch["graph"], torch.ones_like(batch["graph"], dtype=h.dtype))
        pooled = torch.zeros(batch["num_graphs"], h.shape[1], dtype=h.dtype,
                             device=h.device).index_add_(0, batch["graph"], h) / counts[:, None]
        return self.head(pooled)


WORKLOADS: dict[str, Workload] = {
    "digits": Workload(
        "digits", "scikit-learn digits, small CNN", lambda dtype, device: _load_digits(dtype, device),
        lambda seed, dtype, device, split: build_digits_cnn(seed, dtype=dtype, device=device),
        loss_average="batch", target=("test_accuracy", 0.97)),
    "digits-vit": Workload(
        "digits-vit", "scikit-learn digits, ViT-tiny (2x2 patches, 3 blocks)",
        lambda dtype, device: _load_digits(dtype, device),
        lambda seed, dtype, device, split: _seeded(DigitsViT, seed).to(device=device,
                                                                      dtype=dtype),
        loss_average="batch", target=("test_accuracy", 0.93)),
    "char-lm": Workload(
        "char-lm", "stdlib docstrings, small causal transformer",
        lambda dtype, device: _load_char_lm(dtype, device), _build_char_lm,
        loss_average="batch+sequence", target=("test_loss", 2.6)),
    "deep-linear": Workload(
        "deep-linear", "Tselepidis et al. (2020) planted targets, deep linear MLP with batch norm",
        lambda dtype, device: _load_deep_linear(dtype, device),
        lambda seed, dtype, device, split: deep_linear_mlp(16, 10, seed).to(device=device,
                                                                            dtype=dtype),
        loss_average="batch", target=("test_loss", 0.12), metric_name="binary accuracy",
        loss_fn=lambda out, y: F.mse_loss(out, y.to(out.dtype)), loss_module=nn.MSELoss),
    "digits-autoencoder": Workload(
        "digits-autoencoder", "digits pixels, deep tanh autoencoder (binary cross-entropy)",
        lambda dtype, device: _load_digits_pixels(dtype, device),
        lambda seed, dtype, device, split: _seeded(digits_autoencoder, seed).to(device=device,
                                                                                 dtype=dtype),
        loss_average="batch", target=("test_loss", 0.35), metric_name="reconstruction",
        loss_fn=_bce, loss_module=nn.BCEWithLogitsLoss),
    "digits-bn": Workload(
        "digits-bn", "scikit-learn digits, CNN with batch norm",
        lambda dtype, device: _load_digits(dtype, device),
        lambda seed, dtype, device, split: _seeded(digits_bn_cnn, seed).to(device=device,
                                                                            dtype=dtype),
        loss_average="batch", target=("test_accuracy", 0.97)),
    "graphs": Workload(
        "graphs", "synthetic graph families, message-passing GNN",
        lambda dtype, device: _load_graphs(dtype, device),
        lambda seed, dtype, device, split: _seeded(GNN, seed).to(device=device, dtype=dtype),
        loss_average="batch", target=("test_accuracy", 0.9),
        take=lambda graphs, idx: graphs[idx]),
}


def _seeded(cls, seed: int, *args, **kwargs) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(*args, **kwargs)
