"""Stage 1: a U-Net on the whole image at 256/512 px -> coarse mask -> car box (cached)."""
