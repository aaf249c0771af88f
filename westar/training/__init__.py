"""The pieces of `westar.train.Trainer`: data (dataset, batch order, loader), step (one
optimizer step), checkpoints (save, load, resume, final adapters) and metrics (metrics.csv,
TensorBoard). `westar.train` puts them together and runs the loop."""
