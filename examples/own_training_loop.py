"""JEST in your own open_clip training loop, without ``jestclip train``.

jestclip's selection and reference cache are a library: this script is an ordinary hand-written SigLIP
loop (open_clip model, ``SigLipLoss``, AdamW) that uses them on its super-batches.

1. Cache a frozen reference model's embeddings next to the shards, once (``*.example-reference.*``
   sidecars; shards whose sidecar already holds this model are skipped).
2. Each step: draw a super-batch of B = round(b / (1 - f)) pairs, embed it with the learner (no grad,
   eval mode), look up the cached reference embeddings by sample key, jointly select b pairs by
   learnability (``joint_select``) and take a normal optimiser step on those b.
3. Every ``--log-every`` steps print the loss and the learnability (``batch_score``) of the chosen
   sub-batch next to that of the first b of the super-batch (what iid training would learn on).

Run it on the benchmark's pool (``jestclip data`` builds ``data/bench``):

    python examples/own_training_loop.py data/bench/pool --steps 20

The first run embeds every shard once (about 3 s a shard for ``jest-micro`` on a CPU); later runs reuse it.

The default reference is a randomly initialised ``jest-micro`` with a fixed seed, so that the script
runs anywhere with no download; for real selection pass a trained one with ``--reference-checkpoint``.
"""

from __future__ import annotations

import argparse

import torch
from open_clip.loss import SigLipLoss

from jestclip.data import SuperBatchStream
from jestclip.data.refcache import ReferenceCache
from jestclip.models import (
    create_model,
    image_transform,
    model_fingerprint,
    tokenizer,
)
from jestclip.selection import Embeddings, batch_score, joint_select
from jestclip.train.reference import cache_model_embeddings
from jestclip.train.trained import load_trained

CACHE = "example-reference"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("shards", help="a directory of .tar shards (or a brace pattern)")
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--batch-size", type=int, default=32, help="b: examples learned on per step")
parser.add_argument("--filter-ratio", type=float, default=0.5, help="f: share of the super-batch dropped")
parser.add_argument("--model", default="jest-micro", help="open_clip config (jestclip ships jest-*)")
parser.add_argument(
    "--reference-checkpoint",
    help="the reference model: a jestclip run directory or a weights file of --model, either loss "
    "(default: a random one)",
)
parser.add_argument("--log-every", type=int, default=5)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()
b, device = args.batch_size, args.device
B = round(b / (1 - args.filter_ratio))  # super-batch size
transform, tokenize = image_transform(args.model), tokenizer(args.model)

# 1. Reference embeddings, cached next to the shards (resumable: up-to-date sidecars are kept).
torch.manual_seed(0)
if args.reference_checkpoint:  # a run's own config (model, loss), or the loss the weights were trained with
    reference_model = load_trained(args.reference_checkpoint, model=args.model).model
else:
    reference_model = create_model(args.model, loss="sigmoid")
fingerprint = model_fingerprint(reference_model)
cache_model_embeddings(reference_model, args.model, args.shards, name=CACHE, device=device)
del reference_model  # from here on only its cached embeddings are used
cache = ReferenceCache(args.shards, name=CACHE, fingerprint=fingerprint)

# 2. The learner and your own training loop.
torch.manual_seed(1)
model = create_model(args.model, loss="sigmoid").to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
siglip = SigLipLoss()
generator = torch.Generator(device).manual_seed(0)
stream = SuperBatchStream(args.shards, batch_size=B, transform=transform, resampled=True, seed=0)

for step, batch in enumerate(stream, start=1):
    images, tokens = batch.images.to(device), tokenize(batch.texts).to(device)

    # Score the super-batch: the learner's embeddings (no grad, eval mode) against the cached reference's.
    model.eval()
    with torch.no_grad():
        image, text, logit_scale, logit_bias = model(images, tokens)  # L2-normalised, exp(scale), bias
    model.train()
    learner = Embeddings(image, text, logit_scale, logit_bias)
    reference = cache.lookup(batch.keys, batch.urls, digests=batch.digests, device=device)  # by shard and key
    chosen = joint_select(
        learner,
        reference,
        size=b,
        n_chunks=min(16, b),
        scoring="learnability",
        loss="sigmoid",
        generator=generator,
    )

    # Your own step, on the b chosen pairs only.
    loss = siglip(*model(images[chosen], tokens[chosen]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

    if step % args.log_every == 0 or step == args.steps:
        picked = batch_score(learner, reference, chosen)
        first = batch_score(learner, reference, torch.arange(b, device=device))
        print(f"step {step:4d}  loss {loss:.4f}  learnability chosen {picked:+.4f}, first b {first:+.4f}")
    if step == args.steps:
        break
