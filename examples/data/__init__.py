"""The bundled example data (the default training set), shipped in the wheel as sftkit.example_data."""
