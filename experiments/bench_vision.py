"""Vision tower speed: our jitted `VisionEncoder` against HF's `Llama4VisionModel`, CPU, fp32.

    python -m experiments.bench_vision [--tiles 4] [--layers 8] [--width 256] [--repeats 5]

Same random weights on both sides (HF model -> save_pretrained -> checkpoints.load): 336-pixel
tiles of 14-pixel patches (577 tokens per tile, as the real tower), a narrower and shallower
encoder (default width 256, 8 heads, 8 layers). Prints the median wall time of each, the ratio
and the largest output difference. HF runs eager attention (its default for this model on CPU
would be SDPA; pass --sdpa to time that instead).
"""
from __future__ import annotations

from experiments import cli


def bench_models(width: int, layers: int, sdpa: bool):
    from experiments.hf_reference import hf_multimodal_model, params_from_hf
    vision = dict(image_size=336, patch_size=14, hidden_size=width, num_hidden_layers=layers,
                  num_attention_heads=width // 32, intermediate_size=4 * width,
                  vision_output_dim=512, projector_input_dim=512, projector_output_dim=512)
    text = dict(vocab_size=256, hidden_size=64, intermediate_size=64, intermediate_size_mlp=128,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                num_local_experts=2)
    hf = hf_multimodal_model(vision, text, seed=0, image_token_index=5)
    if sdpa:
        hf.vision_model.config._attn_implementation = "sdpa"
    return hf, *params_from_hf(hf)


def main():
    ap = cli.parser(__spec__.name, __doc__)
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sdpa", action="store_true", help="HF with SDPA attention instead of eager")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    import jax
    import numpy as np
    import torch

    from experiments.timing import timed
    from model.vision import VisionEncoder
    if args.threads:
        torch.set_num_threads(args.threads)

    hf, cfg, params = bench_models(args.width, args.layers, args.sdpa)
    pixels = np.random.default_rng(0).normal(size=(args.tiles, 336, 336, 3)).astype(np.float32)
    pixels_t = torch.tensor(pixels).permute(0, 3, 1, 2).contiguous()
    encode = jax.jit(lambda p, x: VisionEncoder(cfg).apply({"params": p}, x))

    def ours():
        return jax.block_until_ready(encode(params["vision"], pixels))

    def theirs():
        with torch.no_grad():
            return hf.vision_model(pixels_t).last_hidden_state

    t_ours, t_hf = timed(ours, theirs, repeats=args.repeats)
    diff = float(np.abs(np.asarray(ours()) - theirs().numpy()).max())
    v = cfg.vision
    print(f"vision tower: {args.tiles} tiles x {(v.image_size // v.patch_size) ** 2 + 1} tokens, "
          f"width {v.hidden_size}, {v.num_heads} heads, {v.num_layers} layers, fp32, "
          f"jax {jax.default_backend()}, torch {torch.get_num_threads()} threads, "
          f"HF attention {'sdpa' if args.sdpa else 'eager'}")
    print(f"ours (jit) {t_ours * 1e3:8.1f} ms")
    print(f"HF         {t_hf * 1e3:8.1f} ms")
    print(f"HF / ours  {t_hf / t_ours:8.2f}x    max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
