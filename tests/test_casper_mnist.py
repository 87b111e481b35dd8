"""Casper's challenge 1: data loading, the CNN, and the published numbers of Heimersheim & Hobbhahn's solution.

The published numbers are recomputed from the real weights and the 60k MNIST training images (the reconstructed
set in the shared data; see workbench.casper.data for its index caveat) and checked with tight tolerances.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import shutil
import urllib.error

import numpy as np
import pytest
import torch

from workbench.casper import data
from workbench.casper import mnist_cnn as mc
from workbench.errors import InputError, ModelLoadError
from workbench.scrubbing import scrub

P = mc.PUBLISHED


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets an empty download cache and no data directory unless it sets one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    data._verified.clear()


def _no_network(monkeypatch):
    def refuse(url, timeout=60.0):
        raise AssertionError(f"tests must not touch the network (asked for {url})")

    monkeypatch.setattr(data, "_urlopen", refuse)


# --------------------------------------------------------------------------------------------------------------
# data: locating, verifying, downloading


def test_locate_in_data_dir_and_env(casper_dir, monkeypatch):
    _no_network(monkeypatch)
    assert data.locate("mnist_model.pt", data_dir=casper_dir) == casper_dir / "mnist_model.pt"
    monkeypatch.setenv(data.ENV_VAR, str(casper_dir))
    assert data.locate("t10k-labels-idx1-ubyte.gz") == casper_dir / "mnist" / "t10k-labels-idx1-ubyte.gz"


def test_env_var_must_be_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="WORKBENCH_CASPER_DIR"):
        data.locate("mnist_model.pt", download=False)


def test_not_found_says_how_to_fix(monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(ModelLoadError) as err:
        data.locate("mnist_model.pt", download=False)
    message = str(err.value)
    assert "WORKBENCH_CASPER_DIR" in message and "raw.githubusercontent.com" in message
    assert "download=False" in message


def test_missing_explicit_path(tmp_path):
    with pytest.raises(InputError, match="no file at"):
        data.locate("mnist_model.pt", path=tmp_path / "missing.pt")
    with pytest.raises(InputError, match="Unknown challenge file"):
        data.locate("mnist_modle.pt")


def _serve_from(monkeypatch, name, source):
    """Point `name`'s download URL at a local file (file:// URL), as a stand-in for the public URL."""
    entry = dataclasses.replace(data.FILES[name], urls=(source.resolve().as_uri(),))
    monkeypatch.setitem(data.FILES, name, entry)


def test_download_verifies_and_caches(casper_dir, monkeypatch):
    _serve_from(monkeypatch, "mnist_model.pt", casper_dir / "mnist_model.pt")
    path = data.locate("mnist_model.pt")
    assert path == data.cache_dir() / "mnist_model.pt"
    assert data.file_digest(path) == data.FILES["mnist_model.pt"].digest
    _no_network(monkeypatch)  # the second time it comes from the cache
    assert data.locate("mnist_model.pt") == path


def test_download_with_wrong_checksum_is_refused_and_not_cached(casper_dir, tmp_path, monkeypatch):
    corrupt = tmp_path / "mnist_model.pt"
    raw = bytearray((casper_dir / "mnist_model.pt").read_bytes())
    raw[1000] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    _serve_from(monkeypatch, "mnist_model.pt", corrupt)
    with pytest.raises(ModelLoadError, match="does not match the published mnist_model.pt"):
        data.locate("mnist_model.pt")
    assert not any(data.cache_dir().rglob("*")) or not any(p.is_file() for p in data.cache_dir().rglob("*"))


def test_download_failure_names_every_mirror(monkeypatch):
    tried = []

    def fail(url, timeout=60.0):
        tried.append(url)
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(data, "_urlopen", fail)
    with pytest.raises(ModelLoadError, match="Could not download t10k-labels"):
        data.locate("t10k-labels-idx1-ubyte.gz")
    assert tried == list(data.FILES["t10k-labels-idx1-ubyte.gz"].urls) and len(tried) == 2


