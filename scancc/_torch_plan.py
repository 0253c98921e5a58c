"""The call planner as torch.compile sees it: a constant function of the call's structure
(kernel, which inputs are given by position/name, options), evaluated once at trace time.
Imported only when torch is (it imports torch)."""
import torch

from scancc.backends.triton.runtime import choose_mode

# torch.compiler / torch._dynamo import triton: without a GPU it must be in interpreter mode by
# then, or scancc's Triton backend cannot run in this process
choose_mode()

from .api import _plan_impl  # noqa: E402
from .autograd import torch_ops  # noqa: E402

plan = torch.compiler.assume_constant_result(_plan_impl)

# define the custom ops now: defining them while torch.compile traces would break the graph
torch_ops()
