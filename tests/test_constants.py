"""The cached constant tensors behind the column sums and the norms' eps (mmseg_vil/models/layers/constants.py)."""
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mmseg_vil.models.layers import constants
from mmseg_vil.models.layers.column_sums import column_sums
from op_log import OpLog


def test_full_is_cached_per_value_and_dtype_and_grows_with_the_length(monkeypatch):
    monkeypatch.setattr(constants, '_CACHE', {})  # other tests' constants out of the way
    monkeypatch.setattr(constants, '_REPLACED', [])
    monkeypatch.setattr(constants, '_VIEWS', {})
    like = torch.zeros(3)
    ones = constants.full(5, 1.0, like, torch.float32)
    assert torch.equal(ones, torch.ones(5))
    again = constants.full(4, 1.0, like, torch.float32)
    assert again.data_ptr() == ones.data_ptr() and torch.equal(again, torch.ones(4))  # a view of the same tensor
    assert constants.full(4, 1.0, like, torch.float32) is again  # the view itself is kept: no slice per call
    assert torch.equal(constants.full(2, 1e-5, like, torch.float64), torch.full((2,), 1e-5, dtype=torch.float64))
    assert constants.full(2, 1.0, like, torch.float64).data_ptr() != ones.data_ptr()  # another dtype, another entry
    address = ones.data_ptr()
    longer = constants.full(9, 1.0, like, torch.float32)
    assert torch.equal(longer, torch.ones(9))
    assert torch.equal(ones, torch.ones(5))  # views handed out before still hold ones
    del ones, again  # a captured CUDA graph holds only the address: the module keeps the replaced tensor alive
    assert any(t.data_ptr() == address for t in constants._REPLACED)


def test_nothing_is_cached_while_tracing_and_column_sums_still_add_the_rows():
    """Under a dispatch mode or fake tensors the constant is made afresh (no cache entry for a value only seen there),
    and the sums are those of the rows."""
    with OpLog() as log:
        ones = constants.full(3, 7.5, torch.zeros(1), torch.float32)
    assert 'aten.full.default' in log.ops and torch.equal(ones, torch.full((3,), 7.5))
    assert all(key[0] != 7.5 for key in constants._CACHE)
    with FakeTensorMode():
        rows = torch.empty(6, 4)
        assert column_sums(rows).shape == (4,)
    rows = torch.arange(24, dtype=torch.float32).view(6, 4)
    torch.testing.assert_close(column_sums(rows), rows.sum(0))
