"""Models: name resolution and loading, chat encoding, the forward engine, per-sample gradients."""
