"""The call planner as torch.compile sees it: a constant function of the call's structure
(kernel, which inputs are given by position/name, options), evaluated once at trace time.
Imported only when torch is (it imports torch)."""
import torch

from .api import _plan_impl
from .autograd import torch_ops

plan = torch.compiler.assume_constant_result(_plan_impl)

# define the custom ops now: defining them while torch.compile traces would break the graph
torch_ops()
