"""Print a checksum of the embedded default model's converted weights (float64 sums over every
tensor), so that a copy converted on another machine (the GPU box) can be checked against this one:
same GGUF + a different transformers version must still give the same dequantised weights."""
import sys

from flashback_ext.engine.models import default_model_path


def checksum(path) -> tuple[float, float, int]:
    from safetensors.torch import load_file

    tensors = [t for _, t in sorted(load_file(str(path / "model.safetensors")).items())]
    total = sum(float(t.double().sum()) for t in tensors)
    absolute = sum(float(t.double().abs().sum()) for t in tensors)
    return total, absolute, sum(t.numel() for t in tensors)


if __name__ == "__main__":
    total, absolute, count = checksum(default_model_path())
    line = f"{total:.6f} {absolute:.6f} {count}"
    print(line)
    if len(sys.argv) > 1 and not all(
            abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
            for a, b in zip(line.split(), sys.argv[1].split())):
        print(f"MISMATCH: expected {sys.argv[1]}", file=sys.stderr)
        sys.exit(1)
