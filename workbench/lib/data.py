"""The authors' checkpoints and the data sets LIB runs on.

Checkpoints (`ApolloResearch/rib` at commit `RIB_COMMIT`, MIT licence) are not bundled. Each file is looked up, in
order: at a path the caller gives (``path=``); in a data directory (``data_dir=``, else ``$WORKBENCH_LIB_DIR``) at
its usual place (``modadd/seed0.pt``) or at the top level; in the download cache
(``$XDG_CACHE_HOME/workbench/lib``); else downloaded from the repository's raw URL at that commit. Every file is
checked against its pinned sha256 before it is used.

Data sets are `LibData`: the model inputs, their labels and a line of code that recreates them.

- `modadd_data(split)`: all pairs (x, y, "=") of (x + y) mod 113, split as the authors' code splits it
  (``torch.utils.data.random_split`` with a generator seeded 0 and 30 % train: 3 830 train / 8 939 test pairs).
- `mnist_data(split)`: MNIST as pixels in [0, 1] (the authors' ``ToTensor()``), read by `workbench.casper.data`
  (``$WORKBENCH_CASPER_DIR`` or a download).
- `lm_data(model)`: packed rows of the demo corpus for a language model.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch

from workbench.casper.data import DataFile, file_digest, load_mnist
from workbench.errors import InputError, ModelLoadError
from workbench.tasks import demo_corpus, pack

ENV_VAR = "WORKBENCH_LIB_DIR"
"""Environment variable naming a folder laid out like ``../shared/data/lib`` (``modadd/seedN.pt``, ``mnist_mlp/``)."""

RIB_REPO = "ApolloResearch/rib"
RIB_COMMIT = "7a6199f7020e1f2d30c1b53e045ebc43a00fd7d8"
_RAW = f"https://raw.githubusercontent.com/{RIB_REPO}/{RIB_COMMIT}/"
_MODADD_DIRS = {
    0: "lr-0.001_bs-10000_norm-None_2023-11-28_16-07-19",
    1: "seed1-lr-0.001_bs-10000_norm-None_2023-12-06_14-49-21",
    2: "seed2-lr-0.001_bs-10000_norm-None_2023-12-06_14-50-13",
    3: "seed3-lr-0.001_bs-10000_norm-None_2023-12-06_14-50-40",
    4: "seed4-lr-0.001_bs-10000_norm-None_2023-12-06_14-51-04",
}
_MODADD_SHA = {
    0: "6fdbd78ba624dfbfa36866152926a071bcdd6d5248fc1a83b4289d41b0d9268d",
    1: "74a5fc338bee3560e9a1c9d1eefb888ce581e885342b7c5155a114d1637c0477",
    2: "e8f3b19a8badee6ca69abb0625fd4d022d7b466c4ab8efc54b1aad5b278da9d6",
    3: "097cb41ffb42407a19dd244ba7dde3ad3a543bd3c21a4a34db813d364b2dfaee",
    4: "c32fec03e3e9d027ecbe7466b5a086520f26188b59cd40f3a7dbb01819e8bc2a",
}
MODADD_SEEDS = tuple(sorted(_MODADD_DIRS))


def _modadd_file(seed: int) -> DataFile:
    src = f"rib_scripts/train_modular_arithmetic/sample_checkpoints/{_MODADD_DIRS[seed]}/model_epoch_60000.pt"
    return DataFile(
        f"seed{seed}.pt",
        f"modadd/seed{seed}.pt",
        (_RAW + src,),
        _MODADD_SHA[seed],
        "sha256",
        f"modular-addition transformer, training seed {seed}, 60 000 epochs (TransformerLens state dict)",
    )


FILES: dict[str, DataFile] = {
    f.relpath: f
    for f in (
        *(_modadd_file(s) for s in MODADD_SEEDS),
        DataFile(
            "model_epoch_12.pt",
            "mnist_mlp/model_epoch_12.pt",
            (
                _RAW
                + "rib_scripts/train_mlp/sample_checkpoints/lr-0.001_bs-64_2023-11-29_14-36-29/model_epoch_12.pt",
            ),
            "ac799e969d30b84c9608e2ea4134624235a32d98219421410c23541c864d22fe",
            "sha256",
            "MNIST MLP 784-100-100-10, 12 epochs (state dict layers.{0,1,2}.{W,b})",
        ),
    )
}
"""The checkpoints by their place in a data directory."""

_verified: set[tuple[str, int, int]] = set()


def cache_dir() -> Path:
    """The download cache: ``$XDG_CACHE_HOME/workbench/lib``, else ``~/.cache/workbench/lib``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "workbench" / "lib"


