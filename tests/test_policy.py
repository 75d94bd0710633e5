import pytest
import torch

from cdp.policy import DiffusionPolicy, DiffusionPolicyConfig
from cdp.runs import RunDir, load_policy, save_policy
from cdp.training.agents import DiffusionBC
from cdp.training.trainer import checkpoint_dir, fit


def make(contraction=None, **kw):
    cfg = DiffusionPolicyConfig(obs_dim=3, action_dim=2, network_kwargs={"hidden": 32, "n_layers": 2},
                                contraction=contraction, **kw)
    return DiffusionPolicy(cfg)


def data(n=256):
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(n, 3, generator=g)
    act = torch.tanh(obs[:, :2] + 0.1 * torch.randn(n, 2, generator=g))
    return obs, act


def train(pol, obs, act, *, steps, batch_size, lr=3e-4, seed=0, lr_schedule="constant", lr_warmup_steps=0, **fit_kw):
    """Behaviour-clone ``pol`` with :class:`DiffusionBC` and :func:`fit` (one generator for batches and loss draws,
    as cdp.experiments.il does); returns the agent (``agent.ema.model`` / ``agent.eval_policy``: the EMA policy)."""
    gen = torch.Generator().manual_seed(seed)
    agent = DiffusionBC(pol, steps=steps, lr=lr, lr_schedule=lr_schedule, lr_warmup_steps=lr_warmup_steps,
                        generator=gen)
    fit(agent, {"observations": obs, "actions": act}, steps=steps, batch_size=batch_size, seed=seed, generator=gen,
        progress=False, **fit_kw)
    return agent


