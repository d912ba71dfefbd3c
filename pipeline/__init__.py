"""thresher core: schema, readers/writers, artifact store, models, stages, CLI."""
