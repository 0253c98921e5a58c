"""scancc.integrations.transformers: patched models against their own torch path.

Tiny random configs (no downloads). The weights are re-drawn larger than transformers' init
(std 0.02 makes the mixers' contribution to the logits vanish below float32 rounding, so a
logits comparison alone could not fail): the mixers' outputs are compared too, captured by
forward hooks, and the report's call counter proves scancc ran (a dispatcher that fell back
to the model's function would pass the comparison but fail the counter check).
"""
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from scancc.integrations import transformers as st  # noqa: E402

TOL = 1e-4          # rel-RMS, float32 (issue 17)
SMALL = dict(hidden_size=16, num_hidden_layers=2, vocab_size=64, num_attention_heads=2,
             num_key_value_heads=1, intermediate_size=32)
M2 = dict(mamba_d_state=4, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2, mamba_expand=2,
          mamba_chunk_size=8)

# name -> (config class, model class, config kwargs, recurrence); every mixer of these models
# calls transformers' mamba / mamba2 scan functions
ARCHS = {
    "mamba": ("MambaConfig", "MambaForCausalLM",
              dict(hidden_size=16, state_size=4, intermediate_size=32, num_hidden_layers=2,
                   vocab_size=64, time_step_rank=4), "mamba"),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM",
                     dict(hidden_size=16, state_size=4, intermediate_size=32,
                          num_hidden_layers=2, vocab_size=64, time_step_rank=4), "mamba"),
    "jamba": ("JambaConfig", "JambaForCausalLM",
              dict(SMALL, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4, attn_layer_period=2,
                   attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                   num_experts=2, num_experts_per_tok=1), "mamba"),
    "zamba": ("ZambaConfig", "ZambaForCausalLM",
              dict(SMALL, num_hidden_layers=3, attention_hidden_size=32, mamba_d_state=4,
                   mamba_expand=2, n_mamba_heads=2, attention_head_dim=16,
                   layers_block_type=["mamba", "hybrid", "hybrid"]), "mamba"),
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM",
               dict(hidden_size=16, state_size=4, expand=2, head_dim=8, num_heads=4, n_groups=2,
                    num_hidden_layers=2, vocab_size=64, chunk_size=8), "mamba2"),
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(SMALL, **M2, attn_layer_indices=[1]),
              "mamba2"),
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
                         dict(SMALL, **M2, layer_types=["mamba", "attention"],
                              num_local_experts=2, num_experts_per_tok=1), "mamba2"),
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM",
               dict(SMALL, num_hidden_layers=3, mamba_d_state=4, mamba_headdim=8,
                    mamba_ngroups=2, mamba_expand=2, n_mamba_heads=4, chunk_size=8,
                    attention_head_dim=16,
                    layers_block_type=["mamba", "hybrid", "hybrid"]), "mamba2"),
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM",
                   dict(SMALL, ssm_state_size=4, mamba_num_heads=4, mamba_head_dim=8, n_groups=2,
                        chunk_size=8, layers_block_type=["mamba", "attention"], head_dim=8),
                   "mamba2"),
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM",
                  dict(SMALL, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2,
                       mamba_d_state=4, mamba_chunk_size=8, head_dim=8), "mamba2"),
    # gated delta net with grouped value heads (2 value heads per key head)
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   dict(SMALL, linear_num_value_heads=2, linear_num_key_heads=1,
                        linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2,
                        num_experts_per_tok=1, moe_intermediate_size=16,
                        shared_expert_intermediate_size=16,
                        layer_types=["linear_attention", "full_attention"], head_dim=8),
                   "gated_delta_net"),
    # Kimi Delta Attention (per-key decay), one KDA layer and one MLA attention layer
    "kimi_linear": ("KimiLinearConfig", "KimiLinearForCausalLM",
                    dict(SMALL, num_key_value_heads=2, moe_intermediate_size=16, kv_lora_rank=8,
                         q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                         num_local_experts=2, num_experts_per_tok=1, linear_head_dim=8,
                         linear_num_heads=2, layer_types=["linear_attention", "full_attention"],
                         mlp_layer_types=["dense", "sparse"], pad_token_id=0, bos_token_id=1,
                         eos_token_id=2), "kda"),
}