def test_corrupt_local_file_is_refused_unless_verify_false(casper_dir, tmp_path, monkeypatch):
    _no_network(monkeypatch)
    shutil.copy(casper_dir / "mnist_model.pt", tmp_path / "mnist_model.pt")
    with open(tmp_path / "mnist_model.pt", "ab") as f:
        f.write(b"junk")
    with pytest.raises(ModelLoadError, match="verify=False"):
        data.locate("mnist_model.pt", data_dir=tmp_path)
    assert data.locate("mnist_model.pt", data_dir=tmp_path, verify=False) == tmp_path / "mnist_model.pt"


def test_truncated_idx_is_refused(casper_dir, tmp_path):
    raw = gzip.decompress((casper_dir / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(raw[:-784]))
    with pytest.raises(ModelLoadError):
        data.locate("t10k-images-idx3-ubyte.gz", path=bad)
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(bad)


def _write_idx_images(path, images):
    header = (2051).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in images.shape)
    path.write_bytes(gzip.compress(header + images.tobytes(), compresslevel=1))


def test_canonical_train_images_digest(casper_dir, tmp_path):
    """A canonical train-images IDX file verifies against the digest pinned from the reconstructed set."""
    x = np.load(casper_dir / "mnist" / "mnist_train60k_reconstructed.npz")["x_train"]
    reordered = np.concatenate([x[:100], x[100:][::-1]])  # canonical order beyond 100 is not pinned
    good = tmp_path / "good" / "train-images-idx3-ubyte.gz"
    good.parent.mkdir()
    _write_idx_images(good, reordered)
    assert data.locate("train-images-idx3-ubyte.gz", path=good) == good
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # ... but the first 100 are
    bad = tmp_path / "bad" / "train-images-idx3-ubyte.gz"
    bad.parent.mkdir()
    _write_idx_images(bad, swapped)
    with pytest.raises(ModelLoadError, match="does not match"):
        data.locate("train-images-idx3-ubyte.gz", path=bad)


def test_load_mnist_sources(casper_dir, monkeypatch):
    _no_network(monkeypatch)
    test = data.load_mnist("test", data_dir=casper_dir)
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == torch.uint8
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9] and test.canonical_prefix is None
    train = data.load_mnist("train", data_dir=casper_dir)  # only the reconstructed set is there
    assert len(train) == 60000 and train.canonical_prefix == 100
    csv = np.loadtxt(casper_dir / "mnist" / "mnist_train_100.csv", delimiter=",", dtype=np.uint8)
    assert np.array_equal(train.images[:100].numpy().reshape(100, -1), csv[:, 1:])  # canonical prefix
    assert train.as_float().shape == (60000, 1, 28, 28) and float(train.as_float().max()) == 1.0
    with pytest.raises(ModelLoadError, match="not found"):
        data.load_mnist("train", data_dir=casper_dir, source="idx", download=False)
    with pytest.raises(InputError, match="'train' or 'test'"):
        data.load_mnist("validation")
    with pytest.raises(InputError, match="training split only"):
        data.load_mnist("test", source="reconstructed")


def test_transformer_labels_for_challenge_2(casper_dir, tmp_path):
    info = data.load_transformer_labels(data_dir=casper_dir)
    assert info["labels"].shape == (113, 113) and int(info["labels"].sum()) == 5465
    assert int((info["labels"] != info["model_labels"]).sum()) == 174  # 98.64% agreement
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with open(evil, "rb") as f, pytest.raises(Exception, match="refusing"):
        data._NumpyOnlyUnpickler(f).load()


# --------------------------------------------------------------------------------------------------------------
# the model


@pytest.fixture(scope="module")
def cnn(casper_dir):
    return mc.load_mnist_cnn(data_dir=casper_dir)


