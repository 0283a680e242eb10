"""diffusers' ConfigMixin / SchedulerMixin / BaseOutput behaviour without diffusers: the config
dict and its JSON file, save_pretrained / from_pretrained / load_config / from_config
(return_unused_kwargs, keys of compatible schedulers kept), `compatibles`, and a dict-like step
output. Written from diffusers 0.42 (configuration_utils.py, schedulers/scheduling_utils.py,
utils/outputs.py) so that a scheduler_config.json round-trips between their classes and ours.

When diffusers is installed, our schedulers also subclass its SchedulerMixin (as the last base,
so every method here wins): diffusers' pipelines decide "can I save/load this component" by
issubclass, so DDPMPipeline.save_pretrained then writes our scheduler's config too."""
import functools
import importlib
import importlib.abc
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import numpy as np
from torch import Tensor

logger = logging.getLogger("diffkernels.schedulers")

CONFIG_NAME = "scheduler_config.json"
# The config format we write is diffusers' (0.42); with diffusers installed its version is used.
DIFFUSERS_FORMAT_VERSION = "0.42.1"

# Other diffusers schedulers' init keys (Karras-compatible family), for when diffusers is not
# installed: a scheduler_config.json from e.g. PNDMScheduler loads silently, as in diffusers.
OTHER_SCHEDULER_KEYS = frozenset((
    "algorithm_type", "clip_sample", "clip_sample_range", "disable_corrector",
    "dynamic_thresholding_ratio", "euler_at_final", "final_sigmas_type", "flow_shift",
    "interpolation_type", "lambda_min_clipped", "lower_order_final", "predict_x0", "rho",
    "sample_max_value", "set_alpha_to_one", "shift_terminal", "sigma_data", "sigma_max",
    "sigma_min", "sigma_schedule", "skip_prk_steps", "solver_order", "solver_p", "solver_type",
    "steps_offset", "thresholding", "time_shift_type", "timestep_spacing", "timestep_type",
    "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas", "use_flow_sigmas",
    "use_karras_sigmas", "use_lu_lambdas", "variance_type", "timestep_values",
    "stochastic_sampling"))


def diffusers_module():
    """diffusers if it is installed (imported on first use), else None."""
    if "diffusers" not in _cache:
        try:
            _cache["diffusers"] = (importlib.import_module("diffusers")
                                   if importlib.util.find_spec("diffusers") else None)
        except Exception:  # a broken install: behave as without it
            _cache["diffusers"] = None
    return _cache["diffusers"]


_cache = {}


def _diffusers_version():
    """The installed diffusers' version (without importing it), else the format we follow."""
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return DIFFUSERS_FORMAT_VERSION


_MIXIN_MODULE = "diffusers.schedulers.scheduling_utils"


