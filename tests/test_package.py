"""The package's public names: the PyTorch ones are reachable from `meissonic_edge`, imported on first use.

(That importing the package and its runtime pulls in no torch is tests/test_architecture.py's.)
"""


def test_torch_api_is_reachable_lazily():
    import meissonic_edge

    assert callable(meissonic_edge.load_transformer)
    assert meissonic_edge.MeissonicTransformer.__name__ == "MeissonicTransformer"