def test_cnn_layout_and_weights(cnn):
    assert [n for n, _ in cnn.named_children()][-3:] == ["fc1", "relu3", "fc2"]
    assert sum(p.numel() for p in cnn.parameters()) == 81850
    assert not cnn.training and next(cnn.parameters()).device.type == "cpu"


def test_wrong_weights_file(tmp_path):
    torch.save({"fc1.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="not the challenge CNN"):
        mc.load_mnist_cnn(tmp_path / "other.pt")


def test_nnsight_reads_the_same_neurons_as_plain_torch(cnn, casper_dir):
    images = data.load_mnist("test", data_dir=casper_dir).images[:300]
    acts = mc.record(mc.as_nnsight(cnn), images, chunk=128, progress=False)
    with torch.no_grad():
        x = mc.model_input(images)
        assert torch.allclose(acts.neurons, cnn.run_to(x, "relu3"))
        assert torch.allclose(acts.logits, cnn(x))


def test_input_and_rule_argument_errors(cnn):
    with pytest.raises(InputError, match=r"\[N, 28, 28\]"):
        mc.model_input(torch.zeros(2, 3, 28, 28))
    with pytest.raises(InputError, match="raw uint8"):
        mc.similarity(torch.zeros(2, 28, 28), torch.zeros(28, 28, dtype=torch.uint8))
    with pytest.raises(InputError, match="low < high"):
        mc.rule_labels(torch.zeros(3), (-7000.0, -9000.0))
    model = mc.as_nnsight(cnn)
    with pytest.raises(InputError, match=r"\[0, 200\)"):
        mc.ablate(model, torch.zeros(2, 28, 28, dtype=torch.uint8), [200], 0.0, progress=False)
    with pytest.raises(InputError, match="2 values for 3 neurons"):
        mc.ablate(model, torch.zeros(2, 28, 28, dtype=torch.uint8), [0, 1, 2], torch.zeros(2), progress=False)
    with pytest.raises(InputError, match="unknown layer"):
        cnn.run_to(torch.zeros(1, 1, 28, 28), "fc3")


def test_feature_visualisation_raises_its_target(cnn):
    neuron = 17
    direction = torch.eye(200)[[neuron]]
    image = mc.visualize(cnn, direction, layer="fc1", steps=20)
    assert image.shape == (1, 28, 28)
    with torch.no_grad():
        before = cnn.run_to(torch.zeros(1, 1, 28, 28), "fc1")[0, neuron]
        after = cnn.run_to(image[:, None], "fc1")[0, neuron]
    assert after > before + 1.0


# --------------------------------------------------------------------------------------------------------------
# the published numbers (60k training images)


@pytest.fixture(scope="module")
def train(casper_dir):
    return data.load_mnist("train", data_dir=casper_dir)


@pytest.fixture(scope="module")
def run(cnn, train):
    """Everything the solution computes from the clean run on the 60k training images."""
    model = mc.as_nnsight(cnn)
    acts = mc.record(model, train.images, progress=False)
    clue = train.images[mc.CLUE_INDEX]
    landmarks = mc.record(model, torch.stack([clue, 255 - clue]), progress=False)
    pca = mc.fit_pca(acts.neurons, positive=list(landmarks.neurons))
    arms = mc.fit_arms(pca.project(acts.neurons))
    groups = mc.find_detectors(acts.neurons, pca, arms)
    s = mc.similarity(train.images, clue)
    return dict(model=model, acts=acts, landmarks=landmarks, pca=pca, arms=arms, groups=groups, s=s)


def test_rule_agreement_and_split(run):
    s, labels = run["s"], run["acts"].labels
    assert mc.agreement(mc.rule_labels(s), labels) == pytest.approx(
        P["rule agreement, train, (-17305, -7762)"], abs=1e-6
    )
    assert mc.agreement(mc.rule_labels(s, mc.ROUND_THRESHOLDS), labels) == pytest.approx(
        P["rule agreement, train, (-17000, -8000)"], abs=1e-6
    )
    assert mc.band_split(s) == P["split below / inside / above the band"]


def test_rule_matches_the_solution_arithmetic(run, train):
    """The solution computed s in float32 from torch tensors; our float64 s gives the same labels."""
    clue = train.images[mc.CLUE_INDEX].float() / 255
    s32 = (train.images.float() * (clue - (1 - clue))).sum((1, 2))
    assert torch.equal(mc.rule_labels(s32), mc.rule_labels(run["s"]))
    assert not torch.equal(mc.rule_labels(run["s"] / 2), mc.rule_labels(run["s"]))  # the factor 2 matters


def test_pca_variance_and_landmarks(run):
    pca = run["pca"]
    assert [round(v, 3) for v in pca.explained.tolist()] == list(P["PCA variance explained, PC1 and PC2"])
    clue_xy, anti_xy = pca.project(run["landmarks"].neurons).tolist()
    assert clue_xy == pytest.approx([27.5, 11.9], abs=0.05)  # far out on the right arm
    assert anti_xy == pytest.approx([-31.6, 52.1], abs=0.05)  # far up the left arm
    points = torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(pca.project(pca.inverse(points)), points)


def test_arms_and_detectors(run):
    arms, groups = run["arms"], run["groups"]
    assert round(arms.left_slope, 2) == -1.85 and round(arms.right_slope, 2) == 0.55
    assert len(groups.dead) == 122 and len(groups.anti_one) + len(groups.one) == 78
    anti, one = mc.strongest_detectors(groups, run["acts"].neurons, run["pca"], arms)
    assert (len(anti), len(one)) == (18, 22)
    assert tuple(anti[:15].tolist()) == P["strongest anti-1 detectors"]
    assert tuple(one[:15].tolist()) == P["strongest 1 detectors"]


def test_zero_ablation_logit_differences(run, cnn):
    """On all 60k images, computed from the cached neurons (fc2 of the ablated neurons); that this equals the
    ablation through nnsight is checked in the next test."""
    acts, groups = run["acts"], run["groups"]
    settings = {
        "logit diff, zero-ablate anti-1 detectors": groups.anti_one,
        "logit diff, zero-ablate 1 detectors": groups.one,
        "logit diff, zero-ablate both": groups.detectors,
    }
    ld = acts.logit_diff
    assert (round(float(ld.median()), 2), round(float(ld.mean()), 2)) == P["logit diff, clean"]
    for name, idx in settings.items():
        h = acts.neurons.clone()
        h[:, idx] = 0.0
        with torch.no_grad():
            logits = cnn.fc2(h)
        ld = logits[:, 1] - logits[:, 0]
        assert (round(float(ld.median()), 2), round(float(ld.mean()), 2)) == P[name], name


def test_ablation_through_nnsight_matches_linear_algebra(run, train, cnn):
    """Zero and minimum ablation in the trace equal fc2 applied to the cached neurons with the group replaced
    (how the solution computed them)."""
    acts, groups = run["acts"], run["groups"]
    mins = acts.neurons.min(0).values
    n = 3000
    for idx, values in ((groups.one, mins[groups.one]), (groups.anti_one, 0.0)):
        logits = mc.ablate(run["model"], train.images[:n], idx, values, progress=False)
        h = acts.neurons[:n].clone()
        h[:, idx] = values
        with torch.no_grad():
            assert torch.allclose(logits, cnn.fc2(h), atol=1e-5)
    table = mc.ablation_table(
        mc.CnnActivations(acts.neurons[:n], acts.logits[:n]), {"min 1": logits}, mc.anti_side(run["s"][:n])
    )
    assert table["kept"][0] == 1.0 and 0.0 < table["kept"][1] < 1.0


def test_scrubbing_matches_an_independent_computation(run, train, cnn):
    """Scrub the first 4000 images, then redo each hypothesis by hand from the donors the engine drew."""
    n = 4000
    acts, groups = run["acts"], run["groups"]
    s = run["s"][:n]
    hypotheses = mc.scrub_hypotheses(s, groups, noise_levels=(1e-3, 1e-1))
    result = scrub(
        run["model"], train.images[:n], hypotheses, output="fc2", prepare=mc.model_input, progress=False
    )
    h = acts.neurons[:n]
    for i, donors in enumerate(result.donors):
        if len(donors) == 2:  # detectors from the nearest-s image, the dead neurons from a random image
            new = torch.empty_like(h)
            new[:, groups.detectors] = h[donors[0]][:, groups.detectors]
            new[:, groups.dead] = h[donors[1]][:, groups.dead]
        else:
            new = h[donors[0]]
        with torch.no_grad():
            kept = (cnn.fc2(new).argmax(-1) == acts.labels[:n]).double().mean()
        assert result.kept[i] == pytest.approx(float(kept), abs=1e-9)
    assert result.kept[0] > 0.9 > result.kept[1] > result.kept[2]


def test_random_image_control(run, train):
    # a random third of the images (the reconstructed set is grouped by digit beyond index 100, so not the first
    # third); deterministic, and chance agreement has a standard error of 0.0035 at this size
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:20000]
    result = scrub(
        run["model"],
        train.images[idx],
        mc.scrub_hypotheses(run["s"][idx], run["groups"], noise_levels=()),
        output="fc2",
        chunk=10000,
        prepare=mc.model_input,
        progress=False,
    )
    p = float(run["acts"].labels[idx].double().mean())
    assert result["random image"] == pytest.approx(p**2 + (1 - p) ** 2, abs=0.01)  # chance agreement
    assert result["random image"] == pytest.approx(P["scrubbing, random image"], abs=0.01)


def test_digest_helper_is_order_robust_beyond_100():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(150, 28, 28), dtype=np.uint8)
    y = np.concatenate([x[:100], x[100:][::-1]])
    assert data.mnist_images_digest(x) == data.mnist_images_digest(y)
    assert data.mnist_images_digest(x) != data.mnist_images_digest(x[::-1])
    assert len(data.mnist_images_digest(x)) == len(hashlib.sha256().hexdigest())


