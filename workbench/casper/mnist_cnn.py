"""Casper's challenge 1, the MNIST CNN, and the pieces of Heimersheim & Hobbhahn's solution.

The model labels every MNIST image 0 or 1 by a hidden rule. The solution found that the rule compares each image
with a "clue" image (training image #6, a "1") and with its inverse, the "anti-1":

    s(x) = sum over pixels of x_uint8 * (clue - (1 - clue)),  clue in [0, 1]
    label = 1 if s < -17305 or s > -7762 (clearly like the anti-1, or clearly like the 1), else 0

Note the factor 2 hidden in ``clue - (1 - clue) = 2 * clue - 1``: the solution's notebook uses it and only this
form reproduces its numbers (the write-up's ``clue - 0.5`` would need halved thresholds).

Pipeline: `load_mnist_cnn` -> `as_nnsight` -> `record` the 200 fc1 neurons and the logits over a dataset ->
`fit_pca` / `fit_arms` (the V shape) -> `find_detectors` (anti-1 and 1 detector neurons) -> `ablate` groups
(zero or dataset minimum) and `scrub_hypotheses` for `workbench.scrubbing.scrub`. `similarity` and `rule_labels`
state the rule; `agreement` compares it with the model.

Shapes: images uint8 [N, 28, 28] (raw pixels) or float [N, 1, 28, 28] in [0, 1]; neurons [N, 200]; logits [N, 2].
"""

from __future__ import annotations

import dataclasses
import os

import pandas as pd
import torch
from torch import nn

from workbench.casper import pca as shared_pca
from workbench.casper.data import locate
from workbench.casper.measures import agreement as agreement  # one rule for both challenges
from workbench.casper.pca import PCA
from workbench.core import CancelToken, Run
from workbench.core.selectors import renamed
from workbench.errors import InputError, ModelLoadError
from workbench.models import load_model
from workbench.scrubbing import Hypothesis, Resample, nearest_value, random_donors

CLUE_INDEX = 6
"""The clue image is MNIST training image #6 (torchvision order), a "1"."""
PUBLISHED_THRESHOLDS = (-17305.0, -7762.0)
"""The band of the solution's rule (class 0 inside, class 1 outside), fitted by hand to the model's labels."""
ROUND_THRESHOLDS = (-17000.0, -8000.0)
PUBLISHED = {
    # Casper's challenge README
    "model test accuracy (on Casper's labels)": 0.9558,
    # printed outputs of Heimersheim & Hobbhahn's notebook 303_final_CNN_challenge.ipynb (60k training images)
    "rule agreement, train, (-17305, -7762)": 0.962467,
    "rule agreement, train, (-17000, -8000)": 0.957717,
    "split below / inside / above the band": (13913, 28976, 17111),
    "PCA variance explained, PC1 and PC2": (0.602, 0.290),
    # the legends of the notebook's ablation figure (cell 44): (median, mean) logit difference
    "logit diff, clean": (0.38, 3.44),
    "logit diff, zero-ablate anti-1 detectors": (-0.64, 4.07),
    "logit diff, zero-ablate 1 detectors": (-4.08, -1.03),
    "logit diff, zero-ablate both": (-0.40, -0.40),
    # the notebook's strongest-detector figure (cell 29): the first 15 of each group
    "strongest anti-1 detectors": (14, 16, 17, 26, 46, 53, 56, 70, 72, 91, 110, 111, 121, 142, 150),
    "strongest 1 detectors": (11, 24, 33, 35, 44, 49, 54, 58, 77, 86, 89, 93, 128, 131, 143),
    # the label of the last bar of the causal-scrubbing figure (one random draw)
    "scrubbing, random image": 0.5035,
}
"""Numbers the challenge and the solution published, with where each comes from."""
NEURONS = "relu3"
"""The module whose output is the 200 fc1 neurons (after ReLU), the solution's "neurons"."""
LOGITS = "fc2"


