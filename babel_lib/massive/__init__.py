"""Massive Activations in LLMs: the residual-stream scan, location, interventions and attention."""
