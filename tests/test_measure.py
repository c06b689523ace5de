"""The measurements the trainer and the benches report."""

import torch
from torch import nn

from hf_oto.measure import count_flops, measure_latency


class CountingLinear(nn.Linear):
    calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_latency_runs_every_model_the_asked_number_of_times_and_restores_the_mode():
    a, b = CountingLinear(4, 3), CountingLinear(4, 3).eval()
    seconds = measure_latency(a, b, inputs=torch.randn(2, 4), repeats=2, warmup=1, number=3)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert a.calls == b.calls == (1 + 2) * 3
    assert a.training and not b.training


def test_flops_count_a_multiply_add_as_two():
    assert count_flops(nn.Linear(4, 3, bias=False), torch.randn(2, 4)) == 2 * 2 * 4 * 3
