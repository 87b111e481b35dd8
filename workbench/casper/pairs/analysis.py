"""Analysis of the challenge-2 model, as in Heimersheim & Hobbhahn's solution: its activations on every pair,
attention fixed to its mean, the AND gate on resid_mid (two linear filters in its first principal components),
the MLP's fold, and the extended embeddings that make resid_mid a sum of a term in A and a term in B."""

from __future__ import annotations

import math
from dataclasses import dataclass

import nnsight
import torch
import torch.nn.functional as F

from workbench.casper.pairs.labels import EQUALS, N_PAIRS, P, all_pairs
from workbench.casper.pairs.model import PairTransformer, _labels_of, _Threads
from workbench.casper.pca import PCA, fit_pca
from workbench.errors import InputError


@dataclass(frozen=True)
class PairRun:
    """Activations at the last position for all 12769 pairs (row ``A*113 + B``).

    pattern [pair, head, key]: attention of the last query; resid_mid, mlp_out, resid_post [pair, d_model];
    logit_diff [pair]: logit of token 1 minus token 0; labels [A, B].
    """

    pattern: torch.Tensor
    resid_mid: torch.Tensor
    mlp_out: torch.Tensor
    resid_post: torch.Tensor
    logit_diff: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        return (self.logit_diff > 0).long().view(P, P)


def run_pairs(model: PairTransformer) -> PairRun:
    """Run every pair through `model` with nnsight and keep the last position's activations."""
    net = nnsight.NNsight(model)
    with torch.no_grad(), net.trace(all_pairs()):
        block = net.blocks[0]
        pattern = block.attn.hook_pattern.output[:, :, -1].save()
        resid_mid = block.hook_resid_mid.output[:, -1].save()
        mlp_out = block.hook_mlp_out.output[:, -1].save()
        resid_post = block.hook_resid_post.output[:, -1].save()
        logits = net.unembed.output[:, -1].save()
    return PairRun(
        pattern=pattern.clone(),
        resid_mid=resid_mid.clone(),
        mlp_out=mlp_out.clone(),
        resid_post=resid_post.clone(),
        logit_diff=(logits[:, 1] - logits[:, 0]).clone(),
    )


def mean_pattern(run: PairRun) -> torch.Tensor:
    """The last query's attention averaged over all pairs, [head, key]."""
    return run.pattern.mean(0)


def fix_attention(model: PairTransformer, pattern: torch.Tensor, mix: float = 0.0) -> PairTransformer:
    """A copy of `model` whose last query attends with ``pattern + mix * (own pattern - pattern)``.

    pattern: [head, key] (usually `mean_pattern`). mix 0 fixes attention to `pattern` for every input; mix 1 is
    the unchanged model. The hook `hook_pattern` shows the pattern actually used.
    """
    cfg = model.cfg
    pattern = torch.as_tensor(pattern, dtype=torch.float32)
    if pattern.shape != (cfg.n_heads, cfg.n_ctx):
        raise InputError(
            f"pattern must be [head, key] = [{cfg.n_heads}, {cfg.n_ctx}], got {tuple(pattern.shape)}"
        )
    fixed = PairTransformer(cfg)
    fixed.load_state_dict(model.state_dict())
    fixed.blocks[0].attn.fixed_pattern = (pattern.clone(), float(mix))
    return fixed.eval()


def resid_to_logits(model: PairTransformer, resid_mid: torch.Tensor) -> torch.Tensor:
    """Finish the forward pass from resid_mid [..., d_model] at the last position: MLP, then unembed."""
    block = model.blocks[0]
    with torch.no_grad():
        x = resid_mid.to(torch.float32)
        return model.unembed(x + block.mlp(x))


def labels_from_resid_mid(model: PairTransformer, resid_mid: torch.Tensor) -> torch.Tensor:
    """Labels [A, B] the model gives when its last-position resid_mid is `resid_mid` [pair, d_model]."""
    return _labels_of(resid_to_logits(model, resid_mid)).view(P, P)


