"""Code both stages share: data access, the U-Net, the trainer, RLE, metrics, config."""
