import json
import math

import torch

from readout.metrics import Degradation, ImageMeans, SensitivityN, results_dict


def test_nan_values_are_left_out_of_means_and_counts():
    means = ImageMeans(2)
    means.update(torch.tensor([[1.0, float("nan")], [3.0, float("nan")]]))
    result = means.compute()
    assert result["mean"][0].item() == 2.0 and math.isnan(result["mean"][1].item())
    assert result["count"].tolist() == [2.0, 0.0]


def test_results_dict_is_plain_python():
    degradation = Degradation(num_tiles=2)
    degradation.update(torch.tensor([[0.9, 0.2, 0.1]]), torch.tensor([[0.9, 0.8, 0.1]]), torch.tensor([0.9]))
    sensitivity = SensitivityN(torch.tensor([1, 2]))
    sensitivity.update(torch.tensor([[0.5, 0.25]]))
    results = results_dict({"degradation": degradation, "sensitivity_n": sensitivity})
    assert results["sensitivity_n"] == {"n": [1, 2], "correlation": [0.5, 0.25], "count": [1.0, 1.0]}
    assert isinstance(results["degradation"]["score"], float)
    json.dumps(results)
