"""Duplicated documents: does LinUpper down-weight redundant, low-loss samples? (paper §3-4, Fig. 1)

Data. The embedded train split (`titan_rw/assets/corpus/train`), its documents cut into pieces of
at most `piece_chars` characters at line boundaries (so that a handful of long Wikipedia / Python
docs cannot dominate a random draw), optionally subsampled to `max_docs` pieces. A seeded random
`dup_fraction` of the pieces is repeated `copies` times in total; every document (originals and
copies) is then shuffled into a random order so that copies land in different rows, and written to
`<out>/seed<S>/data/train.parquet` (columns `text, id, domain, duplicate`; the copies' ids end in
`#cNN`). Validation: the embedded held-out split, untouched.

Training. One in-process loop per run, single process, built from the real pieces: the
`titan_rw.models` Llama flavor (TorchTitan's Llama3, document-causal SDPA on CPU), `TokenDataLoader`
over the derived parquet (packed rows of seq_len + 1 tokens), AdamW with linear warm-up and cosine
decay, gradient clipping. Within a seed every run starts from the same initial weights and sees the
same batches: a paired comparison at equal steps. The seed sets the subsample, the duplicated set,
the shuffles, the row order and the initial weights.

Granularity (what a "sample" of Algorithm 1 is).
- `row`: a packed row (it may hold pieces of several documents): `titan_rw.loss.per_sample_loss`
  and `reweighted_loss`, the b rows of a batch weighted together; prior 1/b.
- `document`: each document fragment inside a row (a run of `positions` restarting at 0):
  `titan_rw.loss.per_token_nll` reduced per fragment by `titan_rw.documents.document_losses`, all
  fragments of the batch weighted together by `document_weights` (prior pi_d = n_d / N, its token
  share); the loss is sum_d w_d f_d. Under `uniform`, w_d = pi_d: the token mean, which is the row
  mean for fully packed rows, so uniform runs once per seed (at the first granularity asked for) and
  is the reference of both; `check_uniform_document` also runs it at document granularity on the
  first seed and reports the difference.

Temperature. r (`temperature`), or the paper's warm-up (App. A.2: "We set r to 100 for a specific
number of warmup steps and then reduce it to 1"): `temp_warmup_steps` K > 0 uses
r = `warmup_temperature` (100) for steps 1..K, then r.

Reported per run, from each sample's weight relative to its uniform share, w / prior (b·w for rows,
w_d / pi_d for fragments; 1 under uniform), and its share q of tokens from duplicated documents
(per row from the loader's provenance; 0 or 1 per fragment, except a merged overflow fragment):
- weight of duplicated vs unique: token weighted, sum n q x / sum n q vs sum n (1-q) x /
  sum n (1-q) over all samples of all steps (for fragments: the weight mass duplicated tokens got
  over their token share), and the plain mean over "pure" samples (q = 1 vs q = 0); the same over
  the second half of training;
- the same for the per-sample training loss;
- validation loss (token mean NLL) on the held-out split, every `eval_every` steps and at the end.
Over seeds: mean ± sample std (ddof 1) of each, and the paired difference of the validation loss
against the same seed's uniform run (mean ± std of the differences, how many seeds are below).

Run:  python -m titan_rw.experiments.duplicates --out runs/duplicates   (or `titan-rw experiment
duplicates`). Writes `results.json` and `duplicates.png` (the first seed) into --out and prints
the tables.
The package, one module per job: `config` (DupConfig), `data` (the derived set, duplicate
shares), `training` (one run), `statistics`, `tables` (tables and the figure), `runs` (the run set),
`cli` (arguments, results.json; `__main__` runs it). This file imports nothing (like titan_rw.data's).
"""
