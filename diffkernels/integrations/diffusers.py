"""Run a diffusers pipeline or model you already have on diffkernels' ops, and undo it.

    from diffkernels.integrations.diffusers import accelerate, restore
    report = accelerate(pipe)  # StableDiffusion(XL)Pipeline, UNet2DConditionModel, AutoencoderKL
    print(report)                  # what was replaced and what was left as it is
    restore(pipe)                  # exactly the objects and forwards it had before

What changes, per instance (diffusers' classes are never patched):
- attention: each `Attention` whose processor is AttnProcessor2_0 / AttnProcessor /
  AttnAddedKVProcessor2_0 gets a processor that computes the same thing with `dk.attention`
  (set with `set_processor`; the original is kept in it and used for a call we cannot express,
  e.g. an attention mask that is not a key padding mask, fp64, or a head dim we do not run);
- GroupNorm -> SiLU: `ResnetBlock2D.forward` is rebound on the instance to run norm1+SiLU and
  norm2+SiLU (with the time-embedding add fused as channel_bias) through `dk.group_norm_silu`;
  the UNet's / VAE encoder's / decoder's `conv_norm_out` runs the fused op and the `conv_act`
  that follows it becomes an identity (`SiLUFusedIntoNorm`, which holds the original);
- scheduler: a pipeline's diffusers DDPMScheduler / DDIMScheduler becomes diffkernels' drop-in
  of the same config (one fused step op per step).
Parameters are never copied or changed: LoRA loading / fusing / unloading works before and after.
A call in autocast, or one that needs gradients, runs the original code (our ops are forward-only).

backend: "auto" adds no work per call (and keeps torch.compile(fullgraph=True) free of graph
breaks). Another name wraps every replaced call in `dk.backend(name)` (about 1-2 us of host time
per call; under torch.compile this is a graph break per call: wrap the compiled call in
`with dk.backend(name):` and use backend="auto" instead).
"""
import dataclasses
import functools
import types
import warnings
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from .. import _backend
from ..ops import attention as dk_attention
from ..ops import group_norm_silu as dk_group_norm_silu
from ..ops.attention import MAX_HEAD_DIM

MIN_VERSION = "0.30.0"     # oldest diffusers whose module code the forwards below mirror
TESTED_UP_TO = "0.42.1"    # newest checked
_ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MARK = "_diffkernels"     # attribute on our forwards / processors
_SCHEDULER_ATTR = "_diffkernels_original_scheduler"


@dataclasses.dataclass
class Report:
    """What accelerate() replaced ({kind: [module names]}) and left ({kind: ["name: why"]})."""
    replaced: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    left: Dict[str, List[str]] = dataclasses.field(default_factory=dict)
    backend: str = "auto"

    def add(self, kind, name, why=None):
        (self.replaced if why is None else self.left).setdefault(kind, []).append(
            name if why is None else f"{name}: {why}")

    @property
    def n_replaced(self):
        return sum(len(v) for v in self.replaced.values())

    @property
    def n_left(self):
        return sum(len(v) for v in self.left.values())

    def __str__(self):
        kinds = sorted(set(self.replaced) | set(self.left))
        lines = [f"diffkernels.accelerate (backend {self.backend}): {self.n_replaced} replaced, "
                 f"{self.n_left} left as they were"]
        for k in kinds:
            lines.append(f"  {k}: {len(self.replaced.get(k, []))} replaced, "
                         f"{len(self.left.get(k, []))} left")
            lines += [f"    left: {w}" for w in self.left.get(k, [])[:8]]
            if len(self.left.get(k, [])) > 8:
                lines.append(f"    ... {len(self.left[k]) - 8} more")
        return "\n".join(lines)


# ------------------------------------------------------------------ version and inputs

def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("diffkernels.integrations.diffusers needs diffusers "
                          f"(>= {MIN_VERSION}): pip install diffusers") from e
    from packaging.version import Version
    v = Version(diffusers.__version__)
    if v < Version(MIN_VERSION):
        raise RuntimeError(f"diffusers {diffusers.__version__} is too old for "
                           f"diffkernels.integrations.diffusers: need >= {MIN_VERSION} (its "
                           "ResnetBlock2D / attention processor code differs); upgrade diffusers")
    if v.release[:2] > Version(TESTED_UP_TO).release[:2]:
        warnings.warn(f"diffusers {diffusers.__version__} is newer than the newest version "
                      f"diffkernels' integration was checked with ({TESTED_UP_TO}); compare the "
                      "output with restore()d modules once", stacklevel=3)
    return diffusers


