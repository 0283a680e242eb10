"""DDPMScheduler / DDIMScheduler against diffusers' schedulers, side by side: the same seeded
generator, a deterministic stand-in model, every intermediate sample compared; plus no-sync,
config and bad-input tests."""
import contextlib
import json
import warnings

import pytest
import torch

import diffkernels as dk
from diffkernels.schedulers import DDIMScheduler, DDPMScheduler

from conftest import TOL

try:  # the test-only reference; the tests that need no diffusers run without it (GPU machine)
    import diffusers
except ImportError:
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")

OURS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
THEIRS = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler} if diffusers else {}


def _fp64_coefficients(cls):
    """diffusers' scheduler with its per-step scalars computed in float64 from the same fp32
    alphas_cumprod, as ours are (0-d float64 tensors do not change the fp32 results' dtype).
    Stock diffusers computes them in fp32, where e.g. DDIM's sqrt(1 - a_prev - std^2) cancels
    catastrophically at eta = 1 near t = T (see test_ddim_eta1_coefficient_precision); against
    this variant every formula is checked at ~fp32 rounding."""
    class Fp64(cls):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.alphas_cumprod = self.alphas_cumprod.double()
            if hasattr(self, "final_alpha_cumprod"):
                self.final_alpha_cumprod = self.final_alpha_cumprod.double()
            if hasattr(self, "one"):
                self.one = self.one.double()
    Fp64.__name__ = cls.__name__
    return Fp64


EXACT = {kind: _fp64_coefficients(cls) for kind, cls in THEIRS.items()}
SHAPE = (2, 4, 8, 8)
PREDICTIONS = ["epsilon", "v_prediction", "sample"]
VARIANCES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
             "learned_range"]
SPACINGS = ["leading", "trailing", "linspace"]
BETAS = {"linear": {}, "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
         "squaredcos_cap_v2": {}}
CLIPS = {"none": dict(clip_sample=False),
         "clip": dict(clip_sample=True, clip_sample_range=1.5),
         "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.6)}


_ALPHA_BAR = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).tolist()


def stand_in_model(x, t, channels, cond=False, variance_type=None):
    """A fixed nonlinear function of (sample, t), shaped like a trained eps-model so that the
    samplers are stable (not chaotic) and 50-step trajectories stay comparable: the ideal
    denoiser of N(0, 2) data (eps ~ x at high noise) plus per-channel structure that fades with
    noise; cond=True adds the conditional CFG half's difference. Then the "learned" variance in
    the next C channels when asked (positive for learned, in [-1, 1] for learned_range). The
    first-order x0 often leaves [-1, 1], so clipping and thresholding take part."""
    a = _ALPHA_BAR[min(int(t), 999)]
    b = 1.0 - a
    xf = x if x.dtype == torch.float64 else x.float()  # the truth runs in fp64
    phase = torch.arange(channels, dtype=xf.dtype).view(1, -1, *([1] * (x.dim() - 2)))
    out = (b ** 0.5 / (2.0 * a + b)) * xf
    out = out + 0.3 * a ** 0.5 * torch.tanh(xf + torch.sin(phase + 3.0 * float(t) / 1000))
    if cond:
        out = out + 0.2 * a ** 0.5 * torch.cos(0.7 * xf + phase)
    if variance_type == "learned":
        out = torch.cat([out, 1e-3 + 0.02 * torch.sigmoid(xf + b)], dim=1)
    elif variance_type == "learned_range":
        out = torch.cat([out, torch.tanh(0.5 * xf - b)], dim=1)
    return out.to(x.dtype)


def make_generators(kind, seed):
    if kind == "list":
        return [torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])]
    return torch.Generator().manual_seed(seed)


def gen_state(g):
    return [x.get_state() for x in g] if isinstance(g, list) else [g.get_state()]


