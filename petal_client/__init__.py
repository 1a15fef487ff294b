"""Petal client: run a model whose blocks live on a swarm of petald servers."""
