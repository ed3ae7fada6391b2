"""SSD and SCRUB (docs/methods.md#ssd, docs/methods.md#scrub): the computations against
hand-written ones, their effect on a model that memorised flipped labels, and the calling
convention."""
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from baseline_support import accuracy, noisy_blobs
from sap_fast.baselines._common import distill_kl
from sap_fast.baselines.finetune import finetune
from sap_fast.baselines.scrub import scrub
from sap_fast.baselines.ssd import ssd

# the package exports the functions under the modules' names, so fetch the modules themselves
scrub_module = importlib.import_module("sap_fast.baselines.scrub")


pytestmark = pytest.mark.usefixtures("one_thread")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- SSD ---------------------------------------------------------------------------------------

def _bn_model():
    """A small BatchNorm model fit to the noisy labels (BN affine parameters are eligible for
    dampening, its running statistics must not move)."""
    _, retain, forget, _ = noisy_blobs()
    x, y = torch.cat([retain[0], forget[0]]), torch.cat([retain[1], forget[1]])
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def _hand_importance(model, sets, bs, kind):
    """Mean over batches (each set in order, consecutive slices) of g² (CE) or |g| (label-free)."""
    params = list(model.parameters())
    imp = [torch.zeros_like(p) for p in params]
    count = 0
    for x, y in sets:
        for i in range(0, len(y), bs):
            model.zero_grad()
            out = model(x[i:i + bs])
            loss = F.cross_entropy(out, y[i:i + bs]) if kind == "ce" else \
                (out ** 2).sum(1).mean()
            loss.backward()
            for acc, p in zip(imp, params):
                acc += p.grad ** 2 if kind == "ce" else p.grad.abs()
            count += 1
    return [acc / count for acc in imp]


# lam > alpha: some selected elements keep beta = 1; the label-free importances of the forget
# set are close to D's, hence alpha near 1 there
@pytest.mark.parametrize("kind, alpha, lam", [("ce", 2.0, 3.0), ("lf", 1.05, 1.1)])
def test_ssd_dampening_matches_hand_computation(kind, alpha, lam):
    model = _bn_model()
    _, retain, forget, _ = noisy_blobs()
    bs = 16
    before = _state(model)
    out = ssd(model, retain, forget, selection_weighting=alpha, dampening_constant=lam,
              batch_size=bs, importance=kind)
    assert _same(_state(model), before)  # the caller's model is untouched
    imp_d = _hand_importance(model, [retain, forget], bs, kind)
    imp_f = _hand_importance(model, [forget], bs, kind)
    n_sel = n_damp = n_clip = 0
    for (name, p0), p1, d, f in zip(model.named_parameters(), out.parameters(), imp_d, imp_f):
        sel = f > alpha * d
        beta = torch.where(sel, (lam * d / f).clamp(max=1), torch.ones_like(f))
        assert torch.allclose(p1, p0 * beta, rtol=1e-5, atol=1e-7), name
        assert torch.equal(p1[~sel], p0[~sel]), name  # not selected: bit-identical
        n_sel += int(sel.sum())
        n_damp += int((sel & (beta < 1)).sum())
        n_clip += int((sel & (beta == 1)).sum())
    assert n_damp > 0 and n_clip > 0 and n_sel < sum(p.numel() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(out[1].parameters(), model[1].parameters()))
    for (name, b0), b1 in zip(model.named_buffers(), out.buffers()):
        assert torch.equal(b0, b1), name  # BN running stats untouched


