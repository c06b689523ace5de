"""OTOTrainer with accelerate's FSDP2 (fsdp_version 2) on CPU; run by tests/test_fsdp_trainer.py alone:

    python tests/fsdp_trainer.py OUT METHOD BATCH               # one process, no sharding
    torchrun --nproc_per_node 2 tests/fsdp_trainer.py OUT METHOD BATCH   # FSDP2 on 2 ranks
    accelerate launch --use_fsdp --fsdp_version 2 ... tests/fsdp_trainer.py OUT METHOD BATCH  # FSDP2 from accelerate's config
    torchrun ... OUT METHOD BATCH save                   # ... with a checkpoint after 4 of 8 steps
    torchrun ... OUT METHOD BATCH CHECKPOINT             # resumes from that checkpoint

accelerate turns FSDP on only for accelerator devices (its state keeps MULTI_CPU otherwise, although
fully_shard runs on CPU/gloo); this script lets it through on CPU, which is all it changes.
"""

import hashlib
import json
import os
import sys

from torch.utils.data import SequentialSampler

sys.path.insert(0, os.path.dirname(__file__))
from trainer_utils import classification_data, classifier  # noqa: E402

from hf_oto import OTOTrainer, OTOTrainingArguments  # noqa: E402
from hf_oto.distributed import leave_process_group  # noqa: E402


def allow_fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = patched


class SequentialOTOTrainer(OTOTrainer):
    # The same example order on one process and across two makes the runs comparable.
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def main() -> None:
    out, method, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else None
    resume = mode if mode not in (None, "save") else None
    sharded = int(os.environ.get("WORLD_SIZE", "1")) > 1
    extra = {}
    if sharded:
        allow_fsdp_on_cpu()
    if sharded and os.environ.get("ACCELERATE_USE_FSDP") != "true":  # torchrun: the Trainer's arguments say FSDP2
        extra = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                             "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                             "transformer_layer_cls_to_wrap": ["BertLayer"],
                                             # each rank writes its own shards (DCP): no full copy
                                             "state_dict_type": "SHARDED_STATE_DICT"})
    args = OTOTrainingArguments(
        output_dir=out, oto_method=method, target_group_sparsity=0.4, max_steps=8,
        oto_pruning_start=2, oto_pruning_end=6, oto_pruning_periods=2, per_device_train_batch_size=batch,
        learning_rate=1e-3, logging_steps=4, report_to=[], save_strategy="steps" if mode else "no", save_steps=4,
        use_cpu=True, seed=0,
        oto_measure_latency=False, oto_check_compressed=False, dataloader_drop_last=True, **extra)
    trainer = SequentialOTOTrainer(model=classifier(), args=args, train_dataset=classification_data(n=64))
    trainer.train(resume_from_checkpoint=resume)
    folder = trainer.save_compressed()
    model = trainer.accelerator.unwrap_model(trainer.model)
    zero = trainer.oto_method.zero_groups(model, trainer.oto_groups)
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for n, p in model.named_parameters()}
    params = {n: t.double().sum().item() for n, t in full.items()}
    digest = hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in full.values())).hexdigest()
    rank = int(os.environ.get("RANK", 0))
    result = {
        "world_size": trainer.args.world_size, "fsdp": trainer.is_fsdp_enabled,
        "param_types": sorted({type(p).__name__ for p in model.parameters()}),
        "zero_groups": zero.nonzero().flatten().tolist(), "params": params, "digest": digest,
        "report_params_after": trainer.oto_report.params_after,
        "compressed_params": (sum(p.numel() for p in trainer.compressed_model.parameters())
                              if trainer.compressed_model is not None else None),
        "folder": folder,
    }
    with open(os.path.join(out, f"result-rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
    leave_process_group()  # everything is on disk; a gloo abort at exit says nothing about the test
