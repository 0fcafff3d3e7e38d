"""lineinspect: multimodal industrial inspection (defect verdicts, heatmaps, reports) over gRPC."""

__version__ = "0.1.0"