# model file -> its fla-routed functions (transformers' use_kernel_func_from_hub_with_fallback)
FLA_ROUTED = {"qwen3_next": ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"),
              "kimi_linear": ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")}


@pytest.fixture(autouse=True)
def fla_routed_torch_path(monkeypatch):
    """With fla installed, transformers routes Qwen3-Next's gated delta rule and Kimi-Linear's
    KDA to fla's Triton kernels (``chunk_gated_delta_rule``, ``chunk_kda``, ...: GPU only): the
    unpatched model's *torch* path is the decorated functions' ``__wrapped__`` torch code,
    installed here for every test (restored after)."""
    import importlib
    for arch, names in FLA_ROUTED.items():
        mod = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
        for n in names:
            fn = getattr(mod, n)
            monkeypatch.setattr(mod, n, getattr(fn, "__wrapped__", fn))
# Triton runs in its CPU interpreter here: the pure SSM models on every backend in the default
# run, the hybrids on the reference (the other backends under -m slow)
FAST_BACKENDS = {"mamba", "mamba2", "kimi_linear"}
NKI_ARCHS = {"mamba", "mamba2"}
# scan calls per mixer forward: Zamba's mixer runs one scan per mamba head (n_mamba_heads=2)
CALLS_PER_MIXER = {"zamba": 2}
_KEEP = ("A_log", "D", "dt_bias", "dt_proj.bias")   # the SSM's (and KDA's gate) own parametrization


def _targets():
    import scancc.backends
    names = [n for n, ok, _ in scancc.backends.report() if ok]
    return [t for t in ("reference", "torch", "triton", "nki") if t in names]


def _cases(nki_fast=False):
    """Every architecture on the reference in the default run; torch and Triton on the pure
    SSM models by default and on the hybrids (the same two functions, the same dispatch)
    under -m slow, to keep the default run short; NKI (its emulator) on Mamba and Mamba2 only,
    in the default run for the prefill test (``nki_fast``), else under -m slow."""
    out = []
    for arch in ARCHS:
        for target in _targets():
            if target == "nki" and arch not in NKI_ARCHS:
                continue
            slow = (target != "reference" and arch not in FAST_BACKENDS) or \
                (target == "nki" and not nki_fast)
            out.append(pytest.param(arch, target, marks=[pytest.mark.slow] if slow else [],
                                    id=f"{arch}-{target}"))
    return out


def build(arch, seed=0):
    cfg_name, model_name, kw, _ = ARCHS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = getattr(transformers, cfg_name)(**kw)
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not name.endswith(_KEEP):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def rel_rms(got, want):
    got, want = got.detach().double(), want.detach().double()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def mixer_outputs(model, ids, **kw):
    """The logits and every supported mixer's output (by forward hooks)."""
    outs, hooks = {}, []
    for name, mod in model.named_modules():
        kind = st._classify(mod)
        if kind and kind[0] == "supported":
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, name=name: outs.setdefault(name, o[0] if isinstance(o, tuple)
                                                           else o)))
    try:
        logits = model(ids, **kw).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, outs


def _patch(model, target):
    rep = st.patch(model, target, warn=False)
    assert rep.patched and not rep.unsupported, str(rep)
    return rep


@pytest.mark.parametrize("arch,target", _cases(nki_fast=True))
def test_prefill_logits_match_the_models_torch_path(arch, target):
    model = build(arch)
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_logits, ref_mix = mixer_outputs(model, ids, use_cache=False)
    rep = _patch(model, target)
    try:
        with torch.no_grad():
            logits, mix = mixer_outputs(model, ids, use_cache=False)
    finally:
        st.unpatch(model)
    rec = ARCHS[arch][3]
    n = len(rep.patched) * CALLS_PER_MIXER.get(arch, 1)
    assert rep.calls[f"{rec}.scan"] == n, dict(rep.calls)
    assert not any(k.endswith("fallback") for k in rep.calls), dict(rep.calls)
    assert set(mix) == set(ref_mix) and mix
    for name in mix:
        # the mixer must matter: its output is not negligible against the residual stream
        assert ref_mix[name].abs().max() > 1e-2, name
        assert rel_rms(mix[name], ref_mix[name]) <= TOL, name
    assert rel_rms(logits, ref_logits) <= TOL


@pytest.mark.parametrize("arch,target", _cases())
def test_greedy_generate_gives_the_same_tokens(arch, target):
    """Prefill through the scan, then 16 decode steps through kernel.step on the model's
    cache: same tokens, and the same per-step logits."""
    model = build(arch)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    gen = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, output_logits=True,
               return_dict_in_generate=True, pad_token_id=0)
    want = model.generate(ids, **gen)
    rep = _patch(model, target)
    try:
        got = model.generate(ids, **gen)
    finally:
        st.unpatch(model)
    rec = ARCHS[arch][3]
    n = len(rep.patched) * CALLS_PER_MIXER.get(arch, 1)
    assert rep.calls[f"{rec}.scan"] == n and rep.calls[f"{rec}.step"] == 15 * n, dict(rep.calls)
    assert not any(k.endswith("fallback") for k in rep.calls), dict(rep.calls)
    assert got.sequences.tolist() == want.sequences.tolist()
    assert len(set(want.sequences[0, 5:].tolist())) > 1      # not a degenerate repetition
    for t, (a, b) in enumerate(zip(got.logits, want.logits)):
        assert rel_rms(a, b) <= TOL, f"step {t}"


