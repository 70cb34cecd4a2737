"""Unraveling Babel: dense FFN -> fine-grained MoE, expert activation profiling, the paper's analyses, pruning."""
