"""CASA helpers: offline configuration, log tails, simulated data, result merging."""
