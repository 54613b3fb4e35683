"""ESD parameter sets on the tiny UNet: which parameters each method trains."""

import pytest

from safediff.unlearning.param_sets import ESD_METHODS, esd_parameter_names, esd_parameters


@pytest.fixture(scope="module")
def names(tiny_sd1):
    return [n for n, _ in tiny_sd1.unet.named_parameters()]


@pytest.fixture(scope="module")
def sets(tiny_sd1):
    return {m: esd_parameter_names(tiny_sd1.unet, m) for m in ESD_METHODS}


def test_every_set_is_nonempty_and_in_parameter_order(sets, names):
    for method, chosen in sets.items():
        assert chosen, method
        assert chosen == [n for n in names if n in set(chosen)], method


def test_esd_u_keeps_attn1_and_projection_outputs_and_drops_xattn_output_time(sets, names):
    u = set(sets["esd-u"])
    attn1_out = [n for n in names if ".attn1.to_out." in n]
    proj_out = [n for n in names if ".proj_out." in n]
    assert attn1_out and proj_out and set(attn1_out + proj_out) <= u  # "out." is not a substring test
    assert not any(".attn2." in n for n in u)
    assert not any(n.startswith(("conv_out.", "conv_norm_out.", "time_embedding.")) for n in u)
    assert any("time_emb_proj" in n for n in u)  # the resnets' timestep projections are trained
    assert any(".norm" in n for n in u) and "conv_in.weight" in u
    excluded = set(names) - u
    assert excluded == {n for n in names if ".attn2." in n or n.startswith(("conv_out.", "conv_norm_out.", "time_embedding."))}


def test_esd_x_is_exactly_the_cross_attention(sets, names):
    x = sets["esd-x"]
    assert x == [n for n in names if ".attn2." in n]
    assert {n.split(".attn2.")[1].split(".")[0] for n in x} == {"to_q", "to_k", "to_v", "to_out"}
    strict = sets["esd-x-strict"]
    assert set(strict) < set(x)
    assert strict == [n for n in x if ".attn2.to_k." in n or ".attn2.to_v." in n]


def test_sets_are_disjoint_or_complementary(sets, names):
    u, x, s, a, nt = (set(sets[m]) for m in ("esd-u", "esd-x", "esd-self", "esd-all", "esd-notime"))
    assert a == set(names)
    assert not u & x
    out_time = {n for n in names if n.startswith(("conv_out.", "conv_norm_out.", "time_embedding."))}
    assert out_time and u | x | out_time == a and not out_time & (u | x)
    assert nt == u | x
    assert s and s < u and s == {n for n in names if ".attn1." in n} and not s & x


def test_unknown_method_and_parameter_dict(tiny_sd1):
    with pytest.raises(ValueError, match="Unknown ESD parameter set"):
        esd_parameter_names(tiny_sd1.unet, "noxattn")
    params = esd_parameters(tiny_sd1.unet, "esd-x-strict")
    named = dict(tiny_sd1.unet.named_parameters())
    assert all(params[k] is named[k] for k in params)