def _models(obj, diffusers):
    """[(prefix, model)] of a pipeline (its unet and vae) or a single supported model."""
    kinds = (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL)
    if isinstance(obj, kinds):
        return [("", obj)]
    if isinstance(obj, nn.Module):
        raise TypeError(f"pipe_or_model: expected a diffusers pipeline, UNet2DConditionModel or "
                        f"AutoencoderKL, got {type(obj).__name__}")
    # a torch.compile'd component: its module (accelerate before compiling, or compile again)
    found = [(name + ".", getattr(getattr(obj, name, None), "_orig_mod", getattr(obj, name, None)))
             for name in ("unet", "vae")]
    found = [(p, m) for p, m in found if isinstance(m, kinds)]
    if not found:
        raise TypeError(f"pipe_or_model: expected a diffusers pipeline (with a unet or vae), "
                        f"UNet2DConditionModel or AutoencoderKL, got {type(obj).__name__}")
    return found


def _with_backend(backend, fn):
    if backend == "auto":
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with _backend.backend(backend):
            return fn(*args, **kwargs)
    return wrapped


def _needs_original(x, *params):
    """Autocast or autograd: the eager code does what our forward-only ops cannot."""
    if torch.is_autocast_enabled(x.device.type):
        return True
    return torch.is_grad_enabled() and (x.requires_grad or any(
        p is not None and p.requires_grad for p in params))


# ------------------------------------------------------------------ attention

def _key_padding_mask(attention_mask, batch, lk):
    """The [B, Lk] bool mask (True = attend) that gives what SDPA gives with this mask, or None
    when the mask is something else (per query / per head / soft bias): then the original runs.
    diffusers hands masks over as bool or as a 0 / -10000 (or -inf) additive bias [B, 1, Lk]."""
    m = attention_mask
    if m.dim() == 3 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dim() != 2 or tuple(m.shape) != (batch, lk):
        return None
    if m.dtype == torch.bool:
        # SDPA gives NaN where a row attends to no key, dk.attention zeros (DESIGN.md 3): run
        # the original then. Inside a compiled graph the host read is not possible: zeros.
        if not torch.compiler.is_compiling() and not bool(m.any(-1).all()):
            return None
        return m
    if not m.is_floating_point() or torch.compiler.is_compiling():
        return None  # checking the values needs a host read: not inside a compiled graph
    keep = m == 0
    # every bias 0 or <= -1e4 (exp underflows to 0 in fp32), and every row keeps a key (with
    # none, SDPA averages all keys or gives NaN)
    if not bool(((keep | (m <= -1e4)).all(-1) & keep.any(-1)).all()):
        return None
    return keep


def _supported_head_dim(d):
    return d % 8 == 0 and d <= MAX_HEAD_DIM


class AttnProcessor:
    """diffusers' AttnProcessor2_0 (or classic AttnProcessor: `classic=True` uses attn.scale and
    no norm_q / norm_k, as it does) with dk.attention instead of SDPA. One per module; `original`
    is the processor it replaced (restore() puts it back; calls we cannot express go to it)."""

    def __init__(self, original, backend="auto", classic=False):
        self.original = original
        self.backend = backend
        self.classic = classic
        self._run = _with_backend(backend, dk_attention)
        setattr(self, _MARK, True)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        kpm = None
        if attention_mask is not None:
            kv = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            lk = kv.shape[1] if kv.ndim == 3 else kv[0, 0].numel()  # 4-D: [B, C, H, W]
            kpm = _key_padding_mask(attention_mask, kv.shape[0], lk)
        if ((attention_mask is not None and kpm is None) or hidden_states.dtype not in _ATTN_DTYPES
                or _needs_original(hidden_states, attn.to_q.weight)):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                 *args, **kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0] if encoder_hidden_states is None else \
            encoder_hidden_states.shape[0]

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads  # a multiple of 8, <= 512: checked by accelerate()
        # [B, L, H*D] -> [B, H, L, D] views, read in place by dk.attention
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        scale = None
        if self.classic:
            scale = attn.scale
        else:
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
        hidden_states = self._run(query, key, value, scale=scale, key_padding_mask=kpm)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class AttnAddedKVProcessor:
    """diffusers' AttnAddedKVProcessor2_0 (UNet2DSimpleCrossAttn blocks: text keys/values
    projected by add_k_proj / add_v_proj, put before the image's) with dk.attention."""

    def __init__(self, original, backend="auto"):
        self.original = original
        self.backend = backend
        self._run = _with_backend(backend, dk_attention)
        setattr(self, _MARK, True)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        if (attention_mask is not None or hidden_states.dtype not in _ATTN_DTYPES
                or _needs_original(hidden_states, attn.to_q.weight)):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                                 *args, **kwargs)
        residual = hidden_states
        hidden_states = hidden_states.flatten(2).transpose(1, 2)  # [B, C, *] -> [B, L, C]
        batch_size, sequence_length, _ = hidden_states.shape
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.head_to_batch_dim(attn.to_q(hidden_states), out_dim=4)
        key = attn.head_to_batch_dim(attn.add_k_proj(encoder_hidden_states), out_dim=4)
        value = attn.head_to_batch_dim(attn.add_v_proj(encoder_hidden_states), out_dim=4)
        if not attn.only_cross_attention:
            own_k = attn.head_to_batch_dim(attn.to_k(hidden_states), out_dim=4)
            own_v = attn.head_to_batch_dim(attn.to_v(hidden_states), out_dim=4)
            key, value = torch.cat([key, own_k], dim=2), torch.cat([value, own_v], dim=2)

        hidden_states = self._run(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, residual.shape[1])
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        hidden_states = hidden_states.transpose(-1, -2).reshape(residual.shape)
        return hidden_states + residual


