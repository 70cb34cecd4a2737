"""Figure builders, one module per notebook: each function takes arrays and returns a plotly figure."""