@pytest.mark.parametrize("contraction", [None, {"weight": 0.1, "margin": 0.1}])
def test_training_lowers_loss_and_changes_every_parameter(contraction):
    obs, act = data()
    pol = make(contraction)
    pol.fit_normalizers(obs, act)
    before = {k: v.clone() for k, v in pol.net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fixed_noise, fixed_k = torch.randn(256, 2, generator=g), torch.randint(1, 6, (256,), generator=g)
    l0, _ = pol.compute_loss(obs, act, noise=fixed_noise, k=fixed_k)
    train(pol, obs, act, steps=150, batch_size=64, lr=3e-3)
    l1, m = pol.compute_loss(obs, act, noise=fixed_noise, k=fixed_k)
    assert float(l1.detach()) < 0.8 * float(l0.detach())
    for k, v in pol.net.state_dict().items():
        assert not torch.equal(v, before[k]), k
    if contraction:
        assert "contraction/lambda_max_mean" in m


@pytest.mark.parametrize("t_range", [(0.0, 1.0), (0.0, 0.4)])
def test_shared_forward_gives_the_same_loss_as_separate_passes(t_range):
    """share_forward (one pass for L_d and the Jacobians) = L_d + loss_from_jacobian at the same points, computed apart."""
    torch.set_default_dtype(torch.float64)
    try:
        obs, act = data(32)
        pol = make({"weight": 0.2, "max_samples": 8, "t_range": t_range}, schedule={"name": "vp", "num_steps": 10})
        pol.fit_normalizers(obs, act)
        loss, m = pol.compute_loss(obs, act, generator=torch.Generator().manual_seed(3))
        reg = pol.regularizer
        # recompute by hand with the same draws: k, noise (compute_loss), then the regulariser's points if any
        g = torch.Generator().manual_seed(3)
        T = pol.schedule.num_steps
        k = torch.randint(1, T + 1, (32,), generator=g)
        noise = torch.randn(32, 2, generator=g)
        a0 = pol.action_normalizer.normalize(act)
        cond = pol.condition(obs)
        a_t, t = pol.schedule.add_noise(a0, noise, k), k / T
        loss_d = ((pol.net(a_t, t, cond) - noise) ** 2).mean()
        if reg.covers_all_steps:
            xc, tc, cc = a_t[:8], t[:8], cond[:8]
        else:
            xc, tc, cc = reg.sample_points(a0, cond, g)
            assert bool((tc <= 0.4 + 1e-9).all())
        loss_c, mc = reg(pol.net, xc, tc, cc)
        assert reg.covers_all_steps == (t_range == (0.0, 1.0))
        assert float(loss) == pytest.approx(float(loss_d + loss_c), rel=1e-10)
        assert m["contraction/lambda_max_mean"] == pytest.approx(mc["lambda_max_mean"], rel=1e-10)
        # and the separate (share_forward=False) path trains the same objective in expectation: same keys
        pol2 = make({"weight": 0.2, "max_samples": 8, "t_range": t_range, "share_forward": False}, schedule={"name": "vp", "num_steps": 10})
        pol2.fit_normalizers(obs, act)
        assert set(pol2.compute_loss(obs, act)[1]) == set(m)
    finally:
        torch.set_default_dtype(torch.float32)


def test_save_load_gives_identical_actions(tmp_path):
    obs, act = data()
    pol = make({"weight": 0.1})
    pol.fit_normalizers(obs, act)
    agent = train(pol, obs, act, steps=20, batch_size=32, run=RunDir(tmp_path / "run", tensorboard=False))
    save_policy(tmp_path / "ck", pol, agent.ema, step=20)
    noise = torch.randn(5, 2)
    a1 = agent.eval_policy.sample(obs[:5], noise=noise, generator=torch.Generator().manual_seed(0))
    # the saved policy and the trainer's own checkpoint both reload as the EMA policy
    for ck in (tmp_path / "ck", checkpoint_dir(tmp_path / "run")):
        loaded = load_policy(ck)
        a2 = loaded.sample(obs[:5], noise=noise, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a1, a2), ck
        assert loaded.config == pol.config


def test_resume_equals_uninterrupted(tmp_path):
    obs, act = data()
    kw = dict(batch_size=32, ckpt_every=10, log_every=5, identity={"run": "r"})
    ref = make({"weight": 0.1})
    ref.fit_normalizers(obs, act)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_agent = train(ref, obs, act, steps=30, run=RunDir(tmp_path / "a", tensorboard=False), **kw)
    part = make({"weight": 0.1})
    part.load_state_dict(init)
    run = RunDir(tmp_path / "b", tensorboard=False)
    train(part, obs, act, steps=20, run=run, **kw)  # stopped after 20 steps (a run whose train.steps then grows)

    def die(step, agent):
        if step == 25:
            raise KeyboardInterrupt

    mid = make({"weight": 0.1})
    mid.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):  # resumed at 20, killed at 25 (no checkpoint after 20)
        train(mid, obs, act, steps=30, run=run, callback=die, **kw)
    resumed = make({"weight": 0.1})
    resumed.load_state_dict(init)
    agent = train(resumed, obs, act, steps=30, run=run, **kw)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    for k, v in ref_agent.ema.model.state_dict().items():
        assert torch.equal(v, agent.ema.model.state_dict()[k]), k
    steps = [r["step"] for r in run.read_metrics()]
    assert steps[-1] == 30
    # a checkpoint of another run (other identity) is refused, naming the differing key
    with pytest.raises(ValueError, match="run: 'r' there, 'other' now"):
        train(make({"weight": 0.1}), obs, act, steps=40, run=run, **{**kw, "identity": {"run": "other"}})


def test_select_action_queues_a_chunk():
    cfg = DiffusionPolicyConfig(obs_dim=3, action_dim=2, horizon=8, n_obs_steps=2, n_action_steps=4,
                                network="mlp", network_kwargs={"hidden": 16, "n_layers": 1})
    pol = DiffusionPolicy(cfg)
    obs, act = data(64)
    pol.fit_normalizers(obs, act)
    calls = []
    orig = pol.sample
    pol.sample = lambda o, generator=None: calls.append(o.shape) or orig(o, generator=generator)
    pol.reset()
    for _ in range(9):
        a = pol.select_action(obs[:1])
        assert a.shape == (1, 2)
    assert calls == [(1, 2, 3)] * 3  # a new chunk every n_action_steps calls


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="network"):
        DiffusionPolicyConfig(obs_dim=3, action_dim=2, network="rnn")
    with pytest.raises(ValueError, match="n_action_steps"):
        DiffusionPolicyConfig(obs_dim=3, action_dim=2, horizon=4, n_obs_steps=2, n_action_steps=4)
    with pytest.raises(ValueError, match="prediction"):
        DiffusionPolicyConfig(obs_dim=3, action_dim=2, contraction={"prediction": "sample"})
    pol = make()
    obs, act = data(8)
    with pytest.raises(ValueError, match="obs must have shape"):
        pol.compute_loss(obs[:, :2], act)
    with pytest.raises(ValueError, match="NaN"):
        pol.compute_loss(obs, act * float("nan"))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_policy("/nonexistent/ck")


