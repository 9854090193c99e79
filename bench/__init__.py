"""Benchmarks (`make bench`): each module measures a figure beside its baseline in the same run."""
