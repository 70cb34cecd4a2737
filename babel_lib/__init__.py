"""babel: dense LLM -> fine-grained MoE, expert activation frequencies, massive activations, sparsity."""

from babel_lib.errors import BabelError

__all__ = ["BabelError"]
__version__ = "0.1.0"
