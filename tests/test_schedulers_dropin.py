"""Our schedulers as drop-ins for diffusers' DDPMScheduler / DDIMScheduler beyond `step`: config
files both ways, compatibles, from_config(return_unused_kwargs), dict-like outputs, DDPM before
set_timesteps, DDIM from off-schedule t, previous_timestep, diffusers' fp32 scalar rounding by
default (float64 as an option), the kept deviations, and no host reads on the new paths. The
same behaviours diffusers' own test suite checks (tests/peer runs that suite when available)."""
import json
import os
import pickle
import subprocess
import sys
import warnings
from collections import OrderedDict

import pytest
import torch

from diffkernels.schedulers import DDIMScheduler, DDPMScheduler, SchedulerOutput

from test_schedulers import no_host_reads

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed")

OURS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
THEIRS = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}
KINDS = ["ddpm", "ddim"]
KWARGS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              clip_sample=False, steps_offset=1, prediction_type="v_prediction")


def deter(n_flip=False):
    """diffusers' tests' dummy_sample_deter / dummy_noise_deter ([4, 3, 8, 8], permuted)."""
    x = torch.arange(4 * 3 * 8 * 8)
    x = x.flip(-1) if n_flip else x
    return (x.reshape(3, 8, 8, 4) / (4 * 3 * 8 * 8)).permute(3, 0, 1, 2)


def model(sample, t):  # diffusers' tests' dummy_model
    if isinstance(t, torch.Tensor):
        t = t.reshape(-1, *(1,) * (sample.dim() - 1)).to(sample.device, dtype=sample.dtype)
    return sample * t / (t + 1)


def no_defaults(config):
    return {k: v for k, v in config.items() if k != "_use_default_values"}


# ---------------------------------------------------------------- config files

@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(kind, tmp_path):
    ours = OURS[kind](**KWARGS)
    ours.save_pretrained(tmp_path)
    again = OURS[kind].from_pretrained(tmp_path)
    assert no_defaults(ours.config) == dict(again.config)
    assert "_use_default_values" not in again.config  # every key came from the file
    assert OURS[kind].load_config(tmp_path) == json.loads(ours.to_json_string())
    ours.to_json_file(tmp_path / "x.json")
    assert json.loads((tmp_path / "x.json").read_text())["_class_name"] == THEIRS[kind].__name__
    (tmp_path / "sub").mkdir()
    ours.save_config(tmp_path / "sub")
    assert OURS[kind].from_pretrained(tmp_path, subfolder="sub").config == again.config


