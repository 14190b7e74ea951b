"""Stage 2: the full-resolution refiner on overlapping tiles of the stage-1 car box."""
