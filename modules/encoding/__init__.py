"""Sentence encoders for routing and embeddings, and what makes them cheap to load and run."""
