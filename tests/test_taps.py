import pytest
import torch

from readout.backbones import load_classifier
from readout.taps import FeatureTaps, ReplaceOutput, hook_count


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return load_classifier("synthetic-cnn", weights=None)


def test_taps_record_the_prefix_outputs_and_remove_their_hooks(classifier):
    x = torch.rand(2, 3, 64, 64)
    with FeatureTaps(classifier, ["block1", "fc"]) as taps:
        assert hook_count(classifier) == 2
        logits = classifier(x)
    assert hook_count(classifier) == 0
    torch.testing.assert_close(
        taps.features["block1"], classifier.split("block1").features(classifier.normalize(x))
    )
    torch.testing.assert_close(taps.features["fc"], logits)


def test_hooks_are_removed_when_the_body_raises(classifier):
    with pytest.raises(RuntimeError, match="boom"), FeatureTaps(classifier, ["block2"]):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), ReplaceOutput(classifier, "block2", lambda t: t):
        raise RuntimeError("boom")
    assert hook_count(classifier) == 0


def test_replace_output_changes_what_follows(classifier):
    x = torch.rand(1, 3, 64, 64)
    with ReplaceOutput(classifier, "block3", torch.zeros_like):
        logits = classifier(x)
    torch.testing.assert_close(logits, classifier.split("block3").suffix(torch.zeros(1, 128, 8, 8)))
    assert hook_count(classifier) == 0


def test_unknown_layer_lists_the_valid_ones(classifier):
    with pytest.raises(KeyError, match="conv3_4.*valid layers: conv1, block1, block2, block3, fc"):
        FeatureTaps(classifier, ["conv3_4"])
