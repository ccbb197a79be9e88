"""One Trainer subclass: evaluation runs the task :class:`~flare.evaluation.Evaluator` (argmax, QA spans or
greedy generation) instead of the HF prediction loop, so validation metrics equal test metrics in definition."""

from __future__ import annotations

from transformers import Trainer

from flare.evaluation import Evaluator


class FlareTrainer(Trainer):
    def __init__(self, *args, evaluator: Evaluator, **kwargs):
        super().__init__(*args, **kwargs)
        self.evaluator = evaluator

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        predictions = self.evaluator.predict(self.model)
        metrics = {f"{metric_key_prefix}_{k}": float(v) for k, v in self.evaluator.score(predictions).items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
