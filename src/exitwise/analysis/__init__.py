"""Measurements of a model under the engine, beside the serving core: the exit profile (``profile``),
the cost model of a decode step (``costs``), and perplexity and top-1 agreement under the engine's
own forward pass (``perplexity``)."""
