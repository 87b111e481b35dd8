"""The authors' committed seed-0 mod-add results, as numbers to set ours beside.

Source: the result files in ``ApolloResearch/rib`` at commit 7a6199f,
``rib_scripts/rib_build/sample_configs_modadd/out/`` (``*_rib_graph.pt``, ``*_ablation_results.json``,
``*_labels.csv``) for seed 0 and bases rib / pca, as summarised in the project's research note
(``docs/research/lib.md`` section 5). These are the authors' own outputs, not re-runs. Keys follow our node-layer
names; "lib" is the authors' "rib" basis.
"""

from __future__ import annotations

PAPER = {
    "unablated_test_accuracy": 0.99955,
    "dims": {
        "lib": {"ln1.0": 115, "ln2.0": 110, "unembed": 116, "output": 114},
        "pca": {"ln1.0": 115, "ln2.0": 127, "unembed": 129, "output": 114},
    },
    # leading Lambdas (constant direction first), as printed in the note (3 significant digits)
    "lambda": {
        "ln1.0": [
            1.17e5,
            1.81e4,
            4.08e3,
            3.04e3,
            1.35e3,
            1.15e3,
            1.06e3,
            1.01e3,
            78,
            74,
            72,
            61,
            40,
            27,
            10.5,
            2.9,
            1.1,
            0.25,
        ],
        "ln2.0": [
            2.96e5,
            1.64e4,
            5.0e3,
            4.6e3,
            4.2e3,
            3.8e3,
            2.9e3,
            1.5e3,
            1.0e3,
            825,
            487,
            377,
            341,
            278,
            241,
            216,
            149,
            0.17,
            0.011,
            0.003,
        ],
        "unembed": [2.17e5, 9.3e3, 5.3e3, 1.9e3, 1.6e3, 1.4e3, 1.2e3, 681, 279, 17.6, 1.6, 1.4, 1.2],
    },
    # PCA: leading eigenvalues of the centred Gram at ln1.0 (the constant direction's is 1.00)
    "pca_eigenvalues": {"ln1.0": [2.42, 1.00, 0.145, 0.122]},
    # test accuracy with k directions kept (constant included)
    "node_ablation": {
        "lib": {
            "ln1.0": {6: 0.255, 8: 0.860, 10: 0.888, 11: 0.967, 13: 0.998, 15: 0.999, 17: 1.000},
            "ln2.0": {6: 0.118, 8: 0.369, 10: 0.785, 11: 0.881, 13: 0.921, 15: 0.983, 17: 1.000},
            "unembed": {6: 0.653, 8: 0.998, 10: 1.000},
        },
        "pca": {
            "ln1.0": {6: 0.110, 8: 0.849, 10: 0.950, 11: 0.953, 13: 0.997, 15: 1.000, 17: 1.000},
            "ln2.0": {6: 0.181, 8: 0.386, 10: 0.544, 11: 0.610, 13: 0.838, 15: 0.986, 17: 1.000},
            "unembed": {6: 0.600, 8: 0.998, 10: 1.000},
        },
    },
    "min_directions_99": {
        "lib": {"ln1.0": 13, "ln2.0": 17, "unembed": 8},
        "pca": {"ln1.0": 13, "ln2.0": 17, "unembed": 8},
    },
    # edges holding 90 / 99 / 99.9 % of the section's total weight (constant edges included), and all edges
    "edge_counts": {
        "lib": {
            "ln1.0 -> ln2.0": (6, 35, 91, 12650),
            "ln2.0 -> unembed": (3, 29, 70, 12760),
            "unembed -> output": (113, 448, 781, 13224),
        },
        "pca": {
            "ln1.0 -> ln2.0": (65, 208, 383, 14605),
            "ln2.0 -> unembed": (27, 107, 234, 16383),
            "unembed -> output": (113, 470, 802, 14706),
        },
    },
    # edge ablation: fewest edges keeping test accuracy within 0.001 of unablated (bisection)
    "edge_bisect": {
        "lib": {"ln1.0 -> ln2.0": 133, "ln2.0 -> unembed": 82, "unembed -> output": 633},
        "pca": {"ln1.0 -> ln2.0": 167, "ln2.0 -> unembed": 114, "unembed -> output": 682},
    },
    "key_frequencies": (1, 8, 15, 18, 36, 56),
    # the MNIST MLP checkpoint on the MNIST test set (the research note's measurement, not the authors')
    "mnist_test_accuracy": 0.9760,
}