@pytest.mark.parametrize("kind", KINDS)
def test_config_json_equals_diffusers_and_loads_both_ways(kind, tmp_path):
    ours, theirs = OURS[kind](**KWARGS), THEIRS[kind](**KWARGS)
    assert json.loads(ours.to_json_string()) == json.loads(theirs.to_json_string())
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert (json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
            == json.loads((tmp_path / "theirs" / "scheduler_config.json").read_text()))
    loaded_by_them = THEIRS[kind].from_pretrained(tmp_path / "ours")
    loaded_by_us = OURS[kind].from_pretrained(tmp_path / "theirs")
    assert dict(loaded_by_them.config) == dict(loaded_by_us.config)
    # the loaded schedulers step alike
    for s in (loaded_by_them, loaded_by_us):
        s.set_timesteps(10)
    x = deter()
    a = loaded_by_us.step(model(x, 901), 901, x, generator=torch.manual_seed(0)).prev_sample
    b = loaded_by_them.step(model(x, 901), 901, x, generator=torch.manual_seed(0)).prev_sample
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_return_unused_kwargs(kind, tmp_path):
    config = {**THEIRS[kind](**KWARGS).config, "skip_prk_steps": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, unused = OURS[kind].from_config(config, return_unused_kwargs=True, foo=3)
        theirs, unused_theirs = THEIRS[kind].from_config(config, return_unused_kwargs=True, foo=3)
    assert isinstance(ours, OURS[kind])
    assert unused == unused_theirs and unused["foo"] == 3 and unused["skip_prk_steps"] is True
    assert ours.config["skip_prk_steps"] is True  # kept for compatible schedulers, as diffusers
    ours.save_pretrained(tmp_path)
    again, unused = OURS[kind].from_pretrained(tmp_path, return_unused_kwargs=True, bar=1)
    assert unused == THEIRS[kind].from_pretrained(tmp_path, return_unused_kwargs=True, bar=1)[1]
    assert OURS[kind].from_config(config, prediction_type="sample").config.prediction_type \
        == "sample"


@pytest.mark.parametrize("kind", KINDS)
def test_compatibles(kind):
    ours = OURS[kind](**KWARGS)
    names = [c.__name__ for c in ours.compatibles]
    assert ours.compatibles[:2] == [OURS[kind], OURS["ddim" if kind == "ddpm" else "ddpm"]]
    assert {"PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"} <= set(names)
    for cls in ours.compatibles:
        other = cls.from_config(ours.config)
        back = OURS[kind].from_config(other.config)
        assert {k: v for k, v in back.config.items() if k in ours.config} == dict(ours.config)
    # a diffusers scheduler lists ours? no: but it builds from our config
    assert diffusers.EulerDiscreteScheduler.from_config(ours.config).config.beta_end == 0.012


@pytest.mark.parametrize("kind", KINDS)
def test_config_attribute_access_and_unknown_attribute(kind):
    s = OURS[kind]()
    with pytest.warns(FutureWarning, match="Accessing config attribute `beta_end` directly"):
        assert s.beta_end == 0.02
    s.register_to_config(extra_key=5)
    assert s.config.extra_key == 5
    with pytest.raises(AttributeError, match=f"^'{OURS[kind].__name__}' object has no attribute "
                                             f"'does_not_exist'$"):
        s.does_not_exist
    with pytest.raises(TypeError, match="config is read-only"):
        s.config["beta_end"] = 1.0


def test_diffusers_pipeline_saves_and_loads_our_scheduler(tmp_path):
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    assert issubclass(DDPMScheduler, SchedulerMixin) and issubclass(DDIMScheduler, SchedulerMixin)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
                                 block_out_channels=(8, 16), layers_per_block=1,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**KWARGS))
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved == json.loads(diffusers.DDPMScheduler(**KWARGS).to_json_string())
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"][1] == "DDPMScheduler"
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)  # the class that was saved
    assert type(loaded.scheduler) is DDPMScheduler
    assert dict(loaded.scheduler.config) == no_defaults(pipe.scheduler.config)
    mine = diffusers.DDPMPipeline.from_pretrained(tmp_path, scheduler=DDPMScheduler.from_pretrained(
        tmp_path, subfolder="scheduler"))
    assert isinstance(mine.scheduler, DDPMScheduler)


