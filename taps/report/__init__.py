"""Per-run files and figures: results.json / .csv / .md, the tau heatmap, acceptance-by-depth
and routing-share plots. Reads result rows; never decodes."""
