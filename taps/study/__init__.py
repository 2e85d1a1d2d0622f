"""The paper's study and the speed harness, assembled from the library's layers: report.md
with its tables, figures and the six findings (one implementation, graded by paired
intervals), W&B study dashboards, and wall-clock timing of decoders."""