def _grads(model, ids):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, use_cache=False)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                               if p.grad is not None}


@pytest.mark.parametrize("arch,target", _cases())
def test_training_step_gives_the_same_gradients(arch, target):
    model = build(arch)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    loss0, g0 = _grads(model, ids)
    rep = _patch(model, target)
    try:
        loss1, g1 = _grads(model, ids)
    finally:
        st.unpatch(model)
    assert rep.calls[f"{ARCHS[arch][3]}.scan"] >= 1
    assert abs(loss1.item() - loss0.item()) <= TOL * abs(loss0.item())
    assert set(g1) == set(g0)
    ssm = [n for n in g0 if n.endswith(("A_log", ".D", "dt_bias", "dt_proj.bias"))]
    assert ssm, "the SSM parameters must receive gradients"
    for n in g0:
        if g0[n].norm() < 1e-6:
            # zero up to rounding (a top-1 MoE router's weight: its normalized gate is 1);
            # a relative error of rounding noise means nothing: both must be that small
            assert g1[n].norm() < 1e-5, (n, g1[n].norm().item())
            continue
        assert rel_rms(g1[n], g0[n]) <= TOL, (n, rel_rms(g1[n], g0[n]), g0[n].norm().item())


def test_unpatch_restores_the_models_own_code():
    import transformers.models.mamba2.modeling_mamba2 as mm
    orig_scan = mm.mamba2_chunk_scan
    model = build("mamba2")
    other = build("mamba2", seed=1)
    st.patch(model, "reference")
    st.patch(other, "reference")
    assert mm.mamba2_chunk_scan is not orig_scan
    assert "forward" in model.backbone.layers[0].mixer.__dict__
    st.unpatch(model)
    assert "forward" not in model.backbone.layers[0].mixer.__dict__
    assert mm.mamba2_chunk_scan is not orig_scan          # `other` still patched
    st.unpatch(other)
    assert mm.mamba2_chunk_scan is orig_scan
    assert st.unpatch(other) is None
    # state-dict names are untouched by a patch
    keys = list(model.state_dict())
    st.patch(model, "reference")
    assert list(model.state_dict()) == keys
    st.unpatch(model)


def test_an_unpatched_model_of_the_same_file_runs_the_original_function():
    model, plain = build("mamba"), build("mamba", seed=1)
    rep = st.patch(model, "reference")
    try:
        ids = torch.randint(0, 64, (1, 4))
        with torch.no_grad():
            plain(ids)
        assert rep.calls["mamba.scan"] == 0           # the other model did not reach scancc
        with torch.no_grad():
            model(ids)
        assert rep.calls["mamba.scan"] == 2
    finally:
        st.unpatch(model)


def test_an_unsupported_mixer_is_reported_by_name():
    """RWKV-4's attention (its recurrence ``rwkv_linear_attention`` has no mapping) is
    reported, by module path and class, with a warning; the module is not touched. The same
    model with a supported mixer beside it patches that one and still reports the other."""
    from transformers.models.rwkv.modeling_rwkv import RwkvSelfAttention
    rwkv = RwkvSelfAttention.__new__(RwkvSelfAttention)
    torch.nn.Module.__init__(rwkv)                    # the class as is, without its weights
    model = torch.nn.ModuleDict({"attention": rwkv})
    with pytest.warns(UserWarning, match=r"attention \(RwkvSelfAttention\)"):
        rep = st.patch(model, "reference")
    by_name = {n: (c, why) for n, c, why in rep.unsupported}
    assert by_name["attention"][0] == "RwkvSelfAttention"
    assert "rwkv_linear_attention" in by_name["attention"][1]
    assert "ModuleDict" in by_name                     # no supported mixer at all
    assert not rep.patched and "forward" not in rwkv.__dict__
    st.unpatch(model)
    both = torch.nn.ModuleDict({"attention": rwkv, "lm": build("kimi_linear")})
    with pytest.warns(UserWarning, match=r"attention \(RwkvSelfAttention\)"):
        rep = st.patch(both, "reference")
    try:
        assert rep.patched == [("lm.model.layers.0.self_attn", "KimiLinearDeltaAttention",
                                "kda")]
        assert [n for n, _, _ in rep.unsupported] == ["attention"]
    finally:
        st.unpatch(both)


def test_a_model_without_mixers_is_reported():
    cfg = transformers.LlamaConfig(**SMALL)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.warns(UserWarning, match="LlamaForCausalLM"):
        rep = st.patch(model, "reference")
    assert rep.unsupported == [("LlamaForCausalLM", "LlamaForCausalLM",
                                "no supported mixer in this model")]
    st.unpatch(model)


