"""Sparsing Law: CETT and PPL-p% activation sparsity, power-law fits, and the micro model family."""