@contextlib.contextmanager
def fp32_noise_for_fp64():
    """diffusers' randn_tensor, except that float64 noise is drawn as float32 and widened: the
    fp64 truth run then sees the very noise of the fp32 runs."""
    modules = [diffusers.schedulers.scheduling_ddpm, diffusers.schedulers.scheduling_ddim]
    original = modules[0].randn_tensor

    def randn(shape, generator=None, device=None, dtype=None, layout=None):
        if dtype != torch.float64:
            return original(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        return original(shape, generator=generator, device=device, dtype=torch.float32).double()

    try:
        for m in modules:
            m.randn_tensor = randn
        yield
    finally:
        for m in modules:
            m.randn_tensor = original


def _max_abs(t):
    return t.double().nan_to_num(0, 0, 0).abs().max().item()


def _error(out, truth, what, where):
    assert torch.equal(out.isnan(), truth.isnan()), f"{where} {what}: NaN pattern differs"
    return _max_abs(out.double() - truth.double())


def lockstep(kind, config, steps, *, step_kwargs=None, guidance=None, dtype=torch.float32,
             gen="single", shape=SHAPE, coefficient_dtype=torch.float32):
    """Our scheduler against diffusers', every step, with the same latents and seeds.

    Five steppers per step: ours and stock diffusers ("eager") each on their own trajectory in
    `dtype`; the truth: diffusers with float64 samples and per-step scalars (EXACT), noise drawn
    as the others draw it; and, teacher-forced from the truth's sample in `dtype`, ours and
    the diffusers of our coefficient precision (stock for fp32 coefficients, EXACT for float64)
    in `dtype`. Checks for prev_sample and pred_original_sample:
    - free-running (DESIGN.md 6): |ours - truth| <= 2 |eager - truth| + TOL * magnitude;
    - teacher-forced (fp32 only): |ours - that diffusers| <= 2e-5 * magnitude + the rounding
      floor of x0's cancelling terms (epsilon: k0 x and k1 m are ~|x| / sqrt(alpha_prod_t)).
    Stock diffusers computes its per-step scalars in fp32, which at eta = 1 or t ~ T costs it
    digits (test_ddim_eta1_coefficient_precision): our fp32 default rounds them as it does
    (teacher-forced against stock diffusers), our float64 option does not (against EXACT)."""
    step_kwargs = step_kwargs or {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fixed_large_log's NaN warning
        ours = OURS[kind](**config, coefficient_dtype=coefficient_dtype)
    same = EXACT if coefficient_dtype == torch.float64 else THEIRS
    eager, truth, exact = THEIRS[kind](**config), EXACT[kind](**config), same[kind](**config)
    for s in (ours, eager, truth, exact):
        s.set_timesteps(steps)
    assert ours.timesteps.tolist() == eager.timesteps.tolist()
    vt = config.get("variance_type") if kind == "ddpm" else None
    c = shape[1]

    def model(x, t):
        """(ours: both CFG halves, combined in the kernel; diffusers: the pipeline's combine)"""
        if guidance is None:
            out = stand_in_model(x, t, c, variance_type=vt)
            return out, out
        u, cd = stand_in_model(x, t, c, False, vt), stand_in_model(x, t, c, True, vt)
        combined = u[:, :c] + guidance * (cd[:, :c] - u[:, :c])
        if u.shape[1] == 2 * c:
            combined = torch.cat([combined, cd[:, c:]], dim=1)
        return torch.cat([u, cd]), combined

    cfg = {} if guidance is None else dict(guidance_scale=guidance)
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x_ours, x_eager, x_truth = x0.to(dtype), x0.to(dtype), x0.double()
    g_ours, g_eager, g_truth, g_forced, g_exact = (make_generators(gen, 1234) for _ in range(5))
    for n, t in enumerate(eager.timesteps):
        where = f"step {n} (t={int(t)})"
        r_ours = ours.step(model(x_ours, t)[0], t, x_ours, generator=g_ours, **step_kwargs, **cfg)
        r_eager = eager.step(model(x_eager, t)[1], t, x_eager, generator=g_eager, **step_kwargs)
        with fp32_noise_for_fp64():
            r_truth = truth.step(model(x_truth, t)[1], t, x_truth, generator=g_truth, **step_kwargs)
        x_in = x_truth.to(dtype)
        r_forced = ours.step(model(x_in, t)[0], t, x_in, generator=g_forced, **step_kwargs, **cfg)
        r_exact = exact.step(model(x_in, t)[1], t, x_in, generator=g_exact, **step_kwargs)
        a_t = float(eager.alphas_cumprod[int(t)])
        cancel = 8 * 2.0 ** -24 * _max_abs(x_in) / a_t ** 0.5 \
            if config.get("prediction_type", "epsilon") == "epsilon" else 0.0
        for what in ("prev_sample", "pred_original_sample"):
            mine, theirs, true = (getattr(r, what) for r in (r_ours, r_eager, r_truth))
            assert mine.dtype == theirs.dtype == dtype and mine.shape == theirs.shape, what
            scale = max(1.0, _max_abs(true))
            err, err_eager = _error(mine, true, what, where), _error(theirs, true, what, where)
            assert err <= 2 * err_eager + TOL[dtype] * scale, \
                f"{where} {what}: error {err:.3g} vs diffusers' own {err_eager:.3g} " \
                f"(scale {scale:.3g})"
            if dtype == torch.float32:
                got, want = getattr(r_forced, what), getattr(r_exact, what)
                err = _error(got, want, what, where)
                bound = 2e-5 * max(1.0, _max_abs(want)) + cancel
                assert err <= bound, f"{where} {what} (teacher-forced): {err:.3g} > {bound:.3g}"
        x_ours, x_eager, x_truth = r_ours.prev_sample, r_eager.prev_sample, r_truth.prev_sample
    # The same draws from the generators (e.g. DDPM: none at t == 0; DDIM: every step if eta>0).
    assert all(torch.equal(p, q) for p, q in zip(gen_state(g_ours), gen_state(g_eager)))
    return x_ours, x_eager


def _pick(options, *indices):
    """A deterministic mix of the grid indices: over the grid, each option meets every value
    of each axis it is mixed from."""
    options = list(options)
    return options[sum(indices) % len(options)]


# ---------------------------------------------------------------- the grids (10-step loops)

STEPS = [10, pytest.param(50, marks=pytest.mark.slow)]  # the 50-step sweep: ~1 min in all
ETAS = [0.0, 0.3, 1.0]


@needs_diffusers
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddpm_grid(prediction, variance, clip, steps):
    p, v, c = PREDICTIONS.index(prediction), VARIANCES.index(variance), list(CLIPS).index(clip)
    beta = _pick(BETAS, c, v)
    config = dict(prediction_type=prediction, variance_type=variance, beta_schedule=beta,
                  timestep_spacing=_pick(SPACINGS, p, v, 2 * c), **BETAS[beta], **CLIPS[clip])
    lockstep("ddpm", config, steps, guidance=_pick([None, 4.0], p, v, c),
             gen=_pick(["single", "list"], v, c),
             coefficient_dtype=_pick([torch.float32, torch.float64], p, c))


@needs_diffusers
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("use_clipped", [False, True], ids=["eps", "clipped-eps"])
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("clip", list(CLIPS))
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_grid(prediction, clip, eta, use_clipped, steps):
    p, c, e = PREDICTIONS.index(prediction), list(CLIPS).index(clip), ETAS.index(eta)
    u = int(use_clipped)
    beta = _pick(BETAS, c, e, u)
    config = dict(prediction_type=prediction, beta_schedule=beta,
                  timestep_spacing=_pick(SPACINGS, p, e, 2 * c),
                  set_alpha_to_one=_pick([True, False], e, u), **BETAS[beta], **CLIPS[clip])
    lockstep("ddim", config, steps, guidance=_pick([None, 7.5], p, c, e),
             gen=_pick(["single", "list"], p, u),
             step_kwargs=dict(eta=eta, use_clipped_model_output=use_clipped),
             coefficient_dtype=_pick([torch.float32, torch.float64], p, c, u))


# ---------------------------------------------------------------- schedules (50-step loops)

@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("beta", list(BETAS))
def test_schedules_50_steps(kind, spacing, beta):
    config = dict(beta_schedule=beta, timestep_spacing=spacing, **BETAS[beta])
    step_kwargs = dict(eta=0.5) if kind == "ddim" else {}
    lockstep(kind, config, 50, step_kwargs=step_kwargs)


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("extra", [
    dict(steps_offset=1),  # SD's config: DDPM then adds noise at its last step (t = 1)
    dict(set_alpha_to_one=False, steps_offset=1, clip_sample=False),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"),
    dict(trained_betas=torch.linspace(1e-4, 0.03, 1000).tolist()),
    dict(num_train_timesteps=200, beta_end=0.05, timestep_spacing="linspace"),
], ids=["offset", "no-alpha-one", "zero-snr", "trained-betas", "T200"])
def test_config_variants(kind, extra):
    config = dict(extra)
    if kind == "ddpm":
        config.pop("set_alpha_to_one", None)
    steps = 50 if config.get("num_train_timesteps", 1000) >= 50 else 20
    lockstep(kind, config, steps, step_kwargs=dict(eta=1.0) if kind == "ddim" else {})


@needs_diffusers
def test_ddpm_custom_timesteps():
    ours, theirs = DDPMScheduler(), diffusers.DDPMScheduler()
    ts = [999, 800, 555, 300, 120, 40, 3, 0]
    ours.set_timesteps(timesteps=ts)
    theirs.set_timesteps(timesteps=ts)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    xa, xb = x, x.clone()
    ga, gb = make_generators("single", 5), make_generators("single", 5)
    for t in ts:
        xa = ours.step(stand_in_model(xa, t, 4), t, xa, generator=ga).prev_sample
        xb = theirs.step(stand_in_model(xb, t, 4), t, xb, generator=gb).prev_sample
        torch.testing.assert_close(xa, xb, atol=1e-4, rtol=1e-4)


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_fine_schedule_tail(kind):
    # Fine schedules: consecutive alphas_cumprod differ by ~1e-4, where coefficients computed in
    # fp32 (diffusers) and fp64 (ours) differ the most; the last 100 steps of a 1000-step chain.
    ours, theirs = OURS[kind](), THEIRS[kind]()
    ours.set_timesteps(1000)
    theirs.set_timesteps(1000)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4)) * 0.5
    xa, xb = x, x.clone()
    ga, gb = make_generators("single", 9), make_generators("single", 9)
    kw = dict(eta=1.0) if kind == "ddim" else {}
    for t in ours.timesteps[-100:]:
        xa = ours.step(stand_in_model(xa, t, 4), t, xa, generator=ga, **kw).prev_sample
        xb = theirs.step(stand_in_model(xb, t, 4), t, xb, generator=gb, **kw).prev_sample
    torch.testing.assert_close(xa, xb, atol=1e-4, rtol=1e-4)


