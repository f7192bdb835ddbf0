"""Build modules as shapes only: on the meta device, without running their initializers.

The checkpoint loader (:mod:`eeengine.checkpoint`) builds a model twice on the meta device
(the size check of :func:`eeengine.checkpoint_checks.check_config_sizes`, and the model whose
weights then come from the file). Random initialization there is wasted work, and on the meta
device ``normal_`` (every ``nn.Embedding``) is implemented in Python: its first call imports
torch's reference ops, about a second of the first ``eeengine predict``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode


class _SkipInitializers(TorchFunctionMode):
    """Returns the tensor unchanged from every ``torch.nn.init`` function (they dispatch
    through torch-function modes); every other call runs as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


@contextmanager
def meta_modules() -> Iterator[None]:
    """Inside, modules are built on the meta device (no memory) and their parameters are left
    uninitialized (``torch.nn.init`` does nothing); load real tensors with
    ``module.load_state_dict(state, assign=True)``.

    Torch-function modes and the default device are per thread: other threads build and
    initialize as usual meanwhile.
    """
    with torch.device("meta"), _SkipInitializers():
        yield
