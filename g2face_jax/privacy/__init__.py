"""What the user's key protects: key files and the draws a key drives (`keys`), and the
keyed payload code that hides an identity so only the key reads it (`secure_payload`).
The official float32 bit code the model itself hides is `g2face_jax.payload`."""