@needs_diffusers
def test_ddim_eta1_coefficient_precision():
    """Why lockstep also compares against EXACT: at eta = 1, DDIM's sqrt(1 - a_prev - std^2) equals
    (1 - a_prev) * sqrt(a / (a_prev * (1 - a))), tiny near t = T, and fp32 (diffusers) loses
    most of its digits to cancellation; ours with coefficient_dtype=float64 keeps them, ours by
    default (fp32) rounds exactly as diffusers does."""
    ours = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace",
                         coefficient_dtype=torch.float64)
    ours.set_timesteps(10)
    t, prev_t = 999, 899
    a, ap = ours._alphas_cumprod[t], ours._alphas_cumprod[prev_t]
    exact = (1 - ap) * (a / (ap * (1 - a))) ** 0.5
    k7 = ours.coefficients(t, eta=1.0)[0][7]
    assert abs(k7 - exact) <= 1e-9 * exact
    theirs = diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace")
    std = 1.0 * theirs._get_variance(t, prev_t) ** 0.5  # diffusers' own fp32 arithmetic
    k7_fp32 = float((1 - theirs.alphas_cumprod[prev_t] - std ** 2) ** 0.5)
    assert abs(k7_fp32 - exact) > 1e-4 * exact  # diffusers' fp32 error, not ours
    default = DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace")
    default.set_timesteps(10)
    assert default.coefficients(t, eta=1.0)[0][7] == k7_fp32  # diffusers' rounding, exactly


