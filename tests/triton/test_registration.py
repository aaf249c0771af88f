"""The Triton op family is registered with exactly the C++ ops' schemas (declared once,
in csrc/westar_ops.cpp) and with the fake kernels and autograd of westar_ops._registry."""

import pytest
import torch

from westar_ops import _registry

OPS = ("sa_hdn_forward", "sa_hdn_backward", "ordinal_ranking_forward", "ordinal_ranking_backward")


@pytest.mark.parametrize("name", OPS)
def test_schemas_match_the_cpp_ops(name):
    cpp = str(getattr(torch.ops.westar_ops, name).default._schema)
    triton = str(getattr(torch.ops.westar_triton, name).default._schema)
    assert triton == cpp.replace("westar_ops::", "westar_triton::", 1)
    assert _registry.cpp_schema(name) == cpp[len(f"westar_ops::{name}") :]


def test_cpp_schema_of_an_unknown_op_raises():
    with pytest.raises(AttributeError):
        _registry.cpp_schema("no_such_op")