# ----------------------------------------------------------------------------------------------------------------
# resid_mid: PCA, the corner boundary, the two filters
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AndGate:
    """Class 1 iff two linear filters of resid_mid both pass: ``x @ directions[i] > thresholds[i]`` for i = 0 (alpha)
    and 1 (beta). Both directions lie in the span of the first k principal components (k = 2 in the solution).

    pca: the PCA of resid_mid. normals [2, k] (unit, pointing into class 1) and offsets [2]: the two boundaries in
    the coordinates of the first k components (``normals[i] @ pc_coords > offsets[i]``). directions [2, d] and
    thresholds [2]: the same filters in resid_mid space. moves [2, d]: adding ``s * moves[0]`` to resid_mid changes
    the alpha filter by s and leaves beta unchanged (and vice versa).
    """

    pca: PCA
    normals: torch.Tensor
    offsets: torch.Tensor
    directions: torch.Tensor
    thresholds: torch.Tensor
    moves: torch.Tensor

    @property
    def n_components(self) -> int:
        return self.normals.shape[1]

    @property
    def corner(self) -> torch.Tensor:
        """Where the two boundaries cross, in PC coordinates [k] (the point nearest the mean if k > 2)."""
        return torch.linalg.pinv(self.normals) @ self.offsets

    def filters(self, x: torch.Tensor) -> torch.Tensor:
        """Signed filter margins [..., 2]: positive where a filter passes."""
        return x.double() @ self.directions.T - self.thresholds

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """AND of the two filters, long [...]."""
        return (self.filters(x) > 0).all(-1).long()

    def basis(self) -> torch.Tensor:
        """The scrubbing basis [d, d]: rows moves[0], moves[1], then the rest of the span of the first k components
        (orthogonal to both filters), then components k+1...; resid_mid minus its mean is ``coords @ basis``, and
        coords[0], coords[1] are the two filter values (up to constants)."""
        k = self.n_components
        rest = torch.linalg.svd(self.normals, full_matrices=True).Vh[
            2:
        ]  # [k - 2, k]: null space of the normals
        return torch.cat([self.moves, rest @ self.pca.components[:k], self.pca.components[k:]])

    def boundary_line(self, extent: float = 1.0, n: int = 2) -> torch.Tensor:
        """The corner's two arms in the PC1-PC2 plane for plotting: [2 arms, n points, 2] (k = 2 only)."""
        if self.n_components != 2:
            raise InputError("the boundary is a pair of lines only for a gate fitted on two components")
        arms = []
        for i in range(2):
            along = torch.stack([-self.normals[i, 1], self.normals[i, 0]])  # along boundary i
            other = self.normals[1 - i]
            # The arm is the half of the line on the class-1 side of the other line.
            along = along if (along @ other) > 0 else -along
            t = torch.linspace(0, extent, n, dtype=torch.float64)
            arms.append(self.corner + t[:, None] * along)
        return torch.stack(arms)


def _fit_corners(u: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, steps: int):
    """Adam on the cross-entropy of a smooth AND, sigmoid(u.w0 - b0) * sigmoid(u.w1 - b1), for several starts at
    once: u [n, k], y [n], w [start, 2, k], b [start, 2]."""
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        margins = torch.einsum("nk,sfk->snf", u, w) - b[:, None, :]
        p = torch.sigmoid(margins).prod(-1).clamp(1e-9, 1 - 1e-9)
        loss = F.binary_cross_entropy(p, y.expand_as(p), reduction="none").mean(1).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return w.detach(), b.detach()


def fit_and_gate(
    x: torch.Tensor, labels: torch.Tensor, *, n_components: int = 2, pca: PCA | None = None, seed: int = 0
) -> AndGate:
    """Fit the corner boundary: class 1 iff two half-spaces of the first `n_components` principal components
    both hold (two half-planes of PC1-PC2, the solution's corner, for the default 2).

    x [pair, d] resid_mid of all pairs; labels [pair] or [A, B]. Maximises a smooth AND (product of two sigmoids)
    by gradient descent from 24 starting orientations and keeps the one with the best hard accuracy.
    """
    pca = pca or fit_pca(x)
    k = n_components
    if not 2 <= k <= x.shape[-1]:
        raise InputError(f"n_components must be between 2 and {x.shape[-1]}, got {k}")
    u = pca.transform(x)[:, :k]
    y = labels.flatten().double()
    scale = u[:, :2].std(0).mean()
    u = u / scale
    generator = torch.Generator().manual_seed(seed)
    # 24 starts (8 orientations x 3 opening angles in the PC1-PC2 plane): w [start, filter, k], b [start, filter].
    # They are screened on a subset of the points; the best is refined on all of them.
    theta = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    gaps = torch.tensor([math.pi / 3, math.pi / 2, 2 * math.pi / 3], dtype=torch.float64)
    angles = torch.stack([theta.repeat(3), (theta[None] + gaps[:, None]).flatten()], dim=1)
    w = torch.zeros(len(angles), 2, k, dtype=torch.float64)
    w[..., :2] = 4.0 * torch.stack([angles.cos(), angles.sin()], dim=-1)
    w[..., 2:] = 0.5 * torch.randn(len(angles), 2, k - 2, generator=generator, dtype=torch.float64)
    start = u.mean(0) + 0.1 * torch.randn(len(angles), 1, k, generator=generator, dtype=torch.float64)
    b = (w * start).sum(-1)
    subset = torch.randperm(len(u), generator=generator)[:3000]
    with _Threads(1):  # small tensors: one thread is faster, and far faster on a busy machine
        w, b = _fit_corners(u[subset], y[subset], w, b, steps=300)
        with torch.no_grad():
            margins = torch.einsum("nk,sfk->snf", u, w) - b[:, None, :]
            accuracy = ((margins > 0).all(-1).double() == y).double().mean(1)
        best = int(accuracy.argmax())
        w, b = _fit_corners(u, y, w[best : best + 1], b[best : best + 1], steps=200)
    w, b = w[0], b[0]
    # Undo the scaling: w.u/scale - b > 0  <=>  (w/|w|).u > b*scale/|w|.
    norms = w.norm(dim=1)
    normals, offsets = w / norms[:, None], b * scale / norms
    components = pca.components[:k]
    directions = normals @ components
    thresholds = offsets + directions @ pca.mean
    # moves: in the span, dual to the directions (directions @ moves.T = identity).
    moves = torch.linalg.solve(normals @ normals.T, normals) @ components
    # Order the filters so that alpha is the one that varies more with A (the first token).
    grid = (x.double() @ directions.T - thresholds).view(P, P, 2)
    a_share = grid.mean(1).var(0) / (grid.mean(1).var(0) + grid.mean(0).var(0))
    order = [1, 0] if a_share[1] > a_share[0] else [0, 1]
    return AndGate(pca, normals[order], offsets[order], directions[order], thresholds[order], moves[order])


