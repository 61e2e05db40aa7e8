"""Tools around the library and the trainer: dataset preparation, benchmarks and the report."""