def test_mamba2_step_falls_back_on_per_headdim_parameters():
    """A caller passing a dt that differs along head_dim (not transformers' expand) gets the
    model's own function, counted as a fallback, rather than a wrong answer."""
    import transformers.models.mamba2.modeling_mamba2 as mm
    model = build("mamba2")
    rep = st.patch(model, "reference")
    cfg = st._Config("reference", {}, rep)
    B, H, P, N = 1, 2, 3, 4
    g = torch.Generator().manual_seed(0)
    state = torch.randn(B, H, P, N, generator=g)
    x, dt = torch.randn(B, H, P, generator=g), torch.rand(B, H, P, generator=g)
    A = -torch.rand(H, P, N, generator=g)
    Bm, Cm = torch.randn(B, 1, N, generator=g), torch.randn(B, 1, N, generator=g)
    orig = mm.mamba2_selective_state_update._scancc_original
    s_ref = state.clone()
    want = orig(s_ref, x, dt, A, Bm, Cm)
    got = st._mamba2_step(cfg, orig, state, x, dt, A, Bm, Cm)
    assert rep.calls["mamba2.step.fallback"] == 1
    assert torch.equal(got, want) and torch.equal(state, s_ref)
    # the expanded form runs on scancc and agrees
    dt_e, A_e = dt[..., :1].expand(B, H, P), A[:, :1, :1].expand(H, P, N)
    s1, s2 = s_ref.clone(), s_ref.clone()
    want = orig(s1, x, dt_e, A_e, Bm, Cm)
    got = st._mamba2_step(cfg, orig, s2, x, dt_e, A_e, Bm, Cm)
    assert rep.calls["mamba2.step"] == 1
    assert rel_rms(got, want) <= TOL and rel_rms(s2, s1) <= TOL
    st.unpatch(model)
    assert math.isfinite(rel_rms(s2, s1))


# ---- scancc.integrations.fla: fla's op functions routed to the library recurrences ----

@pytest.fixture
def fla_patched():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("fla")
        import fla.ops  # noqa: F401
    from scancc.integrations import fla as sf
    sf.calls.clear()
    replaced = sf.patch("reference")
    yield sf, replaced
    sf.unpatch()


def _naive():
    from fla.ops.delta_rule.naive import delta_rule_recurrence
    from fla.ops.gated_delta_rule import naive_recurrent_gated_delta_rule
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.hgrn.naive import naive_recurrent_hgrn
    from fla.ops.simple_gla.naive import naive_recurrent_simple_gla
    return dict(gla=naive_recurrent_gla, simple_gla=naive_recurrent_simple_gla,
                gdn=naive_recurrent_gated_delta_rule, delta=delta_rule_recurrence,
                hgrn=naive_recurrent_hgrn)


