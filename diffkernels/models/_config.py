"""Config checking, the frozen `.config`, output objects and from_pretrained for the models.

A diffusers config.json is validated against what our modules implement: an unknown key, or a
known key set to a value we do not implement, raises a ValueError that names it (never
silently ignored when it would change the math). Keys starting with "_" ("_class_name",
"_diffusers_version", "_name_or_path") are bookkeeping and are kept as they are.
"""
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch


class FrozenConfig(dict):
    """The model's full config: a read-only dict that also allows attribute access
    (`model.config.block_out_channels`), like diffusers' FrozenDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _frozen(self, *args, **kwargs):
        raise TypeError("the config is frozen: build a new model with from_config({...}) instead")

    __setattr__ = __setitem__ = __delitem__ = _frozen
    setdefault = update = pop = popitem = clear = _frozen

    def __reduce__(self):  # copy.deepcopy / pickle / torch.save rebuild it from a plain dict
        return (FrozenConfig, (dict(self),))


def resolve_config(cls_name: str, defaults: dict, config: dict, allowed: dict) -> FrozenConfig:
    """defaults overlaid with config. `allowed` maps a key to the values we implement."""
    unknown = sorted(k for k in config if k not in defaults and not k.startswith("_"))
    if unknown:
        raise ValueError(f"{cls_name}: unsupported config key(s) {unknown}; supported keys: "
                         f"{sorted(defaults)}")
    full = {**defaults, **config}
    for key, values in allowed.items():
        if full[key] not in values:
            raise ValueError(f"{cls_name}: config key {key!r} = {full[key]!r} is not supported "
                             f"(supported: {list(values)})")
    return FrozenConfig(full)


def per_block(cls_name, key, value, n):
    """An int/str (same for every block) or a list with one entry per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{cls_name}: config key {key!r} must have one entry per block "
                             f"({n}), got {list(value)}")
        return list(value)
    return [value] * n


@dataclass
class ModelOutput:
    """Base of the output objects: attribute access, `out[0]` and `to_tuple()` like diffusers'."""

    def to_tuple(self):
        return tuple(getattr(self, f) for f in self.__dataclass_fields__)

    def __getitem__(self, i):
        return self.to_tuple()[i]


@dataclass
class UNet2DConditionOutput(ModelOutput):
    sample: torch.Tensor


@dataclass
class DecoderOutput(ModelOutput):
    sample: torch.Tensor


@dataclass
class AutoencoderKLOutput(ModelOutput):
    latent_dist: Any


WEIGHTS = "diffusion_pytorch_model"


def _weight_files(folder: str, variant: Optional[str]):
    suffix = f".{variant}" if variant else ""
    for ext in (".safetensors", ".bin"):
        single = os.path.join(folder, f"{WEIGHTS}{suffix}{ext}")
        if os.path.isfile(single):
            return [single]
        index = os.path.join(folder, f"{WEIGHTS}{suffix}{ext}.index.json")
        if os.path.isfile(index):  # sharded checkpoint
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    raise FileNotFoundError(
        f"from_pretrained: no {WEIGHTS}{suffix}.safetensors or .bin (or a sharded .index.json) in "
        f"{folder!r}; it holds {sorted(os.listdir(folder))}"
        + (f" (variant={variant!r} was asked for)" if variant else ""))


def load_weights(path: str) -> dict:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def from_pretrained(cls, path, subfolder=None, torch_dtype=None, variant=None):
    """Build cls from a local diffusers component folder (config.json + weights)."""
    folder = os.path.join(path, subfolder) if subfolder else str(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"from_pretrained: {folder!r} is not a local directory. diffkernels reads local "
            "diffusers folders only and downloads nothing; fetch the model first (e.g. "
            "huggingface_hub.snapshot_download(repo_id)) and pass the folder.")
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"from_pretrained: no config.json in {folder!r}")
    with open(config_path) as f:
        config = json.load(f)
    state = {}
    for file in _weight_files(folder, variant):
        state.update(load_weights(file))
    with torch.device("meta"):  # no random init of weights that are overwritten next
        model = cls.from_config(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(torch_dtype or torch.float32).eval()


class PretrainedMixin:
    """from_config / from_pretrained, shared by the models."""

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)

    @classmethod
    def from_pretrained(cls, path, subfolder=None, torch_dtype=None, variant=None):
        """A local diffusers folder (config.json + diffusion_pytorch_model[.variant].safetensors
        or .bin). No download."""
        return from_pretrained(cls, path, subfolder, torch_dtype, variant)