# ---------------------------------------------------------------- other dtypes, noise, return

@needs_diffusers
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind,config,step_kwargs", [
    ("ddpm", dict(variance_type="learned_range", clip_sample=False), {}),
    ("ddpm", dict(thresholding=True, sample_max_value=1.6, prediction_type="sample"), {}),
    ("ddim", dict(prediction_type="v_prediction", timestep_spacing="trailing"), dict(eta=0.5)),
], ids=["ddpm-learned-range", "ddpm-threshold", "ddim-v"])
def test_half_precision(dtype, kind, config, step_kwargs):
    """DESIGN.md 6 in fp16/bf16: against the fp64 truth, our error is at most 2x that of
    diffusers run in the same dtype (which rounds after every op; we round once) + TOL."""
    lockstep(kind, config, 10, step_kwargs=step_kwargs, dtype=dtype, guidance=3.0)


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_variance_noise_and_noise_alias(kind):
    sched = OURS[kind]()
    ref = THEIRS[kind]()
    sched.set_timesteps(10)
    ref.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    t = sched.timesteps[2]
    m = stand_in_model(x, t, 4)
    kw = dict(eta=0.8) if kind == "ddim" else {}
    a = sched.step(m, t, x, variance_noise=noise, **kw).prev_sample
    b = sched.step(m, t, x, noise=noise, **kw).prev_sample
    if kind == "ddim":
        expected = ref.step(m, t, x, variance_noise=noise, **kw).prev_sample
    else:  # diffusers' DDPM has no variance_noise: the same draw through a generator
        expected = ref.step(m, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, expected, atol=1e-5, rtol=1e-5)