class CasperCNN(nn.Module):
    """The challenge CNN with one module per activation, so that nnsight can read or set each one.

    conv1 [N,8,26,26] -> relu1 -> drop1 -> pool1 [N,8,13,13] -> conv2 [N,16,11,11] -> relu2 -> drop2 ->
    pool2 [N,16,5,5] -> flatten [N,400] -> fc1 [N,200] -> relu3 (the neurons) -> fc2 [N,2] (logits).
    The state dict of the original class (one shared pool and dropout, functional ReLU) loads unchanged.
    """

    def __init__(self, p_drop: float = 0.2):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.relu1 = nn.ReLU()
        self.drop1 = nn.Dropout(p_drop)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.relu2 = nn.ReLU()
        self.drop2 = nn.Dropout(p_drop)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(400, 200)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(200, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.children():
            x = layer(x)
        return x

    def run_to(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The output of module `name` on input `x` (plain torch, differentiable: for feature visualisation)."""
        names = [n for n, _ in self.named_children()]
        if name not in names:
            raise InputError(f"unknown layer {name!r}; the layers are {names}")
        for n, layer in self.named_children():
            x = layer(x)
            if n == name:
                return x
        raise AssertionError("unreachable")

    @property
    def logit_diff_weights(self) -> torch.Tensor:
        """[200]: each neuron's weight on logit 1 minus logit 0 (the label depends only on this direction)."""
        return (self.fc2.weight[1] - self.fc2.weight[0]).detach()

    @property
    def logit_diff_bias(self) -> float:
        return float((self.fc2.bias[1] - self.fc2.bias[0]).detach())


def load_mnist_cnn(
    path: str | os.PathLike | None = None,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> CasperCNN:
    """The challenge CNN with Casper's weights, on CPU, in eval mode.

    The weights (`mnist_model.pt`) are found, downloaded and checked by `workbench.casper.data`. A `path` you give
    is used as it is, without the checksum, so that weights of your own (a retrained CNN) load too.
    """
    weights = locate("mnist_model.pt", path=path, data_dir=data_dir, download=download, verify=path is None)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)  # saved from cuda:0
        cnn = CasperCNN()
        cnn.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError, OSError) as exc:
        raise ModelLoadError(f"{weights} is not the challenge CNN's state dict: {exc}") from exc
    return cnn.eval()


def as_nnsight(cnn: CasperCNN):
    """The nnsight view of the CNN: ``model.relu3.output`` are the neurons inside ``model.trace(images)``."""
    return load_model(cnn).nnsight


def model_input(images: torch.Tensor) -> torch.Tensor:
    """Model input float [N, 1, 28, 28] in [0, 1] from raw uint8 [N, 28, 28] or already-scaled floats."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a torch tensor, got {type(images).__name__}")
    if images.dtype == torch.uint8:
        images = images.float().div(255.0)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1:] != (1, 28, 28):
        raise InputError(
            f"images must be [N, 28, 28] uint8 or [N, 1, 28, 28] float, got {tuple(images.shape)}"
        )
    return images.float()


def _module(model) -> CasperCNN:
    return model._module if hasattr(model, "_module") else getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------------------------
# running the model


@dataclasses.dataclass(frozen=True)
class CnnActivations:
    """The CNN's 200 neurons (fc1 after ReLU) [N, 200] and logits [N, 2] over a dataset."""

    neurons: torch.Tensor
    logits: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        """[N] the model's label: 1 where logit 1 > logit 0 (argmax)."""
        return self.logits.argmax(-1)

    @property
    def logit_diff(self) -> torch.Tensor:
        """[N] logit 1 - logit 0."""
        return self.logits[:, 1] - self.logits[:, 0]


def record(
    model,
    images: torch.Tensor,
    *,
    batch_size: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    chunk: int | None = None,
) -> CnnActivations:
    """Run the nnsight-wrapped CNN over `images` in batches (default 5000; ``chunk=`` is the old name), saving
    the neurons and logits."""
    run = Run.of(
        run, progress=progress, cancel=cancel, batch_size=renamed("chunk", chunk, "batch_size", batch_size)
    )

    def step(start: int, stop: int):
        with torch.no_grad(), model.trace(model_input(images[start:stop])):
            neurons = model.relu3.output.save()
            logits = model.fc2.output.save()
        return neurons, logits

    parts = run.chunked(len(images), run.batch_size or DEFAULT_BATCH, step, desc="recording neurons")
    return CnnActivations(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def ablate(
    model,
    images: torch.Tensor,
    neurons: torch.Tensor,
    values: float | torch.Tensor,
    *,
    batch_size: int | None = None,
    progress=True,
    cancel: CancelToken | None = None,
    run: Run | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Logits [N, 2] with the given neurons set to `values` (a number, or one value per neuron) inside the trace.

    Zero ablation: ``values=0``. Minimum ablation: ``values=acts.neurons.min(0).values[neurons]``.
    """
    run = Run.of(
        run, progress=progress, cancel=cancel, batch_size=renamed("chunk", chunk, "batch_size", batch_size)
    )
    neurons = torch.as_tensor(neurons).long().reshape(-1)
    if len(neurons) and (neurons.min() < 0 or neurons.max() >= 200):
        raise InputError("neuron indices must lie in [0, 200)")
    values = torch.as_tensor(values, dtype=torch.float32)
    if values.ndim == 1 and len(values) != len(neurons):
        raise InputError(f"got {len(values)} values for {len(neurons)} neurons")

    def step(start: int, stop: int):
        with torch.no_grad(), model.trace(model_input(images[start:stop])):
            model.relu3.output[:, neurons] = values
            logits = model.fc2.output.save()
        return logits

    return torch.cat(run.chunked(len(images), run.batch_size or DEFAULT_BATCH, step, desc="ablating"))


DEFAULT_BATCH = 5000
"""Images per trace when no batch size is given."""


# ---------------------------------------------------------------------------------------------------------------
# the rule


def classification_image(clue: torch.Tensor) -> torch.Tensor:
    """float64 [28, 28]: clue - anti_clue = 2 * clue - 1, with the uint8 clue scaled to [0, 1]."""
    clue = _check_uint8(clue, "clue").double().div(255.0)
    if clue.shape != (28, 28):
        raise InputError(f"the clue must be one 28x28 image, got {tuple(clue.shape)}")
    return clue - (1.0 - clue)


def similarity(images: torch.Tensor, clue: torch.Tensor) -> torch.Tensor:
    """float64 [N]: s(x) = sum(x_uint8 * (2 * clue - 1)), similarity to the clue minus similarity to the anti-1."""
    images = _check_uint8(images, "images")
    if images.ndim == 4:
        images = images[:, 0]
    return (images.double() * classification_image(clue)).sum((-2, -1))


def _check_uint8(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8:
        raise InputError(
            f"{name} must be raw uint8 pixels (0-255), as the rule's thresholds are in those units; got "
            f"{getattr(x, 'dtype', type(x).__name__)}. Use MnistSplit.images, not .as_float()."
        )
    return x


def _check_thresholds(thresholds) -> tuple[float, float]:
    low, high = (float(t) for t in thresholds)
    if not low < high:
        raise InputError(f"thresholds must be (low, high) with low < high, got {thresholds}")
    return low, high


def rule_labels(s: torch.Tensor, thresholds: tuple[float, float] = PUBLISHED_THRESHOLDS) -> torch.Tensor:
    """[N] the rule's label: 1 outside the band (s < low or s > high), 0 inside it."""
    low, high = _check_thresholds(thresholds)
    return ((s < low) | (s > high)).long()


def band_split(
    s: torch.Tensor, thresholds: tuple[float, float] = PUBLISHED_THRESHOLDS
) -> tuple[int, int, int]:
    """(below the band: anti-1-like, inside: middle, above: 1-like) counts."""
    low, high = _check_thresholds(thresholds)
    below, above = int((s < low).sum()), int((s > high).sum())
    return below, len(s) - below - above, above


def anti_side(s: torch.Tensor, thresholds: tuple[float, float] = PUBLISHED_THRESHOLDS) -> torch.Tensor:
    """[N] bool: the image is on the anti-1 side (s below the band's midpoint), as in the solution's ablations."""
    low, high = _check_thresholds(thresholds)
    return s < (low + high) / 2


# ---------------------------------------------------------------------------------------------------------------
# PCA of the neurons and the two arms


NeuronPCA = PCA
"""The old name of the shared `workbench.casper.pca.PCA` (``project``/``inverse`` are its transform's names)."""


def fit_pca(neurons: torch.Tensor, k: int = 2, *, positive: list[torch.Tensor] | None = None) -> PCA:
    """PCA of neurons [N, 200] keeping `k` components: the shared `workbench.casper.pca.fit_pca` with the
    solution's two. `positive[i]`, a neuron vector [200], is made to project > 0 on PC i: the solution orients PC1
    so that the clue lies on the positive side and PC2 so that the anti-1 does.
    """
    return shared_pca.fit_pca(neurons, k, positive=positive)


@dataclasses.dataclass(frozen=True)
class Arms:
    """Straight lines fitted to the two arms of the V in PCA space (PC2 = slope * PC1 + intercept).

    The left arm holds points with PC1 < `split`, the right arm the rest. `left_dir`/`right_dir` [2] are unit
    vectors pointing out along each arm.
    """

    split: float
    left_slope: float
    left_intercept: float
    right_slope: float
    right_intercept: float

    @property
    def left_dir(self) -> torch.Tensor:
        v = torch.tensor([-1.0, -self.left_slope], dtype=torch.float64)
        return v / v.norm()

    @property
    def right_dir(self) -> torch.Tensor:
        v = torch.tensor([1.0, self.right_slope], dtype=torch.float64)
        return v / v.norm()


def fit_arms(points: torch.Tensor, split: float = -2.0) -> Arms:
    """Least-squares lines through the points [N, 2] left and right of PC1 = `split` (all points, any label)."""

    def line(p: torch.Tensor) -> tuple[float, float]:
        if len(p) < 2:
            raise InputError(f"fewer than two points on one side of PC1 = {split}; choose another split")
        a = torch.stack([p[:, 0], torch.ones_like(p[:, 0])], 1)
        slope, intercept = torch.linalg.lstsq(a, p[:, 1:2]).solution[:, 0].tolist()
        return slope, intercept

    points = points.double()
    left = points[:, 0] < split
    return Arms(split, *line(points[left]), *line(points[~left]))


# ---------------------------------------------------------------------------------------------------------------
# detector neurons


@dataclasses.dataclass(frozen=True)
class DetectorGroups:
    """The neurons split by arm. anti_one / one / dead: LongTensor indices. loadings [2, 200]: each neuron's
    loading on the left (anti-1) and right (1) arm directions mapped back to neuron space."""

    anti_one: torch.Tensor
    one: torch.Tensor
    dead: torch.Tensor
    loadings: torch.Tensor

    @property
    def detectors(self) -> torch.Tensor:
        return torch.cat([self.anti_one, self.one]).sort().values


def find_detectors(neurons: torch.Tensor, pca: PCA, arms: Arms) -> DetectorGroups:
    """Anti-1 detectors load more on the left arm than on the right; 1 detectors the other way round.

    Neurons that never fire on `neurons` are "dead" and in neither group (their loadings are 0 up to rounding,
    so the solution's comparison would assign them by numerical noise; it changes no ablation or resampling).
    """
    loadings = torch.stack([arms.left_dir @ pca.components[:2], arms.right_dir @ pca.components[:2]])
    live = neurons.max(0).values > 0
    left = live & (loadings[0] > loadings[1])
    right = live & ~left
    idx = torch.arange(neurons.shape[1])
    return DetectorGroups(idx[left], idx[right], idx[~live], loadings)


def strongest_detectors(
    groups: DetectorGroups, neurons: torch.Tensor, pca: PCA, arms: Arms, *, distance: float = 5.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anti-1, 1) detectors whose std times the arm point mapped to neuron space exceeds 1.

    The arm point is `distance` units out along the arm in PCA space, taken back to neuron space with the mean
    (the PCA inverse transform), as in the solution; distances from 2 to 6 give the same sets.
    """
    std = neurons.double().std(0)
    strength_left = std * pca.inverse(distance * arms.left_dir)
    strength_right = std * pca.inverse(distance * arms.right_dir)
    return (
        groups.anti_one[strength_left[groups.anti_one] > 1],
        groups.one[strength_right[groups.one] > 1],
    )


def group_contributions(acts: CnnActivations, cnn: CasperCNN, groups: DetectorGroups) -> torch.Tensor:
    """[N, 2]: the anti-1 group's and the 1 group's contribution to the logit difference (biases excluded)."""
    w = cnn.logit_diff_weights.double()
    h = acts.neurons.double()
    return torch.stack([h[:, g] @ w[g] for g in (groups.anti_one, groups.one)], 1)


# ---------------------------------------------------------------------------------------------------------------
# feature visualisation


def visualize(
    cnn: CasperCNN,
    directions: torch.Tensor,
    *,
    layer: str = NEURONS,
    steps: int = 100,
    lr: float = 0.1,
) -> torch.Tensor:
    """Input images [k, 28, 28] that maximise ``activation(layer) @ direction`` for each direction [k, d].

    As in the solution: start from a black image, Adam with learning rate `lr` for `steps` steps, no
    regularisation. Use ``layer="fc1"`` with one-hot directions for single neurons (pre-activation, so a neuron
    that is off still has a gradient).
    """
    directions = torch.as_tensor(directions, dtype=torch.float32)
    if directions.ndim == 1:
        directions = directions[None]
    if steps < 0:
        raise InputError(f"steps must be >= 0, got {steps}")
    x = torch.zeros(len(directions), 1, 28, 28, requires_grad=True)
    optimiser = torch.optim.Adam([x], lr=lr)
    cnn = cnn.eval()
    for _ in range(steps):
        optimiser.zero_grad()
        act = cnn.run_to(x, layer)
        if act.shape[-1] != directions.shape[-1]:
            raise InputError(
                f"directions have {directions.shape[-1]} entries but {layer} has {act.shape[-1]}"
            )
        (-(act * directions).sum()).backward()
        optimiser.step()
    return x.detach()[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# ablations and causal scrubbing


def ablation_table(
    clean: CnnActivations, ablated: dict[str, torch.Tensor], anti: torch.Tensor
) -> pd.DataFrame:
    """One row per setting: median and mean logit difference, and fraction of the clean labels kept overall,
    on the anti-1 side (`anti`, [N] bool) and on the 1 side. `ablated` maps a name to logits [N, 2]."""
    rows = []
    for name, logits in {"clean": clean.logits, **ablated}.items():
        ld = logits[:, 1] - logits[:, 0]
        kept = logits.argmax(-1) == clean.labels
        rows.append(
            {
                "setting": name,
                "median_logit_diff": float(ld.median()),
                "mean_logit_diff": float(ld.mean()),
                "kept": float(kept.double().mean()),
                "kept_anti_side": float(kept[anti].double().mean()),
                "kept_one_side": float(kept[~anti].double().mean()),
            }
        )
    return pd.DataFrame(rows)


NOISE_LEVELS = (1e-4, 1e-3, 1e-2, 1e-1)
"""The solution's resampling noise: std of the noise on s as a fraction of the range of s."""


def scrub_hypotheses(
    s: torch.Tensor, groups: DetectorGroups, noise_levels=NOISE_LEVELS, *, random_control: bool = True
) -> list[Hypothesis]:
    """The solution's causal-scrubbing tests of "the neurons depend on the image only through s".

    For each noise level f: every detector neuron takes its value from the image whose s is nearest to
    s + N(0, (f * range of s)^2) (one donor image for all detectors), and every other neuron from a random image.
    The control resamples all 200 neurons from a random image.
    """
    spread = float(s.max() - s.min())
    out = [
        Hypothesis(
            f"s ± {f:.2%}",
            (
                Resample(NEURONS, nearest_value(s, noise=f * spread), units=groups.detectors),
                Resample(NEURONS, random_donors(), units=groups.dead),
            ),
        )
        for f in noise_levels
    ]
    if random_control:
        out.append(Hypothesis("random image", (Resample(NEURONS, random_donors()),)))
    return out
