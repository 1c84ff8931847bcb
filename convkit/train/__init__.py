"""A small trainer with fastai's semantics (no fastai), for convkit's layers and torch's alike.

Imports go one way, so no module needs another lazily:

- ``events``: the loop's events, the ``Cancel*Exception``s and the ``Callback`` base class;
- ``optimiser``: fastai's Adam, weight-decay parameter groups, hyper-parameter access;
- ``schedules``: hyper-parameter schedules (pure functions of training progress);
- ``checkpoints``: the checkpoint file format (write, and read without running code);
- ``formatting``: the epoch table and mm:ss times as fastai prints them;
- ``hooks``: forward-hook context managers;
- ``plots``: every figure (matplotlib is loaded by the first one drawn);
- ``files``: atomic writes, unreadable files moved aside;
- ``callbacks``: Recorder, ProgressBar, ParamScheduler, ActivationStats, Checkpoint;
- ``learner``: the Learner (``fit``, ``fit_one_cycle``, ``save`` / ``load``, ``summary``);
- ``data``: MNIST, MNIST_SAMPLE and Fashion-MNIST, and loaders with fastai's semantics.

``import convkit`` loads none of this.
"""
