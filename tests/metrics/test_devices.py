import pytest
import torch

from readout.metrics import degradation_curves, localisation_scores, sensitivity_n_correlations

from .helpers import SIZE, linear_model

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_cuda_equal_the_cpu(images):
    model = linear_model()
    attributions = torch.randint(0, 3, (len(images), SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    attributions = attributions.double()
    boxes = torch.zeros(len(images), SIZE, SIZE, dtype=torch.bool)
    boxes[:, 2:7, 3:9] = True
    cpu = (
        degradation_curves(model, images, attributions, None, tile=4),
        sensitivity_n_correlations(model, images, attributions, None, tile=4, num_masks=5)[1],
        localisation_scores(attributions, boxes, boxes),
    )
    cuda = (
        degradation_curves(model.cuda(), images.cuda(), attributions.cuda(), None, tile=4),
        sensitivity_n_correlations(model, images.cuda(), attributions.cuda(), None, tile=4, num_masks=5)[1],
        localisation_scores(attributions.cuda(), boxes.cuda(), boxes.cuda()),
    )
    torch.testing.assert_close(cuda, cpu, check_device=False, equal_nan=True)
