"""The HTTP face of a swarm: an OpenAI-compatible API and a web chat (`petal-api`)."""