def test_return_dict_false_and_output_indexing():
    sched = DDIMScheduler()
    sched.set_timesteps(5)
    x = torch.randn(SHAPE)
    out = sched.step(stand_in_model(x, 800, 4), sched.timesteps[0], x)
    prev, x0 = sched.step(stand_in_model(x, 800, 4), 800, x, return_dict=False)
    torch.testing.assert_close(prev, out.prev_sample)
    torch.testing.assert_close(x0, out[1])
    assert out["prev_sample"] is out.prev_sample


@needs_diffusers
@pytest.mark.parametrize("backend", [b for b in dk.available_backends()
                                     if b in ("reference", "cpu", "triton")])
def test_each_cpu_backend_cfg_learned_range(backend):
    config = dict(variance_type="learned_range", thresholding=True, sample_max_value=1.5)
    with dk.backend(backend):
        lockstep("ddpm", config, 6, guidance=3.0, shape=(1, 4, 5, 7))
        lockstep("ddim", dict(clip_sample_range=1.2), 6, guidance=3.0, shape=(1, 4, 5, 7),
                 step_kwargs=dict(eta=0.6, use_clipped_model_output=True))


# ---------------------------------------------------------------- forward process, config

@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_add_noise_and_velocity(kind, dtype):
    ours = OURS[kind](beta_schedule="scaled_linear")
    theirs = THEIRS[kind](beta_schedule="scaled_linear")
    x0 = torch.randn(SHAPE, dtype=dtype)
    noise = torch.randn(SHAPE, dtype=dtype)
    t = torch.tensor([999, 10])
    assert torch.equal(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))
    assert torch.equal(ours.get_velocity(x0, noise, t), theirs.get_velocity(x0, noise, t))
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    with pytest.raises(ValueError, match=r"timesteps: expected values in \[0, 1000\)"):
        ours.add_noise(x0, noise, torch.tensor([1000, 0]))


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 10, 50, 999])
def test_timesteps_match(kind, spacing, n):
    for offset in (0, 1):
        ours = OURS[kind](timestep_spacing=spacing, steps_offset=offset)
        theirs = THEIRS[kind](timestep_spacing=spacing, steps_offset=offset)
        if spacing == "leading" and offset and n == 1:
            continue
        ours.set_timesteps(n)
        theirs.set_timesteps(n)
        assert ours.timesteps.dtype == theirs.timesteps.dtype
        assert ours.timesteps.tolist() == theirs.timesteps.tolist()


SD15_CONFIG = {  # stable-diffusion-v1-5/scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False}


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_from_config(kind, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # other schedulers' keys and "_..." keys: silent
        ours = OURS[kind].from_config(SD15_CONFIG)
    theirs = THEIRS[kind].from_config(SD15_CONFIG)
    for key, value in ours.config.items():
        if key == "_use_default_values":  # diffusers' list is in set order
            value, theirs_value = sorted(value), sorted(theirs.config[key])
        else:
            theirs_value = theirs.config[key]
        assert theirs_value == value, key
    assert set(ours.config) == set(theirs.config)  # init keys, hidden keys, _use_default_values
    assert ours.config.steps_offset == 1 and ours.config.beta_schedule == "scaled_linear"
    # unknown keys: ignored with a warning, like diffusers
    with pytest.warns(UserWarning, match=r"\['not_a_key'\] were passed"):
        OURS[kind].from_config({**SD15_CONFIG, "not_a_key": 3})
    # round trips and overrides
    again = OURS[kind].from_config(ours.config, prediction_type="v_prediction")
    assert again.config.prediction_type == "v_prediction" and again.config.beta_end == 0.012
    assert OURS[kind].from_config(theirs).config == ours.config  # a diffusers scheduler
    assert OURS[kind].from_config(theirs.config).config == ours.config
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_CONFIG))
    assert OURS[kind].from_pretrained(str(tmp_path), subfolder="scheduler").config == ours.config
    with pytest.raises(TypeError, match="config is read-only"):
        ours.config["beta_end"] = 1.0
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0
    assert ours.order == theirs.order and len(ours) == len(theirs)
    x = torch.randn(SHAPE)
    assert ours.scale_model_input(x, 10) is x


