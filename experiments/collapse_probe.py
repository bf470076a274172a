"""Why the encoder head collapsed at lr 3e-4 (experiments/RESULTS.md, A1): SeqFT on SST-2 then IMDB with
all-MiniLM-L6-v2, 128 training records per label, at a constant 3e-4, with the temperature fixed, with 8
warm-up steps, or at a constant 1e-4.

Command (from the repository root, about 2 minutes per variant on 2 CPU cores)::

    .venv/bin/python experiments/collapse_probe.py const warmup fixedtemp lr1e-4
"""

import sys

from migu_jax.cl import runner

VARIANTS = {"const": {}, "warmup": dict(schedule="warmup_constant", warmup_steps=8),
            "fixedtemp": dict(learn_temperature=False), "lr1e-4": dict(learning_rate=1e-4)}


def main(variants):
  for variant in variants:
    cfg = runner.Config(model="minilm", order="sst-2,imdb", methods=("seqft",), seeds=(0,), train_per_class=128,
                        max_test=100, batch_size=16, learning_rate=3e-4, progress=False, magnitude_batches=0,
                        checkpoint_every=1000, output_dir=f"runs/collapse_probe/{variant}").replace(**VARIANTS[variant])
    run = runner.run_experiment(cfg, plots=False)["runs"][0]
    print(variant, "accuracy after each task (rows) on sst-2, imdb:",
          [[round(100 * x) for x in row] for row in run["matrix"]], "final losses:",
          [round(x, 3) for x in run["final_loss"]])


if __name__ == "__main__":
  main(sys.argv[1:] or list(VARIANTS))
