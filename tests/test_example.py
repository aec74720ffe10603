"""examples/tied_autoencoder.py, run for one epoch: the tie holds through training, the tied
model's output equals F.conv_transpose2d on the encoder's own weights, both models learn, and the
picture is written."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch
import torch.nn.functional as F

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tied_autoencoder.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("tied_autoencoder", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_epoch(example, tmp_path_factory):
    png = tmp_path_factory.mktemp("example") / "digits.png"
    threads = torch.get_num_threads()
    try:
        result = example.main(["--epochs", "1", "--png", str(png)])
    finally:
        torch.set_num_threads(threads)  # main() sets its own; the rest of the suite keeps ours
    return result, png


def _by_hand(tied, x):
    """The tied autoencoder written with PyTorch ops on the encoder's own tensors (f = identity)
    and the decoder's biases."""
    encoder = tied.encoder
    h = encoder(x)
    layers = [(encoder.conv3, 2, 1), (encoder.conv2, 2, 1), (encoder.conv1, 1, 0)]
    for i, ((conv, stride, output_padding), decoder_layer) in enumerate(zip(layers, tied.decoder)):
        h = F.relu(h) if i else h
        h = F.conv_transpose2d(
            h, conv.weight, decoder_layer.bias, stride=stride, padding=1, output_padding=output_padding
        )
    return torch.sigmoid(h)


def test_parameter_counts(one_epoch):
    result, _ = one_epoch
    tied = result["models"]["tied"]
    encoder_params = sum(p.numel() for p in tied.encoder.parameters())
    decoder_biases = 32 + 16 + 1  # each decoder layer's bias: the out channels of the transposed conv
    assert result["parameters"]["tied"] == encoder_params + decoder_biases
    assert result["parameters"]["untied"] > result["parameters"]["tied"]
    # Every parameter of the tied model is the encoder's or a decoder bias: no copy of a weight.
    names = [n for n, _ in tied.named_parameters()]
    assert sorted(n for n in names if not n.startswith("encoder.")) == [
        "decoder.0.bias",
        "decoder.1.bias",
        "decoder.2.bias",
    ]


def test_tied_model_is_conv_transpose_of_the_encoder_weights(one_epoch):
    result, _ = one_epoch
    tied = result["models"]["tied"].eval()
    x = result["test"][:16]
    with torch.no_grad():
        torch.testing.assert_close(tied(x), _by_hand(tied, x), rtol=1e-5, atol=1e-6)
    for layer, conv in zip(tied.decoder, (tied.encoder.conv3, tied.encoder.conv2, tied.encoder.conv1)):
        assert layer.source is conv


def test_both_models_learn_in_one_epoch(one_epoch):
    result, _ = one_epoch
    for name, losses in result["history"].items():
        assert len(losses) == 2
        assert losses[1] < 0.8 * losses[0], f"{name}: held-out MSE {losses[0]:.5f} -> {losses[1]:.5f}"


def test_png_written(one_epoch):
    _, png = one_epoch
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
