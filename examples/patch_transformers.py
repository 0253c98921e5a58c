"""Patch a tiny random transformers Mamba2 model onto scancc kernels, side by side.

    python examples/patch_transformers.py [--target reference|torch|triton|nki]
                                          [--arch mamba2|mamba|kimi_linear]

Builds a tiny model from a config (no download), runs it on transformers' own torch path,
patches it with one call, and prints the logits of both and the greedy generations of both
(prefill through the scan, decode through ``kernel.step`` on the model's cache). Exits 1 if
they disagree (rel-RMS of the logits above 1e-4, or different tokens).
"""
from __future__ import annotations

import argparse
import sys
import warnings


def tiny_model(arch: str, seed: int = 0):
    import torch
    import transformers
    if arch == "kimi_linear":      # one KDA layer, one MLA attention layer
        cfg = transformers.KimiLinearConfig(
            hidden_size=16, num_hidden_layers=2, vocab_size=64, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=32, moe_intermediate_size=16,
            kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8, num_local_experts=2, num_experts_per_tok=1, linear_head_dim=8,
            linear_num_heads=2, layer_types=["linear_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = transformers.KimiLinearForCausalLM
    elif arch == "mamba":
        cfg = transformers.MambaConfig(hidden_size=16, state_size=4, intermediate_size=32,
                                       num_hidden_layers=2, vocab_size=64, time_step_rank=4)
        model = transformers.MambaForCausalLM
    else:
        cfg = transformers.Mamba2Config(hidden_size=16, state_size=4, expand=2, head_dim=8,
                                        num_heads=4, n_groups=2, num_hidden_layers=2,
                                        vocab_size=64, chunk_size=8)
        model = transformers.Mamba2ForCausalLM
    torch.manual_seed(seed)
    m = model(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():      # larger random weights than the init, so the SSM matters
        for name, p in m.named_parameters():
            if p.dim() >= 2 and not name.endswith(("A_log", "dt_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def _kda_torch_path(arch):
    """With fla installed, transformers routes Kimi-Linear's KDA to fla's Triton kernels
    (chunk_kda, fused_recurrent_kda), which need a GPU: without one, the model's own torch
    functions (the decorated functions' ``__wrapped__``) are put in place for this run.
    Returns the function that restores them."""
    import torch
    if arch != "kimi_linear" or torch.cuda.is_available():
        return lambda: None
    import transformers.models.kimi_linear.modeling_kimi_linear as km
    names = ("chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")
    saved = {n: getattr(km, n) for n in names}
    for n, fn in saved.items():
        setattr(km, n, getattr(fn, "__wrapped__", fn))
    return lambda: [setattr(km, n, fn) for n, fn in saved.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="reference")
    ap.add_argument("--arch", default="mamba2", choices=["mamba", "mamba2", "kimi_linear"])
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore", message=".*falling back.*")
    model = tiny_model(args.arch)
    restore = _kda_torch_path(args.arch)
    try:
        return _run(model, args)
    finally:
        restore()


def _run(model, args) -> int:
    import torch
    from scancc.integrations.transformers import patch, unpatch
    prompt = torch.tensor([[3, 14, 15, 9, 26]])
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
               pad_token_id=0)

    with torch.no_grad():
        want_logits = model(prompt).logits
    want_tokens = model.generate(prompt, **gen)

    report = patch(model, args.target)           # the one call
    print(report)
    try:
        with torch.no_grad():
            got_logits = model(prompt).logits
        got_tokens = model.generate(prompt, **gen)
    finally:
        unpatch(model)

    print(f"\nlogits at the last prompt position (first 6 of {want_logits.shape[-1]}):")
    print(f"  transformers torch path: {want_logits[0, -1, :6].tolist()}")
    print(f"  scancc ({args.target:>9}):     {got_logits[0, -1, :6].tolist()}")
    rel = ((got_logits - want_logits).norm() / want_logits.norm()).item()
    print(f"  rel-RMS over all logits: {rel:.2e}")
    n = prompt.shape[1]
    print(f"\ngreedy generation of {args.tokens} tokens:")
    print(f"  transformers torch path: {want_tokens[0, n:].tolist()}")
    print(f"  scancc ({args.target:>9}):     {got_tokens[0, n:].tolist()}")
    print(f"\nscancc calls: {dict(report.calls)}")
    same = got_tokens.tolist() == want_tokens.tolist()
    rec = report.patched[0][2] if report.patched else args.arch
    ok = rel <= 1e-4 and same and report.calls[f"{rec}.scan"] > 0
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
