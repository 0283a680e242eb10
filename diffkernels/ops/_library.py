"""The Python side of the C++ operators: the Python backends ("reference", "triton") the C++
router calls as diffkernels::_<op>_backend(str backend, ...), and the helper that turns a
dispatcher schema error into the op's own argument error."""
import torch

from .._backend import _C  # noqa: F401  (the C++ operators are registered before anything here)

lib = torch.library.Library("diffkernels", "FRAGMENT")


def define_python_backends(op_name, schema, impls):
    """diffkernels::_<op_name>_backend(str backend, <the op's arguments>) -> <its outputs>:
    the C++ op calls it, after its checks, when the route is `reference` or `triton`.
    impls: {"reference": fn, "triton": fn}, each taking the op's arguments."""
    name = f"_{op_name}_backend"
    lib.define(f"{name}(str backend, {schema}")

    def run(backend, *args):
        return impls[backend](*args)

    lib.impl(name, run, "CompositeExplicitAutograd")


def clearer_error(error, check, *args):
    """Re-raise `error` (a dispatcher error such as "expected Tensor for argument x") as the
    op's own argument error when `check` finds one; else re-raise it unchanged."""
    try:
        check(*args)
    except (TypeError, ValueError, RuntimeError) as clearer:
        raise clearer from None
    raise error