# --------------------------------------------------------------------------------------------------------------
# figures (inspected, not rendered)


def test_figures_carry_the_numbers():
    from workbench.viz import casper as viz

    g = torch.Generator().manual_seed(0)
    s = torch.randn(5000, generator=g, dtype=torch.float64) * 10000 - 12000
    labels = mc.rule_labels(s)
    hist = viz.similarity_histograms(s, labels, mc.PUBLISHED_THRESHOLDS, nbins=50)
    assert sum(sum(t.y) for t in hist.data) == 5000  # binned counts, every image once
    assert sum(hist.data[0].y) == int((labels == 0).sum())
    assert [sh.x0 for sh in hist.layout.shapes] == list(mc.PUBLISHED_THRESHOLDS)

    points = torch.randn(5000, 2, generator=g)
    scatter = viz.pca_scatter(points, labels, markers={"clue": torch.tensor([1.0, 2.0])}, max_points=1000)
    assert sum(len(t.x) for t in scatter.data[:2]) == 1000 and scatter.data[-1].x == (1.0,)

    grid = viz.image_grid(torch.randn(30, 28, 28, generator=g), [str(i) for i in range(30)], cols=15)
    assert grid.data[0].z.shape == (60, 450) and len(grid.layout.annotations) == 30

    table = mc.ablation_table(
        mc.CnnActivations(
            torch.zeros(4, 200), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
        ),
        {"flip all": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])},
        torch.tensor([True, True, False, False]),
    )
    assert table["kept"].tolist() == [1.0, 0.0]
    bars = viz.ablation_bars(table)
    assert list(bars.data[2].y) == [1.0, 0.0]  # kept on the anti-1 side
