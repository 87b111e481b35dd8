"""Ready-made LIB experiments: a model, the data its basis is built on, held-out data to score ablations, and the
data its node profiles are drawn from.

    from workbench.lib.setups import load_setup
    s = load_setup("modadd-0")          # or "modadd-1".."modadd-4", "mnist", "demo-lm"
    graph = build_graph(s.model, s.train)
"""

from __future__ import annotations

import dataclasses

from workbench.errors import InputError
from workbench.lib.data import LibData, lm_data, mnist_data, modadd_data
from workbench.lib.models import LibModel, lm_sections, load_mnist_mlp, load_modadd
from workbench.models import load_model

SETUPS = {
    **{f"modadd-{s}": f"mod-add transformer, seed {s} (the authors' checkpoint)" for s in range(5)},
    "mnist": "MNIST MLP 784-100-100-10 (a stand-in for the paper's CIFAR-10 MLP)",
    "demo-lm": "demo language model, block 1 (the paper's negative result, small)",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Setup:
    """A model with its data sets.

    Attributes:
        name: the key in `SETUPS` ("custom" for your own).
        model: the `LibModel`.
        train: what the basis and edges are built on.
        test: held-out data for ablations.
        profile: what node profiles and edge scatters are drawn from (all 12 769 pairs for mod-add).
        prelude: lines of code that must run before `model.code` (e.g. loading the language model).
    """

    name: str
    model: LibModel
    train: LibData
    test: LibData
    profile: LibData
    prelude: tuple[str, ...] = ()


def load_setup(name: str, *, data_dir=None, mnist_dir=None, n_train: int | None = None) -> Setup:
    """The experiment `name` (see `SETUPS`). `data_dir`: the checkpoints' folder (else ``$WORKBENCH_LIB_DIR``, the
    cache or a download); `mnist_dir`: MNIST's (else ``$WORKBENCH_CASPER_DIR`` or a download). `n_train`: build on
    this many training examples (MNIST: 2048 by default; the others use all)."""
    if name not in SETUPS:
        raise InputError(f"unknown setup {name!r}; choose one of {list(SETUPS)}")
    if name.startswith("modadd-"):
        model = load_modadd(int(name.split("-")[1]), data_dir=data_dir)
        train = modadd_data("train")
        if n_train is not None:
            train = train.subset(n_train)
        return Setup(name, model, train, modadd_data("test"), modadd_data("all"))
    if name == "mnist":
        model = load_mnist_mlp(data_dir=data_dir)
        train = mnist_data("train", n=n_train or 2048, data_dir=mnist_dir)
        test = mnist_data("test", data_dir=mnist_dir)
        return Setup(name, model, train, test, test.subset(2000))

    lm = load_model("demo")
    model = lm_sections(lm, (1,))
    train = lm_data(lm, n_rows=n_train or 64, seq_len=32, split="train")
    test = lm_data(lm, n_rows=64, seq_len=32, split="validation")
    return Setup(name, model, train, test, test, prelude=('lm = load_model("demo")',))
