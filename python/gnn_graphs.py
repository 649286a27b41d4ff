"""A GraphNetwork-style GNN on a synthetic graph classification set: K-FAC vs Adam.

Three classes of graphs of 4..14 nodes, made here (no download): a ring with a few random
chords, a random tree, and a star with a few extra edges. A batch concatenates the graphs' nodes
and edges (graph ``n`` owns ``R_n`` node rows and its own number of edge rows). Each block
updates the edges from ``[x_sender, x_receiver, e]`` and the nodes from ``[x, sum of incoming
edges]`` with ``nn.Linear`` layers; the graph's node mean feeds the classifier.

The edge and node layers share their weights over each graph's edges/nodes, a weight-sharing
dim of graph-dependent size: ``kfac_kernels.graph_rows`` names the graph of every row, and
K-FAC-reduce uses Eschenhagen et al. (2023), Eq. 55 (per-graph sums scaled by ``1/sqrt(R_n)``)::

    with graph_rows(batch.node_graph, modules=node_layers), \\
            graph_rows(batch.edge_graph, modules=edge_layers):
        logits = model(batch)

Run from the repository root::

    PYTHONPATH=. python python/gnn_graphs.py
    PYTHONPATH=. python python/gnn_graphs.py --kfac-approx expand
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kfac_kernels
from kfac_kernels import graph_rows


def make_graph(label: int, gen: torch.Generator) -> list[tuple[int, int]]:
    n = int(torch.randint(4, 15, (1,), generator=gen))
    rand = lambda k: int(torch.randint(k, (1,), generator=gen))  # noqa: E731
    if label == 0:      # ring with chords
        edges = [(i, (i + 1) % n) for i in range(n)]
        edges += [(rand(n), rand(n)) for _ in range(rand(3))]
    elif label == 1:    # random tree
        edges = [(i, rand(i)) for i in range(1, n)]
    else:               # star with extras
        edges = [(0, i) for i in range(1, n)]
        edges += [(1 + rand(n - 1), 1 + rand(n - 1)) for _ in range(rand(3))]
    edges = [(a, b) for a, b in edges if a != b]
    return n, edges + [(b, a) for a, b in edges]  # both directions


@dataclass
class GraphBatch:
    x: torch.Tensor           # (nodes, node features)
    senders: torch.Tensor     # (edges,)
    receivers: torch.Tensor   # (edges,)
    node_graph: torch.Tensor  # (nodes,) graph of every node row
    edge_graph: torch.Tensor  # (edges,) graph of every edge row
    y: torch.Tensor           # (graphs,)
    num_graphs: int


def make_dataset(count: int, seed: int) -> list[tuple[int, list, int]]:
    gen = torch.Generator().manual_seed(seed)
    return [(*make_graph(i % 3, gen), i % 3) for i in range(count)]


def collate(graphs, gen: torch.Generator) -> GraphBatch:
    xs, snd, rcv, ng, eg, offset = [], [], [], [], [], 0
    for g, (n, edges, _) in enumerate(graphs):
        xs.append(torch.cat([torch.ones(n, 1), 0.1 * torch.randn(n, 2, generator=gen)], dim=1))
        e = torch.tensor(edges, dtype=torch.long).reshape(-1, 2)
        snd.append(e[:, 0] + offset)
        rcv.append(e[:, 1] + offset)
        ng.append(torch.full((n,), g))
        eg.append(torch.full((len(e),), g))
        offset += n
    return GraphBatch(torch.cat(xs), torch.cat(snd), torch.cat(rcv), torch.cat(ng),
                      torch.cat(eg), torch.tensor([lab for *_, lab in graphs]), len(graphs))


class GNBlock(nn.Module):
    def __init__(self, h: int, he: int):
        super().__init__()
        self.edge = nn.Linear(2 * h + he, he)
        self.node = nn.Linear(h + he, h)

    def forward(self, x, e, b: GraphBatch):
        e = torch.relu(self.edge(torch.cat([x[b.senders], x[b.receivers], e], dim=1)))
        incoming = x.new_zeros(x.shape[0], e.shape[1]).index_add(0, b.receivers, e)
        return torch.relu(self.node(torch.cat([x, incoming], dim=1))), e


class GraphNet(nn.Module):
    def __init__(self, h: int = 16, he: int = 8, blocks: int = 2, classes: int = 3):
        super().__init__()
        self.node_in = nn.Linear(3, h)
        self.edge_in = nn.Linear(1, he)
        self.blocks = nn.ModuleList(GNBlock(h, he) for _ in range(blocks))
        self.classifier = nn.Linear(h, classes)

    def node_layers(self):
        return [self.node_in] + [blk.node for blk in self.blocks]

    def edge_layers(self):
        return [self.edge_in] + [blk.edge for blk in self.blocks]

    def forward(self, b: GraphBatch):
        x = torch.relu(self.node_in(b.x))
        e = torch.relu(self.edge_in(b.x.new_ones(b.senders.shape[0], 1)))
        for blk in self.blocks:
            x, e = blk(x, e, b)
        counts = torch.bincount(b.node_graph, minlength=b.num_graphs).clamp_min(1)
        pooled = x.new_zeros(b.num_graphs, x.shape[1]).index_add(0, b.node_graph, x)
        return self.classifier(pooled / counts[:, None])


def run(model, b: GraphBatch):
    with graph_rows(b.node_graph, modules=model.node_layers(), num_graphs=b.num_graphs), \
            graph_rows(b.edge_graph, modules=model.edge_layers(), num_graphs=b.num_graphs):
        return model(b)


@torch.no_grad()
def accuracy(model, b: GraphBatch) -> float:
    return (model(b).argmax(1) == b.y).float().mean().item()


def train(name, args, train_set, test_batch):
    torch.manual_seed(args.seed)
    model = GraphNet()
    if name == "kfac":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        precond = kfac_kernels.KFAC(model, damping=args.damping, inv_update_steps=10,
                                    kl_clip=args.kl_clip, lr=args.lr,
                                    kfac_approx=args.kfac_approx, loss_average="batch")
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=args.adam_lr)
        precond = None
    gen = torch.Generator().manual_seed(args.seed)
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(train_set), (args.batch_size,), generator=gen).tolist()
        b = collate([train_set[i] for i in idx], gen)
        optimizer.zero_grad()
        loss = F.cross_entropy(run(model, b), b.y)
        loss.backward()
        if precond is not None:
            precond.step()
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            print(f"{name:5s} step {step:4d}  train loss (last 50) "
                  f"{sum(losses[-50:]) / len(losses[-50:]):.4f}  "
                  f"test accuracy {accuracy(model, test_batch):.4f}")
    print(f"{name:5s} {args.steps} steps in {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--kfac-approx", choices=("reduce", "expand"), default="reduce")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--kl-clip", type=float, default=1e-3)
    parser.add_argument("--adam-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizers", default="kfac,adam",
                        help="comma-separated subset of kfac,adam")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_set = make_dataset(600, seed=1)
    test_batch = collate(make_dataset(300, seed=2), torch.Generator().manual_seed(3))
    for name in args.optimizers.split(","):
        train(name, args, train_set, test_batch)


if __name__ == "__main__":
    main()
