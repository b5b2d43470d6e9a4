"""A dispatch mode that records the ATen and custom ops dispatched in its scope (the insides of custom ops are not
dispatched, so not recorded): for tests of what an op or a wrapper issues."""
from torch.utils._python_dispatch import TorchDispatchMode


class OpLog(TorchDispatchMode):

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