def link_diffusers(classes):
    """Make `classes` subclasses of diffusers' SchedulerMixin (appended as the last base, so
    their own methods still win) once diffusers' scheduling_utils is imported: now if it is,
    else right after its import (diffusers costs seconds to import; we do not import it)."""
    def attach(module):
        mixin = getattr(module, "SchedulerMixin", None)
        for cls in classes:
            if isinstance(mixin, type) and not issubclass(cls, mixin):
                cls.__bases__ = cls.__bases__ + (mixin,)
                # A pipeline saved with our scheduler names its module as the library; loading
                # looks up the base class there by name ("SchedulerMixin") to pick from_pretrained.
                setattr(sys.modules[cls.__module__], "SchedulerMixin", mixin)

    if _MIXIN_MODULE in sys.modules:
        attach(sys.modules[_MIXIN_MODULE])
    else:
        sys.meta_path.insert(0, _AfterImport(_MIXIN_MODULE, attach))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` after `name` is imported (then leaves sys.meta_path)."""

    def __init__(self, name, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader, callback = spec.loader, self.callback

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                try:
                    callback(module)
                except Exception as e:  # never break the user's import of diffusers
                    logger.warning("could not link diffkernels schedulers to diffusers: %s", e)

        spec.loader = Loader()
        return spec


class SchedulerConfig(OrderedDict):
    """The config: a read-only dict with attribute access (`config.num_train_timesteps`), like
    diffusers' FrozenDict."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        for k, v in dict(*args, **kwargs).items():
            OrderedDict.__setitem__(self, k, v)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("scheduler config is read-only: build a new scheduler with "
                        "from_config(config, key=value)")

    __setitem__ = __delitem__ = __setattr__ = update = pop = setdefault = clear = _readonly

    def __reduce__(self):  # copy / deepcopy / pickle without going through __setitem__
        return (SchedulerConfig, (dict(self),))


def _json_value(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def register_to_config(init):
    """diffusers' @register_to_config: the init arguments (positional, keyword and defaults,
    minus ignore_for_config) become the config; `_use_default_values` lists the ones left at
    their default, and "_"-keys passed to init go into the config only."""
    signature = inspect.signature(init)
    params = [(name, p.default) for i, (name, p) in enumerate(signature.parameters.items())
              if i > 0 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @functools.wraps(init)
    def inner(self, *args, **kwargs):
        init_kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
        private = {k: v for k, v in kwargs.items() if k.startswith("_")}
        ignore = self.ignore_for_config
        config = {name: arg for arg, (name, _) in zip(args, params) if name not in ignore}
        config.update({k: init_kwargs.get(k, d) for k, d in params
                       if k not in ignore and k not in config})
        defaults = set(config) - set(init_kwargs) - {n for n, _ in params[:len(args)]}
        if defaults:
            config["_use_default_values"] = sorted(defaults)
        self.register_to_config(**private, **config)
        init(self, *args, **init_kwargs)
    return inner


class ConfigMixin:
    """Config handling shared by DDPMScheduler and DDIMScheduler (diffusers' ConfigMixin +
    SchedulerMixin API)."""

    config_name = CONFIG_NAME
    ignore_for_config = []
    has_compatibles = True
    _deprecated_kwargs = []
    _compatibles = []  # set by the subclasses: diffusers' KarrasDiffusionSchedulers names

    # -------------------------------------------------------------- the config

    def register_to_config(self, **kwargs):
        kwargs.pop("kwargs", None)
        if isinstance(kwargs.get("trained_betas"), (np.ndarray, Tensor)):
            kwargs["trained_betas"] = [float(b) for b in kwargs["trained_betas"]]
        old = self.__dict__.get("_internal_dict", {})
        object.__setattr__(self, "_internal_dict", SchedulerConfig({**old, **kwargs}))

    @property
    def config(self) -> SchedulerConfig:
        return self._internal_dict

    def __getattr__(self, name):
        """diffusers' deprecated `scheduler.<config key>` access: works, with a FutureWarning."""
        d = self.__dict__.get("_internal_dict")
        if d is not None and name in d:
            warnings.warn(f"Accessing config attribute `{name}` directly via "
                          f"'{type(self).__name__}' object attribute is deprecated. Please access "
                          f"'{name}' over '{type(self).__name__}'s config object instead, e.g. "
                          f"'scheduler.config.{name}'.", FutureWarning, stacklevel=2)
            return d[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def to_json_string(self) -> str:
        d = dict(self._internal_dict)
        d["_class_name"] = type(self).__name__
        d["_diffusers_version"] = _diffusers_version()
        # diffusers writes these two into its config as it saves; so do we (same config after)
        self.register_to_config(_class_name=d["_class_name"],
                                _diffusers_version=d["_diffusers_version"])
        d.pop("_use_default_values", None)
        d.pop("_ignore_files", None)
        d = {k: _json_value(v) for k, v in d.items()}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path):
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    def save_config(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Write scheduler_config.json into save_directory (created if needed)."""
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory: {save_directory} is a file, expected a directory")
        if push_to_hub:
            raise NotImplementedError("push_to_hub: not supported by diffkernels; save, then "
                                      "upload the folder with huggingface_hub")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, self.config_name)
        self.to_json_file(path)
        logger.info("Configuration saved in %s", path)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        self.save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    # -------------------------------------------------------------- loading

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, return_unused_kwargs=False,
                    return_commit_hash=False, **kwargs):
        """The config dict of a scheduler_config.json: a file, a folder (or folder/subfolder),
        or a Hugging Face Hub repo id (through huggingface_hub, when installed)."""
        subfolder = kwargs.pop("subfolder", None)
        hub = {k: kwargs.pop(k) for k in ("cache_dir", "force_download", "proxies", "token",
                                          "local_files_only", "revision") if k in kwargs}
        for k in ("local_dir", "local_dir_use_symlinks", "mirror", "user_agent"):
            kwargs.pop(k, None)
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isfile(path):
            config_file = path
        elif os.path.isdir(path):
            if subfolder is not None and os.path.isfile(os.path.join(path, subfolder,
                                                                     cls.config_name)):
                config_file = os.path.join(path, subfolder, cls.config_name)
            elif os.path.isfile(os.path.join(path, cls.config_name)):
                config_file = os.path.join(path, cls.config_name)
            else:
                raise EnvironmentError(f"Error no file named {cls.config_name} found in "
                                       f"directory {path}.")
        else:
            try:
                from huggingface_hub import hf_hub_download
            except ImportError:
                raise EnvironmentError(f"{path} is not a local folder or file (and "
                                       f"huggingface_hub, to download it, is not installed)") \
                    from None
            config_file = hf_hub_download(path, filename=cls.config_name, subfolder=subfolder,
                                          **hub)
        try:
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EnvironmentError(f"It looks like the config file at '{config_file}' is not a "
                                   f"valid JSON file.") from None
        if not (return_unused_kwargs or return_commit_hash):
            return config
        out = (config,)
        if return_unused_kwargs:
            out += (kwargs,)
        if return_commit_hash:
            out += (None,)
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder=None,
                        return_unused_kwargs=False, **kwargs):
        config, kwargs = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                         return_unused_kwargs=True, **kwargs)
        return cls.from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def _init_keys(cls, klass=None):
        return set(inspect.signature((klass or cls).__init__).parameters) - {"self", "kwargs"}

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Build from a config dict (a scheduler_config.json, any scheduler's .config, or a
        scheduler); kwargs override it. As diffusers: keys of compatible schedulers are kept in
        the config (hidden) without a warning, other unknown keys are ignored with a warning,
        and return_unused_kwargs=True returns (scheduler, unused keys)."""
        if config is None and "pretrained_model_name_or_path" in kwargs:
            config = kwargs.pop("pretrained_model_name_or_path")
        if config is None:
            raise ValueError("config: pass a config dict as the first argument")
        if not isinstance(config, dict):
            config = getattr(config, "config", config)
        if isinstance(config, (str, os.PathLike)):
            config, kwargs = cls.load_config(config, return_unused_kwargs=True, **kwargs)
        if not isinstance(config, dict):
            raise TypeError(f"config: expected a dict (a scheduler_config.json), got "
                            f"{type(config).__name__}")
        extra = {k: kwargs.pop(k) for k in cls.ignore_for_config if k in kwargs}
        init_dict, unused, hidden = cls._extract_init_dict(config, **kwargs)
        model = cls(**init_dict, **extra)
        if "_class_name" in hidden:
            hidden["_class_name"] = cls.__name__
        model.register_to_config(**hidden)
        unused = {**unused, **hidden}
        return (model, unused) if return_unused_kwargs else model

    @classmethod
    def _extract_init_dict(cls, config, **kwargs):
        """diffusers' ConfigMixin.extract_init_dict: (init kwargs, unused kwargs, hidden)."""
        used_defaults = config.get("_use_default_values", [])
        config = {k: v for k, v in config.items()
                  if k not in used_defaults and k != "_use_default_values"}
        original = dict(config)
        expected = cls._init_keys() - set(cls.ignore_for_config)
        comp_keys = set()
        for c in cls._get_compatibles():
            comp_keys |= cls._init_keys(c)
        if not any(c.__module__.startswith("diffusers") for c in cls._get_compatibles()):
            comp_keys |= OTHER_SCHEDULER_KEYS
        comp_keys -= cls._init_keys()
        config = {k: v for k, v in config.items() if k not in comp_keys}
        orig_name = config.pop("_class_name", cls.__name__)
        if isinstance(orig_name, str) and orig_name != cls.__name__:
            orig = _find_class(orig_name)
            if orig is not None:
                drop = cls._init_keys(orig) - expected
                config = {k: v for k, v in config.items() if k not in drop}
        elif not isinstance(orig_name, (str, list, tuple)):
            raise ValueError("_class_name: expected a string (or a list of strings)")
        config = {k: v for k, v in config.items()
                  if not k.startswith("_") and k != "quantization_config"}
        init_dict = {}
        for key in expected:
            if key in kwargs:
                config.pop(key, None)
                init_dict[key] = kwargs.pop(key)
            elif key in config:
                init_dict[key] = config.pop(key)
        if config:
            warnings.warn(f"The config attributes {sorted(config)} were passed to "
                          f"{cls.__name__}, but are not expected and will be ignored. Please "
                          f"verify your {cls.config_name} configuration file.", stacklevel=3)
        unused = {**config, **kwargs}
        hidden = {k: v for k, v in original.items() if k not in init_dict}
        return init_dict, unused, hidden

    # -------------------------------------------------------------- compatibles

    @property
    def compatibles(self):
        return self._get_compatibles()

    @classmethod
    def _get_compatibles(cls):
        """Classes whose config this scheduler's config can build: ours, then diffusers' of
        the same family (when installed; ones missing an optional dependency are left out)."""
        names = [cls.__name__] + [n for n in cls._compatibles if n != cls.__name__]
        out = []
        for name in names:
            klass = _find_class(name, ours_only=True) or _find_class(name)
            if klass is not None and klass not in out:
                out.append(klass)
        return out


def _find_class(name, ours_only=False):
    from .. import schedulers
    klass = getattr(schedulers, name, None)
    if isinstance(klass, type) or ours_only:
        return klass if isinstance(klass, type) else None
    dm = diffusers_module()
    klass = getattr(dm, name, None) if dm is not None else None
    if klass is None or not isinstance(klass, type):
        return None
    try:
        from diffusers.utils import DummyObject
        if isinstance(klass, DummyObject):  # needs an optional dependency that is missing
            return None
    except ImportError:
        pass
    return klass


# ---------------------------------------------------------------- the step output

@dataclass(init=False, eq=False, repr=False)
class SchedulerOutput(OrderedDict):
    """prev_sample: x_{t-1}, the next model input; pred_original_sample: the predicted x0.

    Behaves as diffusers' BaseOutput: attributes, out["prev_sample"], out[0] / out[:2] (over
    the fields that are not None), to_tuple(), keys() / values() / items(); read-only as a
    dict (setting an attribute updates the item)."""
    prev_sample: Tensor
    pred_original_sample: Optional[Tensor] = None

    def __init__(self, prev_sample, pred_original_sample=None):
        d = self.__dict__
        d["prev_sample"] = prev_sample
        d["pred_original_sample"] = pred_original_sample
        if prev_sample is not None:
            OrderedDict.__setitem__(self, "prev_sample", prev_sample)
        if pred_original_sample is not None:
            OrderedDict.__setitem__(self, "pred_original_sample", pred_original_sample)

    def __getitem__(self, k):
        if isinstance(k, str):
            return OrderedDict.__getitem__(self, k)
        return self.to_tuple()[k]

    def __setattr__(self, name, value):
        if name in self.keys() and value is not None:
            OrderedDict.__setitem__(self, name, value)
        object.__setattr__(self, name, value)

    def __setitem__(self, key, value):
        OrderedDict.__setitem__(self, key, value)
        object.__setattr__(self, key, value)

    def _readonly(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is read-only as a dict (set an attribute instead)")

    __delitem__ = setdefault = pop = update = _readonly

    def to_tuple(self):
        return tuple(OrderedDict.__getitem__(self, k) for k in self.keys())

    def __reduce__(self):
        return (type(self), (self.prev_sample, self.pred_original_sample))

    def __repr__(self):
        return (f"{type(self).__name__}(prev_sample={self.prev_sample!r}, "
                f"pred_original_sample={self.pred_original_sample!r})")


def _register_pytree(cls):
    """As diffusers' BaseOutput: a pytree node (torch.compile / export can return it)."""
    try:
        import torch.utils._pytree as pytree
        pytree.register_pytree_node(
            cls, pytree._dict_flatten,
            lambda values, context: cls(**pytree._dict_unflatten(values, context)),
            serialized_type_name=f"{cls.__module__}.{cls.__name__}")
    except Exception:  # an older torch without this API: the output still works
        pass


_register_pytree(SchedulerOutput)
