"""Train a tiny classifier with OTOTrainer; run by tests alone, under torchrun or accelerate launch.

    python tests/ddp_train.py OUT METHOD BATCH
    torchrun --nproc_per_node 2 tests/ddp_train.py OUT METHOD BATCH
    accelerate launch --multi_gpu --num_processes 2 tests/ddp_train.py OUT METHOD BATCH
"""

import json
import os
import sys

from torch.utils.data import SequentialSampler

sys.path.insert(0, os.path.dirname(__file__))
from trainer_utils import classification_data, classifier, zero_groups  # noqa: E402

from hf_oto import OTOTrainer, OTOTrainingArguments  # noqa: E402


class SequentialOTOTrainer(OTOTrainer):
    # The same example order on one process and across two makes the runs comparable.
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def main() -> None:
    out, method, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    args = OTOTrainingArguments(
        output_dir=out, oto_method=method, target_group_sparsity=0.4, max_steps=8,
        oto_pruning_start=2, oto_pruning_end=6, oto_pruning_periods=2, per_device_train_batch_size=batch,
        learning_rate=1e-3, logging_steps=4, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        oto_measure_latency=False, oto_check_compressed=False, dataloader_drop_last=True)
    trainer = SequentialOTOTrainer(model=classifier(), args=args, train_dataset=classification_data(n=64))
    trainer.train()
    model = trainer.accelerator.unwrap_model(trainer.model)
    zero = zero_groups(trainer)
    result = {
        "world_size": trainer.args.world_size,
        "zero_groups": zero.nonzero().flatten().tolist(),
        "params": {n: p.detach().double().sum().item() for n, p in model.named_parameters()},
        "compressed_params": sum(p.numel() for p in trainer.compressed_model.parameters()),
        "model_accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
    }
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(out, f"result-rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