def test_fla_functions_run_on_scancc_with_fla_argument_names(fla_patched):
    """fla's public functions, called by fla's argument names after patch(), against fla's own
    naive torch recurrences (independent of scancc), initial state and final state included."""
    import fla.ops.gated_delta_rule as fgd
    import fla.ops.gla as fgla
    import fla.ops.hgrn as fh
    import fla.ops.simple_gla as fsg
    import fla.ops.delta_rule as fd
    sf, replaced = fla_patched
    assert ("fla.ops.gla", "chunk_gla") in replaced
    nv = _naive()
    g = torch.Generator().manual_seed(0)
    B, T, H, K, V = 2, 9, 2, 4, 3
    q, k = torch.randn(B, T, H, K, generator=g), torch.randn(B, T, H, K, generator=g)
    v = torch.randn(B, T, H, V, generator=g)
    S0 = torch.randn(B, H, K, V, generator=g)
    gk = torch.nn.functional.logsigmoid(torch.randn(B, T, H, K, generator=g))
    gs = torch.nn.functional.logsigmoid(torch.randn(B, T, H, generator=g))
    beta = torch.rand(B, T, H, generator=g)

    for fn in (fgla.chunk_gla, fgla.fused_recurrent_gla):
        gname = "g" if fn is fgla.chunk_gla else "gk"
        o, S = fn(q=q, k=k, v=v, **{gname: gk}, initial_state=S0, output_final_state=True)
        wo, wS = nv["gla"](q, k, v, gk, initial_state=S0, output_final_state=True)
        assert rel_rms(o, wo) <= TOL and rel_rms(S, wS) <= TOL, fn.__name__

    o, S = fsg.chunk_simple_gla(q, k, v, g=gs, scale=0.5, initial_state=S0,
                                output_final_state=True)
    wo, wS = nv["simple_gla"](q, k, v, gs, scale=0.5, initial_state=S0, output_final_state=True)
    assert rel_rms(o, wo) <= TOL and rel_rms(S, wS) <= TOL

    qn, kn = (torch.nn.functional.normalize(t, dim=-1) for t in (q, k))
    for fn in (fgd.chunk_gated_delta_rule, fgd.fused_recurrent_gated_delta_rule):
        o, S = fn(q=qn, k=kn, v=v, g=gs, beta=beta, initial_state=S0, output_final_state=True)
        wo, wS = nv["gdn"](qn, kn, v, beta, gs, initial_state=S0, output_final_state=True)
        assert rel_rms(o, wo) <= TOL and rel_rms(S, wS) <= TOL, fn.__name__
    # use_qk_l2norm_in_kernel normalizes inside
    o, _ = fgd.chunk_gated_delta_rule(q, k, v, gs, beta, use_qk_l2norm_in_kernel=True)
    wo, _ = nv["gdn"](qn, kn, v, beta, gs)
    assert rel_rms(o, wo) <= TOL

    o, S = fd.chunk_delta_rule(qn, kn, v, beta, initial_state=S0, output_final_state=True)
    th = lambda x: x.transpose(1, 2)  # noqa: E731 - delta_rule_recurrence is head-major
    wo, wS = nv["delta"](th(qn), th(kn), th(v), th(beta), initial_state=S0)
    assert rel_rms(o, th(wo)) <= TOL and rel_rms(S, wS) <= TOL

    x, gh = torch.randn(B, T, 5, generator=g), torch.nn.functional.logsigmoid(
        torch.randn(B, T, 5, generator=g))
    o, S = fh.fused_recurrent_hgrn(x, gh, output_final_state=True)
    wo, wS = nv["hgrn"](x, gh, output_final_state=True)
    assert rel_rms(o, wo) <= TOL and rel_rms(S, wS) <= TOL

    # KDA: per-key log decay g, fla's naive_recurrent_kda (l2-normalized q, k as the model
    # passes them), the in-kernel l2norm against normalized inputs
    from fla.ops.kda.naive import naive_recurrent_kda
    import fla.ops.kda as fkda
    for fn in (fkda.chunk_kda, fkda.fused_recurrent_kda):
        o, S = fn(q=qn, k=kn, v=v, g=gk, beta=beta, initial_state=S0, output_final_state=True)
        wo, wS = naive_recurrent_kda(qn, kn, v, gk, beta, initial_state=S0,
                                     output_final_state=True)
        assert rel_rms(o, wo) <= TOL and rel_rms(S, wS) <= TOL, fn.__name__
    o, _ = fkda.chunk_kda(q, k, v, gk, beta, scale=0.5, use_qk_l2norm_in_kernel=True)
    wo, _ = naive_recurrent_kda(qn, kn, v, gk, beta, scale=0.5)
    assert rel_rms(o, wo) <= TOL
    assert sf.calls["chunk_kda"] == 2 and sf.calls["fused_recurrent_kda"] == 1

    assert sf.calls["chunk_gla"] == 1 and sf.calls["chunk_gated_delta_rule"] == 2
    assert not any(c.endswith("fallback") for c in sf.calls)


def test_fla_grouped_value_heads_run_on_scancc(fla_patched):
    """chunk_kda / fused_recurrent_kda and the gated delta rule with fla's grouped value heads
    (v, g, beta, state with HV = 2 H heads; q, k with H) run on scancc, not fla's function,
    against fla's naive recurrences (naive_recurrent_kda takes HV itself; the naive gated delta
    rule gets q, k repeat_interleave'd, the head map of fla's kernels)."""
    from fla.ops.kda.naive import naive_recurrent_kda
    import fla.ops.gated_delta_rule as fgd
    import fla.ops.kda as fkda
    sf, _ = fla_patched
    g = torch.Generator().manual_seed(2)
    B, T, H, HV, K, V = 1, 9, 2, 4, 4, 3
    q, k = (torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
            for _ in range(2))
    v, S0 = torch.randn(B, T, HV, V, generator=g), torch.randn(B, HV, K, V, generator=g)
    gk = torch.nn.functional.logsigmoid(torch.randn(B, T, HV, K, generator=g))
    gs = torch.nn.functional.logsigmoid(torch.randn(B, T, HV, generator=g))
    beta = torch.rand(B, T, HV, generator=g)
    for fn in (fkda.chunk_kda, fkda.fused_recurrent_kda):
        o, S = fn(q=q, k=k, v=v, g=gk, beta=beta, initial_state=S0, output_final_state=True)
        wo, wS = naive_recurrent_kda(q, k, v, gk, beta, initial_state=S0,
                                     output_final_state=True)
        assert o.shape == (B, T, HV, V) and S.shape == (B, HV, K, V), fn.__name__
        assert rel_rms(o, wo) <= TOL and rel_rms(S, wS) <= TOL, fn.__name__
        # q/k head i // 2, not i % 2: the tiled map is another answer
        to, _ = naive_recurrent_kda(q.repeat(1, 1, 2, 1), k.repeat(1, 1, 2, 1), v, gk, beta,
                                    initial_state=S0)
        assert rel_rms(o, to) > 10 * TOL, fn.__name__
    qi, ki = q.repeat_interleave(2, dim=2), k.repeat_interleave(2, dim=2)
    for fn in (fgd.chunk_gated_delta_rule, fgd.fused_recurrent_gated_delta_rule):
        o, S = fn(q=q, k=k, v=v, g=gs, beta=beta, initial_state=S0, output_final_state=True)
        wo, wS = _naive()["gdn"](qi, ki, v, beta, gs, initial_state=S0, output_final_state=True)
        assert rel_rms(o, wo) <= TOL and rel_rms(S, wS) <= TOL, fn.__name__
    assert sf.calls["chunk_kda"] == 1 and sf.calls["fused_recurrent_kda"] == 1
    assert sf.calls["chunk_gated_delta_rule"] == 1
    assert sf.calls["fused_recurrent_gated_delta_rule"] == 1
    assert not any(c.endswith("fallback") for c in sf.calls)


