"""ipywidgets panels: controls + a plotly FigureWidget + a status line. They hold no science."""
