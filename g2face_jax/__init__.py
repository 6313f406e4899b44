

def __getattr__(name):
  """`g2face_jax.Anonymizer`, imported on first use (the package imports nothing heavy)."""
  if name == "Anonymizer":
    from g2face_jax.anonymizer import Anonymizer
    return Anonymizer
  raise AttributeError(f"module 'g2face_jax' has no attribute '{name}'")
