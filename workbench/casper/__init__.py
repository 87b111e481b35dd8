"""Stephen Casper's two interpretability challenges ("EIS VII: A Challenge for Mechanists"), and the pieces
needed to rerun Heimersheim & Hobbhahn's solutions.

- `workbench.casper.data`: find, download and verify the challenge files and MNIST (`locate`, `load_mnist`,
  `load_transformer_labels`); the data directory comes from ``data_dir=`` or ``$WORKBENCH_CASPER_DIR``.
- `workbench.casper.mnist_cnn`: challenge 1, the CNN with one module per activation, the labelling rule, PCA of
  the neurons, detector groups, ablations and the causal-scrubbing hypotheses.
- `workbench.casper.pairs`: challenge 2, the integer-pair transformer (model, labels, replica, analysis, scrubbing).
- `workbench.casper.pca` and `workbench.casper.measures`: the PCA and the label agreement both challenges use.
"""

from workbench.casper.data import ENV_VAR, MnistSplit, load_mnist, load_transformer_labels, locate

__all__ = ["ENV_VAR", "MnistSplit", "load_mnist", "load_transformer_labels", "locate"]