# ---------------------------------------------------------------- timesteps as tensors, no sync

@contextlib.contextmanager
def no_host_reads():
    """Any .item() / .tolist() / .nonzero() / bool() / int() / float() on a tensor raises."""
    def boom(name):
        def f(*args, **kwargs):
            raise AssertionError(f"step read a tensor value: Tensor.{name}")
        return f
    names = ["item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__"]
    saved = {n: getattr(torch.Tensor, n) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, boom(n))
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("thresholding", [False, True])
def test_no_host_reads_during_step(kind, thresholding):
    """The scheduler's timesteps on the CPU; timesteps given as their elements (views) and as
    meta tensors (stand-ins for device tensors: unreadable by construction)."""
    config = dict(thresholding=thresholding, sample_max_value=1.5)
    kw = dict(eta=0.5) if kind == "ddim" else {}
    results = []
    for how in ("int", "view", "meta"):
        sched = OURS[kind](**config)
        sched.set_timesteps(8, device="cpu")
        host = [int(t) for t in sched.timesteps]
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(1)
        for i, t in enumerate(sched.timesteps):
            m = torch.cat([stand_in_model(x, host[i], 4), stand_in_model(x, host[i], 4, True)])
            ts = {"int": host[i], "view": t, "meta": torch.tensor(host[i], device="meta")}[how]
            if how == "int":
                out = sched.step(m, ts, x, generator=g, guidance_scale=2.0, **kw)
            else:
                with no_host_reads():
                    out = sched.step(m, ts, x, generator=g, guidance_scale=2.0, **kw)
            x = out.prev_sample
        results.append(x)
    torch.testing.assert_close(results[1], results[0], atol=0, rtol=0)
    torch.testing.assert_close(results[2], results[0], atol=0, rtol=0)


@needs_diffusers
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_no_host_reads_catches_diffusers(kind):
    """The patch is a real test: diffusers' own step reads the timestep tensor (nonzero in
    DDPM's previous_timestep, `if prev_timestep >= 0` in DDIM)."""
    sched = THEIRS[kind]()
    sched.set_timesteps(8)
    x = torch.randn(SHAPE)
    with no_host_reads(), pytest.raises(AssertionError, match="step read a tensor value"):
        sched.step(stand_in_model(x, 0, 4), sched.timesteps[0], x)


def test_tensor_timestep_lookup():
    sched = DDIMScheduler()
    sched.set_timesteps(10)
    x = torch.randn(SHAPE)
    m = stand_in_model(x, 0, 4)
    # a view anywhere in the schedule, a CPU tensor by value, an expanded view
    by_view = sched.step(m, sched.timesteps[4], x).prev_sample
    by_value = sched.step(m, torch.tensor(int(sched.timesteps[4])), x).prev_sample
    by_int = sched.step(m, 500, x).prev_sample
    by_expand = sched.step(m, sched.timesteps[4].expand(2), x).prev_sample
    assert int(sched.timesteps[4]) == 500
    for other in (by_value, by_int, by_expand):
        torch.testing.assert_close(other, by_view, atol=0, rtol=0)
    # a slice of the schedule (img2img's timesteps[t_start:]) still maps to the right index
    for t in sched.timesteps[6:]:
        sched.step(m, t, x)
    with pytest.raises(ValueError, match="timestep: expected one timestep for the whole batch"):
        sched.step(m, torch.tensor([500, 400]), x)
    with pytest.raises(TypeError, match="timestep: expected an integer tensor"):
        sched.step(m, torch.tensor(500.0), x)


