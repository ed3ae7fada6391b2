"""SAP over several processes: each rank scores and accumulates its shard of the training set,
and every rank ends with the same trusted set, statistics, α and corrected weights.

    torchrun --nproc_per_node=2 examples/distributed_correct.py            # CPU: gloo
    torchrun --nproc_per_node=8 examples/distributed_correct.py            # one node, 8 GPUs: NCCL
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-endpoint=HOST:29500 examples/distributed_correct.py

On the embedded digits demo (25% symmetric label noise): rank 0 trains the noisy CNN and
broadcasts its weights (the model must be the same on every rank); then the usual API, called
on every rank with its own shard (process_group=None uses torch.distributed's default group).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os

import torch
import torch.distributed as dist

import sap_fast
from sap_fast.experiments import digits
from sap_fast.distributed import local_positions, shard
from sap_fast.experiments.metrics import trusted_set_quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100, help="training epochs of the noisy CNN")
    parser.add_argument("--trusted", type=int, default=300, help="trusted samples (over all ranks)")
    parser.add_argument("--candidates", type=int, default=None,
                        help="score only this many random samples (default: all)")
    parser.add_argument("--out", default=None, help="rank 0 saves the corrected state dict here")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:  # NCCL needs each rank on its own GPU before the first collective
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # a timeout, so that a rank that dies makes the others fail instead of waiting forever
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")

    # the same model everywhere: rank 0 trains, the others load its weights (splits and noise
    # are deterministic functions of the seed)
    box = [digits.make_noisy_model(args.seed, epochs=args.epochs)["model"].state_dict()] \
        if rank == 0 else [None]
    dist.broadcast_object_list(box, src=0)
    demo = digits.make_noisy_model(args.seed, epochs=args.epochs, weights=box[0])
    model = demo["model"].to(device)
    to = lambda t: t.to(device)  # noqa: E731

    ids = shard(len(demo["x_train"]))                 # this rank's block of the training set
    x, y = to(demo["x_train"][ids]), to(demo["y_train_noisy"][ids])
    trusted = sap_fast.select_trusted(model, (x, y), n=args.trusted, indices=ids,
                                      candidates=args.candidates)   # global ids, same on every rank
    mine = local_positions(trusted, ids)              # this rank's part of the trusted set
    val = shard(len(demo["x_val"]))
    result = sap_fast.sweep(model, x[mine.to(device)],
                            (to(demo["x_val"][val]), to(demo["y_val_noisy"][val])))

    state = result.model.state_dict()
    digest = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in state.values())).hexdigest()
    digests = [None] * world
    dist.all_gather_object(digests, digest)
    if rank == 0:
        test = (to(demo["x_test"]), to(demo["y_test"]))
        quality = trusted_set_quality(trusted, demo["corrupted_train"])
        print(f"{world} ranks, {len(demo['x_train'])} training samples, {args.trusted} trusted "
              f"({100 * quality['corrupted_fraction']:.1f}% of them mislabelled, "
              f"{100 * quality['base_corrupted_fraction']:.1f}% overall)")
        print(result.to_markdown())
        print(f"clean test accuracy: {100 * sap_fast.evaluate(model, test).accuracy:.2f}% -> "
              f"{100 * sap_fast.evaluate(result.model, test).accuracy:.2f}% (alpha {result.best_alpha})")
        print(f"identical corrected weights on all {world} ranks: {len(set(digests)) == 1}")
        if args.out:
            torch.save(state, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