def _data_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    dirs = []
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        if not d.is_dir():
            raise InputError(
                f"data_dir={str(data_dir)!r} is not a directory; point it at the folder of checkpoints."
            )
        dirs.append(d)
    else:
        value = os.environ.get(ENV_VAR, "").strip()
        if value:
            d = Path(value).expanduser()
            if not d.is_dir():
                raise InputError(
                    f"{ENV_VAR}={value!r} is not a directory. Point it at the folder that holds modadd/ and "
                    f"mnist_mlp/, or unset it to use the download cache {cache_dir()}."
                )
            dirs.append(d)
    dirs.append(cache_dir())
    return dirs


def verify(path: Path, entry: DataFile) -> None:
    """Raise `ModelLoadError` unless `path` has the pinned sha256 of `entry`."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return
    got = file_digest(path, "sha256")
    if got != entry.digest:
        raise ModelLoadError(
            f"{path} is not the published {entry.relpath}: sha256 {got}, expected {entry.digest}. Delete it and "
            f"download it again from {entry.urls[0]}, or pass verify=False to use your own file."
        )
    _verified.add(key)


def locate(
    relpath: str,
    *,
    path: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    verify_digest: bool = True,
) -> Path:
    """A verified local copy of checkpoint `relpath` (a key of `FILES`), downloading it if needed."""
    if relpath not in FILES:
        raise InputError(f"unknown LIB checkpoint {relpath!r}; known: {', '.join(FILES)}")
    entry = FILES[relpath]
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"no file at {str(path)!r}; give the path to your copy of {entry.relpath}.")
        if verify_digest:
            verify(p, entry)
        return p
    looked = []
    for d in _data_dirs(data_dir):
        for p in (d / entry.relpath, d / entry.name):
            looked.append(str(p))
            if p.is_file():
                if verify_digest:
                    verify(p, entry)
                return p
    if not download:
        raise ModelLoadError(
            f"{entry.relpath} ({entry.description}) was not found (looked in {', '.join(looked)}) and downloading "
            f"is off. Set {ENV_VAR} to the folder that holds it, pass path=..., or allow download=True."
        )
    return _fetch(entry, verify_digest)


def _urlopen(url: str, timeout: float = 60.0):
    """Open `url` for reading (tests replace this)."""
    request = urllib.request.Request(url, headers={"User-Agent": "interp-workbench"})
    return urllib.request.urlopen(request, timeout=timeout)


def _fetch(entry: DataFile, verify_digest: bool) -> Path:
    target = cache_dir() / entry.relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, _urlopen(entry.urls[0]) as response:
            shutil.copyfileobj(response, out)
        if verify_digest:
            verify(tmp, entry)
        os.replace(tmp, target)
        return target
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not download {entry.relpath} from {entry.urls[0]} ({exc}). Download it by hand into "
            f"{target.parent}, or set {ENV_VAR} to a folder that holds it."
        ) from exc
    finally:
        if tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------------------------
# data sets


@dataclasses.dataclass(frozen=True, eq=False)
class LibData:
    """Inputs for a LIB model and their labels.

    Attributes:
        x: model inputs: token ids [N, pos] (mod-add, language models) or pixels [N, 784] float in [0, 1] (MNIST).
        y: labels [N] (mod-add, MNIST) or next-token targets [N, pos] (language models).
        name: a short description ("modadd train (3830 pairs)").
        code: a Python expression that recreates this data set (for "show code").
    """

    x: torch.Tensor
    y: torch.Tensor
    name: str
    code: str

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, n: int, seed: int = 0) -> LibData:
        """`n` rows drawn without replacement (seeded), or all rows when there are no more than `n`."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"n={n!r}: ask for a positive number of rows")
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return LibData(
            self.x[idx],
            self.y[idx],
            f"{self.name}, {n} drawn with seed {seed}",
            f"{self.code}.subset({n}, seed={seed})",
        )


