"""The napari dock widget and its parts: worker glue, result layers, readout and comparison."""
