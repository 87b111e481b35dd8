"""Figure builders: pure functions from engine results to plotly figures. They never run a model."""