def test_cached_time_embedding_gives_identical_samples():
    obs, act = data(16)
    pol = make()
    pol.fit_normalizers(obs, act)
    noise = torch.randn(16, 2)
    a1 = pol.sample(obs, noise=noise, sampler="dpmsolver++", num_inference_steps=3)
    from cdp.samplers import make_sampler, sample
    ref = sample(pol.net, make_sampler("dpmsolver++", pol.schedule, "epsilon", 1.0, 3), noise, pol.condition(obs))
    assert torch.allclose(a1, pol.action_normalizer.unnormalize(ref.clamp(-1, 1)), atol=1e-6)


def test_time_embedding_cache_is_used_and_invalidated_by_training():
    obs, act = data(8)
    pol = make()
    pol.fit_normalizers(obs, act)
    calls = []
    orig = pol.net.embed_time
    pol.net.embed_time = lambda t: calls.append(1) or orig(t)
    noise = torch.randn(8, 2)
    a1 = pol.sample(obs, noise=noise, sampler="ddim")
    n1 = len(calls)
    a2 = pol.sample(obs, noise=noise, sampler="ddim")
    assert len(calls) == n1 == 5 and torch.equal(a1, a2)  # second call reuses the cache
    opt = torch.optim.SGD(pol.net.parameters(), lr=0.1)
    loss, _ = pol.compute_loss(obs, act)
    loss.backward()
    opt.step()  # in-place parameter update bumps the version counters
    a3 = pol.sample(obs, noise=noise, sampler="ddim")
    assert len(calls) == 10
    from cdp.samplers import make_sampler, sample
    ref = sample(pol.net, make_sampler("ddim", pol.schedule, "epsilon", 1.0), noise, pol.condition(obs))
    assert torch.allclose(a3, pol.action_normalizer.unnormalize(ref.clamp(-1, 1)), atol=1e-6)


def test_lr_schedule_closed_form_and_ema_power():
    import math

    from cdp.policy import EMA
    from cdp.training.trainer import lr_at

    c = dict(lr=1e-3, steps=1000, schedule="cosine", warmup=100)
    assert lr_at(0, **c) == pytest.approx(1e-5) and lr_at(99, **c) == pytest.approx(1e-3)
    assert lr_at(100, **c) == pytest.approx(1e-3) and lr_at(550, **c) == pytest.approx(5e-4)
    assert lr_at(999, **c) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 899 / 900)))
    assert lr_at(500, 2e-4, 1000) == 2e-4
    with pytest.raises(ValueError, match="lr_schedule"):
        DiffusionBC(make(), steps=1000, lr=1e-3, lr_schedule="linear")
    # EMA: Diffusion Policy's power schedule, decay_k = min(max, 1 - (1 + k)^-power)
    lin = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(lin, 0.9999, power=0.75)
    with torch.no_grad():
        lin.weight.fill_(0.0)
    ema.model.weight.data.fill_(1.0)
    expected = 1.0
    for k in range(5):
        ema.update(lin)
        expected *= max(0.0, 1 - (1 + k) ** -0.75)
    assert float(ema.model.weight) == pytest.approx(expected)
    with pytest.raises(ValueError, match="power"):
        EMA(lin, 0.99, power=0.0)


def test_cosine_schedule_resume_equals_uninterrupted(tmp_path):
    obs, act = data()
    cfg = dict(steps=30, batch_size=32, ckpt_every=10, log_every=5, lr=3e-3, lr_schedule="cosine", lr_warmup_steps=5)
    ref = make(ema_power=0.75, ema_decay=0.999)
    ref.fit_normalizers(obs, act)
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_agent = train(ref, obs, act, run=RunDir(tmp_path / "a", tensorboard=False), **cfg)

    def die(step, agent):
        if step == 25:
            raise KeyboardInterrupt

    part = make(ema_power=0.75, ema_decay=0.999)
    part.load_state_dict(init)
    run = RunDir(tmp_path / "b", tensorboard=False)
    with pytest.raises(KeyboardInterrupt):
        train(part, obs, act, run=run, callback=die, **cfg)  # killed at step 25; last checkpoint at 20
    resumed = make(ema_power=0.75, ema_decay=0.999)
    resumed.load_state_dict(init)
    agent = train(resumed, obs, act, run=run, **cfg)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    for k, v in ref_agent.ema.model.state_dict().items():
        assert torch.equal(v, agent.ema.model.state_dict()[k]), k
    lrs = [r["train/lr"] for r in run.read_metrics() if "train/lr" in r]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] < 1e-4  # warm-up done by step 5, decayed to ~0 at 30


