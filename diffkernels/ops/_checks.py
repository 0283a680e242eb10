"""Argument checks shared by the ops: each error names the argument and what was expected."""
import torch


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_dtype(name, t, dtypes):
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_device(name, t, like, like_name="x"):
    if t.device != like.device:
        raise RuntimeError(f"{name}: expected a tensor on {like.device} (the device of {like_name}), "
                           f"got {t.device}")


def check_param(name, t, shape, like, dtypes, like_name="x"):
    """An optional parameter tensor of a fixed shape on like's device."""
    if t is None:
        return
    check_tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    check_dtype(name, t, dtypes)
    check_device(name, t, like, like_name)
