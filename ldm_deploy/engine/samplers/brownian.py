"""A Brownian motion fixed by a seed, as torchsde's BrownianInterval draws it with a halfway tree
(what diffusers' DPMSolverSDEScheduler and k-diffusion's DPM++ SDE sample their noise from),
in numpy: the runtime needs no torch and no torchsde.

W over [t0, t1] is one Gaussian, N(0, t1 - t0). An interval is split at its middle, and the left
part of W is drawn from the Brownian bridge given the whole:

    W_left = (l / h) W + sqrt(l r / h) z,   W_right = W - W_left    (l, r: the parts' lengths, h = l + r)

with z a fresh torch.randn from a seed that numpy's SeedSequence gives the node (entropy = the
seed, spawn key = (its index among the nodes of its depth, its depth)). Splitting goes on until a
query point is a node's middle (times rounded to 6 decimals, torchsde's tol 1e-6), so W(ta, tb)
depends on the seed and the query alone: a sum of the nodes that tile [ta, tb], left to right.

torch's float32 arithmetic is followed operation by operation (each Python float factor rounded
to float32 first, as torch does with a scalar), and torch.randn is TorchCpuRandom's.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from ldm_deploy.engine.torch_random import TorchCpuRandom

TOL = 1e-6  # diffusers' BatchedBrownianTree settings
POOL_SIZE = 24
CACHE = 128  # nodes whose W is kept (torchsde keeps 45): 128 recompute almost none in a walk


class Node:
    __slots__ = ("start", "end", "parent", "is_left", "middle", "key", "depth", "seed", "left", "right")

    def __init__(self, start: float, end: float, parent, is_left: bool | None, tree: "BrownianTree"):
        self.start, self.end = tree.round(start), tree.round(end)
        self.parent, self.is_left = parent, is_left
        self.middle = None

    def split(self, tree: "BrownianTree") -> None:
        """Split at the middle: this node's seed, and its two children."""
        middle = 0.5 * (self.end + self.start)
        self.middle = tree.round(middle)
        if self.parent is None:
            self.key, self.depth = 0, 0
        else:
            self.key = 2 * self.parent.key + (0 if self.is_left else 1)
            self.depth = self.parent.depth + 1
        sequence = np.random.SeedSequence(entropy=tree.entropy, spawn_key=(self.key, self.depth),
                                          pool_size=POOL_SIZE)
        self.seed = int(sequence.generate_state(4)[0])  # torchsde's W seed (H and Levy area seeds unused)
        self.left = Node(self.start, middle, self, True, tree)
        self.right = Node(middle, self.end, self, False, tree)


class BrownianTree:
    """W over [t0, t1] (t0 < t1) for one seed; `increment(ta, tb)` is W(tb) - W(ta), (size) float32."""

    def __init__(self, t0: float, t1: float, size: tuple[int, ...], entropy: int):
        self.size, self.entropy = tuple(size), int(entropy)
        self.generator = TorchCpuRandom(0)  # reseeded for each node's draw
        digits = -int(math.log10(TOL))
        self.round = lambda x: round(x, digits)
        self.root = Node(float(t0), float(t1), None, None, self)
        seed = np.random.SeedSequence(entropy=self.entropy, pool_size=POOL_SIZE).generate_state(3)[0]
        self.root_w = self.randn(seed) * np.float32(math.sqrt(float(t1) - float(t0)))
        self.cache: OrderedDict = OrderedDict()

    def randn(self, seed) -> np.ndarray:
        """torch.randn(size) of a generator seeded with `seed`."""
        self.generator.reseed(int(seed))
        return self.generator.standard_normal(self.size).astype(np.float32)

    def increment(self, ta: float, tb: float) -> np.ndarray:
        """W(tb) - W(ta) for t0 <= ta <= tb <= t1 (each clamped into the interval, as torchsde does)."""
        root = self.root
        ta, tb = (min(max(float(t), root.start), root.end) for t in (ta, tb))
        if ta > tb:
            raise ValueError(f"a Brownian increment runs forward in time, got ta={ta} > tb={tb}")
        ta, tb = self.round(ta), self.round(tb)
        if ta == tb:  # (torchsde recurses without end where only the rounding makes them equal)
            return np.zeros(self.size, np.float32)
        nodes: list[Node] = []
        self.locate(root, ta, tb, nodes)
        w = self.w(nodes[0])
        for node in nodes[1:]:
            w = w + self.w(node)
        return w

    def locate(self, node: Node, ta: float, tb: float, out: list) -> None:
        """Append the nodes that tile [ta, tb], left to right, splitting at middles as needed."""
        while True:
            if ta == node.start and tb == node.end:
                out.append(node)
                return
            if node.middle is None:
                node.split(self)
            if tb <= node.middle:
                node = node.left
            elif ta >= node.middle:
                node = node.right
            else:
                self.locate(node.left, ta, node.middle, out)
                node, ta = node.right, node.middle

    def w(self, node: Node) -> np.ndarray:
        """The increment over one node, from its parent's by the Brownian bridge (module docstring)."""
        if node.parent is None:
            return self.root_w
        if node in self.cache:
            self.cache.move_to_end(node)
            return self.cache[node]
        parent = node.parent
        whole = self.w(parent)
        h_reciprocal = 1 / (parent.end - parent.start)
        left, right = parent.middle - parent.start, parent.end - parent.middle
        mean = (np.float32(left) * whole) * np.float32(h_reciprocal)
        left_w = mean + np.float32(math.sqrt(left * right * h_reciprocal)) * self.randn(parent.seed)
        out = left_w if node.is_left else whole - left_w
        self.cache[node] = out
        if len(self.cache) > CACHE:
            self.cache.popitem(last=False)
        return out


def unit_noise(tree: BrownianTree, sigma: float, sigma_next: float) -> np.ndarray:
    """diffusers' BrownianTreeNoiseSampler(sigma, sigma_next): the increment between two noise
    levels (times are sigmas; a step down in sigma is the negated increment), over the square root
    of its length: unit Gaussian noise, correlated across steps as one Brownian path."""
    a, b = np.float32(sigma), np.float32(sigma_next)
    lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
    w = tree.increment(float(lo), float(hi))
    if sign < 0:
        w = -w
    return w / np.sqrt(np.abs(b - a))


def row_noise(brownian: tuple, seeds, shape: tuple[int, ...]) -> list[np.ndarray | None]:
    """Each row's noise input (B, C, h, w) float32 for a plan's `brownian` ((lo, hi), terms): image
    i's from a tree seeded with seeds[i], as AUTOMATIC1111 gives each image its own (and diffusers'
    DPMSolverSDEScheduler with noise_sampler_seed = that seed); None for a row without noise."""
    (lo, hi), terms = brownian
    trees = [BrownianTree(lo, hi, tuple(shape[1:]), seed) for seed in seeds]
    out = []
    for row in terms:
        if not row:
            out.append(None)
            continue
        images = []
        for tree in trees:
            parts = [np.float32(w) * unit_noise(tree, a, b) for w, a, b in row]
            images.append(sum(parts[1:], parts[0]))
        out.append(np.stack(images).astype(np.float32))
    return out
