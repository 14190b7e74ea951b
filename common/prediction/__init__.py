"""Prediction in the shape of Lightning's prediction loop: the reader decodes images ahead of the
device (`reader`), a stage's predictor runs its step on each batch (`step`), the writer is given
each result with its index (`writer`); a predict command's work is a `Job` (`jobs`), run in this
process or as Dask tasks (`cluster`)."""