def test_fla_patch_routes_packed_batches_and_falls_back_on_unmapped_arguments(fla_patched):
    import fla.ops.gla as fgla
    sf, _ = fla_patched
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 7, 2, 4, generator=g), torch.randn(1, 7, 2, 4, generator=g)
    v = torch.randn(1, 7, 2, 3, generator=g)
    gk = torch.nn.functional.logsigmoid(torch.randn(1, 7, 2, 4, generator=g))
    cu = torch.tensor([0, 3, 7])
    o, S = fgla.chunk_gla(q, k, v, gk, cu_seqlens=cu, output_final_state=True)
    nv = _naive()["gla"]
    for n in range(2):
        sl = slice(int(cu[n]), int(cu[n + 1]))
        wo, wS = nv(q[:, sl], k[:, sl], v[:, sl], gk[:, sl], output_final_state=True)
        assert rel_rms(o[:, sl], wo) <= TOL and rel_rms(S[n:n + 1], wS) <= TOL
    # reverse=True has no scancc mapping: fla's own function runs (counted), not a wrong answer
    with pytest.raises(Exception):   # fla's Triton kernels need a GPU here
        fgla.fused_recurrent_gla(q, k, v, gk, reverse=True)
    assert sf.calls["fused_recurrent_gla.fallback"] == 1


def test_fla_unpatch_restores_every_name():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pytest.importorskip("fla")
        import fla.ops
        import fla.ops.gla as fgla
    from scancc.integrations import fla as sf
    before_pkg, before_top = fgla.chunk_gla, getattr(fla.ops, "chunk_gla", None)
    sf.patch("reference")
    assert fgla.chunk_gla is not before_pkg
    if before_top is not None:
        assert fla.ops.chunk_gla is not before_top
    sf.unpatch()
    assert fgla.chunk_gla is before_pkg and getattr(fla.ops, "chunk_gla", None) is before_top


