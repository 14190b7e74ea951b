"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2` (gloo, CPU): one optimizer
step of the real trainer on the Blobs set; each rank saves its parameters to OUT/rank<r>.pt."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import CONFIG, Blobs, blob_settings, blob_validator  # noqa: E402

from common.model import UNet  # noqa: E402
from common.training import distributed  # noqa: E402
from common.training.batches import TensorBatches  # noqa: E402
from common.training.trainer import Run, train  # noqa: E402

out = Path(sys.argv[1])
ranks, device = distributed.init("cpu")
data = Blobs(n=8)
shard = TensorBatches(
    *[(t * 255).round().byte() if t.shape[1] == 3 else t.byte() for t in data.tensors], 4, device, ranks
)
torch.manual_seed(0)
model = UNet(3, 3, 8)
settings = blob_settings(
    epochs=1, optimizer="sgd", momentum=0.0, lr=0.5, schedule="constant", batch_size=4, precision="fp32"
)  # compared at 1e-5 with an fp32 step in the test
train(Run(settings, out / "run", CONFIG, device, ranks), model, shard, blob_validator(data))
torch.save({k: v.detach() for k, v in model.state_dict().items()}, out / f"rank{ranks.rank}.pt")