def test_ssd_cannot_select_when_alpha_exceeds_batch_ratio():
    # D contains D_f, so imp_f / imp_D <= (#batches of D) / (#batches of D_f) = 4 here
    model, retain, forget, _ = noisy_blobs()
    with pytest.warns(UserWarning, match=r"ssd: selection_weighting=10 >= 4"):
        out = ssd(model, retain, forget)  # the defaults: alpha 10, batch 128
    assert _same(_state(out), _state(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ssd(model, retain, forget, selection_weighting=3.5)
    assert not _same(_state(out), _state(model))
    # with D given explicitly the bound does not apply, and no warning is raised
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ssd(model, retain, forget, full_train=retain)


def test_ssd_forgets_flipped_labels_on_noisy_blobs():
    # batch 8: 45 + 5 batches, so alpha may go up to 10; alpha 6, lambda 4 scale selected
    # elements by < 2/3. Forget accuracy (on the wrong labels) 1.0 -> <= 0.5, retain >= 0.85.
    model, retain, forget, test = noisy_blobs()
    assert accuracy(model, forget) == 1.0 and accuracy(model, retain) == 1.0
    out = ssd(model, retain, forget, selection_weighting=6.0, dampening_constant=4.0,
              batch_size=8)
    assert accuracy(out, forget) <= 0.5
    assert accuracy(out, retain) >= 0.85
    assert accuracy(out, test) >= accuracy(model, test) - 0.05


def test_ssd_seed_shuffle_inplace():
    model, retain, forget, _ = noisy_blobs()
    kw = dict(selection_weighting=3.0, batch_size=16)
    a, b = ssd(model, retain, forget, **kw), ssd(model, retain, forget, seed=5, **kw)
    assert _same(_state(a), _state(b))  # data order: the seed plays no part
    s0 = ssd(model, retain, forget, shuffle=True, seed=0, **kw)
    assert _same(_state(s0), _state(ssd(model, retain, forget, shuffle=True, seed=0, **kw)))
    assert not _same(_state(s0), _state(ssd(model, retain, forget, shuffle=True, seed=1, **kw)))
    same = ssd(model, retain, forget, inplace=True, **kw)
    assert same is model and _same(_state(model), _state(a)) and not model.training


@pytest.mark.parametrize("kwargs, match", [
    (dict(selection_weighting=0), "ssd: selection_weighting must be > 0"),
    (dict(selection_weighting="10"), "ssd: selection_weighting must be a number"),
    (dict(dampening_constant=-1.0), "ssd: dampening_constant must be > 0"),
    (dict(dampening_constant=float("nan")), "ssd: dampening_constant must be finite"),
    (dict(batch_size=True), "ssd: batch_size must be an int"),
    (dict(batch_size=0), "ssd: batch_size must be >= 1"),
    (dict(importance="fisher"), "ssd: importance must be one of"),
    (dict(shuffle=1), "ssd: shuffle must be a bool"),
    (dict(seed=-1), "ssd: seed must be >= 0"),
])
def test_ssd_bad_hyperparameters(kwargs, match):
    model, retain, forget, _ = noisy_blobs()
    with pytest.raises((ValueError, TypeError), match=match) as err:
        ssd(model, retain, forget, **kwargs)
    assert "\n" not in str(err.value)


def test_ssd_bad_data_names_method():
    model, retain, forget, _ = noisy_blobs()
    with pytest.raises(ValueError, match="ssd: forget is empty"):
        ssd(model, retain, (forget[0][:0], forget[1][:0]))
    with pytest.raises(ValueError, match="ssd"):
        ssd(model, retain, (forget[0], forget[1] + 10), selection_weighting=3.0)  # bad labels


# ---- SCRUB -------------------------------------------------------------------------------------

def test_distill_kl_is_t_squared_kl_teacher_student():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    for temp in (1.0, 4.0):
        p_t, p_s = F.softmax(t / temp, 1), F.softmax(s / temp, 1)
        hand = temp ** 2 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
        assert torch.allclose(distill_kl(s, t, temp), hand, rtol=1e-5, atol=1e-7)
    assert float(distill_kl(t, t, 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_scrub_without_distillation_is_finetuning():
    model, retain, forget, _ = noisy_blobs()
    a = scrub(model, retain, forget, msteps=0, kd_weight=0.0, gamma=1.0, epochs=3, lr=0.05,
              retain_batch_size=64, seed=3)
    b = finetune(model, retain, epochs=3, lr=0.05, batch_size=64, seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, rtol=1e-6, atol=1e-7), name  # bit-identical on CPU today
    assert not _same(_state(a), _state(model))


def _kl(student, teacher, data, temp=4.0):
    with torch.no_grad():
        return float(distill_kl(student(data[0]), teacher(data[0]), temp))


def test_scrub_max_steps_push_the_student_away_on_forget_data():
    model, retain, forget, _ = noisy_blobs()
    kw = dict(lr=0.1, epochs=3)
    with_max = scrub(model, retain, forget, msteps=2, **kw)
    without = scrub(model, retain, forget, msteps=0, **kw)
    # a flipped sign (minimising KL on forget) would leave it at the level of the msteps=0 run
    assert _kl(with_max, model, forget) > 10 * max(_kl(without, model, forget), 1e-3)
    assert _kl(with_max, model, forget) > 10 * _kl(with_max, model, retain)


def test_scrub_loop_structure_temperature_and_lr_schedule(monkeypatch):
    """Epoch e: forget pass (e <= msteps) then retain pass, lr = lr0 * rate^#{d < e}, KL at T."""
    calls, temps = [], []
    real_step, real_kl = scrub_module.step, scrub_module.distill_kl

    def spy_step(opt, loss, what, *args):
        calls.append(("forget" if "forget" in what else "retain", opt.param_groups[0]["lr"],
                      type(opt).__name__))
        return real_step(opt, loss, what, *args)

    def spy_kl(s, t, temperature):
        temps.append(temperature)
        return real_kl(s, t, temperature)

    monkeypatch.setattr(scrub_module, "step", spy_step)
    monkeypatch.setattr(scrub_module, "distill_kl", spy_kl)
    model, retain, forget, _ = noisy_blobs()  # 360 retain (3 batches of 128), 40 forget (2 of 32)
    scrub(model, retain, forget, epochs=5, msteps=2, lr=0.01, lr_decay_epochs=(1, 3),
          lr_decay_rate=0.5, temperature=2.5)
    lrs = {1: 0.01, 2: 0.005, 3: 0.005, 4: 0.0025, 5: 0.0025}
    expected = []
    for e in range(1, 6):
        expected += [("forget", lrs[e], "SGD")] * (2 if e <= 2 else 0)
        expected += [("retain", lrs[e], "SGD")] * 3
    assert [(w, pytest.approx(lr), o) for w, lr, o in calls] == expected
    assert temps == [2.5] * len(expected)
    calls.clear()
    scrub(model, retain, forget, epochs=1, msteps=1, optimizer="adam")
    assert {o for _, _, o in calls} == {"Adam"} and len(calls) == 5


def test_scrub_forgets_flipped_labels_on_noisy_blobs():
    # Defaults but lr 0.1 (5e-4 barely moves this 3-batch problem; the max steps start at a
    # stationary point of the KL). Forget accuracy 1.0 -> <= 0.5, retain >= 0.95, test not worse.
    model, retain, forget, test = noisy_blobs()
    out = scrub(model, retain, forget, lr=0.1)
    assert accuracy(out, forget) <= 0.5
    assert accuracy(out, retain) >= 0.95
    assert accuracy(out, test) >= accuracy(model, test)


def test_scrub_seed_copy_and_inplace():
    model, retain, forget, _ = noisy_blobs()
    before = _state(model)
    a = scrub(model, retain, forget, lr=0.05, seed=0)
    assert _same(_state(model), before) and not a.training
    assert _same(_state(a), _state(scrub(model, retain, forget, lr=0.05, seed=0)))
    assert not _same(_state(a), _state(scrub(model, retain, forget, lr=0.05, seed=1)))
    same = scrub(model, retain, forget, lr=0.05, seed=0, inplace=True)
    assert same is model and _same(_state(model), _state(a))


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "scrub: lr must be > 0"),
    (dict(epochs=True), "scrub: epochs must be an int"),
    (dict(epochs=0), "scrub: epochs must be >= 1"),
    (dict(msteps=4), r"scrub: msteps must be <= epochs=3"),
    (dict(msteps=-1), "scrub: msteps must be >= 0"),
    (dict(msteps=1.0), "scrub: msteps must be an int"),
    (dict(temperature=0), "scrub: temperature must be > 0"),
    (dict(gamma=-1), "scrub: gamma must be >= 0"),
    (dict(kd_weight=float("inf")), "scrub: kd_weight must be finite"),
    (dict(momentum=1.0), "scrub: momentum must be in"),
    (dict(optimizer="rmsprop"), "scrub: optimizer must be one of"),
    (dict(forget_batch_size=0), "scrub: forget_batch_size must be >= 1"),
    (dict(lr_decay_epochs=3), "scrub: lr_decay_epochs must be a sequence"),
    (dict(lr_decay_epochs=(3, 0)), r"scrub: lr_decay_epochs\[\] must be >= 1"),
    (dict(lr_decay_rate=0), "scrub: lr_decay_rate must be in"),
    (dict(max_grad_norm=0), "scrub: max_grad_norm must be > 0"),
    (dict(seed=1.5), "scrub: seed must be an int"),
])
def test_scrub_bad_hyperparameters(kwargs, match):
    model, retain, forget, _ = noisy_blobs()
    with pytest.raises((ValueError, TypeError), match=match) as err:
        scrub(model, retain, forget, **kwargs)
    assert "\n" not in str(err.value)


def test_scrub_divergence_is_an_error_not_nan_weights():
    model, retain, forget, _ = noisy_blobs()
    with pytest.raises(FloatingPointError, match="scrub"):
        scrub(model, retain, forget, lr=0.05, epochs=5, msteps=5, forget_batch_size=8,
              retain_batch_size=32)