@pytest.mark.parametrize("share_forward", [True, False])
@pytest.mark.parametrize("t_range", [(0.0, 1.0), (0.0, 0.4)])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_rayleigh_gradient_equals_differentiating_eigvalsh(share_forward, t_range, prediction):
    """exact_grad="rayleigh" (Jacobian and eigenvector without a graph, one tangent with it) gives the same loss and
    the same parameter gradients as differentiating eigvalsh of the full Jacobian (Hellmann–Feynman), float64."""
    torch.set_default_dtype(torch.float64)
    try:
        obs, act = data(32)
        results = []
        for exact_grad in ("rayleigh", "full"):
            torch.manual_seed(0)
            pol = make({"weight": 0.5, "margin": 10.0, "max_samples": 8, "t_range": t_range, "share_forward": share_forward,
                        "exact_grad": exact_grad, "prediction": prediction},
                       schedule={"name": "vp", "num_steps": 10}, prediction=prediction)
            pol.fit_normalizers(obs, act)
            loss, m = pol.compute_loss(obs, act, generator=torch.Generator().manual_seed(3))
            grads = torch.autograd.grad(loss, list(pol.net.parameters()))
            results.append((loss, m, grads))
        (l1, m1, g1), (l2, m2, g2) = results
        assert float(l1) == pytest.approx(float(l2), rel=1e-10)
        assert m1 == pytest.approx(m2, rel=1e-9, abs=1e-12)
        # the regulariser's own gradient is not negligible next to L_d's (else the check would be vacuous)
        assert m1["contraction/loss_c"] != 0.0
        for a, b in zip(g1, g2):
            assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)
    finally:
        torch.set_default_dtype(torch.float32)


@pytest.mark.skipif(not any(__import__("shutil").which(n) for n in ("g++", "c++", "clang++")),
                    reason="torch.compile needs a C++ compiler on CPU")
@pytest.mark.parametrize("contraction", [None, {"max_samples": 5}, {"max_samples": 5, "t_range": (0.0, 0.5)}])
def test_compiled_training_pass_equals_eager(contraction):
    """DiffusionPolicyConfig.compile: the compiled L_d forward and the compiled shared hinge pass give the eager loss,
    metrics and parameter gradients (float32 rounding), for plain DBC, CDP at every step and CDP on a t range."""
    torch.manual_seed(0)
    kw = dict(obs_dim=4, action_dim=2, contraction=contraction, network_kwargs=dict(hidden=16, n_layers=2))
    eager, comp = DiffusionPolicy(DiffusionPolicyConfig(**kw)), DiffusionPolicy(DiffusionPolicyConfig(compile=True, **kw))
    comp.load_state_dict(eager.state_dict())
    obs, act = torch.randn(12, 4), torch.rand(12, 2) * 2 - 1
    for p in (eager, comp):
        p.fit_normalizers(obs, act)
    res = []
    for p in (eager, comp):
        p.zero_grad()
        loss, metrics = p.compute_loss(obs, act, generator=torch.Generator().manual_seed(3))
        loss.backward()
        res.append((float(loss), metrics, [q.grad.clone() for q in p.parameters() if q.grad is not None]))
    (l1, m1, g1), (l2, m2, g2) = res
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6) and m1.keys() == m2.keys()
    assert all(m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-5) for k in m1)
    assert len(g1) == len(g2) and all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g1, g2))
    if contraction is not None:
        assert "contraction/lambda_max_mean" in m2