def mlp_fold(run: PairRun, fractions: torch.Tensor | list[float], pca: PCA | None = None) -> torch.Tensor:
    """resid_mid + f * mlp_out for each fraction f, projected on the first two principal components of resid_post
    (or of `pca`): [fraction, pair, 2]. f = 0 is resid_mid, f = 1 is resid_post."""
    pca = pca or fit_pca(run.resid_post)
    f = torch.as_tensor(fractions, dtype=torch.float64)
    points = run.resid_mid.double()[None] + f[:, None, None] * run.mlp_out.double()[None]
    return pca.transform(points)[..., :2]


# ----------------------------------------------------------------------------------------------------------------
# Extended embeddings: resid_mid as a sum of a term in A, a term in B and a constant
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtendedEmbeddings:
    """Under a fixed attention pattern, the last position's resid_mid is ``W_A[A] + W_B[B] + const``.

    W_A, W_B [token, d_model] (tokens 0..112): each token's embedding passed through every head's OV circuit,
    weighted by that head's attention to position 0 (for A) or 1 (for B). const [d_model]: the "=" token, all
    position embeddings and their OV images.
    """

    W_A: torch.Tensor
    W_B: torch.Tensor
    const: torch.Tensor

    def resid_mid(self) -> torch.Tensor:
        """[pair, d_model], pairs in the usual order."""
        return (self.W_A[:, None] + self.W_B[None, :] + self.const).reshape(N_PAIRS, -1)


def extended_embeddings(model: PairTransformer, pattern: torch.Tensor) -> ExtendedEmbeddings:
    """W_A, W_B and const of `model` under a fixed last-query attention `pattern` [head, key]."""
    attn = model.blocks[0].attn
    with torch.no_grad():
        W_E, W_pos = model.embed.W_E.T.double(), model.pos_embed.W_pos.double()  # [vocab, d], [pos, d]
        W_O = attn.W_O.double().view(-1, model.cfg.n_heads, model.cfg.d_head)  # [d, head, d_head]
        # OV circuit of each head as a map on row vectors: x -> x @ ov[h], [head, d, d].
        ov = torch.einsum("hkd,mhk->hdm", attn.W_V.double(), W_O)
        weights = pattern.double()  # [head, key]

        def through(x: torch.Tensor, key: int) -> torch.Tensor:
            return torch.einsum("h,...d,hdm->...m", weights[:, key], x, ov)

        W_A, W_B = through(W_E[:P], 0), through(W_E[:P], 1)
        last = W_E[EQUALS] + W_pos[2]
        const = last + through(last, 2) + through(W_pos[0], 0) + through(W_pos[1], 1)
    return ExtendedEmbeddings(W_A=W_A, W_B=W_B, const=const)


def additive_fit(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best fit of a map [A, B] as ``a[A] + b[B]`` (row and column means): returns (a [A], b [B], r2, max error)."""
    grid = grid.double()
    total = grid.mean()
    a = grid.mean(1)
    b = grid.mean(0) - total
    fit = a[:, None] + b[None, :]
    residual = grid - fit
    r2 = 1 - residual.pow(2).sum().item() / (grid - total).pow(2).sum().item()
    return a, b, r2, residual.abs().max().item()
