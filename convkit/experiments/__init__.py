"""Reproductions of published experiments with convkit's kernels: chapter 13 of the fastai
book (the chapter on convolutions).

- ``models``: the chapter's CNNs and the backends they run on (no trainer needed);
- ``chapter13``: the experiments, with the published numbers, and how each one runs;
- ``results``: results.json and each run's tables.txt;
- ``report``: report.md, the published numbers beside ours;
- ``runner``: ``python -m convkit chapter13`` (every experiment, backend and seed).
"""