@pytest.mark.parametrize("network", ["unet", "dit"])
@pytest.mark.parametrize("t_range", [(0.0, 1.0), (0.0, 0.3)])
def test_central_difference_pass_equals_the_autograd_hinge_at_the_same_points(network, t_range):
    """A chunk network (no closed-form Jacobian) with fd_step = h: the regularised points x ± h v ride in the training
    pass. Its loss equals L_d + γ·mean max(−β, λ̂) with λ̂ from eigvalsh of the exact Jacobian at the same points, and
    its parameter gradient equals that of L_d + the autograd (double-backward) hinge at those points to O(h²)."""
    from cdp.contraction import jacobian, sign_and_ratio

    torch.set_default_dtype(torch.float64)
    try:
        kw = dict(obs_dim=3, action_dim=2, network=network, horizon=4, n_obs_steps=1, n_action_steps=2,
                  schedule={"name": "vp", "num_steps": 10},
                  network_kwargs=dict(down_dims=(8, 16), time_embed_dim=8, n_groups=4) if network == "unet"
                  else dict(d_model=16, n_layers=1, n_heads=2, time_embed_dim=8))
        con = {"weight": 0.5, "margin": 10.0, "max_samples": 3, "t_range": t_range}
        torch.manual_seed(0)
        pol = DiffusionPolicy(DiffusionPolicyConfig(contraction={**con, "fd_step": 1e-4}, **kw))
        with torch.no_grad():  # the DiT starts at zero output (adaLN-zero): give it a non-trivial Jacobian
            for prm in pol.net.parameters():
                prm.add_(0.1 * torch.randn_like(prm))
        g = torch.Generator().manual_seed(0)
        obs, act = torch.randn(8, 3, generator=g), torch.rand(8, 4, 2, generator=g) * 2 - 1
        pol.fit_normalizers(obs, act)
        terms = pol.loss_terms(obs, act, generator=torch.Generator().manual_seed(3))
        loss = terms["loss_d"] + terms["loss_c"]
        grads = torch.autograd.grad(terms["loss_c"], list(pol.net.parameters()), allow_unused=True)

        # the same points, by the autograd route: the first m rows (every step), or the regulariser's own draw
        reg = pol.regularizer
        if reg.covers_all_steps:
            x_c, t_c, c_c = terms["a_t"][:3], terms["t"][:3], terms["cond"][:3]
        else:  # replay the generator: k, noise of the batch, then the apply coin (none at p = 1) and sample_points
            g2 = torch.Generator().manual_seed(3)
            torch.randint(1, 11, (8,), generator=g2), torch.randn(terms["a0"].shape, generator=g2)
            x_c, t_c, c_c = reg.sample_points(terms["a0"], terms["cond"], g2)
        ref = DiffusionPolicy(DiffusionPolicyConfig(contraction={**con, "fd_step": None}, **kw))
        ref.load_state_dict(pol.state_dict())
        out = ref.net(terms["a_t"], terms["t"], terms["cond"])
        loss_d = ((out - terms["noise"]) ** 2).mean()
        loss_c, m = ref.regularizer(ref.net, x_c, t_c, c_c)
        ref_grads = torch.autograd.grad(loss_c, list(ref.net.parameters()), allow_unused=True)

        assert float(loss) == pytest.approx(float(loss_d + loss_c), rel=1e-12)
        assert terms["metrics_c"] == pytest.approx(m, rel=1e-10)
        s, r = sign_and_ratio(reg.schedule, t_c, "epsilon")
        J = jacobian(ref.net, x_c, t_c, c_c)
        lam = r + torch.linalg.eigvalsh(s * 0.5 * (J + J.transpose(1, 2)))[:, -1]
        assert m["lambda_max_mean"] == pytest.approx(float(lam.mean()), rel=1e-10)
        assert float(loss_c) != 0.0
        # the contraction term's own gradient (γ s ∇ vᵀJv on the active rows), central difference vs double backward
        pairs = [(a, b) for a, b in zip(grads, ref_grads) if b is not None]
        assert all(a is not None for a, _ in pairs)
        num = sum(float((a - b).norm() ** 2) for a, b in pairs) ** 0.5
        den = sum(float(b.norm() ** 2) for _, b in pairs) ** 0.5
        assert den > 1e-6 and num <= 1e-6 * den
    finally:
        torch.set_default_dtype(torch.float32)
