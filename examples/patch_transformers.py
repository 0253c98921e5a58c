"""Patch a tiny random transformers Mamba2 model onto scancc kernels, side by side.

    python examples/patch_transformers.py [--target reference|torch|triton|nki] [--arch mamba]

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
    if arch == "mamba":
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
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="reference")
    ap.add_argument("--arch", default="mamba2", choices=["mamba", "mamba2"])
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args(argv)

    import torch
    from scancc.integrations.transformers import patch, unpatch

    warnings.filterwarnings("ignore", message=".*falling back.*")
    model = tiny_model(args.arch)
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
    ok = rel <= 1e-4 and same and report.calls[f"{args.arch}.scan"] > 0
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
