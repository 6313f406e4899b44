"""Official PyTorch checkpoints -> Flax variables.

Converters take plain dicts of NumPy arrays (what `torch.load(weights_only=True)`
gives, or `recipe.regenerate` builds) and return Flax variable trees. They are
the only place that knows the official PyTorch names; torch itself is imported
only by `checkpoint_io`, to read files.
"""
