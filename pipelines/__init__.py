"""The pipeline runner and the `carvana` command line."""