def _attention_plan(attn, diffusers):
    """(processor class, kwargs) for this Attention module, or a string saying why not."""
    ap = diffusers.models.attention_processor
    proc = attn.processor
    added = getattr(attn, "add_k_proj", None) is not None
    kind = type(proc)
    if kind is ap.AttnProcessor2_0 and not added:
        plan = AttnProcessor, {}
    elif kind is ap.AttnProcessor and not added:
        plan = AttnProcessor, {"classic": True}
    elif kind is ap.AttnAddedKVProcessor2_0 and added:
        plan = AttnAddedKVProcessor, {}
    else:
        return f"processor {kind.__name__} is not one we replace"
    q = attn.to_q.weight.shape[0]
    kv = (attn.add_k_proj if added else attn.to_k).weight.shape[0]
    if q != kv or q % attn.heads:
        return f"query width {q} and key width {kv} differ or do not split into {attn.heads} heads"
    d = q // attn.heads
    if not _supported_head_dim(d):
        return f"head dim {d} (dk.attention runs multiples of 8 up to {MAX_HEAD_DIM})"
    return plan


# ------------------------------------------------------------------ GroupNorm -> SiLU

def _norm_silu(x, norm, backend, channel_bias=None):
    """silu(norm(x + channel_bias)) through the fused op; eager where the op's contract or the
    eager semantics (autocast, autograd, dtype promotion) say otherwise."""
    fused = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    if channel_bias is not None and (channel_bias.dtype != x.dtype
                                     or tuple(channel_bias.shape) != (*x.shape[:2], 1, 1)):
        fused = False
    if not fused or _needs_original(x, norm.weight, channel_bias):
        if channel_bias is not None:
            x = x + channel_bias
        return F.silu(F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))
    if channel_bias is not None:
        channel_bias = channel_bias.reshape(x.shape[0], x.shape[1])
    if backend == "auto":
        return dk_group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                  channel_bias=channel_bias)
    with _backend.backend(backend):
        return dk_group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                  channel_bias=channel_bias)


def _resnet_forward_for(backend):
    """diffusers' ResnetBlock2D.forward (0.30 .. 0.42) with norm1+SiLU and (temb add)+norm2+SiLU
    fused; everything else as there."""
    def forward(self, input_tensor, temb, *args, **kwargs):
        hidden_states = _norm_silu(input_tensor, self.norm1, backend)
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "default":
            hidden_states = _norm_silu(hidden_states, self.norm2, backend, channel_bias=temb)
        elif self.time_embedding_norm == "scale_shift":  # the SiLU follows the modulation
            if temb is None:
                raise ValueError(f" `temb` should not be None when `time_embedding_norm` is "
                                 f"{self.time_embedding_norm}")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = self.norm2(hidden_states)
            hidden_states = self.nonlinearity(hidden_states * (1 + time_scale) + time_shift)
        else:
            hidden_states = _norm_silu(hidden_states, self.norm2, backend)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor
    setattr(forward, _MARK, True)
    return forward


def _norm_out_forward_for(backend):
    def forward(self, x):  # GroupNorm + the SiLU of the conv_act that follows (now an identity)
        return _norm_silu(x, self, backend)
    setattr(forward, _MARK, True)
    return forward


class SiLUFusedIntoNorm(nn.Identity):
    """Stands in for a `conv_act` SiLU whose work the conv_norm_out before it now does.
    Holds the original (not as a submodule) for restore()."""

    def __init__(self, original):
        super().__init__()
        object.__setattr__(self, "original", original)

    def extra_repr(self):
        return "SiLU fused into conv_norm_out by diffkernels"


def _ours(fn):
    return getattr(getattr(fn, "__func__", fn), _MARK, False)


def _resnet_plan(m, diffusers):
    if type(m) is not diffusers.models.resnet.ResnetBlock2D:
        return f"{type(m).__name__} is not ResnetBlock2D"
    if type(m.norm1) is not nn.GroupNorm or type(m.norm2) is not nn.GroupNorm:
        return "norm is not nn.GroupNorm"
    if type(m.nonlinearity) is not nn.SiLU:
        return f"activation {type(m.nonlinearity).__name__} is not SiLU"
    return None


