"""The capacity table of docs/benchmarks.md and docs/lora.md: ``cpo_jax.train.plan`` for Llama-3.2-1B, Llama-3.1-8B
and Qwen2.5-32B shapes (configs/shapes/), DPO/CPO at sequence length 2048 with 4 pairs per micro-batch, bf16 weights
and compute, scan + full remat, in four modes: full fine-tuning with a separate or a precomputed reference, LoRA r16
with the base as the reference, QLoRA NF4 r16. Run once per device count (CPU devices are simulated)::

    python tools/plan_table.py --devices 1
    python tools/plan_table.py --devices 8      # mesh fsdp=8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = ("llama-3.2-1b", "llama-3.1-8b", "qwen2.5-32b")
MODES = {
    "full + separate": {"loss": {"reference": "separate"}},
    "full + precomputed": {"loss": {"reference": "precomputed"}},
    "LoRA r16 + base": {"model": {"lora": {"rank": 16, "alpha": 32}}},
    "QLoRA nf4 r16 + base": {"model": {"lora": {"rank": 16, "alpha": 32}, "quantize": "nf4"}},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    sys.path.insert(0, str(REPO))
    import jax

    from cpo_jax.hf.pretrained import read_hf_config
    from cpo_jax.train import TrainConfig, from_dict
    from cpo_jax.train.plan import markdown, plan, plan_dict

    rows = []
    for shape in args.shapes.split(","):
        hf = read_hf_config(REPO / "configs" / "shapes" / shape)
        for mode, extra in MODES.items():
            base = {
                "model": {
                    "path": "x",
                    "dtype": "bfloat16",
                    "param_dtype": "bfloat16",
                    "scan_layers": True,
                    "remat": "full",
                    **extra.get("model", {}),
                },
                "data": {"train_files": ["x"], "max_length": args.length, "pairs_per_batch": args.pairs},
                "loss": {"name": "cpo", "hparams": {"beta": 0.1, "gamma": 0.5}, **extra.get("loss", {})},
                "mesh": {"data": 1, "fsdp": args.devices, "tensor": 1},
            }
            result = plan(from_dict(TrainConfig, base), hf, devices=jax.devices()[: args.devices])
            rows.append((shape, result))
            print(markdown([rows[-1]]).splitlines()[-1], flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps([{"shape": s, **plan_dict(p)} for s, p in rows], indent=2))


if __name__ == "__main__":
    main()