MODULUS = 113
EQUALS = 113
"""Token id of "=", the third input token."""


def modadd_split(frac_train: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) into the 12 769 pairs ordered x-major (pair i is x = i // 113, y = i % 113).

    This is what the authors' ``train_test_split`` draws: ``random_split`` of the pairs with
    ``torch.Generator().manual_seed(seed)`` and ``int(12769 * frac_train)`` training pairs, i.e. the first
    ``n_train`` entries of ``torch.randperm(12769, generator)``.
    """
    if not 0 < frac_train < 1:
        raise InputError(f"frac_train must be between 0 and 1, got {frac_train}")
    n = MODULUS * MODULUS
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_train = int(n * frac_train)
    return perm[:n_train], perm[n_train:]


def modadd_data(split: str = "train", *, frac_train: float = 0.3, seed: int = 0) -> LibData:
    """(x + y) mod 113 pairs as tokens [N, 3] = (x, y, 113) and labels [N].

    split: "train" (3 830 pairs, what LIB is built on), "test" (8 939, what ablations are scored on) or "all"
    (12 769 pairs in x-major order: pair i has x = i // 113, y = i % 113, as the Fourier labels need).
    """
    grid = torch.arange(MODULUS)
    x = torch.stack(
        [grid.repeat_interleave(MODULUS), grid.repeat(MODULUS), torch.full((MODULUS**2,), EQUALS)], dim=1
    )
    y = (x[:, 0] + x[:, 1]) % MODULUS
    if split == "all":
        return LibData(x, y, "modadd all 12769 pairs", 'modadd_data("all")')
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train', 'test' or 'all', got {split!r}")
    train, test = modadd_split(frac_train, seed)
    idx = train if split == "train" else test
    opts = "" if (frac_train, seed) == (0.3, 0) else f", frac_train={frac_train}, seed={seed}"
    return LibData(x[idx], y[idx], f"modadd {split} ({len(idx)} pairs)", f'modadd_data("{split}"{opts})')


def mnist_data(
    split: str = "test", *, n: int | None = None, seed: int = 0, data_dir=None, download: bool = True
) -> LibData:
    """MNIST images as pixels [N, 784] in [0, 1] (float32) with digit labels [N].

    split: "train" (60 000 images; LIB is built on a seeded subset of them, `n`) or "test" (10 000, for scoring).
    The files are found as `workbench.casper.data.load_mnist` finds them (``$WORKBENCH_CASPER_DIR`` or a download).
    """
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    mnist = load_mnist(split, data_dir=data_dir, download=download)
    x = mnist.images.reshape(len(mnist), -1).float().div(255.0)
    where = f", data_dir={str(data_dir)!r}" if data_dir is not None else ""
    data = LibData(x, mnist.labels, f"MNIST {split} ({len(x)} images)", f'mnist_data("{split}"{where})')
    if n is not None:
        data = data.subset(n, seed=seed)
        data = dataclasses.replace(data, code=f'mnist_data("{split}", n={n}, seed={seed}{where})')
    return data


def lm_data(model, *, n_rows: int = 64, seq_len: int = 32, split: str = "validation") -> LibData:
    """Rows of the demo corpus packed for a language model: tokens [n_rows, seq_len], targets the next tokens.

    `model` is a `WorkbenchModel` or a tokenizer. The last position has no target in the row; its target is -100
    (ignored by the loss).
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise InputError(f"seq_len={seq_len!r}: rows need at least 2 tokens")
    tokens = pack(model, demo_corpus(split, n_docs=max(200, n_rows * seq_len // 8)), seq_len, n_rows=n_rows)
    if len(tokens) < n_rows:
        raise InputError(f"the demo corpus gave only {len(tokens)} rows of {seq_len} tokens; ask for fewer")
    targets = torch.full_like(tokens, -100)
    targets[:, :-1] = tokens[:, 1:]
    code = f'lm_data(lm, n_rows={n_rows}, seq_len={seq_len}, split="{split}")'
    return LibData(tokens, targets, f"demo corpus {split}: {n_rows} rows x {seq_len} tokens", code)
