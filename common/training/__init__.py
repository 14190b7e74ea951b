"""Training: the one loop both stages use (`trainer`), the batches that feed it (`batches`), its
augmentation (`augment`) and loss (`losses`), and DDP under torchrun (`distributed`)."""