def test_example_script_prints_matching_side_by_side(capsys):
    """examples/patch_transformers.py (run in-process on the reference: a few seconds)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "patch_transformers.py"
    spec = importlib.util.spec_from_file_location("patch_transformers_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--target", "reference", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "greedy generation of 8 tokens" in out
    assert "mamba2.step" in out
    # Kimi-Linear: the KDA mixer (kda.scan, then kda.step on the cache)
    assert mod.main(["--target", "reference", "--tokens", "8", "--arch", "kimi_linear"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "kda.step" in out and "KimiLinearDeltaAttention" in out


# ---- packed prefill: the model's packing keywords routed to scancc's varlen path ----

# the hybrids whose mixers receive the model's packing keywords (transformers 5.23: the pure
# Mamba / Mamba2 / FalconMamba models and Jamba / Zamba do not forward them to the mixer)
PACKED_ARCHS = ("bamba", "granitemoehybrid", "zamba2", "nemotron_h", "falcon_h1", "qwen3_next",
                "kimi_linear")
# GraniteMoeHybrid's attention layer (not patched) does not keep the packed sequences apart
# here (sdpa, position_ids restarting): its logits differ from the separate runs (~0.1
# rel-RMS, measured, with the mixers matching), so only its mixers' outputs are compared
MIXERS_ONLY = {"granitemoehybrid"}
LENS = (4, 7)


def _packing_kwargs(form):
    cu = torch.tensor([0, LENS[0], sum(LENS)], dtype=torch.int32)
    if form == "cu_seq_lens_q":        # what DataCollatorWithFlattening emits
        return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENS),
                    max_length_k=max(LENS))
    return dict(seq_idx=torch.repeat_interleave(torch.arange(len(LENS), dtype=torch.int32),
                                                torch.tensor(LENS))[None])


def _packed_cases():
    out = []
    for arch in PACKED_ARCHS:
        for target in _targets():
            if target == "nki":
                continue
            for form in ("cu_seq_lens_q", "seq_idx"):
                slow = target != "reference" and (arch not in ("bamba", "kimi_linear")
                                                  or form == "seq_idx")
                out.append(pytest.param(arch, target, form,
                                        marks=[pytest.mark.slow] if slow else [],
                                        id=f"{arch}-{target}-{form}"))
    return out


def _separate(model, ids, **kw):
    """The unpatched model on each sequence alone (batch 1): logits and mixer outputs,
    concatenated along time."""
    cu = [0, LENS[0], sum(LENS)]
    parts = [mixer_outputs(model, ids[:, a:b], use_cache=False, **kw)
             for a, b in zip(cu[:-1], cu[1:])]
    logits = torch.cat([p[0] for p in parts], 1)
    mix = {n: torch.cat([p[1][n] for p in parts], 1) for n in parts[0][1]}
    return logits, mix


@pytest.mark.parametrize("arch,target,form", _packed_cases())
def test_packed_prefill_equals_the_sequences_run_separately(arch, target, form):
    """Two sequences packed into one row (batch 1; position_ids restart; the packing as
    cu_seq_lens_q or seq_idx) through the patched model == each sequence alone through the
    unpatched model. The conv and the scan both keep the sequences apart (unpatched, the same
    packed row mixes them: checked, so the comparison can fail)."""
    model = build(arch)
    ids = torch.randint(0, 64, (1, sum(LENS)), generator=torch.Generator().manual_seed(7))
    pos = torch.cat([torch.arange(n) for n in LENS])[None]
    kw = _packing_kwargs(form)
    with torch.no_grad():
        want, want_mix = _separate(model, ids)
        if form == "cu_seq_lens_q":      # the model's own code ignores it: sequences mix
            _, leak = mixer_outputs(model, ids, position_ids=pos, use_cache=False, **kw)
            assert max(rel_rms(leak[n], want_mix[n]) for n in leak) > 1e-2
    rep = _patch(model, target)
    try:
        with torch.no_grad():
            logits, mix = mixer_outputs(model, ids, position_ids=pos, use_cache=False, **kw)
    finally:
        st.unpatch(model)
    rec = ARCHS[arch][3]
    n = len(rep.patched) * CALLS_PER_MIXER.get(arch, 1)
    assert rep.calls[f"{rec}.scan.packed"] == n and rep.calls["conv.packed"] == n, \
        dict(rep.calls)
    assert not any(k.endswith("fallback") for k in rep.calls), dict(rep.calls)
    assert set(mix) == set(want_mix) and mix
    for name in mix:
        assert rel_rms(mix[name], want_mix[name]) <= TOL, name
    if arch not in MIXERS_ONLY:
        assert rel_rms(logits, want) <= TOL


@pytest.mark.parametrize("arch,target", [
    pytest.param(a, t, id=f"{a}-{t}", marks=[pytest.mark.slow] if t == "triton" else [])
    for a in ("bamba", "qwen3_next", "kimi_linear") for t in ("reference", "torch", "triton")])
def test_packed_training_step_gives_the_separate_sequences_gradients(arch, target):
    """Gradients of a fixed linear functional of the packed logits (patched: the varlen
    backward and the packed conv) == those of the same functional over the sequences run
    separately through the unpatched model."""
    if target not in _targets():
        pytest.skip(f"{target} unavailable")
    model = build(arch)
    ids = torch.randint(0, 64, (1, sum(LENS)), generator=torch.Generator().manual_seed(8))
    pos = torch.cat([torch.arange(n) for n in LENS])[None]
    w = torch.randn(1, sum(LENS), 64, generator=torch.Generator().manual_seed(9))

    def grads(packed):
        model.train()
        model.zero_grad(set_to_none=True)
        if packed:
            logits = model(ids, position_ids=pos, use_cache=False,
                           **_packing_kwargs("cu_seq_lens_q")).logits
        else:
            logits = torch.cat([model(ids[:, a:b], use_cache=False).logits
                                for a, b in ((0, LENS[0]), (LENS[0], sum(LENS)))], 1)
        (logits * w).sum().backward()
        return {n: p.grad.detach().clone() for n, p in model.named_parameters()
                if p.grad is not None}

    g0 = grads(False)
    rep = _patch(model, target)
    try:
        g1 = grads(True)
    finally:
        st.unpatch(model)
    assert rep.calls[f"{ARCHS[arch][3]}.scan.packed"] >= 1, dict(rep.calls)
    assert set(g1) == set(g0)
    assert any(n.endswith("A_log") for n in g0)
    # a gradient at rounding-noise level (Kimi's top-1-of-2 router: its gate.weight gradient
    # measured 3.9e-6 against a largest gradient norm of 542) is compared by size against
    # the largest gradient, not by relative error
    scale = max(g.norm().item() for g in g0.values())
    for n in g0:
        if g0[n].norm() < 1e-5 * scale:
            assert g1[n].norm() < 1e-4 * scale, (n, g1[n].norm().item(), scale)
            continue
        assert rel_rms(g1[n], g0[n]) <= TOL, (n, rel_rms(g1[n], g0[n]))


def test_seq_idx_becomes_cu_seqlens_only_when_it_is_a_contiguous_segment_id():
    T = 7
    assert st._seq_idx_to_cu(torch.tensor([[0, 0, 1, 1, 1, 2, 2]]), T).tolist() == [0, 2, 5, 7]
    assert st._seq_idx_to_cu(torch.tensor([[5, 5, 5, 5, 5, 5, 5]]), T).tolist() == [0, 7]
    assert st._seq_idx_to_cu(torch.tensor([[0, 0, 1, 1, 0, 0, 0]]), T) is None   # id 0 returns
    cu, ok = st._packing({"seq_idx": torch.tensor([[0, 0, 1, 1, 1, 2, 2]])}, T, 1)
    assert ok and cu.tolist() == [0, 2, 5, 7]
    assert st._packing({}, T, 3) == (None, True)
    assert st._packing({"seq_idx": torch.zeros(2, T, dtype=torch.int32)}, T, 2) == (None, False)
    assert st._packing({"cu_seq_lens_q": torch.tensor([0, 3, 6])}, T, 1) == (None, False)
    # cu_seq_lens_q and seq_idx that disagree
    assert st._packing({"cu_seq_lens_q": torch.tensor([0, 3, 7]),
                        "seq_idx": torch.tensor([[0, 0, 1, 1, 1, 2, 2]])}, T, 1) == (None, False)


def test_packing_scancc_cannot_take_runs_the_models_own_function():
    """A non-contiguous seq_idx: the model's own conv runs (counted as a fallback); without
    causal_conv1d it refuses packed sequences, as the unpatched model does."""
    model = build("bamba")
    ids = torch.randint(0, 64, (1, 6))
    seq_idx = torch.tensor([[0, 0, 1, 1, 0, 0]], dtype=torch.int32)
    rep = _patch(model, "reference")
    try:
        with pytest.raises(ValueError, match="packed sequences"), torch.no_grad():
            model(ids, use_cache=False, seq_idx=seq_idx)
    finally:
        st.unpatch(model)
    assert rep.calls["conv.fallback"] == 1 and not rep.calls["mamba2.scan.packed"]


@pytest.mark.parametrize("target", ["reference", "torch"])
def test_kda_decode_steps_the_cache_state_in_place(target):
    """recurrent_kimi_delta_attention at T = 1: the cache's float32 state tensor itself is
    stepped (same storage) and returned; output and state equal the model's torch function."""
    import transformers.models.kimi_linear.modeling_kimi_linear as km
    torch_fn = km.recurrent_kimi_delta_attention          # the fixture's torch path
    rep = st.PatchReport(target=target)
    cfg = st._Config(target, {}, rep)
    g = torch.Generator().manual_seed(2)
    B, H, K, V = 2, 3, 4, 5
    q, k = torch.randn(B, 1, H, K, generator=g), torch.randn(B, 1, H, K, generator=g)
    v = torch.randn(B, 1, H, V, generator=g)
    gk = torch.nn.functional.logsigmoid(torch.randn(B, 1, H, K, generator=g))
    beta = torch.rand(B, 1, H, generator=g)
    cache = torch.randn(B, H, K, V, generator=g)
    want_o, want_S = torch_fn(q, k, v, g=gk, beta=beta, initial_state=cache.clone(),
                              output_final_state=True, use_qk_l2norm_in_kernel=True)
    ptr = cache.data_ptr()
    o, S = st._kda_step(cfg, torch_fn, q, k, v, g=gk, beta=beta, initial_state=cache,
                        output_final_state=True, use_qk_l2norm_in_kernel=True)
    assert rep.calls["kda.step"] == 1 and not rep.calls["kda.step.fallback"]
    assert S is cache and cache.data_ptr() == ptr
    assert rel_rms(o, want_o) <= TOL and rel_rms(cache, want_S) <= TOL
