"""Measurements of a model under the engine, beside the serving core: the exit profile and its cost
model (``profile``), and perplexity and top-1 agreement under the engine's own forward pass
(``perplexity``)."""
