import json
import math

import pytest
import torch

from readout.metrics import Degradation, ImageMeans, SensitivityN, results_dict


def test_nan_values_are_left_out_of_means_and_counts():
    means = ImageMeans(2)
    means.update(torch.tensor([[1.0, float("nan")], [3.0, float("nan")]]))
    result = means.compute()
    assert result["mean"][0].item() == 2.0 and math.isnan(result["mean"][1].item())
    assert result["count"].tolist() == [2.0, 0.0]


def test_standard_errors_are_those_of_the_defined_values():
    values = torch.tensor([[1.0, 2.0], [2.0, float("nan")], [4.0, 5.0], [7.0, float("nan")]])
    means = ImageMeans(2)
    means.update(values[:1])
    means.update(values[1:])
    column = [1.0, 2.0, 4.0, 7.0]
    mean = sum(column) / 4
    expected = math.sqrt(sum((x - mean) ** 2 for x in column) / 3 / 4)
    result = means.compute()
    assert result["se"][0].item() == pytest.approx(expected, rel=1e-12)
    assert result["se"][1].item() == pytest.approx(math.sqrt(4.5 / 2), rel=1e-12)
    single = ImageMeans(1)
    single.update(torch.tensor([[3.0]]))
    assert math.isnan(single.compute()["se"].item())


def test_results_dict_is_plain_python():
    degradation = Degradation(num_tiles=2)
    degradation.update(torch.tensor([[0.9, 0.2, 0.1]]), torch.tensor([[0.9, 0.8, 0.1]]), torch.tensor([0.9]))
    sensitivity = SensitivityN(torch.tensor([1, 2]))
    sensitivity.update(torch.tensor([[0.5, 0.25]]))
    results = results_dict({"degradation": degradation, "sensitivity_n": sensitivity})
    assert results["sensitivity_n"] == {"n": [1, 2], "correlation": [0.5, 0.25], "count": [1.0, 1.0]}
    assert isinstance(results["degradation"]["score"], float)
    json.dumps(results)
