"""Image generation with diffusion models (see engines.diffusion.engine)."""
