"""The bundled ml_collections configs, installed as the package `g2face_jax.configs`."""
