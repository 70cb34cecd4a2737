"""What every study needs: models and their FFN adapters, hooks, token batches, perplexity, artefacts, config, figures."""
