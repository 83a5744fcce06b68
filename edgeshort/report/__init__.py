"""Pictures of a run: heatmap overlays, patch grids, flag overlays, and the HTML report."""