def test_meta_timestep_past_the_end_raises():
    sched = DDPMScheduler()
    sched.set_timesteps(2)
    x = torch.randn(SHAPE)
    for t in [500, 0]:
        sched.step(stand_in_model(x, t, 4), torch.tensor(t, device="meta"), x)
    with pytest.raises(ValueError, match="all 2 steps are done"):
        sched.step(stand_in_model(x, 0, 4), torch.tensor(0, device="meta"), x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("gen_device", ["cpu", "cuda"])
def test_no_sync_cuda(kind, gen_device):
    """Timesteps as elements of scheduler.timesteps (views) and as other CUDA tensors (the
    counter path with its asynchronous check); CPU generators draw on the CPU, then copy."""
    vt = "learned_range" if kind == "ddpm" else None
    config = dict(thresholding=True, sample_max_value=1.5, **({"variance_type": vt} if vt else {}))
    by_view, by_other = OURS[kind](**config), OURS[kind](**config)
    by_view.set_timesteps(6, device="cuda")
    by_other.set_timesteps(6, device="cuda")
    host = by_view.timesteps.cpu().tolist()
    other = [torch.tensor(t, device="cuda") for t in host]
    x = torch.randn(SHAPE, device="cuda")
    models = [torch.cat([stand_in_model(x, t, 4, False, vt), stand_in_model(x, t, 4, True, vt)])
              for t in host]
    kw = dict(eta=0.5) if kind == "ddim" else {}
    g = torch.Generator(gen_device).manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i, t in enumerate(by_view.timesteps):
            x = by_view.step(models[i], t, x, generator=g, guidance_scale=3.0, **kw).prev_sample
        for i in range(len(host)):
            x = by_other.step(models[i], other[i], x, generator=g, guidance_scale=3.0,
                              **kw).prev_sample
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(x).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_wrong_device_timestep_is_caught_later():
    sched = DDIMScheduler()
    sched.set_timesteps(4, device="cuda")
    x = torch.randn(SHAPE, device="cuda")
    wrong = torch.tensor(1, device="cuda")  # not 751, the first step
    sched.step(x, wrong, x)
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="step 0 was given timestep 1"):
        sched.step(x, torch.tensor(501, device="cuda"), x)


# ---------------------------------------------------------------- bad inputs

def _ready(kind, **config):
    s = OURS[kind](**config)
    s.set_timesteps(10)
    return s


