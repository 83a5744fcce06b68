"""Export a detection run to a bundle the torch-free runtime loads."""

from edgeshort.export.exporter import ExportOptions, export_bundle

__all__ = ["ExportOptions", "export_bundle"]
