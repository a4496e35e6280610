"""Plain attributes for a built model's submodules and parameters.

``nn.Module`` keeps submodules and parameters in side dictionaries and finds them through
its ``__getattr__``, which Python calls only after the normal lookup has failed. A decode
step of SmolLM2 makes about 500 such lookups (``self.qkv_proj``, ``self.weight``,
``self.bias`` ...): 0.4 ms of a 10.5 ms one-stream step. Copying the references into each
module's instance dictionary lets the normal lookup find them. ``nn.Module.__setattr__``
drops the copy when an attribute is reassigned, so a later assignment still wins.
"""

from __future__ import annotations

from torch import nn


def bind_attributes(model: nn.Module) -> None:
    """Make every submodule, parameter and buffer of ``model`` a plain instance attribute."""
    for module in model.modules():
        for table in (module._modules, module._parameters, module._buffers):
            for name, value in table.items():
                object.__setattr__(module, name, value)
