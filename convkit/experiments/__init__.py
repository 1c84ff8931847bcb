"""Reproductions of published experiments with convkit's kernels (``chapter13``: the fastai
book's chapter on convolutions)."""
