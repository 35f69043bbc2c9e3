import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random `tiny` model directory in the upstream layout (feature compression on)."""
    from meissonic_edge.presets import make_random

    return make_random(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_flat_model_dir(tmp_path_factory):
    """The `tiny` preset without feature compression (no down/upsampling of the token grid)."""
    from meissonic_edge.presets import make_random

    return make_random(tmp_path_factory.mktemp("models") / "tiny-flat", "tiny", seed=1, feature_compression=False)
