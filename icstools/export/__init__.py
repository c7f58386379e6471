"""Export a run to other tools: TensorBoard event files (:mod:`.tensorboard`).

For live export during training (W&B, MLflow, anything) use ``Recorder(on_record=...)``,
which hands each closed record to your code as a one-step dataset.
"""

from icstools.export.tensorboard import TensorBoardExport, export_tensorboard

__all__ = ["TensorBoardExport", "export_tensorboard"]