@pytest.mark.parametrize("call,exc,match", [
    (lambda: DDPMScheduler(prediction_type="eps"), ValueError, "prediction_type: expected one of"),
    (lambda: DDIMScheduler(prediction_type="x0"), ValueError, "prediction_type: expected one of"),
    (lambda: DDPMScheduler(variance_type="fixed"), ValueError, "variance_type: expected one of"),
    (lambda: DDIMScheduler(beta_schedule="cosine"), ValueError, "beta_schedule: expected one of"),
    (lambda: DDPMScheduler(timestep_spacing="uniform"), ValueError, "timestep_spacing: expected"),
    (lambda: DDIMScheduler(trained_betas=[0.1] * 10), ValueError, "trained_betas: expected 1000"),
    (lambda: DDPMScheduler(clip_sample_range=0.0), ValueError, "clip_sample_range: expected > 0"),
    (lambda: DDIMScheduler().set_timesteps(1001), ValueError,
     "num_inference_steps: expected 1..1000"),
    (lambda: DDIMScheduler(steps_offset=200).set_timesteps(10), ValueError,
     r"timesteps: \[1100, 1000\] fall outside"),
    (lambda: DDPMScheduler().set_timesteps(timesteps=[10, 20]), ValueError, "descending"),
    (lambda: DDIMScheduler().step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE)), ValueError,
     r"call set_timesteps\(num_inference_steps\) first"),
    (lambda: _ready("ddpm").step(torch.zeros(SHAPE), 950, torch.zeros(SHAPE)), ValueError,
     r"timestep: 950 is not in the schedule .*\[900, 800"),
    (lambda: _ready("ddim").step(torch.zeros(SHAPE), 1000, torch.zeros(SHAPE)), ValueError,
     r"timestep: expected 0 <= t < num_train_timesteps=1000, got 1000"),
    (lambda: _ready("ddpm").step(torch.zeros(SHAPE), 1000, torch.zeros(SHAPE)), ValueError,
     "timestep: 1000 is not in the schedule"),
    (lambda: _ready("ddpm").step(torch.zeros(SHAPE), torch.tensor(-1), torch.zeros(SHAPE)),
     ValueError, "timestep: -1 is not in the schedule"),
    (lambda: _ready("ddpm").step(torch.zeros(2, 4, 8, 7), 900, torch.zeros(SHAPE)), ValueError,
     r"model_output: expected shape \[B, ...\] = \[2, 4, 8, 8\]"),
    (lambda: _ready("ddim").step(torch.zeros(4, 4, 8, 8), 900, torch.zeros(SHAPE)), ValueError,
     r"model_output: expected shape \[B, ...\]"),
    (lambda: _ready("ddim").step(torch.zeros(SHAPE), 900, torch.zeros(SHAPE), guidance_scale=5.0),
     ValueError, r"model_output: expected shape \[2B, ...\] \(both CFG halves"),
    (lambda: _ready("ddpm").step(torch.zeros(2, 8, 8, 8), 900, torch.zeros(SHAPE)), ValueError,
     "model_output: has 2C = 8 channels .* variance_type='fixed_small' is not learned"),
    (lambda: _ready("ddim").step(torch.zeros(2, 8, 8, 8), 900, torch.zeros(SHAPE)), ValueError,
     "model_output: has 2C = 8 channels .* DDIMScheduler has no learned variance"),
    (lambda: _ready("ddpm", variance_type="learned").step(torch.zeros(SHAPE), 900,
                                                          torch.zeros(SHAPE)),
     ValueError, "variance_type='learned' needs 2C = 8 channels"),
    (lambda: _ready("ddim").step(torch.zeros(SHAPE), 900, torch.zeros(SHAPE), eta=1.0,
                                 generator=torch.Generator(), variance_noise=torch.zeros(SHAPE)),
     ValueError, "Cannot pass both generator and variance_noise"),
    (lambda: _ready("ddpm").step(torch.zeros(SHAPE), 900, torch.zeros(SHAPE),
                                 variance_noise=torch.zeros(2, 4, 8, 1)),
     ValueError, r"variance_noise: expected shape \[2, 4, 8, 8\]"),
    (lambda: _ready("ddpm").step(torch.zeros(SHAPE), 900, torch.zeros(SHAPE),
                                 generator=[torch.Generator()] * 3 + [None]),
     TypeError, "generator: expected a torch.Generator or a list"),
    (lambda: _ready("ddpm").step(torch.zeros(3, 4, 2, 2), 900, torch.zeros(3, 4, 2, 2),
                                 generator=[torch.Generator()] * 2),
     ValueError, "generator: a list of generators needs one per sample: got 2 for batch 3"),
    (lambda: _ready("ddpm").step(torch.zeros(SHAPE), "900", torch.zeros(SHAPE)), TypeError,
     "timestep: expected an int"),
    (lambda: _ready("ddpm").step([0.0], 900, torch.zeros(SHAPE)), TypeError,
     "model_output: expected a torch.Tensor"),
], ids=["pred-ddpm", "pred-ddim", "variance", "beta", "spacing", "trained-betas", "clip-range",
        "too-many-steps", "offset-overflow", "custom-ascending",
        "ddim-before-set", "ddpm-not-in-schedule", "ddim-t-1000", "t-1000", "t-negative",
        "spatial-mismatch",
        "batch-mismatch", "cfg-needs-2B", "2C-fixed", "2C-ddim", "learned-needs-2C",
        "generator-and-noise", "noise-shape", "generator-list-type", "generator-list-short",
        "timestep-str", "not-tensor"])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_step_consumes_no_noise():
    sched = _ready("ddpm")
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    with pytest.raises(ValueError):
        sched.step(torch.zeros(2, 8, 8, 8), 900, torch.zeros(SHAPE), generator=g)
    assert torch.equal(g.get_state(), state)


def test_fixed_large_log_warns_and_matches_diffusers_nan():
    with pytest.warns(UserWarning, match="fixed_large_log"):
        DDPMScheduler(variance_type="fixed_large_log")