def _norm_out_owners(diffusers):
    from diffusers.models.autoencoders.vae import Decoder, Encoder
    return (diffusers.UNet2DConditionModel, Encoder, Decoder)  # conv_norm_out, then conv_act


# ------------------------------------------------------------------ accelerate / restore

def accelerate(pipe_or_model, *, attention=True, group_norm=True, scheduler=True,
               backend="auto") -> Report:
    """Make a diffusers pipeline (its unet and vae; text encoders untouched), UNet2DConditionModel
    or AutoencoderKL run on diffkernels' ops, in place. Returns a Report. Calling it again first
    restores, then applies the new options. restore() undoes it."""
    diffusers = _diffusers()
    _backend._check_name(backend)
    models = _models(pipe_or_model, diffusers)
    restore(pipe_or_model)
    report = Report(backend=backend)
    for prefix, model in models:
        if attention:
            procs = {}
            for name, m in model.named_modules():
                if not isinstance(m, diffusers.models.attention_processor.Attention):
                    continue
                plan = _attention_plan(m, diffusers)
                if isinstance(plan, str):
                    report.add("attention", prefix + name, plan)
                    continue
                cls, kwargs = plan
                procs[name] = cls(m.processor, backend=backend, **kwargs)
                report.add("attention", prefix + name)
            for name, proc in procs.items():  # set_processor: what set_attn_processor calls
                model.get_submodule(name).set_processor(proc)
        if group_norm:
            _accelerate_norms(model, prefix, backend, report, diffusers)
    if scheduler and not isinstance(pipe_or_model, nn.Module):
        _accelerate_scheduler(pipe_or_model, report, diffusers)
    return report


def _accelerate_norms(model, prefix, backend, report, diffusers):
    resnet_forward = _resnet_forward_for(backend)
    norm_out_forward = _norm_out_forward_for(backend)
    owners = _norm_out_owners(diffusers)
    for name, m in model.named_modules():
        if type(m).__name__.startswith("ResnetBlock"):
            why = _resnet_plan(m, diffusers)
            if why is None:
                m.forward = types.MethodType(resnet_forward, m)
                report.add("group_norm_silu", prefix + name)
            else:
                report.add("group_norm_silu", prefix + name, why)
        if isinstance(m, owners) and getattr(m, "conv_norm_out", None) is not None:
            label = prefix + (name + "." if name else "") + "conv_norm_out"
            norm, act = m.conv_norm_out, getattr(m, "conv_act", None)
            if type(norm) is nn.GroupNorm and type(act) is nn.SiLU:
                norm.forward = types.MethodType(norm_out_forward, norm)
                m.conv_act = SiLUFusedIntoNorm(act)
                report.add("group_norm_silu", label)
            else:
                report.add("group_norm_silu", label, f"{type(norm).__name__} -> "
                           f"{type(act).__name__} is not GroupNorm -> SiLU")


def _accelerate_scheduler(pipe, report, diffusers):
    from .. import schedulers
    current = getattr(pipe, "scheduler", None)
    if current is None:
        return
    ours = {diffusers.DDPMScheduler: schedulers.DDPMScheduler,
            diffusers.DDIMScheduler: schedulers.DDIMScheduler}.get(type(current))
    if ours is None:
        report.add("scheduler", "scheduler", f"{type(current).__name__} has no diffkernels drop-in")
        return
    new = ours.from_config(current.config)
    pipe.scheduler = new
    setattr(pipe, _SCHEDULER_ATTR, (current, new))
    report.add("scheduler", f"scheduler ({type(current).__name__})")


def restore(pipe_or_model) -> None:
    """Undo accelerate(): the original processor objects, no instance forwards, the original
    conv_act modules and scheduler object. Parameters were never touched."""
    diffusers = _diffusers()
    for _, model in _models(pipe_or_model, diffusers):
        for m in model.modules():
            proc = getattr(m, "processor", None)
            if isinstance(m, diffusers.models.attention_processor.Attention) and getattr(
                    proc, _MARK, False):
                m.set_processor(proc.original)
            if _ours(m.__dict__.get("forward")):
                del m.forward
            if isinstance(getattr(m, "conv_act", None), SiLUFusedIntoNorm):
                m.conv_act = m.conv_act.original
    saved = getattr(pipe_or_model, _SCHEDULER_ATTR, None) if not isinstance(
        pipe_or_model, nn.Module) else None
    if saved is not None:
        original, ours = saved
        if pipe_or_model.scheduler is ours:  # else the user has set another one since: keep it
            pipe_or_model.scheduler = original
        delattr(pipe_or_model, _SCHEDULER_ATTR)
