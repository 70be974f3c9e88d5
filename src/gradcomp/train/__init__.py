"""Training from the command line: datasets, models, the data-parallel loop, metrics and reports."""
