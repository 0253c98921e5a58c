"""Readies the torch side of scancc before torch.compile may trace a call: the interpreter
mode for triton, then the ``scancc::scan`` custom ops (defining them while torch.compile
traces would break the graph). Imported only when torch is (it imports torch); imports only
``autograd`` and the Triton runtime (``api`` imports it, never the other way round)."""
import torch  # noqa: F401

from scancc.backends.triton.runtime import choose_mode

# torch.compiler / torch._dynamo import triton: without a GPU it must be in interpreter mode by
# then, or scancc's Triton backend cannot run in this process
choose_mode()

from .autograd import torch_ops  # noqa: E402

torch_ops()
