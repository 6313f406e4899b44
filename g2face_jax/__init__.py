"""g2face_jax: reversible, key-driven face anonymization (G2Face) in JAX.

Photos: `images` reads and writes, `faces` finds and aligns, `photo.Anonymizer`
anonymizes / recovers / verifies the faces of one image with a key, `video`
does the same for videos through the photo API, and `files` runs either over
files and folders. `pipeline` holds the jitted stages on aligned crops.
"""


def __getattr__(name):
  """`g2face_jax.Anonymizer`, imported on first use (the package imports nothing heavy)."""
  if name == "Anonymizer":
    from g2face_jax.photo import Anonymizer
    return Anonymizer
  raise AttributeError(f"module 'g2face_jax' has no attribute '{name}'")
