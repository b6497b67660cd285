"""The global-normalization contract: splitting a step into micro-batches or data-parallel shards
changes neither its loss nor its gradients; and gradcheck on the smooth branches."""

import pytest
import torch

from engine.algorithms.losses import (
    PolicyLossConfig,
    bradley_terry_loss,
    clipped_pg_loss,
    dpo_loss,
    kl_penalty,
    nll_loss,
)

B, T = 8, 6


@pytest.fixture
def step():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, generator=g, dtype=torch.float64)
    prev = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 1.0
    ref = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.1 - 1.0
    gen = prev + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.05
    adv = torch.randn(B, 1, generator=g, dtype=torch.float64).expand(B, T).contiguous()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    mask[3] = 0  # one fully masked sequence
    return logits, prev, ref, gen, adv, mask


def pg_losses(cfg):
    def fn(lp, prev, ref, gen, adv, mask, n_tok, n_seq):
        loss, _ = clipped_pg_loss(
            lp,
            prev,
            adv,
            mask,
            cfg,
            reference_logprobs=ref,
            generation_logprobs=gen,
            global_valid_tokens=n_tok,
            global_valid_seqs=n_seq,
        )
        return loss

    return fn


def nll_fn(lp, prev, ref, gen, adv, mask, n_tok, n_seq):
    return nll_loss(lp, mask, global_valid_tokens=n_tok)


LOSSES = {
    "nll": nll_fn,
    "ppo_token": pg_losses(PolicyLossConfig(kl_beta=0.05)),
    "ppo_seq": pg_losses(PolicyLossConfig(token_level_loss=False)),
    "gspo": pg_losses(PolicyLossConfig(sequence_level_ratio=True)),
    "tis": pg_losses(PolicyLossConfig(importance_sampling="tis", is_max=1.05)),
    "dual_clip": pg_losses(PolicyLossConfig(ratio_clip_c=3.0)),
}


def run_split(loss_fn, step, splits):
    """Sum the per-chunk losses of one step, each normalized by the step's global counts."""
    base, prev, ref, gen, adv, mask = step
    lp = (base * 0.1 - 1.0).clone().requires_grad_(True)
    n_tok = mask.sum()
    n_seq = (mask.sum(-1) > 0).sum()
    total = torch.zeros((), dtype=torch.float64)
    for idx in torch.arange(B).chunk(splits):
        chunk_loss = loss_fn(lp[idx], prev[idx], ref[idx], gen[idx], adv[idx], mask[idx], n_tok, n_seq)
        chunk_loss.backward()
        total = total + chunk_loss.detach()
    return total, lp.grad.clone()


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("splits", [2, 4, 8])
def test_micro_batches_sum_to_the_whole_step(name, splits, step):
    whole_loss, whole_grad = run_split(LOSSES[name], step, 1)
    split_loss, split_grad = run_split(LOSSES[name], step, splits)
    torch.testing.assert_close(split_loss, whole_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(LOSSES))
def test_data_parallel_shards_sum_to_the_whole_step(name, step):
    """Two 'ranks' each take half the sequences, split into micro-batches of their own; the all-reduced
    (summed) gradient equals the single-process one."""
    whole_loss, whole_grad = run_split(LOSSES[name], step, 1)
    base, prev, ref, gen, adv, mask = step
    n_tok, n_seq = mask.sum(), (mask.sum(-1) > 0).sum()
    lp = (base * 0.1 - 1.0).clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.float64)
    for rank_rows in (torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7])):
        for idx in rank_rows.chunk(2):
            loss = LOSSES[name](lp[idx], prev[idx], ref[idx], gen[idx], adv[idx], mask[idx], n_tok, n_seq)
            loss.backward()
            total = total + loss.detach()
    torch.testing.assert_close(total, whole_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lp.grad, whole_grad, rtol=1e-12, atol=1e-12)


def _smooth_inputs():
    g = torch.Generator().manual_seed(1)
    lp = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.01 - 1.0).requires_grad_(True)
    prev = lp.detach() + torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.01
    adv = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ref = lp.detach() + 0.3
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)
    return lp, prev, adv, ref, mask


@pytest.mark.parametrize(
    "cfg",
    [
        PolicyLossConfig(ratio_clip_min=10.0, ratio_clip_max=10.0),  # inside the clip band: smooth
        PolicyLossConfig(disable_ppo_ratio=True),
        PolicyLossConfig(kl_beta=0.1, ratio_clip_min=10.0, ratio_clip_max=10.0),
        PolicyLossConfig(sequence_level_ratio=True, ratio_clip_max=10.0, ratio_clip_min=0.99),
        PolicyLossConfig(token_level_loss=False, ratio_clip_max=10.0, ratio_clip_min=0.99),
    ],
)
def test_gradcheck_policy_loss(cfg):
    lp, prev, adv, ref, mask = _smooth_inputs()
    assert torch.autograd.gradcheck(
        lambda x: clipped_pg_loss(x, prev, adv, mask, cfg, reference_logprobs=ref)[0], (lp,)
    )


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_gradcheck_kl(kind):
    lp, _, _, ref, _ = _smooth_inputs()
    assert torch.autograd.gradcheck(lambda x: kl_penalty(x, ref, kind=kind), (lp,))


def test_gradcheck_nll_dpo_bt():
    lp, _, _, _, mask = _smooth_inputs()
    assert torch.autograd.gradcheck(lambda x: nll_loss(x, mask), (lp,))
    c = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-1.5, -1.0], dtype=torch.float64, requires_grad=True)
    refc, refr = torch.tensor([-1.2, -2.1], dtype=torch.float64), torch.tensor([-1.4, -1.1], dtype=torch.float64)
    for loss_type in ("sigmoid", "ipo"):
        assert torch.autograd.gradcheck(
            lambda a, b: dpo_loss(a, b, refc, refr, loss_type=loss_type, label_smoothing=0.1)[0], (c, r)
        )
    assert torch.autograd.gradcheck(lambda a, b: bradley_terry_loss(a, b, margin=0.5)[0], (c, r))
