"""Multi-task data as webdataset shards (schema: docs/data-schema.md): converters, synthetic data, loaders."""
