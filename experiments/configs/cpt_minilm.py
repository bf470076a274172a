"""Continual pre-training (the paper's Table 3 setting, at CPU scale): MiniLM's masked LM trained on four text
domains in turn, SeqFT vs MIGU vs the random mask, two seeds; held-out perplexity matrix, general-corpus
perplexity, then the DAS end-task protocol (a copy of the final model fine-tuned on each domain's labeled task:
accuracy and macro-F1).

Command (from the repository root; first build the offline domains from ../shared/data/CL_Benchmark)::

    python experiments/build_text_domains.py        # writes ~/.cache/migu_jax/text_domains (and PROVENANCE.md)
    migu-jax run --config experiments/configs/cpt_minilm.py               # the paper's fixed 1e-4 for every method
    migu-jax run --config experiments/configs/cpt_minilm.py:tuned         # each method's rate chosen on dev first

Scale: 256 training documents per domain packed into blocks of 128 tokens (6 to 41 optimizer steps of 16
blocks per domain: 6, 8, 17, 40 for seed 0), 64 held-out documents per domain, 300 BoolQ passages as the general corpus; end tasks
with 64 records per label and 200 test records, two epochs at 1e-4. all-MiniLM-L6-v2 has no MLM head: a fresh one is
initialised with its decoder tied to the word embedding (transformers' initialisation), so the initial row's
perplexities are high and the first domain mostly trains the head. The matrix holds perplexities (lower is
better); BWT and forgetting are perplexity increases.

Measured (experiments/RESULTS.md, A6; 2 seeds, 2026-12-02), with SST-2's end task re-run at 256 records per label
(at 64 it stays at chance in 9 of 12 runs): on the DAS end tasks MIGU is above SeqFT at both
rates (accuracy / macro-F1 74.0 / 72.0 against 72.8 / 71.1 at 1e-4, where the random mask matches MIGU;
73.1 / 71.5 against 69.6 / 66.7 at the dev-chosen 3e-4), and has the highest held-out perplexity of the
three at both. About 2 hours per variant on 2 CPU cores.
"""

from pathlib import Path

from migu_jax.cl.runner import Config

DOMAINS = Path("~/.cache/migu_jax/text_domains").expanduser()


def get_config() -> Config:
  return Config(
      model="minilm",              # all-MiniLM-L6-v2 (BERT), masked LM with a fresh tied MLM head
      objective="lm",
      data_dir=str(DOMAINS),
      order=("news/agnews", "encyclopedia/dbpedia", "reviews/products", "reviews/movies"),
      general=str(DOMAINS / "general" / "boolq"),
      end_tasks={"news/agnews": "TC/agnews-end", "encyclopedia/dbpedia": "TC/dbpedia-end",
                 "reviews/products": "SC/products-end", "reviews/movies": "SC/movies-end"},
      end_task_train_per_class=64,   # 16 per label and one epoch left SST-2 and Amazon at chance (2 and 5 steps)
      end_task_max_test=200,
      end_task_epochs=2,
      end_task_lr=1e-4,              # all-MiniLM-L6-v2's classifier learned at 1e-4 on SST-2 (RESULTS.md A2)
      methods=("seqft", "migu", "random"),
      seeds=(0, 1),
      ratio=0.7,
      train_per_class=256,         # with objective="lm": training documents per domain
      max_test=64,                 # held-out documents per domain (and of the general corpus)
      max_length=128,              # block size
      batch_size=16,
      learning_rate=1e-4,
      eval_batch_size=32,
      checkpoint_every=10,
      magnitude_batches=0,
      output_dir="runs/cpt_minilm",
  )


def get_configs() -> dict[str, Config]:
  """``tuned``: each method's rate chosen among 3e-5, 1e-4 and 3e-4 by the lowest final average perplexity
  on 48 dev documents per domain carved out of its training file (seed 0), then every method at its chosen
  rate only (``runs/cpt_minilm_tuned``; ``tuning.json`` says which was chosen); the runs at the paper's 1e-4
  are the plain config's."""
  return {"tuned": get_config().replace(tune_rates=(3e-5, 1e-4, 3e-4), dev_per_class=48, tune_keep_fixed=False,
                                        output_dir="runs/cpt_minilm_tuned")}