def test_importing_schedulers_does_not_import_diffusers_but_links_it_later():
    code = ("import sys; import diffkernels.schedulers as s; assert 'diffusers' not in sys.modules;"
            " from diffusers.schedulers.scheduling_utils import SchedulerMixin as M;"
            " assert issubclass(s.DDIMScheduler, M) and s.DDIMScheduler.__mro__[1].__name__ =="
            " 'SchedulerBase'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------- outputs

def test_output_is_dict_like_as_diffusers():
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    for s in (ours, theirs):
        s.set_timesteps(10)
    x = deter()
    out, ref = ours.step(model(x, 901), 901, x), theirs.step(model(x, 901), 901, x)
    assert isinstance(out, OrderedDict) and list(out.keys()) == list(ref.keys())
    assert [k for k, _ in out.items()] == ["prev_sample", "pred_original_sample"]
    assert out[0] is out.prev_sample is out["prev_sample"] is list(out.values())[0]
    assert out[1] is out.pred_original_sample and len(out[:2]) == 2
    assert out.to_tuple() == (out.prev_sample, out.pred_original_sample)
    new = torch.zeros(1)
    out.prev_sample = new
    assert out["prev_sample"] is new and out[0] is new
    for bad in (lambda: out.pop("prev_sample"), lambda: out.update(a=1),
                lambda: out.setdefault("a", 1), lambda: out.__delitem__("prev_sample")):
        with pytest.raises(TypeError, match="read-only"):
            bad()
    partial = SchedulerOutput(prev_sample=new)  # None fields are no keys, as BaseOutput
    assert list(partial.keys()) == ["prev_sample"] and partial.to_tuple() == (new,)
    assert partial.pred_original_sample is None
    back = pickle.loads(pickle.dumps(out))
    assert torch.equal(back.prev_sample, out.prev_sample) and list(back) == list(out)
    flat, spec = torch.utils._pytree.tree_flatten(out)
    assert torch.utils._pytree.tree_unflatten(flat, spec)[0] is out[0]


# ---------------------------------------------------------------- timesteps as diffusers

def test_ddpm_before_set_timesteps_equals_diffusers():
    """diffusers' test_full_loop_with_noise: the full training schedule, no set_timesteps;
    with fp32 scalars (default) the sum equals diffusers' (387.9466), float64 gives 387.9676."""
    sums = {}
    for name, s in (("ours", DDPMScheduler()), ("theirs", diffusers.DDPMScheduler()),
                    ("ours64", DDPMScheduler(coefficient_dtype=torch.float64))):
        timesteps = s.timesteps[998:]
        sample = s.add_noise(deter(), deter(True), timesteps[:1])
        g = torch.manual_seed(0)
        for t in timesteps:
            sample = s.step(model(sample, t), t, sample, generator=g).prev_sample
        sums[name] = sample.abs().sum().item()
    assert abs(sums["ours"] - sums["theirs"]) <= 1e-6 * sums["theirs"], sums
    assert abs(sums["theirs"] - 387.9466) < 1e-3
    assert abs(sums["ours64"] - 387.9676) < 1e-3, sums  # the more accurate float64 scalars


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_full_train_loop_int_t_equals_diffusers(prediction_type):
    ours = DDPMScheduler(prediction_type=prediction_type)
    theirs = diffusers.DDPMScheduler(prediction_type=prediction_type)
    a = b = deter()
    ga, gb = torch.manual_seed(0), torch.Generator().manual_seed(0)
    for t in reversed(range(len(ours))):
        a = ours.step(model(a, t), t, a, generator=ga).prev_sample
        b = theirs.step(model(b, t), t, b, generator=gb).prev_sample
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert abs(a.abs().sum().item() - b.abs().sum().item()) <= 1e-6 * b.abs().sum().item()


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("t", [1, 10, 49, 333, 999])
def test_ddim_off_schedule_t_equals_diffusers(t, eta):
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    for s in (ours, theirs):
        s.set_timesteps(50)
    assert t not in ours.timesteps.tolist() or t == 999
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for tt in (t, torch.tensor(t)):
        a = ours.step(0.1 * x, tt, x, eta, generator=torch.manual_seed(0))
        b = theirs.step(0.1 * x, tt, x, eta, generator=torch.manual_seed(0))
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample,
                                   atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("config", [{}, dict(set_alpha_to_one=False, beta_start=0.01),
                                    dict(prediction_type="v_prediction"),
                                    dict(timestep_spacing="trailing")])
def test_ddim_full_loops_equal_diffusers(config):
    sums = []
    for s in (DDIMScheduler(**config), diffusers.DDIMScheduler(**config)):
        s.set_timesteps(10)
        x = deter()
        for t in s.timesteps:
            x = s.step(model(x, t), t, x, 0.0).prev_sample
        sums.append(x.abs().sum().item())
    assert abs(sums[0] - sums[1]) <= 1e-6 * sums[1], sums


def test_previous_timestep_int_and_tensor_as_diffusers():
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    for t in (999, 500, 0):  # before set_timesteps: t - 1
        assert ours.previous_timestep(t) == theirs.previous_timestep(t) == t - 1
        a, b = ours.previous_timestep(torch.tensor(t)), theirs.previous_timestep(torch.tensor(t))
        assert isinstance(a, torch.Tensor) and a.item() == b.item()
    for setup in (dict(num_inference_steps=10), dict(timesteps=[100, 87, 50, 1, 0])):
        ours.set_timesteps(**setup)
        theirs.set_timesteps(**setup)
        for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
            a, b = ours.previous_timestep(t_ours), theirs.previous_timestep(t_theirs)
            assert isinstance(a, torch.Tensor) and a.item() == b.item()
            assert ours.previous_timestep(int(t_ours)) == b.item()


def test_get_variance_as_diffusers():
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    for t in (0, 487, 999):
        assert torch.equal(ours._get_variance(t), theirs._get_variance(t))
    ours, theirs = DDIMScheduler(), diffusers.DDIMScheduler()
    for t, p in ((0, 0), (420, 400), (980, 960)):
        assert torch.equal(ours._get_variance(t, p), theirs._get_variance(t, p))


# ---------------------------------------------------------------- scalars: fp32 and float64

@pytest.mark.parametrize("kind,config,kw", [
    ("ddpm", dict(variance_type="fixed_small"), {}),
    ("ddpm", dict(variance_type="fixed_large", prediction_type="v_prediction"), {}),
    ("ddim", dict(beta_schedule="squaredcos_cap_v2"), dict(eta=1.0)),
    ("ddim", dict(prediction_type="sample", set_alpha_to_one=False),
     dict(eta=0.5, use_clipped_model_output=True)),
])
def test_fp32_scalars_are_diffusers_scalars(kind, config, kw):
    """Our k's equal the scalars diffusers forms in fp32, bit for bit (DDPM: the posterior
    coefficients and noise std; DDIM: sqrt(a_prev), the direction coefficient and std)."""
    ours, theirs = OURS[kind](**config), THEIRS[kind](**config)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    for t in ours.timesteps.tolist():
        if kind == "ddpm":
            k, _ = ours.coefficients(t)
            p = theirs.previous_timestep(t)
            a = theirs.alphas_cumprod[t]
            ap = theirs.alphas_cumprod[p] if p >= 0 else theirs.one
            cb = 1 - a / ap
            assert k[5] == float(ap ** 0.5 * cb / (1 - a))
            assert k[6] == float((a / ap) ** 0.5 * (1 - ap) / (1 - a))
            assert k[8] == float(theirs._get_variance(t) ** 0.5)
        else:
            k, _ = ours.coefficients(t, **kw)
            p = t - 1000 // 20
            ap = theirs.alphas_cumprod[p] if p >= 0 else theirs.final_alpha_cumprod
            std = kw["eta"] * theirs._get_variance(t, p) ** 0.5
            assert k[5] == float(ap ** 0.5) and k[8] == float(std)
            assert k[7] == float((1 - ap - std ** 2) ** 0.5)
    wide = OURS[kind](**config, coefficient_dtype=torch.float64)
    wide.set_timesteps(20)
    t = ours.timesteps.tolist()[-1]
    args = (t,) if kind == "ddpm" else (t, kw["eta"], kw.get("use_clipped_model_output", False))
    assert wide.coefficients(*args)[0] != ours.coefficients(*args)[0]  # float64 digits differ
    with pytest.raises(ValueError, match="coefficient_dtype: expected torch.float32"):
        OURS[kind](coefficient_dtype=torch.float16)
    assert "coefficient_dtype" not in ours.config  # a runtime option, not a config key
    assert OURS[kind].from_config(ours.config, coefficient_dtype=torch.float64) \
        .coefficient_dtype == torch.float64


# ---------------------------------------------------------------- kept deviations

def test_kept_deviations_raise_and_say_what_diffusers_does():
    with pytest.raises(ValueError, match="diffusers accepts this and silently builds a 2-step"):
        DDPMScheduler(trained_betas=[0.1, 0.3])
    diffusers.DDPMScheduler(trained_betas=[0.1, 0.3])  # (diffusers: no error)
    with pytest.raises(ValueError, match="diffusers accepts any string here and then samples as "
                                         "'fixed_small'"):
        DDPMScheduler(variance_type="other")
    DDPMScheduler(trained_betas=[0.1, 0.3], num_train_timesteps=2)  # consistent: fine


# ---------------------------------------------------------------- host cost, no host reads

@pytest.mark.parametrize("kind", KINDS)
def test_new_paths_read_no_tensor(kind):
    """DDPM before set_timesteps (timesteps as views), DDIM from an off-schedule int t, and
    previous_timestep on a view: no tensor value is read on the host."""
    s = OURS[kind]()
    if kind == "ddim":
        s.set_timesteps(10)
        steps = [s.timesteps[0], 555, torch.tensor(333, device="meta")]
    else:
        steps = [s.timesteps[0], s.timesteps[1], 997]
    x = torch.randn(2, 4, 8, 8)
    s.step(x, steps[0], x, generator=torch.Generator().manual_seed(0))  # fills caches
    with no_host_reads():
        for t in steps:
            x = s.step(0.1 * x, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        if kind == "ddpm":
            s.previous_timestep(s.timesteps[3])


def test_repeated_step_skips_revalidation(monkeypatch):
    import diffkernels.schedulers._common as common
    calls = []
    real = common.check_args
    monkeypatch.setattr(common, "check_args", lambda *a: calls.append(1) or real(*a))
    s = DDIMScheduler()
    s.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    m = torch.randn(2, 4, 8, 8)
    for t in s.timesteps:
        s.step(m, t, x, guidance_scale=7.5)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="model_output"):  # a new shape is checked again
        s.step(torch.randn(2, 4, 8, 7), 1, x, guidance_scale=7.5)
